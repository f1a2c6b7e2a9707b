"""Compute pacing: a local federation whose regions compute at their topology profile's speed.

On one machine every region trains on the same cores, so the heterogeneity a
topology describes (ap-beijing 8x ap-chengdu) would be absent from every
wall-clock figure. `cloudless-fl launch` therefore tells each SuperNode its
profile's pace (`--node-config "pace-samples-per-s=..."`: samples/s of one
worker, times its efficiency and the launch's time scale), and the region
ClientApp waits out the difference between what a job took here and what the
profile says it takes on the workers that computed it (training/workers.py; the region model's
`samples / (s_r * n * eta_r)`, control/region_model.py). A job slower here
than its profile cannot be paced; it is reported, not hidden.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

NODE_KEY = "pace-samples-per-s"  # node config: the profile's samples/s per worker (efficiency, time scale applied)


@dataclass(frozen=True)
class Paced:
    """A job's compute as the profile says it took, and how far this machine fell behind that."""

    seconds: float
    behind_s: float


def profile_seconds(samples: int, workers: int, samples_per_s: float) -> float:
    """What `samples` take on `workers` workers at the profile's per-worker pace."""
    if samples_per_s <= 0 or workers < 1:
        raise ValueError(f"pace needs samples/s > 0 and workers >= 1, got {samples_per_s} and {workers}")
    return samples / (samples_per_s * workers)


def wait_out(samples: int, workers: int, samples_per_s: float, took_s: float) -> Paced:
    """Sleep until the job has lasted as long as the profile says; the compute time to report.

    A job that took longer is not hidden: it reports how far behind it is, and the server counts it
    (`summary.behind_pace`, one warning per region).
    """
    target = profile_seconds(samples, workers, samples_per_s)
    if took_s < target:
        time.sleep(target - took_s)
        return Paced(target, 0.0)
    return Paced(took_s, took_s - target)
