"""What a run ends with, side by side: one knob of the final model off and on, against the Ideal.

Two knobs decide the model a run serves at its end:

- `average`: the last version vs an exponential moving average of the versions
  (`strategy.average_decay`; ASGD-GA's consecutive versions swing with the
  regions' non-IID updates, so the last one is one sample of that swing);
- `cooldown`: a constant step size vs one that falls linearly to zero over the
  last share of the budget (`strategy.lr_cooldown`; local SGD on non-IID regions
  stays a step-size-sized distance from the optimum while the rate is constant).

Each workload runs once per setting and seed (in-process engine, the studies'
budgets), and its Ideal (the same data on `lan`, as the studies' `ideal` rows);
the table gives final accuracy, its gap to the Ideal and time to target for both.

    .venv/bin/python experiments/bench_served_model.py                     # average; geo4, world5, tabular; seeds 1-3
    .venv/bin/python experiments/bench_served_model.py --knob cooldown --strategy ma --workloads geo4 tabular
    .venv/bin/python experiments/bench_served_model.py --strategy asgd_ga --workloads geo4   # the paper's mode
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner import execute, pool  # noqa: E402

WORKLOADS = {  # name → overrides (the studies' budgets; geo4 with its defaults)
    "geo4": [],
    "geo4-fluct": ["topology=geo4-fluct", "strategy.num_rounds=100000", "strategy.stop.max_time_s=200"],
    "world5": ["topology=world5", "strategy.num_rounds=100000", "strategy.stop.max_time_s=400"],
    "tabular": ["dataset=tabular", "target_accuracy=0.88", "strategy.num_rounds=100000", "strategy.stop.max_time_s=400"],
}
IDEAL = {  # name → the Ideal's overrides (conf/experiment: correctness for the digits, tabular's `ideal` row)
    "digits": ["topology=lan", "strategy=fedavg", "strategy.num_rounds=15"],
    "tabular": ["topology=lan", "strategy=fedavg", "strategy.num_rounds=30", "dataset=tabular",
                "target_accuracy=0.88"],
}
KNOBS = {  # knob → {setting: override}; the first setting is "off"
    "average": lambda value: {"last": "strategy.average_decay=null", "average": f"strategy.average_decay={value}"},
    "cooldown": lambda value: {"constant": "strategy.lr_cooldown=null", "cooldown": f"strategy.lr_cooldown={value}"},
}
DEFAULT_VALUE = {"average": 0.9, "cooldown": 0.3}
NO_CHECKPOINTS = ["checkpoint.every=0", "checkpoint.at_end=false"]


def ideal_of(workload: str) -> str:
    return "tabular" if workload == "tabular" else "digits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--knob", default="average", choices=list(KNOBS))
    parser.add_argument("--value", type=float, help="the knob's value when on (average: 0.9, cooldown: 0.3)")
    parser.add_argument("--strategy", default="asgd_ga_delta", choices=["asgd_ga_delta", "asgd_ga", "ma"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--workloads", nargs="+", default=["geo4", "world5", "tabular"], choices=list(WORKLOADS))
    parser.add_argument("--out", default="outputs/served-model")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    value = DEFAULT_VALUE[args.knob] if args.value is None else args.value
    settings = KNOBS[args.knob](value)
    out = Path(args.out)

    def folder(workload: str, setting: str, seed: int) -> str:
        return str(out / f"{args.strategy}-{workload}-{setting}-{value if setting != next(iter(settings)) else 'off'}"
                         f"-s{seed}")

    jobs = [([f"strategy={args.strategy}", *WORKLOADS[w], override, f"seed={seed}", *NO_CHECKPOINTS],
             folder(w, name, seed))
            for w in args.workloads for seed in args.seeds for name, override in settings.items()]
    ideals = sorted({ideal_of(w) for w in args.workloads})
    jobs += [([*IDEAL[i], f"seed={seed}", *NO_CHECKPOINTS], str(out / f"ideal-{i}-s{seed}"))
             for i in ideals for seed in args.seeds]
    with pool(args.workers) as workers:
        done = execute(workers, jobs)

    off, on = settings
    print(f"\nfinal model: {args.knob} {off} vs {on} ({value:g}); {args.strategy}, seeds {args.seeds}")
    print(f"{'workload':<11} {'Ideal':>6} {'final ' + off:>14} {'final ' + on:>14} {'gap ' + off:>12} {'gap ' + on:>12}"
          f"  time to target {off} / {on} (s)")
    for w in args.workloads:
        ideal = statistics.mean(done[str(out / f"ideal-{ideal_of(w)}-s{s}")]["final_accuracy"] for s in args.seeds)
        finals, times = {}, {}
        for name in settings:
            summaries = [done[folder(w, name, s)] for s in args.seeds]
            finals[name] = statistics.mean(s["final_accuracy"] for s in summaries)
            times[name] = "/".join("—" if (t := s["time_to_target_s"]) is None else f"{t:.1f}" for s in summaries)
        print(f"{w:<11} {ideal:>6.3f} {finals[off]:>14.3f} {finals[on]:>14.3f} {100 * (ideal - finals[off]):>9.2f} pt"
              f" {100 * (ideal - finals[on]):>9.2f} pt  {times[off]}  /  {times[on]}")


if __name__ == "__main__":
    main()
