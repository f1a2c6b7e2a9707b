"""Does a change leave results as they were? Runs fixed-seed configs at a git revision and in this checkout.

    .venv/bin/python experiments/same_results.py --base HEAD~3 [--cases fedavg ma ...]

For each case (in-process engine, seed 1) both trees write a results.json; the
script prints, per case, whether the summaries (the contract's keys of the
base's summary) and the histories, events, schedules, costs and per-region
books are identical, and which summary keys the change added. A refactor must
print "identical" everywhere. About 6 minutes for all cases on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "fedavg": ["strategy=fedavg"],
    "ma": ["strategy=ma"],
    "asgd_ga": ["strategy=asgd_ga"],
    "asgd_ga_delta": ["strategy=asgd_ga_delta"],
    "ma_elastic": ["strategy=ma", "scheduler=elastic"],
    "delta_elastic_fluct": ["strategy=asgd_ga_delta", "scheduler=elastic", "topology=geo4-fluct"],
    "fedavg_selective": ["strategy=fedavg", "scheduler=elastic", "strategy.round_deadline_s=2.0",
                         "strategy.num_rounds=10"],
    "ma_deadline_clip": ["strategy=ma", "strategy.deadline_s=3.0", "strategy.num_rounds=10",
                         "validation.max_norm=5", "validation.on_norm=clip"],
}
COMPARED = ("history", "events", "schedule", "costs", "regions")
RUN_ONE = """
import json, sys
from pathlib import Path
from cloudless_fl.config import compose
from cloudless_fl.run import run
out, overrides = Path(sys.argv[1]), sys.argv[2:]
payload = run(compose(["engine=inprocess", "progress=false", "checkpoint.every=10", *overrides]), out)
"""


def run_case(tree: Path, overrides: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the tree's own package first
    subprocess.run([sys.executable, "-c", RUN_ONE, str(out), *overrides], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def compare(base: dict, new: dict) -> str:
    summary_same = all(base["summary"][k] == new["summary"].get(k) for k in base["summary"])
    added = sorted(set(new["summary"]) - set(base["summary"]))
    others = [k for k in COMPARED if base.get(k) != new.get(k)]
    return (f"summary {'identical' if summary_same else 'DIFFERENT'}"
            + (f", differs: {', '.join(others)}" if others else f", {'/'.join(COMPARED)} identical")
            + (f" (new summary keys: {', '.join(added)})" if added else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        # `cloudless_fl.conf` is installed from this checkout's conf/: the base tree must read its own
        (base_tree / "cloudless_fl" / "conf").symlink_to(base_tree / "conf", target_is_directory=True)
        try:
            for name in args.cases:
                base = run_case(base_tree, CASES[name], Path(tmp) / "out-base" / name)
                new = run_case(ROOT, CASES[name], Path(tmp) / "out-new" / name)
                print(f"{name:<22} {compare(base, new)}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
