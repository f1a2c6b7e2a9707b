"""The documented example: a plain Flower ServerApp with FedAvg swapped for our strategies."""

from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from cloudless_fl.deployment.grid import InProcessGrid
from conftest import app_modules

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plain-flower-app"


@pytest.fixture
def example_modules():
    with app_modules(EXAMPLE, "client_app", "server_app") as modules:
        yield modules


@pytest.mark.parametrize("strategy", ["asgd_ga", "ma"])
def test_plain_flower_app_runs_our_strategies_without_topology(example_modules, strategy, capsys):
    client_app, server_app = example_modules
    torch.manual_seed(0)  # the example's model init is the user's, unseeded
    grid = InProcessGrid(client_app.app, 3)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"strategy": strategy})
    server_app.app(grid, context)
    out = capsys.readouterr().out
    accuracy = float(out.split("'accuracy': ")[1].split("}")[0].split(",")[0].strip("'"))
    assert accuracy > 0.8  # held-out digits, a small MLP: learns well past chance (0.1)
