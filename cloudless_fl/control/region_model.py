"""The one model of a region: how fast it computes, how long its link takes, what its traffic costs.

Every part that reasons about regions uses these formulas and nothing else:
the cost model (job timing and prices in simulation), the scheduler (plans,
and reading measurements back into profiles) and the WAN proxy (shaping a
region's real link in deployment).

- compute: a job of `samples` on `n` workers takes
  `job_start_s + samples / (s_r * n * eta_r * g_r(n))` seconds (`job_start_s`
  is the fixed start-up of every job: in deployment each Flower message starts
  a ClientApp process; `g_r(n)` is the group efficiency a measured run found
  for `n` workers, 1 where none was measured, so profiles alone use `eta_r`);
- transfer: `latency + 8 * bytes / bandwidth(t)` over the region's link, whose
  bandwidth follows the topology's seeded fluctuation model or a trace (the
  scheduler plans on the nominal bandwidth);
- egress: bytes leaving a region at that region's price; traffic inside one
  region (the coordinator's own) is free.
"""

from __future__ import annotations

from .bandwidth import Bandwidth, ConstantBandwidth, FluctuatingBandwidth, TraceBandwidth, integrate_transfer
from .topology import Region, Topology

UP, DOWN = "up", "down"  # up: region → coordinator; down: coordinator → region


def group_efficiency(region: Region, workers: int) -> float:
    """The measured efficiency of a group of `workers`: its per-worker speed over that of the smallest group
    measured (1 when nothing was). Between measured counts the group's throughput is interpolated; past the
    largest it grows by the last measured gain per worker, or not at all where that gain was a loss; below
    the smallest, workers are as fast as there."""
    points = region.scaling
    if len(points) < 2 or workers <= points[0][0]:
        return 1.0
    rates = [(n, n * e) for n, e in points]  # throughput, in units of one worker of the smallest group
    for (n0, t0), (n1, t1) in zip(rates, rates[1:]):
        if workers <= n1:
            return (t0 + (t1 - t0) * (workers - n0) / (n1 - n0)) / workers
    (n0, t0), (n1, t1) = rates[-2:]
    return (t1 + max(0.0, (t1 - t0) / (n1 - n0)) * (workers - n1)) / workers


def throughput(region: Region, workers: int) -> float:
    """Samples per second of `workers` workers in `region`."""
    return region.samples_per_s * workers * region.efficiency * group_efficiency(region, workers)


def work_seconds(region: Region, samples: int, workers: int) -> float:
    """Seconds `samples` take on `workers` workers, without the job's fixed start-up."""
    return samples / throughput(region, workers)


def compute_seconds(region: Region, samples: int, workers: int) -> float:
    """A job's compute time: its fixed start-up, then its samples at the region's speed."""
    return region.job_start_s + work_seconds(region, samples, workers)


def speed_per_worker(region: Region, samples: int, work_s: float, workers: int) -> float:
    """The per-worker samples/s that a measured `work_s` (start-up excluded) implies."""
    return samples / (work_s * workers * region.efficiency * group_efficiency(region, workers))


def link_bandwidth(topology: Topology, region: str, direction: str, seed: int) -> Bandwidth:
    """The region's link in one direction over time: its trace, or the seeded fluctuation model."""
    link = topology.region(region).link
    if link.trace:
        return TraceBandwidth.from_csv(link.trace)
    mbps = link.up_mbps if direction == UP else link.down_mbps
    return FluctuatingBandwidth(mbps, topology.fluctuation, seed, f"{region}/{direction}")


def nominal_bandwidth(region: Region, direction: str) -> Bandwidth:
    """The profile's bandwidth in one direction, without fluctuation (what plans assume)."""
    return ConstantBandwidth(region.link.up_mbps if direction == UP else region.link.down_mbps)


def latency_s(region: Region) -> float:
    return region.link.latency_ms / 1000.0


def transfer_seconds(topology: Topology, region: str, bandwidth: Bandwidth, start: float, nbytes: int) -> float:
    """Seconds to move `nbytes` over the region's link from `start`: latency, then bits at the varying rate."""
    if topology.free_communication:
        return 0.0
    return integrate_transfer(bandwidth, start, nbytes, latency_s(topology.region(region)))


def link_mbps_from(region: Region, nbytes: int, transfer_s: float, transfers: int = 2) -> float | None:
    """The bandwidth a measured transfer time implies (`transfers` one-way latencies taken off), or None."""
    wire_s = transfer_s - transfers * latency_s(region)
    if nbytes <= 0 or wire_s <= 0:
        return None
    return 8.0 * nbytes / wire_s / 1e6


def crosses_wan(topology: Topology, region: str) -> bool:
    """Whether traffic between `region` and the coordinator leaves a region."""
    return region != topology.coordinator and not topology.free_communication


def egress_usd(topology: Topology, region: str, nbytes: int, direction: str) -> float:
    """Egress fee of a transfer: charged by the region the bytes leave."""
    if not crosses_wan(topology, region):
        return 0.0
    payer = topology.region(region if direction == UP else topology.coordinator)
    return nbytes / 1e9 * payer.egress_usd_per_gb

