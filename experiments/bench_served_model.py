"""The last version vs an average of versions as the served model (`strategy.average_decay`), side by side.

ASGD-GA's consecutive versions swing with the regions' non-IID updates; the
run's final accuracy is one sample of that swing unless the served model is
an exponential moving average of the versions. Each workload runs once per
setting and seed (in-process engine, the studies' budgets); the table gives
final accuracy and time to target for both.

    .venv/bin/python experiments/bench_served_model.py                     # geo4, world5, tabular; seeds 1-3
    .venv/bin/python experiments/bench_served_model.py --decay 0.95 --seeds 1
    .venv/bin/python experiments/bench_served_model.py --strategy asgd_ga --workloads geo4   # the paper's mode
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import execute, pool  # noqa: E402

WORKLOADS = {  # name → overrides (the off-benchmark studies' budgets; geo4 with its defaults)
    "geo4": [],
    "world5": ["topology=world5", "strategy.num_rounds=100000", "strategy.stop.max_time_s=400"],
    "tabular": ["dataset=tabular", "target_accuracy=0.88", "strategy.num_rounds=100000", "strategy.stop.max_time_s=400"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decay", type=float, default=0.9, help="strategy.average_decay of the averaged runs")
    parser.add_argument("--strategy", default="asgd_ga_delta", choices=["asgd_ga_delta", "asgd_ga", "ma"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--out", default="outputs/served-model")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    settings = {"last": "strategy.average_decay=null", "average": f"strategy.average_decay={args.decay}"}
    out = Path(args.out)
    jobs = [([f"strategy={args.strategy}", *WORKLOADS[w], setting, f"seed={seed}", "checkpoint.every=0",
              "checkpoint.at_end=false"],
             str(out / f"{args.strategy}-{w}-{name}-{args.decay if name == 'average' else 'none'}-s{seed}"))
            for w in args.workloads for seed in args.seeds for name, setting in settings.items()]
    with pool(args.workers) as workers:
        done = execute(workers, jobs)

    print(f"\nserved model: last version vs average_decay={args.decay}; {args.strategy}, seeds {args.seeds}")
    print(f"{'workload':<9} {'final last':>10} {'final avg':>10} {'t-target last (s)':>18} {'t-target avg (s)':>17}")
    for w in args.workloads:
        row = {}
        for name in settings:
            summaries = [done[str(out / f"{args.strategy}-{w}-{name}-{args.decay if name == 'average' else 'none'}-s{s}")]
                         for s in args.seeds]
            finals = [s["final_accuracy"] for s in summaries]
            times = [s["time_to_target_s"] for s in summaries]
            row[name] = (f"{statistics.mean(finals):.3f}",
                         "/".join("—" if t is None else f"{t:.1f}" for t in times))
        print(f"{w:<9} {row['last'][0]:>10} {row['average'][0]:>10} {row['last'][1]:>18} {row['average'][1]:>17}")


if __name__ == "__main__":
    main()
