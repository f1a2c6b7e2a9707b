"""What ASGD-GA's update screen costs when nobody attacks, and whose honest updates it holds back or clips.

Settings side by side, every region honest: the default screen (the length
bound), the same with the opt-in clip (`validation.clip_factor=1`, the default
until 2026-12-07), no screen, and the share budgets. Per setting: final
accuracy and the mean of the last five evaluations per seed, and per region the updates held back and clipped out of the jobs it
sent. In-process engine, the off-benchmark studies' budgets (bench_served_model.py's
workloads); runs are cached in `--out`.

    .venv/bin/python experiments/bench_screen_cost.py                          # tabular, seeds 1-3
    .venv/bin/python experiments/bench_screen_cost.py --workloads geo4 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_served_model import WORKLOADS  # noqa: E402
from runner import execute, last_evaluations, pool, share_budget  # noqa: E402

def budget_settings(k: float) -> dict[str, list[str]]:
    """The share budget `k` in place of the clip, with and without the length bound."""
    return {"budget": share_budget(k), "budget_bound": share_budget(k, length_bound=True)}


SETTINGS = {"default": [], "clip": ["validation.clip_factor=1.0"],
            "off": ["validation.norm_factor=null", "validation.clip_factor=null"], **budget_settings(2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="asgd_ga_delta", choices=["asgd_ga_delta", "asgd_ga"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--workloads", nargs="+", default=["tabular"], choices=list(WORKLOADS))
    parser.add_argument("--out", default="outputs/screen-cost")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--share-budget", type=float, default=2.0, help="the budget settings' (default: 2)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    SETTINGS.update(budget_settings(args.share_budget))

    def folder(workload: str, setting: str, seed: int) -> Path:
        return out / f"{args.strategy}-{workload}-{setting}-s{seed}"

    jobs = [([f"strategy={args.strategy}", *WORKLOADS[w], *overrides, f"seed={seed}"], str(folder(w, name, seed)))
            for w in args.workloads for name in args.settings for overrides in [SETTINGS[name]] for seed in args.seeds]
    with pool(args.workers) as workers:
        execute(workers, jobs)

    print(f"\nthe update screen when nobody attacks: {args.strategy}, seeds {args.seeds}")
    for w in args.workloads:
        for name in args.settings:
            finals, lasts, held, clipped, sent = [], [], Counter(), Counter(), Counter()
            for seed in args.seeds:
                results = json.loads((folder(w, name, seed) / "results.json").read_text())
                finals.append(f"{results['summary']['final_accuracy']:.3f}")
                lasts.append(f"{last_evaluations(str(folder(w, name, seed))):.3f}")
                held.update(e["region"] for e in results["events"] if e["event"] == "update_screened")
                clipped.update(results["summary"]["clipped_updates"] or {})
                sent.update({region: account["jobs"] for region, account in results["regions"].items()})
            regions = ", ".join(f"{r} {held[r]}/{clipped[r]}/{sent[r]}" for r in sent)
            print(f"{w:<8} {name:<8} final {'/'.join(finals)}  last 5 {'/'.join(lasts)}  "
                  f"held back/clipped/sent: {regions}")


if __name__ == "__main__":
    main()
