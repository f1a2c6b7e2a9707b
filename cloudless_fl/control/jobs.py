"""A job: one unit of work sent to a region, and when its phases happen.

The clock orders jobs, the cost model times them, the meter charges them;
all three share these two records.
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
