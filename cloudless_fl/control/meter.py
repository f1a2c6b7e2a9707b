"""The `Meter`: what strategies call to have each job timed and charged.

It joins a `Clock` (modelled or measured time), a `CostModel` and a `Ledger`.
Without a topology it still measures time and bytes, and reports no cost — so a
strategy dropped into a plain Flower project works unchanged.

A job's fixed overhead (`job_start_s` in the region model: in deployment, the
Flower message's trip through SuperNode and SuperExec, the ClientApp process
start, imports, data loading) is modelled in simulation and *measured* under
the wall clock: the time from dispatch to the reply's creation, minus the
compute the region reports and the download the region model gives its link.
On a WAN-emulated federation the proxies shape links with that same model, so
the remainder is the overhead; on real links it also takes up their error.
The time from the reply's creation to its arrival here beyond the modelled
upload (the SuperNode, SuperLink and our pulls relaying it) is measured apart,
as each region's reply relay: it delays the run, not the region.

Before the first job every node is asked who it is (a `query` message, when the
strategy asks: `roll_call`): one message's trip with no compute, so in
simulation the slowest region's per-job overhead and latency both ways.

Under the wall clock it also measures each region's speed per worker at each
worker count its jobs computed on, and from that the region's scaling: how
much of a lone (or the smallest measured) group's per-worker speed a bigger
group keeps. The scheduler plans with it (`Region.scaling`).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable

from flwr.app import ArrayRecord

from .clock import Clock, VirtualClock, WallClock
from .costmodel import CostModel, Ledger
from .jobs import Job, JobTiming, Reported, moving_average
from .region_model import latency_s
from .topology import Topology

MEASUREMENT_EMA = 0.3  # weight of a new measurement in a region's averages (overhead, group speeds)

log = logging.getLogger(__name__)


def record_bytes(record: ArrayRecord) -> int:
    """Bytes an ArrayRecord puts on the wire (serialised array payloads)."""
    return sum(len(a.data) for a in record.values())


class Meter:
    """Times and charges jobs.

    Parameters
    ----------
    clock : Clock
        `VirtualClock` in simulation, `WallClock` in deployment.
    cost_model : CostModel, optional
        Prices and modelled durations; None means time and bytes only.
    """

    def __init__(self, clock: Clock, cost_model: CostModel | None = None) -> None:
        if clock.modelled and cost_model is None:
            raise ValueError("a VirtualClock needs a cost model to tell it how long jobs take")
        self.clock = clock
        self.cost_model = cost_model
        self.ledger = Ledger(cost_model) if cost_model else None
        self._job_counts: dict[str, int] = defaultdict(int)
        self.wan_bytes_unpriced = 0  # bytes moved when there is no topology to price them
        self.overhead_s: dict[str, float] = {}  # region → smoothed per-job overhead (modelled or measured)
        self.behind_pace: Counter[str] = Counter()  # region → jobs slower here than its paced profile
        self.overhead_parts: dict[str, dict[str, float]] = {}  # region → smoothed parts the region reported
        self.relay_s: dict[str, float] = {}  # region → smoothed reply relay beyond the modelled upload (measured)
        self.trained_workers: dict[str, int] = {}  # region → the most workers that computed one of its jobs
        self.group_speed: dict[str, dict[int, float]] = {}  # region → workers → samples/s per worker (measured)

    @classmethod
    def simulated(cls, topology: Topology, seed: int) -> "Meter":
        return cls(VirtualClock(), CostModel(topology, seed))

    @classmethod
    def measured(cls, topology: Topology | None = None, seed: int = 0) -> "Meter":
        return cls(WallClock(), CostModel(topology, seed) if topology else None)

    def workers(self, region: str) -> int:
        return self.ledger.accounts[region].workers if self.ledger else 1

    def computed_by(self, job: Job, reported: Reported) -> int:
        """The workers a job's time was computed on: measured, the reply's count (a group that lost a worker
        is smaller than the plan's); modelled, or a reply that does not say, the count rented when it was
        dispatched (the cost model timed it with those, whatever a plan adopted since rents)."""
        if self.clock.modelled or reported.workers is None:
            return self._dispatched_with(job)
        return reported.workers

    def _dispatched_with(self, job: Job) -> int:
        return job.workers if job.workers is not None else self.workers(job.region)

    def roll_call(self, regions: Iterable[str]) -> None:
        """Every node was asked who it is before the first job. Measured, that time has passed; modelled, it
        is the slowest region's per-job overhead (`job_start_s`) and latency both ways."""
        if not self.clock.modelled:
            return
        took = max((r.job_start_s + 2 * latency_s(r) for r in map(self.cost_model.topology.region, regions)),
                   default=0.0)
        self.clock.wait_until(self.clock.now() + took)

    def dispatch(self, region: str, *, bytes_down: int, samples: int | None = None,
                 at: float | None = None) -> Job:
        """Start a job now (or at `at`); with `samples` known its modelled end is fixed at once."""
        job_id = self._job_counts[region]
        self._job_counts[region] += 1
        job = Job(region, job_id, self.clock.now() if at is None else at, bytes_down, workers=self.workers(region))
        if samples is not None and self.cost_model:
            job.timing = self._model(job, samples, bytes_up=bytes_down)
        return job

    def complete(self, job: Job, *, bytes_up: int, reported: Reported) -> tuple[float, float, float | None]:
        """Finish `job` with what its reply `reported` (samples, measured compute, ...) and charge it.

        Returns what the job took, `(work_s, transfer_s, overhead_s)`: modelled
        under the virtual clock, measured under the wall clock — what the
        scheduler learns from. `work_s` is compute without the job's fixed
        overhead, which the region model adds per job as `job_start_s`; the
        overhead is charged as busy time (it runs on the region's machine).
        A reply that reports no compute (a stock ClientApp's) has no overhead
        to tell apart from it: `overhead_s` is None (busy time is the same).
        """
        samples = reported.samples
        if self.cost_model and job.timing is None:
            job.timing = self._model(job, samples, bytes_up=bytes_up)
        end = self.clock.finish(job)
        overhead: float | None
        if self.clock.modelled:
            busy, transfer = job.timing.compute_s, job.timing.download_s + job.timing.upload_s
            overhead = self.cost_model.topology.region(job.region).job_start_s
            work = busy - overhead
        else:
            work = reported.compute_s or 0.0
            if job.timing is None:  # no cost model, no model of the link: the rest of the wait is transfer
                busy, transfer, overhead = work, max(0.0, end - job.dispatched_at - work), None
            else:  # the modelled link; the rest of the wait until the reply was made, the region was busy
                to_reply = max(0.0, end - reported.replied_s_ago - job.dispatched_at)  # dispatch → reply made
                download = min(job.timing.download_s, max(0.0, to_reply - work))
                busy, transfer = max(work, to_reply - download), download + job.timing.upload_s  # clock skew
                overhead = None if reported.compute_s is None else busy - work
                relay = max(0.0, min(reported.replied_s_ago, end - job.dispatched_at) - job.timing.upload_s)
                self.relay_s[job.region] = moving_average(self.relay_s.get(job.region), relay, MEASUREMENT_EMA)
            if reported.behind_s > 0:
                self._note_behind(job.region, reported.behind_s)
            if reported.workers is not None:
                self.trained_workers[job.region] = max(reported.workers, self.trained_workers.get(job.region, 0))
                self._note_group_speed(job.region, reported.workers, samples, work)
            self._note_parts(job.region, reported)
        if overhead is not None:
            self.overhead_s[job.region] = moving_average(self.overhead_s.get(job.region), overhead, MEASUREMENT_EMA)
        if self.ledger:
            self.ledger.record_job(job.region, busy, transfer, job.bytes_down, bytes_up)
            self.ledger.hold_until(self.clock.now())
        else:
            self.wan_bytes_unpriced += job.bytes_down + bytes_up
        return work, transfer, overhead

    def _note_parts(self, region: str, reported: Reported) -> None:
        """The parts of the overhead the region itself saw (its process start, its data load)."""
        parts = self.overhead_parts.setdefault(region, {})
        for name, seconds in (("process_start_s", reported.startup_s), ("data_load_s", reported.load_s)):
            if seconds is not None:
                parts[name] = moving_average(parts.get(name), seconds, MEASUREMENT_EMA)

    def _note_group_speed(self, region: str, workers: int, samples: int, work_s: float) -> None:
        if samples > 0 and work_s > 0:
            speeds = self.group_speed.setdefault(region, {})
            speeds[workers] = moving_average(speeds.get(workers), samples / work_s / workers, MEASUREMENT_EMA)

    def scaling(self, region: str) -> tuple[tuple[int, float], ...]:
        """The region's measured group efficiency per worker count: per-worker speed relative to that of the
        smallest count it computed on (1 for a lone worker). Empty until its jobs computed on two counts."""
        speeds = self.group_speed.get(region, {})
        if len(speeds) < 2:
            return ()
        counts = sorted(speeds)
        return tuple((n, speeds[n] / speeds[counts[0]]) for n in counts)

    def _note_behind(self, region: str, seconds: float) -> None:
        if not self.behind_pace[region]:
            log.warning("region %s computes slower than its profile (%.2f s behind on one job): the deployment is "
                        "slower than the topology it emulates (summary.behind_pace counts such jobs)", region, seconds)
        self.behind_pace[region] += 1

    def abandon(self, job: Job, at: float) -> None:
        """A job cut off at `at` (a missed deadline): charge its download and the compute done by then."""
        if self.ledger:
            if job.timing is not None:
                busy = min(max(0.0, at - job.dispatched_at - job.timing.download_s), job.timing.compute_s)
                transfer = min(job.timing.download_s, max(0.0, at - job.dispatched_at))
            else:
                busy, transfer = max(0.0, at - job.dispatched_at), 0.0
            self.ledger.record_job(job.region, busy, transfer, job.bytes_down, 0)
        else:
            self.wan_bytes_unpriced += job.bytes_down

    def _model(self, job: Job, samples: int, bytes_up: int) -> JobTiming:
        return self.cost_model.job(job.region, job.dispatched_at, bytes_down=job.bytes_down, samples=samples,
                                   bytes_up=bytes_up, workers=self._dispatched_with(job), job_id=job.job_id)

    def state_dict(self) -> dict:
        """The books so far, for a checkpoint: time, job counters, ledger, unpriced bytes."""
        return {"now": self.clock.now(), "job_counts": dict(self._job_counts),
                "ledger": self.ledger.state_dict() if self.ledger else None,
                "wan_bytes_unpriced": self.wan_bytes_unpriced, "overhead_s": dict(self.overhead_s),
                "overhead_parts": self.overhead_parts, "behind_pace": dict(self.behind_pace),
                "relay_s": dict(self.relay_s),
                "trained_workers": dict(self.trained_workers),
                "group_speed": {r: dict(s) for r, s in self.group_speed.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.clock.restore(float(state["now"]))
        self._job_counts = defaultdict(int, state["job_counts"])
        if self.ledger and state["ledger"] is not None:
            self.ledger.load_state_dict(state["ledger"])
        self.wan_bytes_unpriced = int(state["wan_bytes_unpriced"])
        self.overhead_s = dict(state.get("overhead_s", {}))  # absent from checkpoints of earlier versions
        self.behind_pace = Counter(state.get("behind_pace", {}))
        self.overhead_parts = {r: dict(p) for r, p in state.get("overhead_parts", {}).items()}
        self.relay_s = dict(state.get("relay_s", {}))
        self.trained_workers = dict(state.get("trained_workers", {}))
        self.group_speed = {r: {int(n): v for n, v in s.items()} for r, s in state.get("group_speed", {}).items()}

    def figures(self) -> dict:
        """Time, cost and WAN bytes so far, in the `results.json` history shape."""
        now = self.clock.now()
        if not self.ledger:
            return {"time_s": now, "cost_usd": None, "wan_bytes": self.wan_bytes_unpriced}
        self.ledger.hold_until(now)
        return {"time_s": now, "cost_usd": self.ledger.cost_usd(), "wan_bytes": self.ledger.wan_bytes}

    def job_figures(self) -> dict:
        """Per region: the smoothed per-job overhead (seconds; modelled, or measured under the wall clock),
        the parts of it the region reported, how many jobs fell behind their paced profile, and (measured
        only: in simulation they are modelled) the smoothed reply relay, the samples/s per worker at each
        worker count, the most workers that computed one job and the scaling efficiency per worker count
        (regions whose jobs computed on two counts or more)."""
        return {"job_overhead_s": dict(self.overhead_s), "job_overhead_parts": self.overhead_parts,
                "behind_pace": dict(self.behind_pace), "reply_relay_s": dict(self.relay_s),
                "speed_per_worker": {r: {str(n): v for n, v in s.items()} for r, s in self.group_speed.items()},
                "workers": dict(self.trained_workers),
                "scaling_efficiency": {r: {str(n): e for n, e in self.scaling(r)}
                                       for r in self.group_speed if self.scaling(r)}}

    def per_job_s(self) -> dict[str, float]:
        """Per region measured so far: the fixed time one job costs beyond its compute and modelled transfer
        (its overhead plus its reply relay), what the region model calls `job_start_s`."""
        return {region: overhead + self.relay_s.get(region, 0.0) for region, overhead in self.overhead_s.items()}

    def utilization(self) -> dict[str, float] | None:
        if not self.ledger:
            return None
        self.ledger.hold_until(self.clock.now())
        return {name: acc.utilization for name, acc in self.ledger.accounts.items()}
