"""The real Flower Simulation Engine (Ray): slow to start, so one deliberate test."""

import json

import pytest

from cloudless_fl.config import compose
from cloudless_fl.run import run
from conftest import small_run_overrides


@pytest.mark.integration
def test_fedavg_on_simulation_engine_raises_accuracy(two_region_topology, tmp_path):
    overrides = small_run_overrides(two_region_topology) + ["engine=simulation", "strategy.num_rounds=2"]
    run(compose(overrides), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    accuracy = [e["accuracy"] for e in results["history"]]
    assert len(accuracy) == 3
    assert accuracy[-1] > accuracy[0] + 0.1
