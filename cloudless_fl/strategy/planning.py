"""A strategy following the elastic scheduler's plan: rent its workers, use its local work, re-plan.

`PlanFollower` is the strategies' side of the scheduler: it plans for the
regions that joined, adopts each new plan (workers rented from now on in the
ledger, local steps per region), re-plans every `replan_every` steps from what
the jobs measured, and leaves out or takes back regions as they are lost or
rejoin. Every adopted plan is a `plan` event in results.json.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..control.jobs import Job, Reported
from ..control.meter import Meter
from ..control.scheduler import Plan, Scheduler
from ..errors import ConfigError
from .runbook import RunBook

REPLAN_EVERY = 5  # steps between re-plans unless a run says otherwise (conf/scheduler/elastic.yaml: the same)


class PlanFollower:
    """Parameters
    ----------
    scheduler : Scheduler
    meter : Meter
        Its ledger rents the plan's workers.
    book : RunBook
        Where plan changes are recorded.
    replan_every : int
        Steps (versions or periods) between re-plans.
    """

    def __init__(self, scheduler: Scheduler, meter: Meter, book: RunBook, replan_every: int = REPLAN_EVERY) -> None:
        self.scheduler = scheduler
        self.meter = meter
        self.book = book
        self.replan_every = max(1, int(replan_every))
        self.steps: dict[str, int] | None = None  # the adopted plan's local work per region taking part

    def start(self, data_sizes: dict[str, int], model_bytes: int, worker_caps: dict[str, int] | None = None) -> None:
        """Plan now for the regions that joined (`prepare`), before any job has gone out."""
        self.prepare(data_sizes, model_bytes, worker_caps)
        self.adopt(self.scheduler.start(self.meter.clock.now()))

    def prepare(self, data_sizes: dict[str, int], model_bytes: int, worker_caps: dict[str, int] | None = None) -> None:
        """What the first plan is for: the regions that joined, their resident data sizes, the model's size
        and, where a region's SuperNode said, the most workers it starts for one job. Until a plan is
        adopted the strategy's own local work and the regions' minimum workers are used."""
        names = set(data_sizes)
        unknown = names - set(self.scheduler.topology.region_names)
        if unknown:
            raise ConfigError(f"the scheduler's topology has no region(s) {', '.join(sorted(unknown))}; "
                              "name each SuperNode's region (node-config region='...') after the topology")
        self.scheduler.set_workload(data_sizes=data_sizes, model_bytes=model_bytes, worker_caps=worker_caps)
        for name in set(self.scheduler.topology.region_names) - names:
            self.scheduler.exclude(name)

    def adopt(self, plan: Plan | None) -> None:
        """Rent the plan's workers from now on and use its local work."""
        if plan is None:
            return
        now = self.meter.clock.now()
        if self.meter.ledger is not None:
            for name, decision in plan.regions.items():
                self.meter.ledger.set_workers(name, decision.workers, at=now)
        self.steps = plan.local_steps()
        change = self.scheduler.changes[-1]
        self.book.event("plan", reason=change["reason"], plan=change["plan"])

    def observe(self, job: Job, reported: Reported, *, work_s: float, transfer_s: float,
                overhead_s: float | None, nbytes: int) -> None:
        """Hand one finished job's measurements to the scheduler, read at the workers that computed it and
        with the region's scaling as the meter measured it."""
        self.scheduler.observe(job.region, samples=reported.samples, work_s=work_s,
                               workers=self.meter.computed_by(job, reported), nbytes=nbytes,
                               transfer_s=transfer_s, overhead_s=overhead_s, scaling=self.meter.scaling(job.region))

    def maybe_replan(self, step: int) -> None:
        """The first plan after the first step (a run whose first jobs went out with the roll call), then
        a re-plan every `replan_every` steps from what the jobs measured."""
        if self.scheduler.current is None or step % self.replan_every == 0:
            self.adopt(self.scheduler.replan(self.meter.clock.now()))

    def region_left(self, region: str, live: Iterable[str]) -> None:
        """`region` lost its node; if no node of it is left, plan without it."""
        if region not in set(live):
            self.scheduler.exclude(region)
            self.adopt(self.scheduler.replan(self.meter.clock.now()))

    def region_back(self, region: str) -> None:
        self.scheduler.readmit(region)
        self.adopt(self.scheduler.replan(self.meter.clock.now()))

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "planned_steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["planned_steps"]
