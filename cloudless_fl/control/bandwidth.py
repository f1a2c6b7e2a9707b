"""Link bandwidth over (virtual) time: constant, a seeded fluctuation model, or a measured trace.

Each exposes `segment(t) -> (mbps, until)`: the bandwidth in force at time `t`
and when it next may change. `integrate_transfer` moves a transfer across such
changes, so a transfer that starts fast and runs into a dip takes the right time.
"""

from __future__ import annotations

import bisect
import csv
import math
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import ConfigError
from .topology import Fluctuation


class Bandwidth(Protocol):
    def segment(self, t: float) -> tuple[float, float]:
        """(Mbit/s in force at `t`, the time it may next change)."""


class ConstantBandwidth:
    """A link's nominal bandwidth, forever (what the scheduler plans with)."""

    def __init__(self, mbps: float) -> None:
        self.mbps = mbps

    def segment(self, t: float) -> tuple[float, float]:
        return self.mbps, math.inf


class FluctuatingBandwidth:
    """Nominal bandwidth times a per-window factor drawn from `(seed, link, window)`.

    The factor is lognormal with median 1 and `sigma`; with `dip_probability` the
    window is a dip at `dip_factor` instead. Same seed → same bandwidth at every t.
    """

    def __init__(self, nominal_mbps: float, fluctuation: Fluctuation, seed: int, link_key: str) -> None:
        self.nominal_mbps = nominal_mbps
        self.fluct = fluctuation
        self._key = [int(seed) & 0xFFFFFFFF, zlib.crc32(link_key.encode())]
        self._factors: dict[int, float] = {}

    def factor(self, window: int) -> float:
        f = self._factors.get(window)
        if f is None:
            rng = np.random.default_rng([*self._key, window])
            jitter, dip = rng.standard_normal(), rng.random()
            f = self.fluct.dip_factor if dip < self.fluct.dip_probability else math.exp(self.fluct.sigma * jitter)
            self._factors[window] = f
        return f

    def segment(self, t: float) -> tuple[float, float]:
        if self.fluct.sigma == 0 and self.fluct.dip_probability == 0:
            return self.nominal_mbps, math.inf
        window = int(t // self.fluct.window_s)
        return self.nominal_mbps * self.factor(window), (window + 1) * self.fluct.window_s


class TraceBandwidth:
    """A step function read from a `t_seconds,mbps` CSV; the last value holds forever."""

    def __init__(self, times: list[float], mbps: list[float]) -> None:
        if not times or times[0] != 0:
            raise ConfigError("a bandwidth trace must start at t_seconds = 0")
        if any(b <= a for a, b in zip(times, times[1:])):
            raise ConfigError("bandwidth trace times must be strictly increasing")
        if any(m <= 0 for m in mbps):
            raise ConfigError("bandwidth trace values must be > 0 Mbps (model an outage as a small value)")
        self.times, self.mbps = times, mbps

    @classmethod
    def from_csv(cls, path: str | Path) -> "TraceBandwidth":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"bandwidth trace {path} does not exist")
        times, values = [], []
        with path.open() as fh:
            for row in csv.reader(fh):
                if not row or row[0].strip().startswith("#") or row[0].strip() == "t_seconds":
                    continue
                try:
                    times.append(float(row[0]))
                    values.append(float(row[1]))
                except (ValueError, IndexError) as exc:
                    raise ConfigError(f"{path}: bad trace row {row!r}; expected 't_seconds,mbps'") from exc
        return cls(times, values)

    def segment(self, t: float) -> tuple[float, float]:
        i = bisect.bisect_right(self.times, t) - 1
        until = self.times[i + 1] if i + 1 < len(self.times) else math.inf
        return self.mbps[i], until


def integrate_transfer(link: Bandwidth, start: float, nbytes: int, latency_s: float) -> float:
    """Seconds to move `nbytes` starting at `start`: latency, then bits at the varying rate."""
    if nbytes <= 0:
        return 0.0
    t = start + latency_s
    remaining = 8.0 * nbytes
    while True:
        mbps, until = link.segment(t)
        rate = mbps * 1e6
        if t + remaining / rate <= until:
            return t + remaining / rate - start
        remaining -= rate * (until - t)
        t = until
