"""Progress of a run on the console: a live tqdm line on a terminal, plain lines otherwise.

A terminal gets one bar per run, updated at every round/version with the last
accuracy, virtual time, cost and WAN traffic; it fills with the run's time
against its time budget when it has one (the default), else with its
rounds/versions. When output is not a terminal
(logs, CI, Hydra multirun piped to a file) each evaluated round/version prints
one complete line instead, so logs never fill with carriage returns.
`progress=false` switches both off.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class Progress:
    """A `History` listener; call `close()` when the run ends."""

    def __init__(self, strategy: str, total: int, unit: str, time_budget_s: float | None = None,
                 live: bool | None = None) -> None:
        self.strategy = strategy
        self.unit = unit  # what `total` counts: round, period or version
        self.time_budget_s = time_budget_s
        self.live = sys.stderr.isatty() if live is None else live
        self.bar = None
        if self.live:
            self.bar = (tqdm(total=total, desc=strategy, unit=self.unit, dynamic_ncols=True) if time_budget_s is None
                        else tqdm(total=round(time_budget_s, 1), desc=strategy, unit="s", dynamic_ncols=True))
        self._last_accuracy = "    -"

    def __call__(self, entry: dict[str, Any]) -> None:
        cost = entry["cost_usd"]["instance"] if entry.get("cost_usd") else float("nan")
        if entry["accuracy"] is not None:
            self._last_accuracy = f"{entry['accuracy']:.4f}"
        figures = (f"t={entry['time_s']:8.2f}s  acc={self._last_accuracy}  cost=${cost:.4f}  "
                   f"wan={entry['wan_bytes'] / 1e6:8.1f} MB")
        if self.bar is not None:
            if self.time_budget_s is None:
                self.bar.n = entry["version"]
            else:
                self.bar.n = round(min(entry["time_s"], self.time_budget_s), 1)
                figures = f"{self.unit} {entry['version']}  {figures}"
            self.bar.set_postfix_str(figures, refresh=True)
        elif entry["accuracy"] is not None:
            print(f"[{self.strategy}] {self.unit} {entry['version']:>4}  {figures}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
