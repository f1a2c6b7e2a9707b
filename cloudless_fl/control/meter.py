"""The `Meter`: what strategies call to have each job timed and charged.

It joins a `Clock` (modelled or measured time), a `CostModel` and a `Ledger`.
Without a topology it still measures time and bytes, and reports no cost — so a
strategy dropped into a plain Flower project works unchanged.
"""

from __future__ import annotations

from collections import defaultdict

from flwr.app import ArrayRecord

from .clock import Clock, VirtualClock, WallClock
from .costmodel import CostModel, Ledger
from .jobs import Job, JobTiming
from .topology import Topology


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

    @classmethod
    def simulated(cls, topology: Topology, seed: int) -> "Meter":
        return cls(VirtualClock(), CostModel(topology, seed))

    @classmethod
    def measured(cls, topology: Topology | None = None, seed: int = 0) -> "Meter":
        return cls(WallClock(), CostModel(topology, seed) if topology else None)

    def workers(self, region: str) -> int:
        return self.ledger.accounts[region].workers if self.ledger else 1

    def dispatch(self, region: str, *, bytes_down: int, samples: int | None = None,
                 at: float | None = None) -> Job:
        """Start a job now (or at `at`); with `samples` known its modelled end is fixed at once."""
        job_id = self._job_counts[region]
        self._job_counts[region] += 1
        job = Job(region, job_id, self.clock.now() if at is None else at, bytes_down)
        if samples is not None and self.cost_model:
            job.timing = self._model(job, samples, bytes_up=bytes_down)
        return job

    def complete(self, job: Job, *, bytes_up: int, samples: int, compute_s: float) -> tuple[float, float]:
        """Finish `job` (reported `samples`, measured `compute_s`) and charge it.

        Returns what the job took, `(work_s, transfer_s)`: modelled under the
        virtual clock, measured under the wall clock — what the scheduler learns
        from. `work_s` leaves out the job's fixed start-up (`job_start_s`), which
        the region model adds per job (a ClientApp measures only its own compute).
        """
        if self.cost_model and job.timing is None:
            job.timing = self._model(job, samples, bytes_up=bytes_up)
        end = self.clock.finish(job)
        if self.clock.modelled:
            busy, transfer = job.timing.compute_s, job.timing.download_s + job.timing.upload_s
            work = busy - self.cost_model.topology.region(job.region).job_start_s
        else:
            busy, transfer = compute_s, max(0.0, end - job.dispatched_at - compute_s)
            work = busy
        if self.ledger:
            self.ledger.record_job(job.region, busy, transfer, job.bytes_down, bytes_up)
            self.ledger.hold_until(self.clock.now())
        else:
            self.wan_bytes_unpriced += job.bytes_down + bytes_up
        return work, transfer

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
                                   bytes_up=bytes_up, workers=self.workers(job.region), job_id=job.job_id)

    def state_dict(self) -> dict:
        """The books so far, for a checkpoint: time, job counters, ledger, unpriced bytes."""
        return {"now": self.clock.now(), "job_counts": dict(self._job_counts),
                "ledger": self.ledger.state_dict() if self.ledger else None,
                "wan_bytes_unpriced": self.wan_bytes_unpriced}

    def load_state_dict(self, state: dict) -> None:
        self.clock.restore(float(state["now"]))
        self._job_counts = defaultdict(int, state["job_counts"])
        if self.ledger and state["ledger"] is not None:
            self.ledger.load_state_dict(state["ledger"])
        self.wan_bytes_unpriced = int(state["wan_bytes_unpriced"])

    def figures(self) -> dict:
        """Time, cost and WAN bytes so far, in the `results.json` history shape."""
        now = self.clock.now()
        if not self.ledger:
            return {"time_s": now, "cost_usd": None, "wan_bytes": self.wan_bytes_unpriced}
        self.ledger.hold_until(now)
        return {"time_s": now, "cost_usd": self.ledger.cost_usd(), "wan_bytes": self.ledger.wan_bytes}

    def utilization(self) -> dict[str, float] | None:
        if not self.ledger:
            return None
        self.ledger.hold_until(self.clock.now())
        return {name: acc.utilization for name, acc in self.ledger.accounts.items()}
