"""Progress of a run on the console: a live tqdm line on a terminal, plain lines otherwise.

A terminal gets one bar per run, updated at every round/version with the last
accuracy, virtual time, cost and WAN traffic; it fills with the run's time
against its time budget when it has one (the default; on the wall clock from
when the run has measured it), else with its rounds/versions. When output is not a terminal
(logs, CI, Hydra multirun piped to a file) each evaluated round/version prints
one complete line instead, so logs never fill with carriage returns.
`progress=false` switches both off.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm


class Progress:
    """A `History` listener; call `close()` when the run ends.

    `time_budget_s()` is the run's time budget now (None: none, or not set yet); asked at every entry, so a
    budget set during the run turns the bar from counting rounds to filling with time."""

    def __init__(self, strategy: str, total: int, unit: str,
                 time_budget_s: Callable[[], float | None] = lambda: None, live: bool | None = None) -> None:
        self.strategy = strategy
        self.unit = unit  # what `total` counts: round, period or version
        self.time_budget_s = time_budget_s
        self.live = sys.stderr.isatty() if live is None else live
        budget = time_budget_s()
        self._timed = budget is not None  # the bar fills with time
        self.bar = (tqdm(total=round(budget, 1) if self._timed else total, desc=strategy,
                         unit="s" if self._timed else self.unit, dynamic_ncols=True) if self.live else None)
        self._last_accuracy = "    -"

    def __call__(self, entry: dict[str, Any]) -> None:
        cost = entry["cost_usd"]["instance"] if entry.get("cost_usd") else float("nan")
        if entry["accuracy"] is not None:
            self._last_accuracy = f"{entry['accuracy']:.4f}"
        figures = (f"t={entry['time_s']:8.2f}s  acc={self._last_accuracy}  cost=${cost:.4f}  "
                   f"wan={entry['wan_bytes'] / 1e6:8.1f} MB")
        if self.bar is not None:
            budget = self.time_budget_s()
            if budget is not None and not self._timed:
                self.bar.reset(total=round(budget, 1))
                self.bar.unit, self._timed = "s", True
            if self._timed:
                self.bar.n = round(min(entry["time_s"], budget), 1)
                figures = f"{self.unit} {entry['version']}  {figures}"
            else:
                self.bar.n = entry["version"]
            self.bar.set_postfix_str(figures, refresh=True)
        elif entry["accuracy"] is not None:
            print(f"[{self.strategy}] {self.unit} {entry['version']:>4}  {figures}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
