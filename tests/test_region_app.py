"""The region ClientApp: who am I, where is my data, what do I reply."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.region_app import locate_region, make_client_app
from cloudless_fl.training import protocol
from cloudless_fl.training.data import load_source, split_dataset
from cloudless_fl.errors import ConfigError, DataError
from cloudless_fl.deployment.grid import InProcessGrid
from cloudless_fl.training.models import build_model


def _context(node_config):
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_region_from_node_config(tmp_path):
    region, data_dir = locate_region(_context({"region": "b", "data-dir": str(tmp_path)}),
                                     ConfigRecord({"regions": "a,b"}), None)
    assert (region, data_dir) == ("b", tmp_path)


def test_region_from_partition_id(tmp_path):
    region, data_dir = locate_region(_context({"partition-id": 1}), ConfigRecord({"regions": "a,b"}), tmp_path)
    assert (region, data_dir) == ("b", tmp_path / "b")


def test_unknown_region_in_node_config(tmp_path):
    with pytest.raises(ConfigError, match="region 'mars', which is not in the topology"):
        locate_region(_context({"region": "mars", "data-dir": str(tmp_path)}), ConfigRecord({"regions": "a,b"}), None)


def test_missing_data_dir_in_node_config():
    with pytest.raises(DataError, match="no data-dir"):
        locate_region(_context({"region": "a"}), ConfigRecord({"regions": "a,b"}), None)


def _train_message(model, **work):
    spec = protocol.ModelSpec("mlp", 10, {"hidden": [32]})
    order = protocol.WorkOrder(lr=0.1, batch_size=16, **work)
    config = ConfigRecord({**spec.to_config(), **order.to_config(), "regions": "a,b"})
    return Message(RecordDict({protocol.ARRAYS: ArrayRecord(model.state_dict()), protocol.CONFIG: config}),
                   dst_node_id=2, message_type="train")


def test_train_reply_carries_arrays_metrics_and_region(tmp_path):
    split_dataset(load_source("digits"), {"a": 0.5, "b": 0.5}, tmp_path)
    grid = InProcessGrid(make_client_app(tmp_path), 2)
    model = build_model("mlp", (1, 8, 8), 10, seed=0, hidden=[32])
    [mid] = grid.push_messages([_train_message(model, steps=3, offset=0)])
    [reply] = grid.pull_messages([mid])
    assert not reply.has_error()
    metrics = reply.content[protocol.METRICS]
    assert (metrics["num-examples"], metrics["steps"]) == (48, 3)
    assert metrics["compute-seconds"] > 0
    assert protocol.reply_region(reply) == "b"
    new = reply.content[protocol.ARRAYS].to_torch_state_dict()
    assert any(not np.allclose(new[k].numpy(), v.numpy()) for k, v in model.state_dict().items())


def test_bad_labels_become_an_error_reply(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for r in "ab":
        np.savez(tmp_path / r / "train.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 2, 42]))
    grid = InProcessGrid(make_client_app(tmp_path), 2)
    model = build_model("mlp", (1, 8, 8), 10, seed=0, hidden=[32])
    [mid] = grid.push_messages([_train_message(model, steps=1)])
    [reply] = grid.pull_messages([mid])
    assert reply.has_error() and "outside the model's 10 classes" in reply.error.reason
