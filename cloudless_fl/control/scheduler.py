"""The elastic scheduler: how many workers each region rents, how much local work
it does per synchronisation, and who takes part — planned from the region
profiles and re-planned from what the run measures.

The plan's model of a synchronisation period
--------------------------------------------
Data never moves, so every region's resident data must be covered at the same
*epoch rate*: per period region `r` processes at least `k_r = ceil(f * N_r / b)`
mini-batches, with `f` (epochs per period) set so the regions do `base_steps`
mini-batches each on average. With `n_r` workers the region finishes after

    finish_r = comm_r + job_start_r + k_r * b / (s_r * n_r * eta_r)

(the region model's times: model down and update up at the link's nominal
bandwidth, the job's fixed start-up, its samples at the region's speed) and
the period lasts `T = max_r finish_r`. A region that would finish early is
paid for the wait anyway (instance billing), so its local work is raised until
it finishes with the slowest one (`H_r`, at most `max_steps_factor * k_r`, to
bound drift on non-IID data); the strategies weight regions by data share, not
by steps, so extra steps never mean extra weight. An asynchronous strategy
(`Workload.equal_steps`) has no period to equalise: every region does
`base_steps` per job, and the plan chooses its workers and participation.

The search
----------
For a fixed period `T` the cheapest workers are the fewest that make `T` in
every region, and cost and time only grow with `T` beyond that; so scanning the
finite set of finish times `{finish_r(n)}` as candidate periods and taking the
fewest workers for each finds the optimum over all worker vectors (the tests
check this against a brute-force search). Objectives: `min_cost` (optionally
under a deadline), `min_time` (optionally under a budget), `weighted`
(cost + `usd_per_hour` x hours).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import ConfigError
from . import region_model
from .jobs import moving_average
from .region_model import DOWN, UP
from .topology import Link, Topology

OBJECTIVES = ("min_cost", "min_time", "weighted")
BILLINGS = ("instance", "serverless")
_EPS = 1e-9


@dataclass(frozen=True)
class Objective:
    """What the plan optimises, and the bound it must respect.

    Parameters
    ----------
    kind : "min_cost" | "min_time" | "weighted"
    deadline_s : float, optional
        `min_cost`: the whole job (`epochs` epochs) must end within this.
    budget_usd : float, optional
        `min_time`: the whole job must cost at most this.
    usd_per_hour : float
        `weighted`: what an hour of training time is worth, added to the cost.
    billing : "instance" | "serverless"
        Which bill the cost figures use.
    """

    kind: str = "min_cost"
    deadline_s: float | None = None
    budget_usd: float | None = None
    usd_per_hour: float = 0.0
    billing: str = "instance"

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ConfigError(f"scheduler objective {self.kind!r} is unknown; use one of {', '.join(OBJECTIVES)}")
        if self.billing not in BILLINGS:
            raise ConfigError(f"scheduler billing {self.billing!r} is unknown; use one of {', '.join(BILLINGS)}")
        for key in ("deadline_s", "budget_usd"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"scheduler {key}={value} must be > 0 (or null for none)")
        if self.usd_per_hour < 0:
            raise ConfigError(f"scheduler usd_per_hour={self.usd_per_hour} must be ≥ 0")

    def score(self, p: "Plan") -> float:
        """What the objective minimises: the plan's cost, its time, or the cost with the time priced in."""
        if self.kind == "weighted":
            return p.total_usd + self.usd_per_hour * p.total_time_s / 3600.0
        return p.total_usd if self.kind == "min_cost" else p.total_time_s

    def allows(self, p: "Plan") -> bool:
        """Whether the plan keeps the objective's bound (the deadline, or the budget)."""
        if self.kind == "min_cost" and self.deadline_s is not None:
            return p.total_time_s <= self.deadline_s * (1 + _EPS)
        if self.kind == "min_time" and self.budget_usd is not None:
            return p.total_usd <= self.budget_usd * (1 + _EPS)
        return True


@dataclass(frozen=True)
class Workload:
    """What is planned: resident data per region, the model's wire size, the job's length.

    Parameters
    ----------
    data_sizes : mapping region → samples
        Resident training samples; a region with none takes no part.
    model_bytes : int
        Bytes of the model (sent down, and about as much sent back up, per period).
    base_steps : int
        Mean mini-batches per region per period (the strategy's configured local work).
    batch_size : int
    epochs : float
        Epochs of all resident data the plan's totals cover.
    max_steps_factor : float
        A region's local work is raised to fill idle time up to this multiple of its share.
    max_overhead_share : float, optional
        Local work is raised (every region's alike) until the largest per-job overhead (`job_start_s`,
        measured in deployment) is at most this share of the period; None: never.
    max_overhead_growth : float
        ... but by at most this factor (the scheduler's drift bound, `max_steps_factor`): many more local
        steps between synchronisations cost accuracy on non-IID data.
    equal_steps : bool
        Every region does `base_steps` per job (an asynchronous strategy's jobs: measured on geo4, ASGD-GA
        delta under data-share steps reached 95 % in 15.3/19.4/15.1 s against 12.2/12.1/12.3 s
        unscheduled, with `base_steps` everywhere 12.4/12.1 s); else steps in proportion to the region's
        data, so that every region covers its data at the same epoch rate.
    """

    data_sizes: Mapping[str, int]
    model_bytes: int
    base_steps: int = 20
    batch_size: int = 32
    epochs: float = 10.0
    max_steps_factor: float = 4.0
    max_overhead_share: float | None = None
    max_overhead_growth: float = 4.0
    equal_steps: bool = False


@dataclass(frozen=True)
class RegionPlan:
    """One region's part of a plan; times are per period, in seconds."""

    name: str
    takes_part: bool
    workers: int
    local_steps: int
    batch_size: int
    comm_s: float
    compute_s: float
    usd_per_period: float  # compute under the objective's billing, plus egress

    @property
    def finish_s(self) -> float:
        return self.comm_s + self.compute_s


@dataclass(frozen=True)
class Plan:
    """Per-region decisions plus the estimated time and cost per epoch and in total."""

    regions: dict[str, RegionPlan]
    period_s: float
    epochs_per_period: float
    epochs: float
    billing: str

    @property
    def time_per_epoch_s(self) -> float:
        return self.period_s / self.epochs_per_period

    @property
    def usd_per_epoch(self) -> float:
        return sum(r.usd_per_period for r in self.regions.values()) / self.epochs_per_period

    @property
    def total_time_s(self) -> float:
        return self.epochs * self.time_per_epoch_s

    @property
    def total_usd(self) -> float:
        return self.epochs * self.usd_per_epoch

    def workers(self) -> dict[str, int]:
        return {name: r.workers for name, r in self.regions.items()}

    def local_steps(self) -> dict[str, int]:
        """Mini-batches per synchronisation, for the regions that take part."""
        return {name: r.local_steps for name, r in self.regions.items() if r.takes_part}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        regions = {name: RegionPlan(**{k: v for k, v in r.items() if k != "finish_s"})
                   for name, r in data["regions"].items()}
        return cls(regions, data["period_s"], data["epochs_per_period"], data["epochs"], data["billing"])

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "period_s": self.period_s, "epochs_per_period": self.epochs_per_period,
                "time_per_epoch_s": self.time_per_epoch_s, "usd_per_epoch": self.usd_per_epoch,
                "total_time_s": self.total_time_s, "total_usd": self.total_usd, "billing": self.billing,
                "regions": {name: {**asdict(r), "finish_s": r.finish_s} for name, r in self.regions.items()}}


def comm_seconds(topology: Topology, region: str, model_bytes: int) -> float:
    """Model down plus update up over the region's link at its nominal bandwidth."""
    r = topology.region(region)
    return sum(region_model.transfer_seconds(topology, region, region_model.nominal_bandwidth(r, d), 0.0,
                                             model_bytes) for d in (DOWN, UP))


def _egress_usd(topology: Topology, region: str, model_bytes: int) -> float:
    return sum(region_model.egress_usd(topology, region, model_bytes, d) for d in (DOWN, UP))


def share_steps(topology: Topology, work: Workload, exclude: Iterable[str] = ()) -> tuple[dict[str, int], float]:
    """Minimum mini-batches per period per region (equal epoch rate, or `base_steps` each with
    `equal_steps`) and the epochs per period (with equal steps: the share the region with the most data
    covers, as in `static_plan`)."""
    live = {r.name: int(work.data_sizes.get(r.name, 0)) for r in topology.regions if r.name not in set(exclude)}
    live = {name: n for name, n in live.items() if n > 0}
    if not live:
        raise ConfigError("no region with resident data can take part; nothing to plan")
    if work.equal_steps:
        return {name: work.base_steps for name in live}, min(work.base_steps * work.batch_size / n
                                                              for n in live.values())
    f = work.base_steps * work.batch_size * len(live) / sum(live.values())
    return {name: max(1, math.ceil(f * n / work.batch_size - _EPS)) for name, n in live.items()}, f


def epoch_steps(data_sizes: Mapping[str, int], epochs: float, batch_size: int) -> int:
    """`epochs` of the mean region's resident data, in mini-batches (at least one): FedAvg's local work."""
    mean = sum(data_sizes.values()) / max(1, len(data_sizes))
    return max(1, round(epochs * mean / batch_size))


def evaluate_plan(topology: Topology, work: Workload, workers: Mapping[str, int], billing: str = "instance",
                  exclude: Iterable[str] = (), fill: bool = True) -> Plan:
    """The plan a given worker vector yields (the scheduler's model; search and tests both use it)."""
    steps, f = share_steps(topology, work, exclude)
    steps, f = _amortise_overhead(topology, work, workers, steps, f)
    return _build(topology, work, workers, steps, f, billing, fill)


def _amortise_overhead(topology: Topology, work: Workload, workers: Mapping[str, int], steps: Mapping[str, int],
                       f: float) -> tuple[dict[str, int], float]:
    """Every region's work scaled by one factor `c >= 1`, the least that makes the period at least
    `max(job_start_s) / max_overhead_share` (a period lasts as long as its slowest job, and the
    others are filled towards it): a fixed per-job overhead then stays that small a share of a job.
    `c` is capped at `max_overhead_growth`: with geo4's measured overhead (18 s per job against ~1 s of
    compute) full amortisation meant ~80 local epochs per period and 414 s to 90 % (simulated), 131.5 s
    capped."""
    start = max(topology.region(n).job_start_s for n in steps)
    if work.max_overhead_share is None or start <= 0:
        return dict(steps), f
    target = start / work.max_overhead_share
    b = work.batch_size
    reach = []  # for each region, the factor at which its own job alone lasts `target`
    for name, k in steps.items():
        region = topology.region(name)
        fixed = comm_seconds(topology, name, work.model_bytes) + region.job_start_s
        reach.append((target - fixed) / region_model.work_seconds(region, k * b, workers[name]))
    c = min(max(1.0, min(reach)), work.max_overhead_growth)
    return {name: max(1, math.ceil(k * c - _EPS)) for name, k in steps.items()}, f * c


def static_plan(topology: Topology, work: Workload, billing: str = "instance") -> Plan:
    """The unscheduled setup: minimum workers, `base_steps` everywhere; an epoch of all resident
    data takes as long as the region with the most data needs to cover its own."""
    live = {r.name: n for r in topology.regions if (n := int(work.data_sizes.get(r.name, 0))) > 0}
    steps = {name: work.base_steps for name in live}
    f = min(work.base_steps * work.batch_size / n for n in live.values())
    workers = {r.name: r.workers_min for r in topology.regions}
    return _build(topology, work, workers, steps, f, billing, fill=False)


def _build(topology: Topology, work: Workload, workers: Mapping[str, int], steps: Mapping[str, int], f: float,
           billing: str, fill: bool) -> Plan:
    b = work.batch_size
    rate = {name: region_model.throughput(topology.region(name), workers[name]) for name in steps}
    start = {name: topology.region(name).job_start_s for name in steps}
    comm = {name: comm_seconds(topology, name, work.model_bytes) for name in steps}
    period = max(comm[n] + region_model.compute_seconds(topology.region(n), steps[n] * b, workers[n]) for n in steps)
    regions: dict[str, RegionPlan] = {}
    for region in topology.regions:
        name = region.name
        if name not in steps:  # no data or excluded: rents nothing
            regions[name] = RegionPlan(name, False, 0, 0, b, 0.0, 0.0, 0.0)
            continue
        local = steps[name]
        if fill:
            room = math.floor((period - comm[name] - start[name]) * rate[name] / b + _EPS)
            local = min(max(local, room), math.floor(work.max_steps_factor * steps[name]))
        compute = region_model.compute_seconds(region, local * b, workers[name])
        held = period if billing == "instance" else compute
        usd = workers[name] * region.usd_per_worker_hour * held / 3600.0 + _egress_usd(topology, name, work.model_bytes)
        if billing == "serverless":
            usd += region.cold_start_usd
        regions[name] = RegionPlan(name, True, workers[name], local, b, comm[name], compute, usd)
    return Plan(regions, period, f, work.epochs, billing)


def plan(topology: Topology, work: Workload, objective: Objective = Objective(),
         exclude: Iterable[str] = ()) -> Plan:
    """The best plan for `objective`; a `ConfigError` naming the tightest feasible bound if none meets it."""
    exclude = set(exclude)
    steps, _ = share_steps(topology, work, exclude)
    candidates = _candidate_plans(topology, work, objective.billing, exclude, steps)
    if objective.kind == "weighted":
        return min(candidates, key=objective.score)
    bounded = "total_time_s" if objective.kind == "min_cost" else "total_usd"  # what the bound limits
    feasible = [p for p in candidates if objective.allows(p)]
    if not feasible:
        tightest = min(candidates, key=lambda p: (getattr(p, bounded), objective.score(p)))
        raise ConfigError(_infeasible(objective, tightest, work))
    return min(feasible, key=lambda p: (objective.score(p), getattr(p, bounded)))


def _infeasible(objective: Objective, tightest: Plan, work: Workload) -> str:
    """The error for a bound no plan meets, naming the tightest feasible value."""
    if objective.kind == "min_cost":
        return (f"deadline {objective.deadline_s:g} s infeasible; the fastest plan needs {tightest.total_time_s:.3g} s "
                f"for {work.epochs:g} epochs (raise the deadline, rent more workers or plan fewer epochs)")
    return (f"budget ${objective.budget_usd:g} infeasible; the cheapest plan costs ${tightest.total_usd:.3g} "
            f"for {work.epochs:g} epochs (raise the budget or plan fewer epochs)")


def _candidate_plans(topology: Topology, work: Workload, billing: str, exclude: set[str],
                     steps: Mapping[str, int]) -> list[Plan]:
    """For each candidate period (a region's finish time at some worker count), the fewest workers
    that make it everywhere."""
    b = work.batch_size

    def finish(name: str, n: int) -> float:
        return (comm_seconds(topology, name, work.model_bytes)
                + region_model.compute_seconds(topology.region(name), steps[name] * b, n))

    options = {name: range(topology.region(name).workers_min, topology.region(name).workers_max + 1)
               for name in steps}
    periods = sorted({finish(name, n) for name, ns in options.items() for n in ns})
    plans = []
    for period in periods:
        workers = {}
        for name, ns in options.items():
            fitting = [n for n in ns if finish(name, n) <= period * (1 + _EPS)]
            if not fitting:
                break
            workers[name] = fitting[0]
        else:
            plans.append(evaluate_plan(topology, work, workers, billing, exclude))
    return plans


@dataclass
class _Measured:
    """Moving averages of one region's observed pace."""

    samples_per_worker_s: float | None = None
    link_mbps: float | None = None
    job_start_s: float | None = None
    scaling: tuple[tuple[int, float], ...] = ()  # the meter's measured group efficiency per worker count


@dataclass
class Scheduler:
    """Plans at start and re-plans from measurements while the run goes on.

    State is explicit (like `torch.optim`): the current plan, the measured
    averages, the excluded regions, and every plan change (kept in results.json).

    Parameters
    ----------
    topology, work, objective :
        What `plan()` is called with; the measurements replace the profile's
        per-worker speed and link bandwidth of each region as they come in.
    smoothing : float
        Weight of a new measurement in the moving averages.
    tolerance : float
        A re-plan is adopted when a region's workers or participation change or
        its local work moves by more than this fraction (keeps jitter from
        churning the plan).
    min_gain : float, optional
        Hysteresis: a re-plan that changes no region's participation is adopted
        only if the objective's estimate of it beats keeping the current workers
        (re-estimated from the same measurements) by at least this fraction, or
        the current workers no longer keep the bound. None: every change beyond
        `tolerance` is adopted (measured: ap-chengdu's workers flapping 2 ↔ 3
        within seconds, README "Elastic scheduler").
    """

    topology: Topology
    work: Workload
    objective: Objective = field(default_factory=Objective)
    smoothing: float = 0.5
    tolerance: float = 0.1
    min_gain: float | None = None
    excluded: set[str] = field(default_factory=set)
    changes: list[dict[str, Any]] = field(default_factory=list)
    current: Plan | None = None
    worker_caps: dict[str, int] = field(default_factory=dict)  # region → the most workers its SuperNode starts
    _measured: dict[str, _Measured] = field(default_factory=dict)

    def set_workload(self, *, data_sizes: Mapping[str, int], model_bytes: int,
                     worker_caps: Mapping[str, int] | None = None) -> None:
        """What the run found out at start-up: the regions' resident data, the model's size and the most
        workers some regions' SuperNodes start for one job (a plan renting more would be charged and
        modelled for workers that never compute)."""
        self.work = replace(self.work, data_sizes=dict(data_sizes), model_bytes=int(model_bytes))
        self.worker_caps = {name: int(cap) for name, cap in (worker_caps or {}).items()}
        regions = []
        for r in self.topology.regions:
            if r.name in self.worker_caps:
                most = max(1, min(r.workers_max, self.worker_caps[r.name]))
                r = replace(r, workers_min=min(r.workers_min, most), workers_max=most)
            regions.append(r)
        self.topology = replace(self.topology, regions=tuple(regions))

    def start(self, at: float = 0.0) -> Plan:
        self.current = plan(self.topology, self.work, self.objective, self.excluded)
        self.changes.append({"time_s": at, "reason": "initial plan", "plan": _decisions(self.current)})
        return self.current

    def observe(self, region: str, *, samples: int, work_s: float, workers: int, nbytes: int, transfer_s: float,
                overhead_s: float | None = None, scaling: tuple[tuple[int, float], ...] = ()) -> None:
        """Fold one finished job's measured pace (`work_s`: compute without the job's start-up, and
        `overhead_s`: that start-up) into the region's moving averages; `scaling` is the region's group
        efficiency measured so far (`Meter.scaling`), by which a group's speed is read back to one worker's."""
        if region not in {r.name for r in self.topology.regions}:
            return
        m = self._measured.setdefault(region, _Measured())
        m.scaling = tuple(scaling)
        r = replace(self.topology.region(region), scaling=m.scaling)
        if overhead_s is not None:
            m.job_start_s = self._average(m.job_start_s, overhead_s)
        if work_s > 0 and samples > 0:
            m.samples_per_worker_s = self._average(m.samples_per_worker_s,
                                                   region_model.speed_per_worker(r, samples, work_s, workers))
        mbps = region_model.link_mbps_from(r, nbytes, transfer_s)
        if mbps is not None and region_model.crosses_wan(self.topology, region):
            # one link speed for both directions: the plan only needs their sum
            m.link_mbps = self._average(m.link_mbps, mbps)

    def _average(self, old: float | None, new: float) -> float:
        return moving_average(old, new, self.smoothing)

    def exclude(self, region: str) -> None:
        self.excluded.add(region)

    def readmit(self, region: str) -> None:
        self.excluded.discard(region)

    def measured_topology(self) -> Topology:
        """The profile with each region's measured speed, link, per-job overhead and scaling substituted where
        known."""
        regions = []
        for r in self.topology.regions:
            m = self._measured.get(r.name, _Measured())
            if m.samples_per_worker_s is not None:
                r = replace(r, samples_per_s=m.samples_per_worker_s)
            if m.job_start_s is not None:
                r = replace(r, job_start_s=m.job_start_s)
            if m.scaling:
                r = replace(r, scaling=m.scaling)
            if m.link_mbps is not None:
                r = replace(r, link=Link(up_mbps=m.link_mbps, down_mbps=m.link_mbps,
                                         latency_ms=r.link.latency_ms, trace=r.link.trace))
            regions.append(r)
        return replace(self.topology, regions=tuple(regions))

    def replan(self, at: float) -> Plan | None:
        """A new plan if the measurements (or the live regions) call for one, else None."""
        if self.current is None:
            return self.start(at)
        measured = self.measured_topology()
        new = plan(measured, self.work, self.objective, self.excluded)
        reason = self._difference(self.current, new)
        if reason is None or self._not_worth_it(measured, new):
            return None
        self.current = new
        self.changes.append({"time_s": at, "reason": reason, "plan": _decisions(new)})
        return new

    def state_dict(self) -> dict[str, Any]:
        """Everything `replan()` depends on, for a checkpoint."""
        return {"data_sizes": dict(self.work.data_sizes), "model_bytes": self.work.model_bytes,
                "worker_caps": dict(self.worker_caps), "excluded": sorted(self.excluded), "changes": self.changes,
                "current": self.current.to_dict() if self.current else None,
                "measured": {r: asdict(m) for r, m in self._measured.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_workload(data_sizes=state["data_sizes"], model_bytes=state["model_bytes"],
                          worker_caps=state.get("worker_caps"))
        self.excluded = set(state["excluded"])
        self.changes = list(state["changes"])
        self.current = Plan.from_dict(state["current"]) if state["current"] else None
        self._measured = {r: _Measured(**{**m, "scaling": tuple(tuple(p) for p in m.get("scaling", ()))})
                          for r, m in state["measured"].items()}

    def _not_worth_it(self, measured: Topology, new: Plan) -> bool:
        """Under `min_gain`: `new` changes no region's participation and gains less than `min_gain` over the
        current workers, which still keep the bound."""
        if self.min_gain is None or any(r.takes_part != new.regions[name].takes_part
                                        for name, r in self.current.regions.items()):
            return False
        kept = evaluate_plan(measured, self.work, self.current.workers(), self.objective.billing, self.excluded)
        return (self.objective.allows(kept)
                and self.objective.score(new) > (1 - self.min_gain) * self.objective.score(kept))

    def _difference(self, old: Plan, new: Plan) -> str | None:
        reasons = []
        for name, o in old.regions.items():
            n = new.regions[name]
            if o.takes_part != n.takes_part:
                reasons.append(f"{name} {'rejoins' if n.takes_part else 'leaves'}")
            elif o.workers != n.workers:
                reasons.append(f"{name} workers {o.workers}→{n.workers}")
            elif abs(n.local_steps - o.local_steps) > self.tolerance * max(o.local_steps, 1):
                reasons.append(f"{name} local steps {o.local_steps}→{n.local_steps}")
        return "; ".join(reasons) or None


def _decisions(p: Plan) -> dict[str, dict[str, Any]]:
    return {name: {"takes_part": r.takes_part, "workers": r.workers, "local_steps": r.local_steps}
            for name, r in p.regions.items()}
