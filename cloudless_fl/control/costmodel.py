"""Time and price of work in a topology: what every strategy is charged by.

A job on region r = download the model + compute + upload the reply, each
timed by the region model (`region_model`: compute with its fixed start-up,
transfers over the link's fluctuating bandwidth), compute times a seeded
jitter. The `Ledger` accumulates what was spent, per region:

- `instance` billing: every rented worker is paid for all the time it is held,
  idle (waiting at a barrier) included;
- `serverless` billing: busy (compute) worker-seconds plus a cold-start charge
  per invocation;
- egress: bytes leaving a region, at that region's price; free inside one region.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from . import region_model
from .jobs import JobTiming
from .region_model import DOWN, UP
from .topology import Region, Topology

COMPUTE_JITTER_SIGMA = 0.05
_JITTER_BLOCK = 1024


class CostModel:
    """Modelled durations and prices for one topology and seed.

    Parameters
    ----------
    topology : Topology
        Region profiles and links.
    seed : int
        Seeds bandwidth fluctuation and compute jitter: same seed, same figures.
    compute_jitter : float
        Lognormal sigma of the per-job compute-time jitter.
    """

    def __init__(self, topology: Topology, seed: int, compute_jitter: float = COMPUTE_JITTER_SIGMA) -> None:
        self.topology = topology
        self.seed = int(seed)
        self.compute_jitter = compute_jitter
        self._jitter_blocks: dict[tuple[str, int], list[float]] = {}
        self._links = {(r.name, d): region_model.link_bandwidth(topology, r.name, d, seed)
                       for r in topology.regions for d in (UP, DOWN)}

    def crosses_wan(self, region: str) -> bool:
        return region_model.crosses_wan(self.topology, region)

    def transfer_seconds(self, region: str, start: float, nbytes: int, direction: str) -> float:
        return region_model.transfer_seconds(self.topology, region, self._links[region, direction], start, nbytes)

    def throughput(self, region: str, workers: int) -> float:
        return region_model.throughput(self.topology.region(region), workers)

    def compute_seconds(self, region: str, samples: int, workers: int, job_id: int) -> float:
        """The region model's compute time of the job, times its seeded jitter."""
        base = region_model.compute_seconds(self.topology.region(region), samples, workers)
        if self.compute_jitter == 0:
            return base
        return base * math.exp(self.compute_jitter * self._jitter_normal(region, job_id))

    def _jitter_normal(self, region: str, job_id: int) -> float:
        """Standard normal for (seed, region, job): drawn in seeded blocks, so cheap per job."""
        block, i = divmod(job_id, _JITTER_BLOCK)
        draws = self._jitter_blocks.get((region, block))
        if draws is None:
            rng = np.random.default_rng([self.seed, zlib.crc32(region.encode()), block])
            draws = self._jitter_blocks[region, block] = rng.standard_normal(_JITTER_BLOCK).tolist()
        return draws[i]

    def job(self, region: str, start: float, *, bytes_down: int, samples: int, bytes_up: int,
            workers: int, job_id: int) -> JobTiming:
        """Timing of a job dispatched at `start`: download, compute, upload in sequence."""
        down = self.transfer_seconds(region, start, bytes_down, DOWN)
        compute = self.compute_seconds(region, samples, workers, job_id)
        up = self.transfer_seconds(region, start + down + compute, bytes_up, UP)
        return JobTiming(start, down, compute, up)

    def egress_usd(self, region: str, nbytes: int, direction: str) -> float:
        return region_model.egress_usd(self.topology, region, nbytes, direction)


@dataclass
class RegionAccount:
    """What one region used and paid so far."""

    workers: int = 1
    held_until: float = 0.0
    held_worker_s: float = 0.0
    busy_worker_s: float = 0.0
    busy_s: float = 0.0
    transfer_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    wan_bytes: int = 0
    egress_usd: float = 0.0
    instance_usd: float = 0.0
    serverless_usd: float = 0.0
    invocations: int = 0

    @property
    def idle_s(self) -> float:
        """Held time spent neither computing nor transferring (waiting at a barrier, say)."""
        return max(0.0, self.held_worker_s / max(self.workers, 1) - self.busy_s - self.transfer_s)

    @property
    def utilization(self) -> float:
        return self.busy_worker_s / self.held_worker_s if self.held_worker_s > 0 else 0.0


@dataclass
class Ledger:
    """Accumulates $ compute (both billings), $ egress, bytes, busy and held time per region."""

    cost_model: CostModel
    accounts: dict[str, RegionAccount] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._prices = {r.name: r.usd_per_worker_hour for r in self.cost_model.topology.regions}
        for r in self.cost_model.topology.regions:
            self.accounts.setdefault(r.name, RegionAccount(workers=r.workers_min))

    def _region(self, name: str) -> Region:
        return self.cost_model.topology.region(name)

    def set_workers(self, region: str, workers: int, at: float) -> None:
        """Change how many workers `region` rents from time `at` on."""
        self.hold_until(at)
        self.accounts[region].workers = workers

    def hold_until(self, t: float) -> None:
        """Bill every region's rented workers (instance billing) up to time `t`."""
        for name, acc in self.accounts.items():
            if t > acc.held_until:
                worker_s = (t - acc.held_until) * acc.workers
                acc.held_worker_s += worker_s
                acc.instance_usd += worker_s * self._prices[name] / 3600.0
                acc.held_until = t

    def record_job(self, region: str, compute_s: float, transfer_s: float, bytes_down: int, bytes_up: int) -> None:
        """Charge one job: busy and transfer time, serverless invocation, bytes and egress."""
        acc = self.accounts[region]
        r = self._region(region)
        acc.busy_s += compute_s
        acc.transfer_s += transfer_s
        acc.busy_worker_s += compute_s * acc.workers
        acc.serverless_usd += compute_s * acc.workers * r.usd_per_worker_hour / 3600.0 + r.cold_start_usd
        acc.invocations += 1
        acc.bytes_down += bytes_down
        acc.bytes_up += bytes_up
        cm = self.cost_model
        if cm.crosses_wan(region):
            acc.wan_bytes += bytes_down + bytes_up
        acc.egress_usd += cm.egress_usd(region, bytes_down, DOWN) + cm.egress_usd(region, bytes_up, UP)

    @property
    def wan_bytes(self) -> int:
        return sum(a.wan_bytes for a in self.accounts.values())

    def cost_usd(self) -> dict[str, float]:
        """Total cost so far under each billing mode (compute + egress)."""
        parts = self.breakdown()
        return {"instance": parts["compute_instance"] + parts["egress"],
                "serverless": parts["compute_serverless"] + parts["egress"]}

    def state_dict(self) -> dict:
        return {name: asdict(acc) for name, acc in self.accounts.items()}

    def load_state_dict(self, state: dict) -> None:
        self.accounts = {name: RegionAccount(**fields) for name, fields in state.items()}

    def breakdown(self) -> dict[str, float]:
        return {
            "compute_instance": sum(a.instance_usd for a in self.accounts.values()),
            "compute_serverless": sum(a.serverless_usd for a in self.accounts.values()),
            "egress": sum(a.egress_usd for a in self.accounts.values()),
        }
