"""Every strategy `strategy=<name>` can choose, in one place: its config schema, its builder, its unit.

Nothing else switches on a strategy's name. A new strategy is a new
`StrategyEntry` here plus a `conf/strategy/<name>.yaml`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Strategy

from ..checkpoint import Checkpointer
from ..control.budget import AUTO
from ..config_schema import BOOL, COUNT, OPTIONAL_SECONDS, POSITIVE, Choice, Number, Rule
from ..control.meter import Meter
from ..control.scheduler import Scheduler, Workload, evaluate_plan
from ..errors import ConfigError
from ..training import protocol
from ..training.compression import Codec
from .base import ROLL_CALLS
from .asgd_ga import STALENESS_FUNCTIONS, UPDATES, AsyncGradAccum
from .drift import corrects_drift
from .ma import ModelAveraging
from .planning import REPLAN_EVERY
from .metered import Metered
from .robust import AGGREGATIONS
from .runbook import StopRules
from .selective import SelectiveFedAvg
from .validation import UpdateLimits


@dataclass(frozen=True)
class Build:
    """What every builder gets besides the strategy's own settings (`cfg.strategy` as plain values)."""

    meter: Meter
    num_regions: int
    limits: UpdateLimits
    target_accuracy: float
    work: Workload | None = None
    scheduler: Scheduler | None = None
    replan_every: int = REPLAN_EVERY
    checkpointer: Checkpointer | None = None
    resume: bool = False
    compression: Codec | None = None
    time_budget_later: Callable[[], float | None] | None = None  # `StopRules.time_budget_later`
    parameter_names: tuple[str, ...] | None = None  # the model's parameters (not its buffers)


@dataclass(frozen=True)
class StrategyEntry:
    """One choice of the `strategy` config group.

    Parameters
    ----------
    name : str
    unit : str
        What `num_rounds` counts: "round", "period" or "version".
    local_work : str
        The config key of a region's local work per synchronisation:
        "local_epochs" (one work order for every region, as Flower's FedAvg
        sends), "local_steps" or "accumulation_steps" (mini-batches per job).
    schema : mapping key → rule
        Allowed values of every `strategy.*` key it reads.
    build : callable(settings, Build) → Strategy
    fills_idle_time : bool
        Under the scheduler, early finishers get extra local steps to fill the
        period (only a strategy with a barrier to wait at).
    equal_steps : bool
        Under the scheduler, every region keeps the strategy's local work per job
        (asynchronous: no period whose epochs to equalise; a job's steps trade
        update frequency against staleness) instead of work in proportion to its data.
    """

    name: str
    unit: str
    local_work: str
    schema: Mapping[str, Rule]
    build: Callable[[dict[str, Any], Build], Strategy]
    fills_idle_time: bool = False
    equal_steps: bool = False

    @property
    def epoch_based(self) -> bool:
        """Local work in epochs: one work order for every region, as Flower's FedAvg sends."""
        return self.local_work == "local_epochs"


_ROBUST: dict[str, Rule] = {"strategy.aggregation": Choice(AGGREGATIONS),
                            "strategy.trim_fraction": Number(0, 0.4)}
STRATEGY_COMMON: dict[str, Rule] = {
    "strategy.num_rounds": COUNT, "strategy.eval_every": COUNT, "strategy.lr": POSITIVE,
    "strategy.batch_size": COUNT, "strategy.reply_timeout_s": POSITIVE,
    "strategy.stop.max_time_s": Number(0, low_open=True, nullable=True, words=(AUTO,)),
    "strategy.stop.max_cost_usd": OPTIONAL_SECONDS, "strategy.stop.at_target": BOOL,
}
_OWN_LOOP: dict[str, Rule] = {  # strategies that run their own loop (GeoStrategy)
    "strategy.rejoin_every": COUNT, "strategy.average_decay": Number(0, 0.999, nullable=True),
    "strategy.lr_cooldown": Number(0, 1, nullable=True),
    "strategy.roll_call": Choice(ROLL_CALLS)}


def _stop_rules(s: dict[str, Any], b: Build) -> StopRules:
    return StopRules(max_time_s=s["stop"]["max_time_s"], max_cost_usd=s["stop"]["max_cost_usd"],
                     target_accuracy=b.target_accuracy if s["stop"]["at_target"] else None,
                     time_budget_later=b.time_budget_later)


def _geo_common(s: dict[str, Any], b: Build) -> dict[str, Any]:
    return {"meter": b.meter, "eval_every": s["eval_every"], "stop": _stop_rules(s, b),
            "reply_timeout": s["reply_timeout_s"], "average_decay": s["average_decay"],
            "rejoin_every": s["rejoin_every"], "roll_call": s["roll_call"], "scheduler": b.scheduler,
            "replan_every": b.replan_every, "limits": b.limits, "checkpointer": b.checkpointer, "resume": b.resume,
            "compression": b.compression, "lr_cooldown": s["lr_cooldown"]}


def build_fedavg(s: dict[str, Any], b: Build) -> Strategy:
    """Flower's own FedAvg, metered; with `round_deadline_s`, slow regions join only every m-th round.

    FedAvg takes the scheduler's initial plan (its workers, and its round-time
    estimates for the deadline); it does not re-plan.
    """
    fedavg_args = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": b.num_regions,
                   "min_available_nodes": b.num_regions}
    plan = b.scheduler.start() if b.scheduler is not None else None
    if plan is not None:
        for name, workers in plan.workers().items():
            b.meter.ledger.set_workers(name, workers, at=0.0)
    robust = {"mean": {}, "median": {}, "trimmed_mean": {"beta": s["trim_fraction"]}}[s["aggregation"]]
    if s["aggregation"] != "mean" and s["round_deadline_s"] is not None:
        raise ConfigError("strategy.round_deadline_s works with strategy.aggregation=mean only")
    if s["round_deadline_s"] is None:
        inner: Strategy = {"mean": FedAvg, "median": FedMedian, "trimmed_mean": FedTrimmedAvg}[s["aggregation"]](
            **fedavg_args, **robust)
    else:
        if b.meter.cost_model is None or b.work is None:
            raise ConfigError("strategy.round_deadline_s needs a topology to estimate round times")
        if plan is None:  # one worker per region, one local epoch each
            topology = b.meter.cost_model.topology
            plan = evaluate_plan(topology, b.work, {r.name: r.workers_min for r in topology.regions}, fill=False)
        round_times = {name: r.finish_s for name, r in plan.regions.items() if r.takes_part}
        inner = SelectiveFedAvg(round_times=round_times, deadline_s=s["round_deadline_s"], **fedavg_args)
    return Metered(inner, b.meter, eval_every=s["eval_every"], stop=_stop_rules(s, b), limits=b.limits,
                   checkpointer=b.checkpointer, resume=b.resume, reply_timeout=s["reply_timeout_s"],
                   compression=b.compression)


FILL_FACTOR = 4.0  # heterogeneity-aware MA: early finishers fill the period up to this x (scheduler's default)


def region_model_steps(b: Build) -> dict[str, int]:
    """Heterogeneity-aware `H_r` from the region model at the regions' minimum workers: each region's data
    share of the configured mean, raised until it finishes with the period's slowest job (at most
    `FILL_FACTOR` x), so fast regions do not idle at the barrier while the slowest one (its link or
    its compute) sets the period."""
    topology = b.meter.cost_model.topology
    work = replace(b.work, max_steps_factor=FILL_FACTOR)
    return evaluate_plan(topology, work, {r.name: r.workers_min for r in topology.regions}).local_steps()


def build_ma(s: dict[str, Any], b: Build) -> Strategy:
    # a {region: H} mapping is taken as given; a scheduler's plan, once adopted, replaces either
    fitted = s["heterogeneity_aware"] and not isinstance(s["local_steps"], dict)
    if fitted and (b.work is None or b.meter.cost_model is None):
        raise ConfigError("strategy.heterogeneity_aware needs the region model (a topology with its regions' "
                          "speeds and links); set strategy.heterogeneity_aware=false or give the run a topology")
    plain_average = corrects_drift(s["aggregation"], s["outer_momentum"])
    if s["drift_correction"] is True and not plain_average:
        raise ConfigError("strategy.drift_correction reads the regions' average step off the model: it needs "
                          "strategy.aggregation=mean and strategy.outer_momentum=0 (or set "
                          "strategy.drift_correction=false or auto)")
    drift = plain_average if s["drift_correction"] == AUTO else s["drift_correction"]  # auto: where it applies
    return ModelAveraging(lr=s["lr"], local_steps=region_model_steps(b) if fitted else s["local_steps"],
                          batch_size=s["batch_size"], normalize=s["normalize"], outer_lr=s["outer_lr"],
                          outer_momentum=s["outer_momentum"], nesterov=s["nesterov"], deadline_s=s["deadline_s"],
                          aggregation=s["aggregation"], trim_fraction=s["trim_fraction"],
                          drift_correction=drift, drift_warmup=s["drift_warmup"], parameter_names=b.parameter_names,
                          weight_by="shares" if fitted else None,  # extra steps must not mean extra weight
                          **_geo_common(s, b))


def build_asgd_ga(s: dict[str, Any], b: Build) -> Strategy:
    local_steps = s["update"] == protocol.MODE_DELTA
    if s["drift_correction"] is True and not (local_steps and s["aggregation"] == "mean"):
        raise ConfigError("strategy.drift_correction corrects local steps and trusts every admitted update: it "
                          "needs strategy.update=delta and strategy.aggregation=mean (or set "
                          "strategy.drift_correction=false or auto)")
    drift = local_steps and s["aggregation"] == "mean" if s["drift_correction"] == AUTO else s["drift_correction"]
    return AsyncGradAccum(lr=s["lr"], momentum=s["momentum"], nesterov=s["nesterov"],
                          accumulation_steps=s["accumulation_steps"], batch_size=s["batch_size"],
                          tau_max=s["tau_max"], staleness=s["staleness"], update=s["update"], local_lr=s["local_lr"],
                          balance=s["balance"], max_weight=s["max_weight"], aggregation=s["aggregation"],
                          trim_fraction=s["trim_fraction"], buffer_regions=s["buffer_regions"], drift_correction=drift,
                          drift_warmup=s["drift_warmup"], parameter_names=b.parameter_names, **_geo_common(s, b))


_ASGD_GA_SCHEMA: dict[str, Rule] = {
    **_OWN_LOOP, "strategy.accumulation_steps": Number(1, integer=True, per_region=True),
    "strategy.momentum": Number(0, 1), "strategy.nesterov": BOOL,
    "strategy.tau_max": Number(0, integer=True, nullable=True),
    "strategy.staleness": Choice(tuple(STALENESS_FUNCTIONS)), "strategy.update": Choice(UPDATES),
    "strategy.local_lr": POSITIVE, "strategy.balance": BOOL, "strategy.max_weight": Number(1),
    **_ROBUST, "strategy.buffer_regions": Number(3, integer=True),
    "strategy.drift_correction": Choice((True, False, AUTO)), "strategy.drift_warmup": Number(0, 1),
}


def _rules(own: Mapping[str, Rule]) -> dict[str, Rule]:
    return {**STRATEGY_COMMON, **own}


STRATEGIES: dict[str, StrategyEntry] = {entry.name: entry for entry in (
    StrategyEntry("fedavg", unit="round", local_work="local_epochs", build=build_fedavg, schema=_rules({
        "strategy.local_epochs": POSITIVE, "strategy.round_deadline_s": OPTIONAL_SECONDS, **_ROBUST})),
    StrategyEntry("ma", unit="period", local_work="local_steps", build=build_ma, fills_idle_time=True, schema=_rules({
        **_OWN_LOOP, "strategy.local_steps": Number(1, integer=True, per_region=True), "strategy.normalize": BOOL,
        "strategy.heterogeneity_aware": BOOL, "strategy.drift_correction": Choice((True, False, AUTO)),
        "strategy.drift_warmup": Number(0, 1),
        "strategy.outer_lr": POSITIVE, "strategy.outer_momentum": Number(0, 1), "strategy.nesterov": BOOL,
        "strategy.deadline_s": OPTIONAL_SECONDS, **_ROBUST})),
    StrategyEntry("asgd_ga", unit="version", local_work="accumulation_steps", build=build_asgd_ga, equal_steps=True,
                  schema=_rules(_ASGD_GA_SCHEMA)),
    StrategyEntry("asgd_ga_delta", unit="version", local_work="accumulation_steps", build=build_asgd_ga,
                  equal_steps=True, schema=_rules(_ASGD_GA_SCHEMA)),  # the same strategy, delta updates by default
)}


def strategy_entry(name: str) -> StrategyEntry:
    if name not in STRATEGIES:
        raise ConfigError(f"strategy={name!r} is not allowed; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
