"""Every strategy's default budget: the time the baseline's default run takes on the run's own workload.

A count of rounds, periods or versions is not a budget that compares across
strategies: FedAvg's 30 rounds take ~150 modelled seconds on geo4 while
ASGD-GA's 200 versions took 27, and on another topology the ratio is another
one. So by default (`strategy.stop.max_time_s: auto`) every strategy, FedAvg
included, gets the same time: what Flower's FedAvg with its default settings
(`conf/strategy/fedavg.yaml`: its rounds of one local epoch, every region on
its minimum workers) takes on this topology, data and model, as the region
model times it. Under the wall clock `auto` sets no time budget (a deployed job
carries a per-message overhead the region model learns only during the run);
the run's `num_rounds` bounds it.
"""

from __future__ import annotations

from collections.abc import Callable

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


def resolve_time_budget(setting: float | str | None, clock: str,
                        baseline_s: Callable[[], float] | None) -> float | None:
    """`strategy.stop.max_time_s` as seconds (None: no time budget): `auto` is `baseline_s()` (computed only
    then) under the virtual clock and no time budget under the wall clock or without a baseline."""
    if setting != AUTO:
        return setting
    return baseline_s() if clock == "virtual" and baseline_s is not None else None
