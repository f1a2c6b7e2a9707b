"""One notion of time for strategies, modelled (simulation) or measured (deployment).

`VirtualClock`: time is what the cost model says; jobs complete in order of
their modelled end, whatever order the engine returns replies in, so a
simulated run is deterministic for a seed. `WallClock`: time is measured, jobs
complete in arrival order.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

from .jobs import Job

K = TypeVar("K", bound=Hashable)


class Clock(ABC):
    """The interface strategies use, blind to which clock is behind it."""

    modelled: bool

    @abstractmethod
    def now(self) -> float:
        """Seconds since the run started."""

    @abstractmethod
    def restore(self, t: float) -> None:
        """Continue from `t` seconds already elapsed (a resumed run)."""

    @abstractmethod
    def finish(self, job: Job) -> float:
        """Mark `job` complete and return its completion time."""

    @abstractmethod
    def wait_until(self, t: float) -> None:
        """Let time pass up to `t` (a deadline nobody met)."""

    @abstractmethod
    def pick(self, pending: Mapping[K, Job], arrived: Sequence[K]) -> K | None:
        """Which pending job to complete next, given the replies `arrived` (in arrival order).

        None means: wait for more replies.
        """


class VirtualClock(Clock):
    """Modelled time; never goes backwards."""

    modelled = True

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def restore(self, t: float) -> None:
        self._now = t

    def finish(self, job: Job) -> float:
        self._now = max(self._now, job.timing.end)
        return job.timing.end

    def wait_until(self, t: float) -> None:
        self._now = max(self._now, t)

    def pick(self, pending: Mapping[K, Job], arrived: Sequence[K]) -> K | None:
        if not pending:
            return None
        first = min(pending, key=lambda k: (pending[k].timing.end, pending[k].region))
        return first if first in arrived else None


class WallClock(Clock):
    """Measured time from construction (or from `start` seconds already elapsed)."""

    modelled = False

    def __init__(self, start: float = 0.0) -> None:
        self._t0 = time.monotonic() - start

    def now(self) -> float:
        return time.monotonic() - self._t0

    def restore(self, t: float) -> None:
        self._t0 = time.monotonic() - t

    def finish(self, job: Job) -> float:
        return self.now()

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.now()))

    def pick(self, pending: Mapping[K, Job], arrived: Sequence[K]) -> K | None:
        return next((k for k in arrived if k in pending), None)
