"""Wall-clock ASGD-GA vs FedAvg on a real federation over geo4-shaped links, beside the simulator's prediction.

Each strategy runs twice on the same data split and settings:

- deployed: `cloudless-fl launch` machinery — a real SuperLink, one SuperNode per
  geo4 region behind its WAN-emulating proxy (the topology's bandwidth, seeded
  fluctuation and latency, divided by `--time-scale`), the wall clock;
- simulated: the same ServerApp, strategy and ClientApp in-process under the
  virtual clock, i.e. the simulator's prediction for that setting.

It prints time-to-target for both, their ratio (FedAvg / ASGD-GA) and the gap
between measured and predicted. On one machine every region computes on the
same cores, so the deployment's heterogeneity is the links' (and the data
sizes'); the simulator also models each region's compute speed.

    .venv/bin/python experiments/bench_deployment.py [--target 0.9] [--time-scale 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cloudless_fl.config import compose
from cloudless_fl.launch import launch
from cloudless_fl.run import run

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = "geo4"
STRATEGIES = {  # what each runs; ASGD-GA stops at the target, FedAvg's rounds are bounded
    "fedavg": (20, ["strategy.eval_every=1"]),
    "asgd_ga_delta": (300, ["strategy.eval_every=4", "strategy.stop.at_target=true"]),
}


def deployed(strategy: str, rounds: int, overrides: list[str], run_dir: Path, time_scale: float) -> dict:
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    try:
        code = launch(TOPOLOGY, strategy, rounds, run_dir, time_scale=time_scale, overrides=overrides,
                      app_dir=ROOT, stream_to=log)
    finally:
        log.close()
    if code != 0:
        raise SystemExit(f"the deployed {strategy} run failed (exit code {code}); see {run_dir.with_suffix('.log')}")
    [results] = run_dir.glob("*/results.json")
    return json.loads(results.read_text())["summary"]


def simulated(strategy: str, rounds: int, overrides: list[str], data_dir: Path, run_dir: Path) -> dict:
    cfg = compose([f"strategy={strategy}", f"topology={TOPOLOGY}", f"strategy.num_rounds={rounds}", "dataset=npz",
                   f"dataset.root={data_dir}", "engine=inprocess", "clock=virtual", "progress=false", *overrides])
    return run(cfg, run_dir)["summary"]


def _seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.90, help="accuracy to reach (default 0.90)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="links this many times faster (default 1)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-deployment"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {}
    for strategy, (rounds, extra) in STRATEGIES.items():
        overrides = [f"target_accuracy={args.target}", f"seed={args.seed}", *extra]
        run_dir = (args.out / f"{strategy}-deployed").resolve()
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists: pass another --out or remove it")
        start = time.perf_counter()
        deployed_summary = deployed(strategy, rounds, overrides, run_dir, args.time_scale)
        wall = time.perf_counter() - start
        simulated_summary = simulated(strategy, rounds, overrides, run_dir / "data",
                                      (args.out / f"{strategy}-simulated").resolve())
        figures[strategy] = (deployed_summary["time_to_target_s"], simulated_summary["time_to_target_s"])
        print(f"{strategy}: deployed {_seconds(figures[strategy][0])} to {args.target:.0%} "
              f"(final {deployed_summary['final_accuracy']:.3f}, run {wall:.0f} s); "
              f"simulated {_seconds(figures[strategy][1])} (final {simulated_summary['final_accuracy']:.3f})",
              flush=True)
    print(f"\nTime to {args.target:.0%} on {TOPOLOGY}, links x{args.time_scale:g}, seed {args.seed}")
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
