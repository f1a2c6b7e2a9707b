"""A job: one unit of work sent to a region, and when its phases happen.

The clock orders jobs, the cost model times them, the meter charges them;
all three share these records.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobTiming:
    """When a job's phases happen, in seconds of (virtual) time."""

    start: float
    download_s: float
    compute_s: float
    upload_s: float

    @property
    def end(self) -> float:
        return self.start + self.download_s + self.compute_s + self.upload_s


@dataclass
class Job:
    """One dispatched unit of work, with its modelled timing when a topology is known."""

    region: str
    job_id: int
    dispatched_at: float
    bytes_down: int
    timing: JobTiming | None = None
    # workers rented when it was dispatched: the order told the region to start them, the cost model times
    # it with them (a plan adopted while it runs changes later jobs only); None: kept by an older checkpoint
    workers: int | None = None


@dataclass(frozen=True)
class Reported:
    """What a region's reply says about a finished job, and how long the reply waited at the server."""

    samples: int
    compute_s: float | None = None  # its compute (paced: as long as the profile says); None: not reported
    replied_s_ago: float = 0.0  # since the reply was created on the node
    behind_s: float = 0.0  # how far the region fell behind its paced profile
    startup_s: float | None = None  # ClientApp process start → its handler: interpreter, imports, app load
    load_s: float | None = None  # the handler reading its resident data and building the model
    workers: int | None = None  # data-parallel workers that computed it (training/workers.py); None: not said


def moving_average(old: float | None, new: float, weight: float) -> float:
    """An exponential moving average of measurements; `weight` is the newest one's share (the first is taken as is)."""
    return new if old is None else (1 - weight) * old + weight * new
