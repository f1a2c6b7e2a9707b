"""Default budgets compare across strategies: every strategy gets the time FedAvg's default rounds take."""

from __future__ import annotations

import pytest

from cloudless_fl.config import compose, validate
from cloudless_fl.control.budget import (baseline_settings, measured_baseline_time_s,
                                         resolve_time_budget)
from cloudless_fl.errors import ConfigError
from cloudless_fl.run import run
from conftest import modelled_baseline_s


def toy_overrides(topology) -> list[str]:
    return [f"topology_file={topology}", "engine=inprocess", "progress=false", "model.options.hidden=[64]",
            "checkpoint.every=0", "checkpoint.at_end=false"]


def baseline_of(overrides: list[str]) -> float:
    return modelled_baseline_s(compose(overrides))


def test_by_default_every_strategy_runs_as_long_as_fedavgs_default_rounds_take(two_region_topology, tmp_path):
    """The counts are caps well past the budget here, so a run that ends by its count did not get the budget."""
    base = toy_overrides(two_region_topology)
    fedavg = run(compose([*base, "strategy=fedavg", "strategy.stop.max_time_s=null"]), tmp_path / "fedavg")
    rounds = baseline_settings()["num_rounds"]
    assert fedavg["summary"]["ended_by"] == f"strategy.num_rounds ({rounds} rounds) done"
    budget = baseline_of(base)
    assert budget == pytest.approx(fedavg["summary"]["total_time_s"], rel=0.05)  # the region model's timing
    for strategy, cap in (("fedavg", rounds), ("ma", 60), ("asgd_ga_delta", 600), ("asgd_ga", 3000)):
        payload = run(compose([*base, f"strategy={strategy}", f"strategy.num_rounds={cap}"]), tmp_path / strategy)
        assert payload["summary"]["ended_by"] == f"time budget {budget:g} s reached", strategy
        times = [entry["time_s"] for entry in payload["history"]]
        assert times[-1] >= budget > times[-2], strategy  # ended at the first round/period/version past it


@pytest.mark.parametrize("sizes, expected", [
    ({"fast": 640, "slow": 640}, 2 * (2 * (0.010 + 8e6 / 80e6) + 640 / 100)),  # slow: link both ways + 10 x 64
    ({"slow": 640}, 2 * (2 * (0.010 + 8e6 / 80e6) + 640 / 100)),  # the mean over the regions with data
    ({"slow": 16}, 2 * (2 * (0.010 + 8e6 / 80e6) + 64 / 100)),  # a quarter of a mini-batch: still one step
])
def test_the_baseline_is_its_rounds_times_the_slowest_regions_round_by_hand(monkeypatch, sizes, expected):
    """FedAvg's settings as its config file says (patched: 2 rounds, batches of 64): each round every region
    computes one epoch of the mean region's data; the slow region's 80 Mbps link and 100 samples/s set it."""
    import cloudless_fl.control.budget as budget
    from cloudless_fl.control.topology import load_topology
    from conftest import TWO_REGIONS

    monkeypatch.setattr(budget, "baseline_settings", lambda: {"num_rounds": 2, "local_epochs": 1, "batch_size": 64})
    topology = load_topology(TWO_REGIONS)
    assert budget.baseline_time_s(topology, sizes, model_bytes=1_000_000) == pytest.approx(expected)


def test_auto_is_the_modelled_baseline_on_the_virtual_clock_and_the_measured_one_later_on_the_wall_clock():
    def baseline() -> float:
        calls.append(1)
        return 150.0

    def measured() -> float | None:
        return None

    calls = []
    assert resolve_time_budget("auto", "virtual", baseline, measured) == (150.0, None)
    assert resolve_time_budget("auto", "wall", baseline, measured) == (None, measured)  # known once measured
    assert resolve_time_budget("auto", "wall", baseline) == (None, None)
    assert resolve_time_budget("auto", "virtual", None) == (None, None)
    assert resolve_time_budget(40.0, "wall", baseline, measured) == (40.0, None)
    assert resolve_time_budget(None, "virtual", baseline, measured) == (None, None)
    assert len(calls) == 1  # the baseline is worked out only where `auto` needs it


@pytest.mark.parametrize("per_job, expected", [
    ({"fast": 0.5, "slow": 2.0}, 2 * (2.0 + 2 * (0.010 + 8e6 / 80e6) + 640 / 100)),  # slow's round, 2 s longer
    ({"fast": 9.0, "slow": 2.0}, 2 * (9.0 + 2 * (8e6 / 1000e6) + 640 / 1000)),  # fast's overhead now sets it
    ({"slow": 2.0}, None),  # fast has not answered a job yet
])
def test_the_measured_baseline_gives_each_region_its_measured_per_job_time_by_hand(monkeypatch, per_job,
                                                                                   expected):
    import cloudless_fl.control.budget as budget
    from cloudless_fl.control.topology import load_topology
    from conftest import TWO_REGIONS

    monkeypatch.setattr(budget, "baseline_settings", lambda: {"num_rounds": 2, "local_epochs": 1, "batch_size": 64})
    got = measured_baseline_time_s(load_topology(TWO_REGIONS), {"fast": 640, "slow": 640}, 1_000_000, per_job)
    assert got == (None if expected is None else pytest.approx(expected))


def test_a_regions_per_job_time_is_its_overhead_and_reply_relay_once_its_overhead_is_measured():
    """A region whose replies report no compute (a stock ClientApp's) has a relay but no overhead to tell
    from its work: no per-job time, so a budget waiting for every region is not set from a guess."""
    from cloudless_fl.control.meter import Meter

    meter = Meter.measured()
    meter.overhead_s, meter.relay_s = {"ours": 3.0, "no-relay-yet": 1.0}, {"ours": 0.5, "stock": 2.0}
    assert meter.per_job_s() == {"ours": 3.5, "no-relay-yet": 1.0}


def test_a_budget_known_only_later_is_set_once_it_is_and_then_ends_the_run():
    from cloudless_fl.strategy import StopRules

    answers = [None, 12.0]
    stop = StopRules(time_budget_later=lambda: answers.pop(0))
    assert stop.settle() is None and stop.max_time_s is None and stop.spent({"time_s": 5.0}) is None
    assert stop.settle() == 12.0 and stop.max_time_s == 12.0
    assert stop.settle() is None and not answers  # settled: not asked again
    assert stop.spent({"time_s": 6.0}) == 0.5
    assert stop.reason({"time_s": 12.0}, None) == "time budget 12 s reached"


@pytest.mark.parametrize("strategy, cap", [("ma", 500), ("asgd_ga_delta", 2500)])
def test_a_wall_clock_runs_budget_is_set_once_every_region_answered_and_ends_the_run(monkeypatch,
                                                                                     two_region_topology, tmp_path,
                                                                                     strategy, cap):
    """In-process on the wall clock (real seconds), FedAvg's default run patched to one round so the budget is
    seconds. The per-job overhead measured in one process is near zero (for ASGD-GA delta, zero), so this does
    not tell whether it was added: the by-hand test above and the real-process test in test_deployment.py do."""
    import cloudless_fl.control.budget as budget

    monkeypatch.setattr(budget, "baseline_settings", lambda: {"num_rounds": 1, "local_epochs": 1, "batch_size": 32})
    base = toy_overrides(two_region_topology)
    modelled = baseline_of(base)
    # ~170 periods or ~800 versions fit in the budget here; the cap ends a run that never got one, and the test
    # says so
    payload = run(compose([*base, "clock=wall", f"strategy={strategy}", f"strategy.num_rounds={cap}"]),
                  tmp_path / strategy)
    [event] = [e for e in payload["events"] if e["event"] == "time_budget_set"]
    assert modelled <= event["seconds"] < modelled + 5  # the model's round plus what a job cost here beyond it
    assert event["time_s"] < event["seconds"] / 2  # set once both regions answered, not at the run's end
    assert payload["summary"]["ended_by"] == f"time budget {event['seconds']:g} s reached"
    assert payload["summary"]["total_time_s"] >= event["seconds"]


def test_the_budget_follows_the_workload():
    """geo4's FedAvg rounds take ~150 modelled seconds; world5's slower links make its budget longer."""
    geo4, world5 = baseline_of(["topology=geo4"]), baseline_of(["topology=world5"])
    assert 140 < geo4 < 160 and world5 > 1.5 * geo4


@pytest.mark.parametrize("value", ["soon", -1])
def test_a_time_budget_must_be_seconds_or_auto(value):
    with pytest.raises(ConfigError, match="strategy.stop.max_time_s"):
        validate(compose(["strategy=ma", f"strategy.stop.max_time_s={value}"]))


def test_a_resumed_wall_clock_run_keeps_the_budget_it_was_given(monkeypatch, two_region_topology, tmp_path):
    """Resumed, the meter's per-job averages are those of the run's end, not of its first jobs: the budget is the
    one the run set (its event), not worked out again."""
    import cloudless_fl.control.budget as budget

    monkeypatch.setattr(budget, "baseline_settings", lambda: {"num_rounds": 1, "local_epochs": 1, "batch_size": 32})
    base = [*toy_overrides(two_region_topology)[:-1], "checkpoint.at_end=true", "clock=wall", "strategy=ma",
            "strategy.num_rounds=500"]
    first = run(compose(base), tmp_path)
    [event] = [e for e in first["events"] if e["event"] == "time_budget_set"]
    monkeypatch.setattr(budget, "baseline_time_s", lambda *args: 1e6)  # what working it out again would give
    resumed = run(compose([*base, f"resume={tmp_path}"]), tmp_path)
    ended_by = f"time budget {event['seconds']:g} s reached"
    assert resumed["summary"]["ended_by"] == first["summary"]["ended_by"] == ended_by
    assert [e for e in resumed["events"] if e["event"] == "time_budget_set"] == [event]
