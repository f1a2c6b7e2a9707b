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
between measured and predicted. On one machine every region computes on the
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
from cloudless_fl.launch import launch, sigterm_as_interrupt
from cloudless_fl.run import run

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = "geo4"
STRATEGIES = {  # what each runs; ASGD-GA stops at the target or the time budget, FedAvg's rounds are bounded
    "fedavg": (20, ["strategy.eval_every=1"]),
    "asgd_ga_delta": (300, ["strategy.eval_every=4", "strategy.stop.at_target=true"]),
}


def scaled_geo4(scale: float, folder: Path) -> Path:
    """geo4 with every link's bandwidth times `scale`, as a topology file both runs use."""
    raw = OmegaConf.to_container(compose([f"topology={TOPOLOGY}"]).topology)
    raw["name"] = f"{TOPOLOGY}-bw{scale:g}"
    for region in raw["regions"].values():
        region["link"]["up_mbps"] *= scale
        region["link"]["down_mbps"] *= scale
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.90, help="accuracy to reach (default 0.90)")
    parser.add_argument("--bandwidth-scale", type=float, default=1.0,
                        help="every geo4 link's bandwidth times this (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="seconds (wall clock deployed, modelled simulated) after which ASGD-GA stops (default 600)")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/bench-deployment/bw<scale>")
    args = parser.parse_args()
    args.out = args.out or Path(f"outputs/bench-deployment/bw{args.bandwidth_scale:g}")
    args.out.mkdir(parents=True, exist_ok=True)
    topology = scaled_geo4(args.bandwidth_scale, args.out)
    figures = {}
    for strategy, (rounds, extra) in STRATEGIES.items():
        overrides = [f"target_accuracy={args.target}", f"seed={args.seed}", *extra]
        if "stop.at_target=true" in " ".join(extra):
            overrides.append(f"strategy.stop.max_time_s={args.budget_s}")
        run_dir = (args.out / f"{strategy}-deployed").resolve()
        with sigterm_as_interrupt():
            real = deployed(strategy, rounds, overrides, topology, run_dir)
        model = simulated(strategy, rounds, overrides, topology, run_dir / "data",
                          (args.out / f"{strategy}-simulated").resolve())
        figures[strategy] = (real["summary"]["time_to_target_s"], model["summary"]["time_to_target_s"])
        for name, results in (("deployed", real), ("simulated", model)):
            summary, last = results["summary"], results["history"][-1]
            print(f"{strategy} {name}: {_seconds(summary['time_to_target_s'])} to {args.target:.0%}; ran "
                  f"{last['version']} versions/rounds in {last['time_s']:.0f} s, best {summary['best_accuracy']:.3f}, "
                  f"final {summary['final_accuracy']:.3f}; staleness of applied updates "
                  f"{summary['staleness_histogram'] or '—'}", flush=True)
    print(f"\nTime to {args.target:.0%} on {topology.stem}, seed {args.seed}")
    print(f"| {'strategy':<14} | {'deployed (wall clock)':>22} | {'simulated (predicted)':>22} | measured / predicted |")
    print(f"|{'-' * 16}|{'-' * 24}|{'-' * 24}|{'-' * 22}|")
    for strategy, (measured, predicted) in figures.items():
        gap = f"{measured / predicted:.1f}x" if measured and predicted else "—"
        print(f"| {strategy:<14} | {_seconds(measured):>22} | {_seconds(predicted):>22} | {gap:>20} |")
    (fed_d, fed_s), (asgd_d, asgd_s) = figures["fedavg"], figures["asgd_ga_delta"]
    speedup_d = f"{fed_d / asgd_d:.2f}x" if fed_d and asgd_d else "—"
    speedup_s = f"{fed_s / asgd_s:.2f}x" if fed_s and asgd_s else "—"
    print(f"| {'FedAvg/ASGD-GA':<14} | {speedup_d:>22} | {speedup_s:>22} | {'':>20} |")


if __name__ == "__main__":
    main()
