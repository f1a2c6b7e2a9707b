"""Reproduce the paper's evaluation: every study in conf/experiment/, then the report.

    .venv/bin/python experiments/reproduce.py                  # all studies, seeds 1-3 (see README: Results)
    .venv/bin/python experiments/reproduce.py --quick          # one seed, fewer versions, target 90 %: CI smoke
    .venv/bin/python experiments/reproduce.py --study sensitivity

Each study file lists its runs (label → Hydra overrides) and seeds under
`study:`; a run is `+experiment=<study>` plus those overrides, written to
`<out>/<study>/<label>/seed<k>/results.json`. Afterwards `cloudless-fl report`
writes the table (printed, and saved as report.md) and the PNG plots in `<out>`.
Resumable: finished runs are kept.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml


from runner import Job, execute, pool

def studies() -> dict[str, dict]:
    """Study name → its `study:` block (runs, seeds, quick variant), from the `experiment` config group."""
    from cloudless_fl.config import conf_dir

    return {p.stem: yaml.safe_load(p.read_text())["study"] for p in sorted((conf_dir() / "experiment").glob("*.yaml"))}


def jobs_for(name: str, study: dict, out: Path, quick: bool) -> list[Job]:
    spec = study["quick"] if quick else study
    jobs = []
    for label, overrides in spec["runs"].items():
        for seed in spec["seeds"]:
            run_dir = out / name / label.replace(" ", "_") / f"seed{seed}"
            extra = ["target_accuracy=0.9"] if quick else []  # short runs: a target they can reach
            jobs.append(([f"+experiment={name}", *overrides, f"seed={seed}", f"label='{label}'", *extra],
                         str(run_dir)))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="default: outputs/studies (outputs/studies-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="one seed, fewer versions (under 5 minutes)")
    parser.add_argument("--study", action="append", help="only this study (repeatable)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out or ("outputs/studies-quick" if args.quick else "outputs/studies"))
    chosen = {k: v for k, v in studies().items() if not args.study or k in args.study}
    unknown = set(args.study or ()) - set(chosen)
    if unknown:
        raise SystemExit(f"unknown study {', '.join(sorted(unknown))}; studies: {', '.join(studies())}")
    wall = time.perf_counter()
    jobs = [job for name, study in chosen.items() for job in jobs_for(name, study, out, args.quick)]
    print(f"{len(jobs)} runs from studies {', '.join(chosen)} -> {out}", flush=True)
    with pool(args.workers) as workers:
        execute(workers, jobs)
    from cloudless_fl.reporting.report import write_report

    print()
    print(write_report(out))
    print(f"\nreproduction wall time: {time.perf_counter() - wall:.0f} s "
          f"({len(jobs)} runs, {args.workers} processes)")


if __name__ == "__main__":
    main()
