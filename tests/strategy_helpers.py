"""Build small in-process federations for strategy tests."""

from __future__ import annotations

import copy
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord

from clients.region_app import make_client_app
from cloudless_fl.training.data import load_resident, load_source, split_dataset
from cloudless_fl.deployment.grid import InProcessGrid
from cloudless_fl.control.meter import Meter
from cloudless_fl.training.models import build_model
from cloudless_fl.training.protocol import ModelSpec
from cloudless_fl.control.topology import load_topology
from conftest import TWO_REGIONS

HIDDEN = [32]


def topology(regions: dict[str, dict] | None = None, shares: dict[str, float] | None = None):
    raw = copy.deepcopy(TWO_REGIONS)
    if regions is not None:
        raw["regions"] = regions
        raw["coordinator"] = next(iter(regions))
    if shares:
        for name, share in shares.items():
            raw["regions"][name]["data_share"] = share
    return load_topology(raw)


def solo_topology():
    region = copy.deepcopy(TWO_REGIONS["regions"]["fast"])
    region["data_share"] = 1.0
    return topology({"solo": region})


class Federation:
    """Split digits over a topology's regions and serve them through an InProcessGrid."""

    def __init__(self, root: Path, topo, seed: int = 0, alpha: float = 0.5, data=None) -> None:
        self.topology = topo
        split_dataset(data or load_source("digits"), topo.shares(), root, alpha=alpha, seed=0)
        self.root = root
        self.grid = InProcessGrid(make_client_app(root), len(topo.regions))
        self.model = build_model("mlp", (1, 8, 8), 10, seed=seed, hidden=HIDDEN)
        self.initial = ArrayRecord(self.model.state_dict())
        spec = ModelSpec("mlp", 10, {"hidden": HIDDEN})
        self.config = ConfigRecord({**spec.to_config(), "regions": ",".join(topo.region_names), "data-seed": 0})

    def meter(self, seed: int = 0) -> Meter:
        return Meter.simulated(self.topology, seed)

    def resident(self, region: str):
        return load_resident(self.root / region).train

    def evaluator(self):
        """Central evaluation of a model on the split's test set."""
        from flwr.app import MetricRecord

        from cloudless_fl.training.data import load_npz
        from cloudless_fl.training.local import evaluate

        test, _ = load_npz(self.root / "test.npz")
        model = build_model("mlp", (1, 8, 8), 10, hidden=HIDDEN)

        def evaluate_fn(version, arrays):
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, accuracy = evaluate(model, test)
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        return evaluate_fn
