"""Every strategy's default budget: the time the baseline's default run takes on the run's own workload.

A count of rounds, periods or versions is not a budget that compares across
strategies: FedAvg's 30 rounds take ~150 modelled seconds on geo4 while
ASGD-GA's 200 versions took 27, and on another topology the ratio is another
one. So by default (`strategy.stop.max_time_s: auto`) every strategy, FedAvg
included, gets the same time: what Flower's FedAvg with its default settings
(`conf/strategy/fedavg.yaml`: its rounds of one local epoch, every region on
its minimum workers) takes on this topology, data and model, as the region
model times it. Under the wall clock a deployed job also carries a fixed
per-message cost (Flower's trip through SuperNode and SuperExec, the ClientApp
process start) that only the run itself measures, so there `auto` is set once
every region has answered a job: the same baseline with each region's measured
per-job overhead and reply relay as its `job_start_s`. Until then (and for
ClientApps that report no compute, whose overhead cannot be told from their
work) the run's `num_rounds` bounds it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from omegaconf import OmegaConf

from .scheduler import Workload, epoch_steps, evaluate_plan
from .topology import Topology

AUTO = "auto"
BASELINE = "fedavg"  # the strategy whose default run sets the default budget


def baseline_settings() -> dict:
    """The baseline's default settings, read from its config file (one source for its rounds and work)."""
    from ..config import conf_dir

    return OmegaConf.to_container(OmegaConf.load(conf_dir() / "strategy" / f"{BASELINE}.yaml"))


def baseline_time_s(topology: Topology, data_sizes: dict[str, int], model_bytes: int) -> float:
    """Modelled seconds of the baseline's default run: its rounds × the period of one round."""
    s = baseline_settings()
    work = Workload(data_sizes, model_bytes, base_steps=epoch_steps(data_sizes, s["local_epochs"], s["batch_size"]),
                    batch_size=s["batch_size"])
    plan = evaluate_plan(topology, work, {r.name: r.workers_min for r in topology.regions}, fill=False)
    return s["num_rounds"] * plan.period_s


def measured_baseline_time_s(topology: Topology, data_sizes: dict[str, int], model_bytes: int,
                             per_job_s: Mapping[str, float]) -> float | None:
    """`baseline_time_s` with each region's fixed time per job (`job_start_s`) as measured in `per_job_s`;
    None while a region of the topology has no measurement."""
    if any(r.name not in per_job_s for r in topology.regions):
        return None
    measured = replace(topology, regions=tuple(replace(r, job_start_s=per_job_s[r.name]) for r in topology.regions))
    return baseline_time_s(measured, data_sizes, model_bytes)


TimeBudget = tuple[float | None, Callable[[], float | None] | None]


def resolve_time_budget(setting: float | str | None, clock: str, baseline_s: Callable[[], float] | None,
                        measured_baseline_s: Callable[[], float | None] | None = None) -> TimeBudget:
    """`strategy.stop.max_time_s` as `(seconds, later)`: the seconds known now (None: no time budget yet) and,
    where the budget can only be known during the run, `later()`, which gives it once it can (else None).

    `auto` is `baseline_s()` under the virtual clock (computed only then) and `measured_baseline_s()` under
    the wall clock; without the callable it stands for, no time budget."""
    if setting != AUTO:
        return setting, None
    if clock == "virtual":
        return (baseline_s() if baseline_s is not None else None), None
    return None, measured_baseline_s
