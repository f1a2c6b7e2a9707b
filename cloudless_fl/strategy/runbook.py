"""A run's books, kept the same way by every strategy: history, counters, stop rules, evaluation, checkpoints.

`RunBook` is what `GeoStrategy` (ASGD-GA, MA) and `Metered` (Flower's FedAvg)
share: the `History` that becomes results.json, the samples trained on, the
stop rules, central evaluation, and the common part of every checkpoint
(step, samples, meter, history). Each strategy adds its own state to the
checkpoint; nothing here knows which strategy it serves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from ..checkpoint import Checkpointer
from ..control.meter import Meter
from ..reporting.results import History
from .validation import UpdateValidator

log = logging.getLogger("cloudless_fl")
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
BUDGET_SET = "time_budget_set"  # the event of a time budget set during the run (`StopRules.settle`)


@dataclass
class StopRules:
    """Whichever comes first ends the run."""

    max_time_s: float | None = None
    max_cost_usd: float | None = None  # instance billing
    target_accuracy: float | None = None
    time_budget_later: Callable[[], float | None] | None = None  # gives `max_time_s` once the run can know it

    def settle(self) -> float | None:
        """Set a time budget that waited for the run's measurements (`auto` on the wall clock) as soon as
        `time_budget_later` gives it; returns the seconds on that call, else None."""
        if self.time_budget_later is None:
            return None
        seconds = self.time_budget_later()
        if seconds is not None:
            self.keep(seconds)
        return seconds

    def keep(self, seconds: float) -> None:
        """Fix the time budget at `seconds`, waiting for nothing more (settled now, or before a resume)."""
        self.max_time_s, self.time_budget_later = seconds, None

    def reason(self, figures: dict, accuracy: float | None) -> str | None:
        if self.max_time_s is not None and figures["time_s"] >= self.max_time_s:
            return f"time budget {self.max_time_s:g} s reached"
        cost = figures.get("cost_usd")
        if self.max_cost_usd is not None and cost and cost["instance"] >= self.max_cost_usd:
            return f"cost budget ${self.max_cost_usd:g} reached"
        if self.target_accuracy is not None and accuracy is not None and accuracy >= self.target_accuracy:
            return f"target accuracy {self.target_accuracy:g} reached"
        return None

    def spent(self, figures: dict) -> float | None:
        """The share of the time or cost budget gone, whichever is nearer its end; None without either."""
        shares = []
        if self.max_time_s:
            shares.append(figures["time_s"] / self.max_time_s)
        cost = figures.get("cost_usd")
        if self.max_cost_usd and cost:
            shares.append(cost["instance"] / self.max_cost_usd)
        return max(shares, default=None)


class RunBook:
    """History, counters, stop rules, evaluation and checkpoint state of one run.

    Parameters
    ----------
    meter : Meter
        Where the figures of every history entry come from.
    eval_every : int
        Central evaluation every k steps (and whenever forced: the start, the last step).
    stop : StopRules, optional
        Time / cost budget and target accuracy.
    checkpointer : Checkpointer, optional
        Where checkpoints go; every `checkpointer.every` steps and at the end.
    resume : bool
        Continue from `checkpointer`'s checkpoint instead of starting afresh.
    """

    def __init__(self, meter: Meter, *, eval_every: int = 1, stop: StopRules | None = None,
                 checkpointer: Checkpointer | None = None, resume: bool = False) -> None:
        if resume and checkpointer is None:
            raise ValueError("resume=True needs a checkpointer that says where the checkpoint is")
        self.meter = meter
        self.eval_every = max(1, int(eval_every))
        self.stop = stop or StopRules()
        self.checkpointer = checkpointer
        self.resume = resume
        self.history = History()
        self.step = 0  # rounds, periods or versions done
        self.samples = 0
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------ what happened
    def now(self) -> float:
        return self.meter.clock.now()

    def event(self, kind: str, counter: str | None = None, count: int = 1, **details: Any) -> None:
        """Record an event at the current time (and bump `counter`, if given)."""
        if counter is not None:
            self.history.counters[counter] += count
        self.history.event(kind, self.now(), **details)

    def count(self, counter: str, n: int = 1) -> None:
        self.history.counters[counter] += n

    def count_with(self, validator: UpdateValidator) -> None:
        """Keep the validator's rejection and clip counts as the history's (a resumed run's counts go on)."""
        validator.rejections.update(self.history.rejections)
        validator.clipped.update(self.history.clipped)
        self.history.rejections = validator.rejections
        self.history.clipped = validator.clipped

    # ------------------------------------------------------------------ evaluation and stopping
    def record(self, version: int, arrays: ArrayRecord, evaluate_fn: EvaluateFn | None,
               due: bool) -> MetricRecord | None:
        """Add a history entry for `version`, evaluated centrally if `due` (`evaluation_due`); returns the
        evaluation."""
        res = evaluate_fn(version, arrays) if evaluate_fn and due else None
        self.history.record(version, self.meter.figures(), self.samples,
                            accuracy=None if res is None else res.get("accuracy"),
                            loss=None if res is None else res.get("loss"))
        return res

    def evaluation_due(self, version: int, force: bool = False) -> bool:
        """Evaluate `version` centrally: when forced, every `eval_every`, or when a time or cost budget is
        spent (the run ends with this model: its accuracy is the run's final one)."""
        return force or version % self.eval_every == 0 or self.should_stop(None)

    def should_stop(self, accuracy: float | None) -> bool:
        settled = self.stop.settle()
        if settled is not None:
            log.info("time budget set from what the run measured: %.1f s", settled)
            self.event(BUDGET_SET, seconds=settled)
        if self.stop_reason is None:
            self.stop_reason = self.stop.reason(self.meter.figures(), accuracy)
        return self.stop_reason is not None

    def result(self, arrays: ArrayRecord) -> Result:
        """Flower's `Result`: the final model and the central evaluations by version."""
        result = Result()
        result.arrays = arrays
        for entry in self.history.entries:
            if entry["accuracy"] is not None:
                metrics = {k: entry[k] for k in ("accuracy", "loss") if entry[k] is not None}
                result.evaluate_metrics_serverapp[entry["version"]] = MetricRecord(metrics)
        return result

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_due(self, step: int, force: bool = False) -> bool:
        return self.checkpointer is not None and (force or self.checkpointer.due(step))

    def save(self, meta: dict[str, Any], tensors: dict[str, Any]) -> None:
        """Write a checkpoint: the books every strategy keeps, plus the strategy's own `meta` and `tensors`.

        A checkpoint that cannot be written (disk full, folder gone read-only)
        never ends the run: it is logged and recorded, and the run goes on to
        write its results.
        """
        books = {"step": self.step, "samples": self.samples, "meter": self.meter.state_dict(),
                 "history": self.history.state_dict()}
        try:
            self.checkpointer.save({**books, **meta}, tensors)
        except OSError as exc:
            log.error("checkpoint at step %d not written (%s); the run goes on, but cannot resume from it",
                      self.step, exc)
            self.event("checkpoint_failed", counter="failed_checkpoints", step=self.step, reason=str(exc))

    def load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore the books from the checkpoint; returns it for the strategy's own part."""
        meta, tensors = self.checkpointer.load()
        self.step, self.samples = int(meta["step"]), int(meta["samples"])
        self.meter.load_state_dict(meta["meter"])
        self.history.load_state_dict(meta["history"])
        set_before = [e["seconds"] for e in self.history.events if e["event"] == BUDGET_SET]
        if set_before and self.stop.time_budget_later is not None:  # the run keeps the budget it was given
            self.stop.keep(set_before[-1])
        self.event("resumed", step=self.step)
        return meta, tensors
