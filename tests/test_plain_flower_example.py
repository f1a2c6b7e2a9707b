"""The documented example: a plain Flower ServerApp with FedAvg swapped for our strategies."""

import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from cloudless_fl.deployment.grid import InProcessGrid

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plain-flower-app"


@pytest.fixture
def example_modules():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import client_app
        import server_app

        yield client_app, server_app
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in ("client_app", "server_app", "task"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize("strategy", ["asgd_ga", "ma"])
def test_plain_flower_app_runs_our_strategies_without_topology(example_modules, strategy, capsys):
    client_app, server_app = example_modules
    torch.manual_seed(0)  # the example's model init is the user's, unseeded
    grid = InProcessGrid(client_app.app, 3)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"strategy": strategy})
    server_app.app(grid, context)
    out = capsys.readouterr().out
    accuracy = float(out.split("'accuracy': ")[1].split("}")[0].split(",")[0].strip("'"))
    assert accuracy > 0.8  # digits, a small MLP: learns well past chance (0.1)
