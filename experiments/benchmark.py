"""The geo4 benchmark (shared/BENCHMARK.md): FedAvg vs MA vs ASGD-GA vs Ideal.

ASGD-GA runs in both update modes (`asgd_ga`: gradient accumulation, the
default; `asgd_ga_delta`: local SGD deltas). Strategies use their Hydra
defaults (no scheduler: one worker per region, equal local work); `ma+elastic`
and `asgd_ga_delta+elastic` are the same runs planned by the elastic scheduler
(`scheduler=elastic`, min-cost objective) with the learning rate tuned for the
unscheduled run, so the scheduler's contribution is isolated. Each tuned
strategy's learning rate is picked from {0.01, 0.03, 0.1, 0.3} on seed 0
(best time-to-95 %, then best final accuracy), then run on seeds 1, 2, 3 on
geo4 and geo4-fluct; Ideal is the same training on topology `lan`. Runs use the
in-process engine (same ServerApp/ClientApp/strategies as the Simulation
Engine, identical figures under the virtual clock, no Ray start-up per run) on
2 worker processes (`runner.py`). Prints the comparison table at the end.

    .venv/bin/python experiments/benchmark.py --out outputs/benchmark
    .venv/bin/python experiments/benchmark.py --quick      # geo4, seed 1, default lrs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from runner import execute, pool

LRS = (0.01, 0.03, 0.1, 0.3)
SEEDS = (1, 2, 3)
TOPOLOGIES = ("geo4", "geo4-fluct")
COUNTS = "strategy.stop.max_time_s=null"  # the tuning runs compare at these counts, not the default time budget
STRATEGIES = {
    "fedavg": ["strategy=fedavg", "strategy.num_rounds=40"],
    "ma": ["strategy=ma", "strategy.num_rounds=40"],
    "asgd_ga": ["strategy=asgd_ga", "strategy.num_rounds=1500", "strategy.eval_every=25"],
    "asgd_ga_delta": ["strategy=asgd_ga_delta", "strategy.num_rounds=400", "strategy.eval_every=10"],
}
ELASTIC = {f"{name}+elastic": name for name in ("ma", "asgd_ga_delta")}  # run with the base's tuned lr
STRATEGIES.update({name: [*STRATEGIES[base], "scheduler=elastic"] for name, base in ELASTIC.items()})
STRATEGIES = {name: [*overrides, COUNTS] for name, overrides in STRATEGIES.items()}
# The learning rate each strategy tunes: the local one where the server applies updates as sent.
TUNED_KEY = {"asgd_ga_delta": "strategy.local_lr"}
IDEAL = ["strategy=fedavg", "topology=lan", "strategy.num_rounds=15"]


def _score(summary: dict) -> tuple[float, float]:
    t95 = summary["time_to_target_s"]
    return (t95 if t95 is not None else float("inf"), -(summary["final_accuracy"] or 0.0))


def _jobs(out: Path, phase: str, seeds, lrs: dict[tuple[str, str], list[float]]) -> list[tuple[list[str], str]]:
    jobs = []
    for (topology, strategy), grid in lrs.items():
        base = IDEAL if strategy == "ideal" else [*STRATEGIES[strategy], f"topology={topology}"]
        for lr in grid:
            for seed in seeds:
                run_dir = out / phase / topology / strategy / f"lr{lr}-seed{seed}"
                key = TUNED_KEY.get(ELASTIC.get(strategy, strategy), "strategy.lr")
                jobs.append(([*base, f"{key}={lr}", f"seed={seed}"], str(run_dir)))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/benchmark")
    parser.add_argument("--quick", action="store_true", help="geo4 only, seed 1, no tuning")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    keys = [(t, s) for t in (TOPOLOGIES[:1] if args.quick else TOPOLOGIES) for s in STRATEGIES]
    keys.append(("lan", "ideal"))
    wall = time.perf_counter()
    with pool(args.workers) as workers:
        if args.quick:
            chosen = {k: [0.3] for k in keys}
            seeds = SEEDS[:1]
        else:
            print("tuning learning rates on seed 0", flush=True)
            tuned = execute(workers, _jobs(out, "tune", [0], {k: list(LRS) for k in keys if k[1] not in ELASTIC}))
            chosen = {}
            for topology, strategy in keys:
                if strategy in ELASTIC:
                    continue
                best = min(LRS, key=lambda lr: _score(tuned[str(out / "tune" / topology / strategy / f"lr{lr}-seed0")]))
                chosen[topology, strategy] = [best]
                print(f"  {topology}/{strategy}: lr={best}", flush=True)
            seeds = SEEDS
            chosen.update({(t, s): chosen[t, ELASTIC[s]] for t, s in keys if s in ELASTIC})
        print(f"reporting runs on seeds {list(seeds)}", flush=True)
        execute(workers, _jobs(out, "final", seeds, chosen))
    from cloudless_fl.reporting.report import write_report

    print()
    print("chosen learning rates: " + ", ".join(f"{t}/{s}={lr[0]}" for (t, s), lr in chosen.items()))
    print(write_report(out / "final"))
    print(f"\nbenchmark wall time: {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
