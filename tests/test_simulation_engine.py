"""The real Flower Simulation Engine (Ray): slow to start, so few deliberate tests."""

import json

import pytest

from cloudless_fl.config import compose
from cloudless_fl.run import run
from conftest import small_run_overrides

CASES = {
    "fedavg": ["strategy=fedavg", "strategy.num_rounds=2"],
    "asgd_ga": ["strategy=asgd_ga", "strategy.num_rounds=40", "strategy.eval_every=20",
                "strategy.accumulation_steps=2"],
    # MA over compressed links: Ray's ClientApps keep their snapshots in the folder the server names
    "ma_int8": ["strategy=ma", "strategy.num_rounds=3", "strategy.local_steps=10", "compression=int8"],
}


@pytest.mark.integration
@pytest.mark.parametrize("strategy", list(CASES))
def test_strategy_on_simulation_engine_raises_accuracy(two_region_topology, tmp_path, strategy):
    overrides = small_run_overrides(two_region_topology) + ["engine=simulation", *CASES[strategy]]
    run(compose(overrides), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    accuracy = [e["accuracy"] for e in results["history"] if e["accuracy"] is not None]
    assert len(accuracy) >= 2
    assert accuracy[-1] > accuracy[0] + 0.1
    assert results["summary"]["total_time_s"] > 0
    # under the virtual clock the in-process engine gives the same modelled figures
    inprocess = run(compose(small_run_overrides(two_region_topology) + CASES[strategy]), tmp_path / "inprocess")
    for sim, local in zip(results["history"], inprocess["history"], strict=True):
        assert (sim["version"], sim["time_s"], sim["cost_usd"], sim["wan_bytes"]) == \
            (local["version"], local["time_s"], local["cost_usd"], local["wan_bytes"])
        if sim["accuracy"] is not None:  # region threads differ (Ray: 1): float noise only
            assert sim["accuracy"] == pytest.approx(local["accuracy"], abs=0.02)
