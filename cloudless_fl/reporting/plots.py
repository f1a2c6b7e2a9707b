"""PNG figures of a folder of runs (matplotlib, no display needed).

One figure per question a reader asks: how fast does accuracy rise in time and
in money, how busy is each region, how stale are asynchronous updates, and what
did the links do while the scheduler re-planned. Curves show one seed (the
lowest) per label so lines stay readable; bars average over seeds.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines and in CI
import matplotlib.pyplot as plt  # noqa: E402

from ..control import region_model  # noqa: E402
from ..control.topology import load_topology  # noqa: E402
from .results import Run  # noqa: E402

PLOTS = ("accuracy_vs_time", "accuracy_vs_cost", "accuracy_vs_samples", "utilisation", "staleness", "bandwidth")


def write_plots(runs: list[Run], out: Path) -> list[Path]:
    """Write every figure for `runs` into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    main = [r for r in runs if " " not in r.label]  # sensitivity variants ("ma H=5") stay in the table
    written = []
    for name in PLOTS:
        fig = globals()[f"_{name}"](main or runs)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _first_seeds(runs: list[Run]) -> dict[tuple[str, str], Run]:
    chosen: dict[tuple[str, str], Run] = {}
    for run in sorted(runs, key=lambda r: r.seed):
        chosen.setdefault((run.topology, run.label), run)
    return chosen


def _topologies(runs: list[Run]) -> list[str]:
    return sorted({r.topology for r in runs if r.topology != "lan"}) or sorted({r.topology for r in runs})


def _curves(runs: list[Run], x_of, xlabel: str, title: str):
    topologies = _topologies(runs)
    fig, axes = plt.subplots(1, len(topologies), figsize=(6.5 * len(topologies), 4.5), squeeze=False)
    first = _first_seeds(runs)
    for ax, topology in zip(axes[0], topologies):
        for (topo, label), run in sorted(first.items()):
            if topo not in (topology, "lan"):
                continue
            points = [(x_of(e), e["accuracy"]) for e in run.data["history"]
                      if e.get("accuracy") is not None and x_of(e) is not None]
            if points:
                xs, ys = zip(*points)
                name = "Ideal (lan)" if topo == "lan" else label
                ax.plot(xs, ys, label=f"{name} (seed {run.seed})", linestyle="--" if topo == "lan" else "-")
        target = runs[0].summary.get("target_accuracy")
        if target:
            ax.axhline(target, color="grey", linewidth=0.8, linestyle=":", label=f"target {target:.0%}")
        ax.set(title=f"{title} — {topology}", xlabel=xlabel, ylabel="test accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _accuracy_vs_time(runs: list[Run]):
    return _curves(runs, lambda e: e["time_s"], "virtual time (s)", "Accuracy vs time")


def _accuracy_vs_cost(runs: list[Run]):
    return _curves(runs, lambda e: (e.get("cost_usd") or {}).get("instance"), "cost, instance billing (US$)",
                   "Accuracy vs cost")


def _accuracy_vs_samples(runs: list[Run]):
    return _curves(runs, lambda e: e["samples"], "training samples processed", "Accuracy vs samples (correctness)")


def _utilisation(runs: list[Run]):
    by_label: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for region, u in (run.summary.get("utilization") or {}).items():
            by_label[run.topology, run.label][region].append(u)
    keys = sorted(k for k in by_label if k[0] != "lan")
    regions = sorted({r for k in keys for r in by_label[k]})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(keys) + 3), 4.5))
    width = 0.8 / max(1, len(regions))
    for i, region in enumerate(regions):
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [100 * statistics.fmean(by_label[k][region]) if by_label[k][region] else 0 for k in keys],
               width, label=region)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], [f"{t}\n{label}" for t, label in keys],
                  fontsize=7, rotation=30, ha="right")
    ax.set(title="Per-region utilisation (busy / rented worker-time, mean over seeds)", ylabel="utilisation (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _staleness(runs: list[Run]):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    totals: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for run in runs:
        for tau, count in (run.summary.get("staleness_histogram") or {}).items():
            totals[f"{run.topology} {run.label}"][int(tau)] += count
    for label, hist in sorted(totals.items()):
        taus = sorted(hist)
        ax.step(taus, [hist[t] for t in taus], where="mid", label=label)
    if not totals:
        ax.text(0.5, 0.5, "no asynchronous runs", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="Staleness of applied ASGD-GA updates (all seeds)", xlabel="staleness τ (versions)",
           ylabel="updates applied")
    ax.grid(alpha=0.3)
    if totals:
        ax.legend(fontsize=8)
    return fig


def _bandwidth(runs: list[Run]):
    """Each region's link over the longest run on a fluctuating topology, with plan changes marked."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    candidates = [r for r in runs if (r.topology_spec.get("fluctuation") or {}).get("sigma")]
    if not candidates:
        ax.text(0.5, 0.5, "no run on a fluctuating topology", ha="center", va="center", transform=ax.transAxes)
        return fig
    scheduled = [r for r in candidates if r.data.get("schedule")]
    run = max(scheduled or candidates, key=lambda r: r.summary["total_time_s"])
    topology = load_topology(run.topology_spec)
    horizon = max(run.summary["total_time_s"], 1.0)
    steps = 400
    for region in topology.regions:
        if region.name == topology.coordinator:
            continue
        link = region_model.link_bandwidth(topology, region.name, region_model.UP, run.seed)
        ts = [horizon * i / steps for i in range(steps + 1)]
        ax.plot(ts, [link.segment(t)[0] for t in ts], label=f"{region.name} (nominal {region.link.up_mbps:g})")
    for change in (run.data.get("schedule") or [])[1:]:
        ax.axvline(change["time_s"], color="black", linewidth=0.7, linestyle=":")
    ax.set_yscale("log")
    ax.set(title=f"Uplink bandwidth, {topology.name} seed {run.seed} ({run.label}; dotted: plan changes)",
           xlabel="virtual time (s)", ylabel="bandwidth (Mbit/s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
