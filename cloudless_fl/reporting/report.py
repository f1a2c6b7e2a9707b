"""`cloudless-fl report <folder>`: compare the runs in a folder as a Markdown table and plots.

Every `results.json` below the folder is read (a corrupt or partial one is
listed as skipped, with its path, never fatal). Runs are grouped by topology,
dataset, label (the config's `label`, else the strategy, `+elastic` when
scheduled) and target; figures are mean ± std over seeds, and ratios are taken
against FedAvg on the same topology and dataset (and seed) and against the
Ideal reference (topology `lan`, same dataset). `write_report` also saves
`report.md` and the PNG figures of `plots.py` in the folder.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .results import Run, load_runs

BASELINE = "fedavg"
IDEAL_TOPOLOGY = "lan"


def _mean_std(values: Iterable[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3g} ± {std:.2g}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per (topology, dataset, strategy, target) with per-seed figures relative to FedAvg and Ideal
    (on the same dataset, at the same target)."""
    by_key: dict[tuple[str, str, str, float], dict[int, Run]] = defaultdict(dict)
    for run in runs:
        by_key[run.topology, run.dataset, run.label, run.target][run.seed] = run
    ideal = {(data, target, seed): run for (topo, data, _, target), seeds in by_key.items()
             if topo == IDEAL_TOPOLOGY for seed, run in seeds.items()}
    table = []
    for (topo, data, label, target), seeds in sorted(by_key.items()):
        base = by_key.get((topo, data, BASELINE, target), {})
        per_seed = defaultdict(list)
        for seed, run in seeds.items():
            s = run.summary
            b = base.get(seed).summary if seed in base else None
            i = ideal[data, target, seed].summary if (data, target, seed) in ideal else None
            cost = s["cost_to_target_usd"] or {}
            base_cost = (b or {}).get("cost_to_target_usd") or {}
            per_seed["t95"].append(s["time_to_target_s"])
            per_seed["cost_i"].append(cost.get("instance"))
            per_seed["cost_s"].append(cost.get("serverless"))
            per_seed["speedup"].append(_ratio(b and b["time_to_target_s"], s["time_to_target_s"]))
            for mode, key in (("instance", "red_i"), ("serverless", "red_s")):
                r = _ratio(cost.get(mode), base_cost.get(mode))
                per_seed[key].append(None if r is None else 1 - r)
            per_seed["ideal_gap"].append(_ratio(s["time_to_target_s"], i and i["time_to_target_s"]))
            acc_gap = None
            if i and i["final_accuracy"] is not None and s["final_accuracy"] is not None:
                acc_gap = 100 * (i["final_accuracy"] - s["final_accuracy"])
            per_seed["acc_gap"].append(acc_gap)
            per_seed["final"].append(s["final_accuracy"])
            wan = s.get("wan_bytes_to_target")
            per_seed["wan"].append(None if wan is None else wan / 1e9)
            util = s.get("utilization") or {}
            per_seed["util"].append(statistics.fmean(util.values()) if util else None)
        table.append({"topology": topo, "dataset": data, "label": label, "target": target, "seeds": sorted(seeds),
                      **per_seed})
    return table


COLUMNS = [  # {t}: the target accuracy, e.g. "95 %"
    ("time-to-{t} (s)", "t95"), ("cost-to-{t} $ inst.", "cost_i"), ("cost-to-{t} $ srvl.", "cost_s"),
    ("speedup vs FedAvg", "speedup"), ("cost reduction (inst.)", "red_i"), ("cost reduction (srvl.)", "red_s"),
    ("ideal gap", "ideal_gap"), ("accuracy gap (pts)", "acc_gap"), ("final accuracy", "final"),
    ("WAN GB to {t}", "wan"), ("mean utilisation", "util"),
]


def _percent(target: float) -> str:
    return f"{100 * target:g} %"


def markdown(table: list[dict[str, Any]]) -> str:
    """The table; headers name the runs' target accuracy, or say "target" with a column for it if they differ;
    a dataset column when the runs used more than one."""
    targets = {row["target"] for row in table}
    single = len(targets) == 1
    datasets = len({row["dataset"] for row in table}) > 1
    t = _percent(next(iter(targets))) if single else "target"
    fixed = ["topology"] + (["dataset"] if datasets else []) + ["run", "seeds"] + ([] if single else ["target"])
    head = "| " + " | ".join(fixed + [c.format(t=t) for c, _ in COLUMNS]) + " |"
    sep = "|" + "---|" * (len(fixed) + len(COLUMNS))
    lines = [head, sep]
    for row in table:
        cells = [_mean_std(row[key]) for _, key in COLUMNS]
        seeds = ",".join(str(s) for s in row["seeds"])
        first = ([row["topology"]] + ([row["dataset"]] if datasets else []) + [row["label"], seeds]
                 + ([] if single else [_percent(row["target"])]))
        lines.append("| " + " | ".join(first + cells) + " |")
    return "\n".join(lines)


def report(folder: str | Path) -> str:
    runs, skipped = load_runs(folder)
    out = []
    if runs:
        out.append(markdown(rows(runs)))
    else:
        out.append(f"no results.json found under {folder}")
    for path, reason in skipped:
        out.append(f"skipped {path}: {reason}")
    return "\n".join(out)


def write_report(folder: str | Path) -> str:
    """`report(folder)`, also saved as `<folder>/report.md`, plus the figures in `<folder>/plots/`."""
    from ..atomic import atomic_write_text
    from .plots import write_plots

    folder = Path(folder)
    text = report(folder)
    runs, _ = load_runs(folder)
    if runs:
        plots = write_plots(runs, folder / "plots")
        text += "\n\nplots: " + ", ".join(str(p) for p in plots)
    atomic_write_text(folder / "report.md", text + "\n")
    return text
