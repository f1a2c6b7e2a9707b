"""The paper's gradient-mode ASGD-GA with and without a hard staleness bound, side by side.

`before` is what `strategy=asgd_ga` ran with until issue 16: updates staler
than `tau_max=16` versions dropped. On geo4 that dropped every update of the
two slowest regions (70 % of the data): the fastest one makes ~100 versions per
job of the slowest. `after`: no hard bound, stale updates only weighed down by
`alpha(tau)` (inverse square root). `now` is today's default: `after` plus the
relatedness screen (validation.min_relatedness=auto: 2 spreads in gradient
mode), which holds back noise from a hostile region — what it costs when
nobody attacks is the difference from `after`. Every run gets the
same budget (2000 versions on geo4; 100 modelled seconds on the tabular
workload, which the change was not chosen on). In-process engine, virtual
clock; "last 5" is the mean of the last five evaluations.

    .venv/bin/python experiments/bench_gradient_mode.py                    # geo4 + tabular, seeds 1-3 (~25 min)
    .venv/bin/python experiments/bench_gradient_mode.py --workloads geo4 --seeds 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import execute, last_evaluations, pool  # noqa: E402

SETTINGS = {  # label → overrides of strategy=asgd_ga
    "before": ["strategy.tau_max=16", "validation.min_relatedness=null"],
    "after": ["validation.min_relatedness=null"],
    "now": [],
}
WORKLOADS = {  # name → overrides
    "geo4": ["strategy.num_rounds=2000"],
    "tabular": ["dataset=tabular", "target_accuracy=0.88", "strategy.num_rounds=100000",
                "strategy.stop.max_time_s=100"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", default="outputs/gradient-mode")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)

    def folder(workload: str, setting: str, seed: int) -> str:
        return str(out / f"{workload}-{setting}-s{seed}")

    jobs = [(["strategy=asgd_ga", *WORKLOADS[w], *SETTINGS[s], f"seed={seed}",
              "checkpoint.every=0", "checkpoint.at_end=false"], folder(w, s, seed))
            for w in args.workloads for s in args.settings for seed in args.seeds]
    with pool(args.workers) as workers:
        done = execute(workers, jobs)

    print(f"\nGradient-mode ASGD-GA, seeds {args.seeds}: time to target per seed (modelled s), final accuracy, "
          "mean of the last 5 evaluations, updates dropped as too stale, and held back by the screen (per seed)")
    print(f"{'workload':<8} {'setting':<9} {'t-target (s)':>20} {'final':>20} {'last 5':>20} {'dropped':>12} "
          f"{'held back':>12}")
    for w in args.workloads:
        for s in args.settings:
            runs = [done[folder(w, s, seed)] for seed in args.seeds]
            times = "/".join("—" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}" for r in runs)
            finals = "/".join(f"{r['final_accuracy']:.3f}" for r in runs)
            late = "/".join(f"{last_evaluations(folder(w, s, seed)):.3f}" for seed in args.seeds)
            dropped = "/".join(str(r["dropped_stale"]) for r in runs)
            held = "/".join(str(r["screened_updates"]) for r in runs)
            print(f"{w:<8} {s:<9} {times:>20} {finals:>20} {late:>20} {dropped:>12} {held:>12}")


if __name__ == "__main__":
    main()
