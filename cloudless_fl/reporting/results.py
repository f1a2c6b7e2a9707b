"""A run's history and its `results.json`, written and read back here (the contract: README, section "results.json").

`History` collects one entry per round (sync) or model version (async) plus the
counters strategies keep (rejected updates, stale drops, lost regions,
staleness). `summarize` derives the figures users compare: time-, cost- and
WAN-bytes-to-target, totals, utilisation, and the Ideal reference.
`write_results` writes the file atomically; `Run` / `load_runs` read it back
(the report and its plots).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text


@dataclass
class History:
    """Entries in the contract's shape, plus run counters."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)
    staleness: Counter = field(default_factory=Counter)
    events: list[dict[str, Any]] = field(default_factory=list)  # region lost/back, plan changes
    rejections: dict[str, Counter] = field(default_factory=dict)  # region → reason → bad updates rejected
    clipped: Counter = field(default_factory=Counter)  # region → updates clipped to the norm bound
    listeners: list[Callable[[dict[str, Any]], None]] = field(default_factory=list, repr=False)

    def record(self, version: int, figures: dict[str, Any], samples: int,
               accuracy: float | None = None, loss: float | None = None) -> dict[str, Any]:
        """One entry per version: a version recorded again (evaluated after the fact, at a run's end) replaces
        its entry."""
        entry = {"version": int(version), **figures, "samples": int(samples),
                 "accuracy": accuracy, "loss": loss}
        if self.entries and self.entries[-1]["version"] == entry["version"]:
            self.entries[-1] = entry
        else:
            self.entries.append(entry)
        for listener in self.listeners:
            listener(entry)
        return entry

    def event(self, kind: str, time_s: float, **details: Any) -> None:
        self.events.append({"event": kind, "time_s": time_s, **details})

    def state_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "counters": dict(self.counters),
                "staleness": {str(k): v for k, v in self.staleness.items()}, "events": self.events,
                "rejections": {r: dict(c) for r, c in self.rejections.items()}, "clipped": dict(self.clipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = list(state["entries"])
        self.counters = Counter(state["counters"])
        self.staleness = Counter({int(k): v for k, v in state["staleness"].items()})
        self.events = list(state["events"])
        self.rejections.clear()  # the validator's live counters: refill in place
        self.rejections.update({r: Counter(c) for r, c in state["rejections"].items()})
        self.clipped.clear()
        self.clipped.update(state["clipped"])


def first_reaching(entries: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((e for e in entries if e.get("accuracy") is not None and e["accuracy"] >= target), None)


def summarize(history: History, target: float, utilization: dict[str, float] | None,
              ideal_samples_per_s: float | None, final: dict[str, Any] | None = None) -> dict[str, Any]:
    """The contract's `summary`, plus the Ideal reference for the same samples.

    Totals come from `final` (the meter's figures when the run ended: work done
    after the last history entry, or in a run that never got past its first,
    is still counted), else from the last entry.
    """
    entries = history.entries
    evaluated = [e for e in entries if e.get("accuracy") is not None]
    hit = first_reaching(entries, target)
    last = entries[-1] if entries else {"time_s": 0.0, "cost_usd": None, "wan_bytes": 0, "samples": 0}
    if final is not None:
        last = {**last, **final}
    ideal = None
    if ideal_samples_per_s:
        ideal = {
            "samples_per_s": ideal_samples_per_s,
            "time_s": last["samples"] / ideal_samples_per_s,
            "time_to_target_s": hit["samples"] / ideal_samples_per_s if hit else None,
        }
    return {
        "target_accuracy": target,
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_accuracy": max((e["accuracy"] for e in evaluated), default=None),
        "time_to_target_s": hit["time_s"] if hit else None,
        "cost_to_target_usd": hit["cost_usd"] if hit else None,
        "wan_bytes_to_target": hit["wan_bytes"] if hit else None,
        "samples_to_target": hit["samples"] if hit else None,
        "total_time_s": last["time_s"],
        "total_cost_usd": last["cost_usd"],
        "wan_bytes": last["wan_bytes"],
        "samples": last["samples"],
        "utilization": utilization,
        "rejected_updates": int(history.counters.get("rejected_updates", 0)),
        "screened_updates": int(history.counters.get("screened_updates", 0)),
        "dropped_stale": int(history.counters.get("dropped_stale", 0)),
        "lost_regions": int(history.counters.get("lost_regions", 0)),
        "rejoined_regions": int(history.counters.get("rejoined_regions", 0)),
        "failed_replies": int(history.counters.get("failed_replies", 0)),
        "failed_checkpoints": int(history.counters.get("failed_checkpoints", 0)),
        "quarantined_regions": int(history.counters.get("quarantined_regions", 0)),
        "rejections": {region: dict(reasons) for region, reasons in history.rejections.items() if reasons},
        "clipped_updates": dict(history.clipped),
        "staleness_histogram": {str(k): v for k, v in sorted(history.staleness.items())},
        "ideal": ideal,
    }


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `results.json` atomically; NaN/Inf become null so the file stays valid JSON."""
    path = Path(path)
    atomic_write_text(path, json.dumps(_finite(payload), indent=2, sort_keys=False) + "\n")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


REQUIRED = {"strategy": str, "seed": int, "config": dict, "history": list, "summary": dict}  # key → type


@dataclass
class Run:
    """One results.json read back: its path, its content, and the fields reports group by."""

    path: Path
    data: dict[str, Any]

    distinction: str = ""  # what sets it apart from runs with the same label (see `distinguish`)

    @property
    def label(self) -> str:
        """The run's `label`, else its strategy, marked `+elastic` when the elastic scheduler planned it;
        followed by its `distinction`, if any."""
        return self.base_label + (f" {self.distinction}" if self.distinction else "")

    @property
    def base_label(self) -> str:
        if self.data["config"].get("label"):
            return str(self.data["config"]["label"])
        scheduler = (self.data["config"].get("scheduler") or {}).get("name", "none")
        return self.data["strategy"] + ("" if scheduler == "none" else f"+{scheduler}")

    @property
    def topology_spec(self) -> dict[str, Any]:
        """The topology the run used (older results: the config's topology group)."""
        return self.data.get("topology") or self.data["config"]["topology"]

    @property
    def topology(self) -> str:
        return str(self.topology_spec.get("name", "unnamed"))

    @property
    def dataset(self) -> str:
        return str((self.data["config"].get("dataset") or {}).get("name", "unknown"))

    @property
    def seed(self) -> int:
        return int(self.data["seed"])

    @property
    def summary(self) -> dict[str, Any]:
        return self.data["summary"]

    @property
    def target(self) -> float:
        """The target accuracy its time-, cost- and bytes-to-target figures refer to."""
        return float(self.summary["target_accuracy"])


def load_runs(folder: str | Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """All readable runs below `folder`, and (path, reason) for each that is not."""
    runs, skipped = [], []
    for path in sorted(Path(folder).rglob("results.json")):
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"holds a {type(data).__name__}, not a results object")
            missing = [k for k in REQUIRED if k not in data]
            if missing:
                raise ValueError(f"missing keys {missing}")
            wrong = [k for k, kind in REQUIRED.items() if not isinstance(data[k], kind)]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} of the wrong type")
            if not isinstance(data["summary"].get("target_accuracy"), (int, float)):
                raise ValueError("summary.target_accuracy missing")
            runs.append(Run(path, data))
        except (OSError, ValueError) as exc:
            skipped.append((path, str(exc)))
    distinguish(runs)
    return runs, skipped


IGNORED_KEYS = ("seed", "resume", "progress", "label", "engine", "flower_log_level", "hydra")  # never a distinction


def distinguish(runs: list[Run]) -> None:
    """Tell apart runs that would share a label, topology, dataset, target and seed: each such group gets, as
    its `distinction`, the config values that differ within it (or its folder, if none do)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.topology, run.dataset, run.base_label, run.target), []).append(run)
    for group in groups.values():
        seeds = [run.seed for run in group]
        if len(seeds) == len(set(seeds)):
            continue
        flat = [_flatten(run.data["config"]) for run in group]
        keys = sorted({k for f in flat for k in f if not k.startswith(IGNORED_KEYS)})
        differing = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
        for run, values in zip(group, flat):
            run.distinction = (" ".join(f"{k}={values.get(k)}" for k in differing) if differing
                               else str(run.path.parent))


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
