"""Wall-clock FedAvg, MA and ASGD-GA on a real local federation shaped like a topology, beside the simulator's prediction.

Each run goes twice on the same data split and settings:

- deployed: `cloudless-fl launch` machinery — a real SuperLink, one SuperNode per
  region of `--topology` (default geo4) behind its WAN-emulating proxy (the topology's bandwidth, seeded
  fluctuation and latency), each region's compute paced to its profile
  (training/pacing.py), the wall clock;
- predicted: the same ServerApp, strategy and ClientApp in-process under the
  virtual clock, with each region's per-job fixed time (`job_start_s`) set to what
  the deployed run itself measured (`summary.job_overhead_s`: dispatch to reply
  minus compute and the modelled download; plus `summary.reply_relay_s`: the
  reply's way back beyond the modelled upload; both smoothed) and its speed to the
  measured one where that is slower than its profile (`summary.speed_per_worker`)
  — no hand calibration.

It prints, per run, time and cost to the target deployed and predicted, the
ratios against FedAvg, and where each job's time went (waiting for the node,
process start and imports, data load, compute, transfers), and writes
`<out>/summary.json`. Every region has a warm trainer (clients/warm_trainer.py), as
`cloudless-fl launch` gives it; the `*_cold` runs go without (every message's
ClientApp process imports PyTorch and computes the job). `--bandwidth-scale` multiplies every link's bandwidth
(1 = the topology as it is); `--time-scale` makes links and paced compute that many
times faster (as `cloudless-fl launch --time-scale`); `--dataset tabular` trains on the off-benchmark study's
generated tabular task instead of the digits (as `cloudless-fl launch --data`).

    .venv/bin/python experiments/bench_deployment.py [--target 0.9] [--runs fedavg ma asgd_ga_delta ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from cloudless_fl.atomic import atomic_write_text
from cloudless_fl.config import compose
from cloudless_fl.control.topology import load_topology
from cloudless_fl.deployment.launch import launch, prepare_split, sigterm_as_interrupt
from cloudless_fl.run import run

ROOT = Path(__file__).resolve().parents[1]
# run name → (strategy, its rounds/periods/versions at most, Hydra overrides); every run stops at the target
RUNS = {
    "fedavg": ("fedavg", 60, ["strategy.eval_every=1", "strategy.stop.at_target=true"]),
    "ma": ("ma", 60, ["strategy.eval_every=1", "strategy.stop.at_target=true"]),
    # re-planned after every period from what the last one measured (speeds, overheads), local work raised
    # (at most max_steps_factor-fold) until the measured overhead is at most a fifth of a period
    "ma_elastic": ("ma", 40, ["strategy.eval_every=1", "strategy.stop.at_target=true", "scheduler=elastic",
                              "scheduler.replan_every=1"]),
    # ... without raising local work against the overhead
    "ma_elastic_no_amortise": ("ma", 40, ["strategy.eval_every=1", "strategy.stop.at_target=true",
                                          "scheduler=elastic", "scheduler.replan_every=1",
                                          "scheduler.max_overhead_share=null"]),
    "asgd_ga_delta": ("asgd_ga_delta", 4000, ["strategy.eval_every=4", "strategy.stop.at_target=true"]),
    # the scheduler's G_r from measured speeds and overheads (every 5 versions), raised against the overhead
    "asgd_ga_delta_elastic": ("asgd_ga_delta", 4000, ["strategy.eval_every=4", "strategy.stop.at_target=true",
                                                     "scheduler=elastic"]),
    "asgd_ga": ("asgd_ga", 6000, ["strategy.eval_every=8", "strategy.stop.at_target=true"]),
}
# runs without a warm trainer per region: every message's ClientApp process imports PyTorch itself
COLD = {f"{name}_cold": name for name in ("fedavg", "ma", "asgd_ga_delta")}
RUNS.update({cold: RUNS[warm] for cold, warm in COLD.items()})


def topology_file(folder: Path, topology: str, scale: float, max_workers: int | None, measured: dict | None = None,
                  tag: str = "") -> Path:
    """`topology` (a name in conf/topology) with every link's bandwidth times `scale`, at most `max_workers` workers per region (None: geo4's)
    and, given a deployed run's `summary`, what it measured.

    Each region's per-job fixed time (`job_start_s`) becomes its measured overhead plus its reply relay
    (both are per job, neither is compute nor modelled transfer), and its speed the measured one where it
    computed slower than its profile (a local federation's regions share this machine's cores).
    """
    raw = OmegaConf.to_container(compose([f"topology={topology}"]).topology)
    raw["name"] = f"{topology}-bw{scale:g}{tag}"
    for name, region in raw["regions"].items():
        if max_workers is not None:
            region["workers"]["max"] = max(region["workers"]["min"], min(region["workers"]["max"], max_workers))
        region["link"]["up_mbps"] *= scale
        region["link"]["down_mbps"] *= scale
        if measured:
            region["job_start_s"] = float(measured["job_overhead_s"].get(name, 0.0)
                                          + measured.get("reply_relay_s", {}).get(name, 0.0))
            # one worker's speed; a region whose jobs all ran on more (the elastic runs' in-region groups) keeps
            # its profile: its groups' measured speed is not given to the simulator
            speed = measured.get("speed_per_worker", {}).get(name, {}).get("1")
            if speed is not None:
                region["samples_per_s"] = min(region["samples_per_s"], speed / region["efficiency"])
    path = folder / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # the topology's region order: the split follows it
    return path.resolve()


def deployed(strategy: str, rounds: int, overrides: list[str], topology: Path, data: Path, run_dir: Path,
             time_scale: float, warm: bool) -> dict:
    """The run's results; a folder that already holds them (an earlier invocation) is not run again."""
    done = list(run_dir.glob("*/results.json"))
    if done:
        return json.loads(done[0].read_text())
    if run_dir.exists():
        raise SystemExit(f"{run_dir} holds an unfinished run: remove it to run again")
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    try:
        # insecure: the README's figures were measured so (before launch secured runs by default)
        code = launch(str(topology), strategy, rounds, run_dir, overrides=overrides, app_dir=ROOT, stream_to=log,
                      time_scale=time_scale, security="insecure", warm=warm, data=data)
    finally:
        log.close()
    if code != 0:
        raise SystemExit(f"the deployed {strategy} run failed (exit code {code}); see {run_dir.with_suffix('.log')}")
    [results] = run_dir.glob("*/results.json")
    return json.loads(results.read_text())


def predicted(strategy: str, rounds: int, overrides: list[str], topology: Path, data_dir: Path,
              run_dir: Path) -> dict:
    cfg = compose([f"strategy={strategy}", f"topology_file={topology}", f"strategy.num_rounds={rounds}", "dataset=npz",
                   f"dataset.root={data_dir}", "engine=inprocess", "clock=virtual", "progress=false", *overrides])
    return run(cfg, run_dir)


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f} s"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "—"


def _usd(value: dict | None) -> str:
    return "—" if value is None else f"${value['instance']:.4f}"


def breakdown(results: dict) -> dict[str, dict[str, float]]:
    """Per region, where one job's time went (seconds, smoothed over the run's jobs)."""
    summary, costs = results["summary"], results.get("regions") or {}
    out = {}
    for region, overhead in summary["job_overhead_s"].items():
        parts = summary["job_overhead_parts"].get(region, {})
        start, load = parts.get("process_start_s", 0.0), parts.get("data_load_s", 0.0)
        account = costs.get(region, {})
        jobs = max(1, account.get("jobs", 0))
        out[region] = {"waiting_for_node_s": max(0.0, overhead - start - load), "process_start_s": start,
                       "data_load_s": load, "compute_s": account.get("busy_s", 0.0) / jobs - overhead,
                       "transfer_s": account.get("transfer_s", 0.0) / jobs}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.90, help="accuracy to reach (default 0.90)")
    parser.add_argument("--runs", nargs="+", default=["fedavg", "ma", "asgd_ga_delta"], choices=sorted(RUNS),
                        help="which runs (default: fedavg ma asgd_ga_delta); fedavg is always run, as the reference")
    parser.add_argument("--topology", default="geo4", help="a topology of conf/topology (default geo4)")
    parser.add_argument("--bandwidth-scale", type=float, default=1.0, help="every link's bandwidth times this")
    parser.add_argument("--time-scale", type=float, default=1.0, help="links and paced compute this many times faster")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dataset", default="digits", choices=["digits", "tabular"],
                        help="what the regions train on, split over the topology as the simulator's studies split it "
                             "(Dirichlet 0.5; default digits, the README's figures; tabular: the off-benchmark "
                             "study's)")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="wall-clock seconds after which a run that has not reached the target stops (default 600)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for every run but FedAvg (repeatable)")
    parser.add_argument("--compression", default="none",
                        help="WAN codec of every run (the README's figures: none)")
    parser.add_argument("--max-workers", type=int, default=1,
                        help="in-region workers a region may rent at most (default 1: on a small machine a region's "
                             "extra workers are processes on the same cores and cannot keep its profile's pace); "
                             "0: the topology's own bounds")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/bench-deployment/<topology>-bw<scale>")
    args = parser.parse_args()
    args.out = (args.out or Path(f"outputs/bench-deployment/{args.topology}-bw{args.bandwidth_scale:g}")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    names = ["fedavg", *[n for n in args.runs if n != "fedavg"]]
    max_workers = args.max_workers or None
    topology = topology_file(args.out, args.topology, args.bandwidth_scale, max_workers)
    data = args.out / f"data-{args.dataset}"  # one split for every run, deployed and predicted
    prepare_split(load_topology(topology), data, source=args.dataset)
    common = [f"target_accuracy={args.target}", f"seed={args.seed}", f"compression={args.compression}"]
    table: dict[str, dict] = {}
    for name in names:
        strategy, rounds, overrides = RUNS[name]
        overrides = [*common, *overrides, *([] if COLD.get(name, name) == "fedavg" else
                                           [f"strategy.stop.max_time_s={args.budget_s}", *args.set])]
        run_dir = args.out / f"{name}-deployed"
        with sigterm_as_interrupt():
            real = deployed(strategy, rounds, overrides, topology, data, run_dir, args.time_scale,
                            warm=name not in COLD)
        measured = topology_file(args.out, args.topology, args.bandwidth_scale, max_workers, real["summary"],
                                 tag=f"-{name}")
        model = predicted(strategy, rounds, overrides, measured, data, args.out / f"{name}-predicted")
        table[name] = {"deployed": real, "predicted": model}
        for label, result in table[name].items():
            s, last = result["summary"], result["history"][-1]
            print(f"{name} {label}: {_seconds(s['time_to_target_s'])} to {args.target:.0%}; {last['version']} "
                  f"versions/rounds in {last['time_s']:.0f} s, best {s['best_accuracy']:.3f}, "
                  f"final {s['final_accuracy']:.3f}, staleness {s['staleness_histogram'] or '—'}", flush=True)

    t = {n: {k: r["summary"]["time_to_target_s"] for k, r in v.items()} for n, v in table.items()}
    print(f"\nTo {args.target:.0%}, {args.dataset} on {topology.stem} (compute paced, links shaped, time scale "
          f"{args.time_scale:g}), seed {args.seed}; predicted = the simulator given the run's own measurements "
          "(per-job overhead and reply relay, speed where slower than the profile)")
    print("| run | deployed (wall clock) | predicted | deployed / predicted | FedAvg / run deployed | "
          "FedAvg / run predicted | deployed $ to target (instance) |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        d, p = t[name]["deployed"], t[name]["predicted"]
        cost = table[name]["deployed"]["summary"]["cost_to_target_usd"]
        print(f"| {name} | {_seconds(d)} | {_seconds(p)} | {_ratio(d, p)} | {_ratio(t['fedavg']['deployed'], d)} | "
              f"{_ratio(t['fedavg']['predicted'], p)} | {_usd(cost)} |")
    print("\nWhere a job's time went (seconds per job, deployed; waiting = overhead the region did not see: "
          "the SuperNode's pull loop, SuperExec, FAB)")
    print("| run | region | waiting for node | process start + imports | data load | compute | transfers |")
    print("|---|---|---|---|---|---|---|")
    parts = {}
    for name in names:
        parts[name] = breakdown(table[name]["deployed"])
        for region, p in parts[name].items():
            print(f"| {name} | {region} | " + " | ".join(f"{v:.2f}" for v in p.values()) + " |")
    summary = {name: {"deployed_time_to_target_s": t[name]["deployed"], "predicted_time_to_target_s":
                      t[name]["predicted"],
                      "deployed_cost_to_target_usd": (table[name]["deployed"]["summary"]["cost_to_target_usd"]
                                                      or {}).get("instance"),
                      "job_breakdown_s": parts[name]} for name in names}
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"\n{args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
