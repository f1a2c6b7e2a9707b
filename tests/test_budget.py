"""Default budgets compare across strategies: every strategy gets the time FedAvg's default rounds take."""

from __future__ import annotations

import pytest

from cloudless_fl.config import compose, prepare_data, topology_of, validate
from cloudless_fl.control.budget import baseline_settings, baseline_time_s, resolve_time_budget
from cloudless_fl.errors import ConfigError
from cloudless_fl.run import run
from cloudless_fl.server_app import resident_sizes
from cloudless_fl.training.compression import make_codec, wire_bytes
from cloudless_fl.training.models import build_model


def toy_overrides(topology) -> list[str]:
    return [f"topology_file={topology}", "engine=inprocess", "progress=false", "model.options.hidden=[64]",
            "checkpoint.every=0", "checkpoint.at_end=false"]


def baseline_of(overrides: list[str]) -> float:
    cfg = compose(overrides)
    topology, layout = topology_of(cfg), prepare_data(cfg)
    model = build_model(cfg.model.name, layout.input_shape, layout.num_classes, **cfg.model.options)
    return baseline_time_s(topology, resident_sizes(topology, layout), wire_bytes(make_codec("none"),
                                                                                  model.state_dict()))


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


def test_auto_is_the_baseline_on_the_virtual_clock_and_no_budget_on_the_wall_clock():
    def baseline() -> float:
        calls.append(1)
        return 150.0

    calls = []
    assert resolve_time_budget("auto", "virtual", baseline) == 150.0
    assert resolve_time_budget("auto", "wall", baseline) is None  # deployed jobs carry overhead the model learns later
    assert resolve_time_budget("auto", "virtual", None) is None
    assert resolve_time_budget(40.0, "wall", baseline) == 40.0
    assert resolve_time_budget(None, "virtual", baseline) is None
    assert len(calls) == 1  # the baseline is worked out only where `auto` needs it


def test_the_budget_follows_the_workload():
    """geo4's FedAvg rounds take ~150 modelled seconds; world5's slower links make its budget longer."""
    geo4, world5 = baseline_of(["topology=geo4"]), baseline_of(["topology=world5"])
    assert 140 < geo4 < 160 and world5 > 1.5 * geo4


@pytest.mark.parametrize("value", ["soon", -1])
def test_a_time_budget_must_be_seconds_or_auto(value):
    with pytest.raises(ConfigError, match="strategy.stop.max_time_s"):
        validate(compose(["strategy=ma", f"strategy.stop.max_time_s={value}"]))
