"""Wall-clock ASGD-GA vs FedAvg on a real federation over geo4-shaped links, beside the simulator's prediction.

Each strategy runs twice on the same data split and settings:

- deployed: `cloudless-fl launch` machinery — a real SuperLink, one SuperNode per
  geo4 region behind its WAN-emulating proxy (the topology's bandwidth, seeded
  fluctuation and latency), the wall clock;
- simulated: the same ServerApp, strategy and ClientApp in-process under the
  virtual clock, i.e. the simulator's prediction for that setting.

Both use one topology file: geo4 with every link's bandwidth times
`--bandwidth-scale` (1 = geo4 as it is; below 1 a slower WAN, to see the
WAN-bound regime on a machine where each job's own start-up takes seconds).

It prints time-to-target for both, their ratio (FedAvg / ASGD-GA) and the gap
between measured and predicted. The model has no per-job start-up by default,
while in deployment every Flower message starts a ClientApp process: the
script measures that start-up from FedAvg's rounds (deployed minus modelled
time per round), sets it as every region's `job_start_s`, and simulates both
strategies again — a prediction of ASGD-GA calibrated on FedAvg only. On one machine every region computes on the
same cores, so the deployment's heterogeneity is the links' (and the data
sizes'); the simulator also models each region's compute speed.

    .venv/bin/python experiments/bench_deployment.py [--target 0.9] [--bandwidth-scale 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from cloudless_fl.config import compose
from cloudless_fl.deployment.launch import launch, sigterm_as_interrupt
from cloudless_fl.run import run

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = "geo4"


def scaled_geo4(scale: float, folder: Path, job_start_s: float = 0.0) -> Path:
    """geo4 with every link's bandwidth times `scale` (and a job start-up per region), as a topology file."""
    raw = OmegaConf.to_container(compose([f"topology={TOPOLOGY}"]).topology)
    raw["name"] = f"{TOPOLOGY}-bw{scale:g}" + (f"-start{job_start_s:.1f}s" if job_start_s else "")
    for region in raw["regions"].values():
        region["link"]["up_mbps"] *= scale
        region["link"]["down_mbps"] *= scale
        region["job_start_s"] = job_start_s
    path = folder / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path.resolve()


def deployed(strategy: str, rounds: int, overrides: list[str], topology: Path, run_dir: Path) -> dict:
    """The run's results; a folder that already holds them (an earlier invocation) is not run again."""
    done = list(run_dir.glob("*/results.json"))
    if done:
        return json.loads(done[0].read_text())
    if run_dir.exists():
        raise SystemExit(f"{run_dir} holds an unfinished run: remove it to run again")
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    try:
        code = launch(str(topology), strategy, rounds, run_dir, overrides=overrides, app_dir=ROOT, stream_to=log)
    finally:
        log.close()
    if code != 0:
        raise SystemExit(f"the deployed {strategy} run failed (exit code {code}); see {run_dir.with_suffix('.log')}")
    [results] = run_dir.glob("*/results.json")
    return json.loads(results.read_text())


def simulated(strategy: str, rounds: int, overrides: list[str], topology: Path, data_dir: Path,
              run_dir: Path) -> dict:
    cfg = compose([f"strategy={strategy}", f"topology_file={topology}", f"strategy.num_rounds={rounds}", "dataset=npz",
                   f"dataset.root={data_dir}", "engine=inprocess", "clock=virtual", "progress=false", *overrides])
    return run(cfg, run_dir)


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f} s"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "—"


def describe(label: str, results: dict, target: float) -> None:
    summary, last = results["summary"], results["history"][-1]
    print(f"{label}: {_seconds(summary['time_to_target_s'])} to {target:.0%}; ran {last['version']} versions/rounds "
          f"in {last['time_s']:.0f} s, best {summary['best_accuracy']:.3f}, final {summary['final_accuracy']:.3f}; "
          f"staleness of applied updates {summary['staleness_histogram'] or '—'}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.90, help="accuracy to reach (default 0.90)")
    parser.add_argument("--bandwidth-scale", type=float, default=1.0,
                        help="every geo4 link's bandwidth times this (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fedavg-rounds", type=int, default=20, help="FedAvg's rounds (default 20)")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="seconds (wall clock deployed, modelled simulated) after which ASGD-GA stops (default 600)")
    parser.add_argument("--asgd-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for the ASGD-GA runs only (repeatable), e.g. strategy.balance=false")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/bench-deployment/bw<scale>")
    args = parser.parse_args()
    args.out = args.out or Path(f"outputs/bench-deployment/bw{args.bandwidth_scale:g}")
    args.out.mkdir(parents=True, exist_ok=True)
    topology = scaled_geo4(args.bandwidth_scale, args.out)
    common = [f"target_accuracy={args.target}", f"seed={args.seed}"]
    runs = {"fedavg": (args.fedavg_rounds, [*common, "strategy.eval_every=1"]),
            # ASGD-GA stops at the target or when the budget is spent
            "asgd_ga_delta": (300, [*common, "strategy.eval_every=4", "strategy.stop.at_target=true",
                                    f"strategy.stop.max_time_s={args.budget_s}", *args.asgd_set])}
    results: dict[str, dict[str, dict]] = {}
    for strategy, (rounds, overrides) in runs.items():
        run_dir = (args.out / f"{strategy}-deployed").resolve()
        with sigterm_as_interrupt():
            results[strategy] = {"deployed": deployed(strategy, rounds, overrides, topology, run_dir)}
        results[strategy]["simulated"] = simulated(strategy, rounds, overrides, topology, run_dir / "data",
                                                   (args.out / f"{strategy}-simulated").resolve())
    # What the model leaves out here: each job's start-up. FedAvg's rounds (one job per region, in parallel)
    # measure it: the deployed minus the modelled time per round. The model with it then predicts ASGD-GA.
    fedavg = results["fedavg"]
    job_start_s = max(0.0, (fedavg["deployed"]["history"][-1]["time_s"] - fedavg["simulated"]["history"][-1]["time_s"])
                      / fedavg["deployed"]["history"][-1]["version"])
    calibrated = scaled_geo4(args.bandwidth_scale, args.out, job_start_s)
    for strategy, (rounds, overrides) in runs.items():
        results[strategy]["simulated + start-up"] = simulated(
            strategy, rounds, overrides, calibrated, (args.out / f"{strategy}-deployed" / "data").resolve(),
            (args.out / f"{strategy}-simulated-start").resolve())
        for label, result in results[strategy].items():
            describe(f"{strategy} {label}", result, args.target)
    columns = ["deployed", "simulated", "simulated + start-up"]
    print(f"\nTime to {args.target:.0%} on {topology.stem}, seed {args.seed}, ASGD-GA {args.asgd_set or 'as configured'}; "
          f"job start-up measured from FedAvg's rounds: {job_start_s:.1f} s")
    print("| strategy | deployed (wall clock) | simulated (predicted) | simulated + measured start-up |")
    print("|---|---|---|---|")
    t = {s: [results[s][c]["summary"]["time_to_target_s"] for c in columns] for s in runs}
    for strategy, times in t.items():
        print(f"| {strategy} | " + " | ".join(_seconds(v) for v in times) + " |")
    print("| FedAvg / ASGD-GA | " + " | ".join(_ratio(f, a) for f, a in zip(t["fedavg"], t["asgd_ga_delta"])) + " |")
    print("| deployed / predicted | — | " + " / ".join(_ratio(t[s][0], t[s][1]) for s in runs) + " | "
          + " / ".join(_ratio(t[s][0], t[s][2]) for s in runs) + " |")


if __name__ == "__main__":
    main()
