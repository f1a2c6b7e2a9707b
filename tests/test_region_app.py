"""The region ClientApp: who am I, where is my data, what do I reply."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.region_app import make_client_app
from clients.region_jobs import locate_region
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


def _query(tmp_path, node_config: dict) -> Message:
    if not (tmp_path / "a").is_dir():
        split_dataset(load_source("digits"), {"a": 0.5, "b": 0.5}, tmp_path)
    grid = InProcessGrid(make_client_app(), 2)
    grid._contexts[2].node_config.update({"region": "a", "data-dir": str(tmp_path / "a"), **node_config})
    ask = Message(RecordDict({protocol.CONFIG: ConfigRecord({"regions": "a,b"})}), dst_node_id=2,
                  message_type="query")
    [reply] = grid.pull_messages(grid.push_messages([ask]))
    return reply


def test_the_roll_call_answer_says_how_many_workers_the_supernode_starts(tmp_path):
    """The query reply names the region and its data and, if the SuperNode sets `max-workers`, that cap
    (the scheduler plans within it); a bad cap is an error reply naming the fix."""
    plain, capped = _query(tmp_path, {}), _query(tmp_path, {"max-workers": 2})
    assert protocol.reply_region(plain) == protocol.reply_region(capped) == "a"
    assert plain.content[protocol.METRICS]["resident-examples"] == capped.content[protocol.METRICS][
        "resident-examples"] > 0
    assert protocol.MAX_WORKERS not in plain.content[protocol.METRICS]
    assert capped.content[protocol.METRICS][protocol.MAX_WORKERS] == 2
    bad = _query(tmp_path, {"max-workers": 0})
    assert bad.has_error() and 'fix --node-config "max-workers=N"' in bad.error.reason


def test_a_first_job_is_read_by_its_region_and_refused_by_a_region_it_has_no_work_for(tmp_path):
    """A train message sent with the roll call carries every region's work order (`per-region`): a region
    trains by its row (b's 5 steps, not a's 3); one without a row replies an error naming the regions."""
    import json

    split_dataset(load_source("digits"), {"a": 0.5, "b": 0.5}, tmp_path)
    grid = InProcessGrid(make_client_app(tmp_path), 2)  # node 2 is region b
    model = build_model("mlp", (1, 8, 8), 10, seed=0, hidden=[32])

    def first_job(rows):
        message = _train_message(model, steps=1, offset=0)
        config = message.content[protocol.CONFIG]
        for key in ("local-steps", "sample-offset"):
            del config[key]
        config[protocol.PER_REGION] = json.dumps(rows)
        return message

    row = lambda steps: protocol.WorkOrder(lr=0.1, batch_size=16, steps=steps, offset=0).to_config()  # noqa: E731
    [reply] = grid.pull_messages(grid.push_messages([first_job({"a": row(3), "b": row(5)})]))
    assert not reply.has_error(), reply.error.reason
    assert reply.content[protocol.METRICS]["steps"] == 5 and protocol.reply_region(reply) == "b"
    assert reply.content[protocol.METRICS]["resident-examples"] > 0  # it names its node as the roll call would
    [refused] = grid.pull_messages(grid.push_messages([first_job({"a": row(3)})]))
    assert refused.has_error() and "work for regions a, not for 'b'" in refused.error.reason


def _paced_job(tmp_path, pace: float | None, workers: int = 1, max_workers: int | None = None) -> tuple[float, dict]:
    """Wall seconds and reply metrics of one 320-sample job on `workers` (planned) on a SuperNode paced at `pace`
    samples/s per worker, which may start up to `max_workers` worker processes."""
    import time

    if not (tmp_path / "a").is_dir():
        split_dataset(load_source("digits"), {"a": 0.5, "b": 0.5}, tmp_path)
    grid = InProcessGrid(make_client_app(), 2)  # node 2: the SuperNode, told its region, data and pace by --node-config
    grid._contexts[2].node_config.update({"region": "a", "data-dir": str(tmp_path / "a")})
    if pace is not None:
        grid._contexts[2].node_config["pace-samples-per-s"] = pace
    if max_workers is not None:
        grid._contexts[2].node_config["max-workers"] = max_workers
    model = build_model("mlp", (1, 8, 8), 10, seed=0, hidden=[32])
    def send():
        return grid.pull_messages(grid.push_messages([_train_message(model, steps=20, offset=0, workers=workers)]))

    send()  # warm: data loaded and model built, as for a SuperNode's later jobs
    start = time.perf_counter()
    [reply] = send()
    assert not reply.has_error(), reply.error.reason
    return time.perf_counter() - start, dict(reply.content[protocol.METRICS])


@pytest.mark.wallclock
def test_a_paced_region_computes_at_its_profile_speed(tmp_path):
    """launch paces each SuperNode to its profile: half the speed takes about twice as long for the same
    job, twice the workers that computed it half as long, and the reply reports the profile's time (measured
    loosely). Pacing follows the workers that computed the job, not the plan's count."""
    fast_s, fast = _paced_job(tmp_path, pace=800.0)  # 320 samples: 0.4 s
    slow_s, slow = _paced_job(tmp_path, pace=400.0)  # 0.8 s
    # a group of two worker processes (its start-up inside the paced time: 0.2-0.6 s here, over 1 s on a busy
    # machine, so the paced time leaves room for it): 3.2 s
    doubled_s, doubled = _paced_job(tmp_path, pace=50.0, workers=2, max_workers=2)
    capped_s, capped = _paced_job(tmp_path, pace=200.0, workers=2, max_workers=1)  # the plan's 2, one computes: 1.6 s
    assert fast["compute-seconds"] == pytest.approx(0.4) and slow["compute-seconds"] == pytest.approx(0.8)
    assert (doubled["compute-seconds"], doubled["workers"]) == (pytest.approx(3.2), 2)
    assert (capped["compute-seconds"], capped["workers"]) == (pytest.approx(1.6), 1)
    assert 1.6 < slow_s / fast_s < 2.4 and 1.6 < doubled_s / (2 * slow_s) < 2.4 and 1.6 < capped_s / slow_s < 2.4
    assert fast["pace-behind-seconds"] == slow["pace-behind-seconds"] == doubled["pace-behind-seconds"] == 0.0


def test_a_region_slower_than_its_profile_is_reported_not_hidden(tmp_path):
    unpaced_s, unpaced = _paced_job(tmp_path, pace=None)
    _, behind = _paced_job(tmp_path, pace=1e9)  # no machine trains 320 samples in 0.3 µs
    assert unpaced["pace-behind-seconds"] == 0.0 and unpaced_s < 0.4  # unpaced: this machine's own speed
    assert behind["pace-behind-seconds"] > 0 and behind["compute-seconds"] == pytest.approx(
        behind["pace-behind-seconds"], rel=0.01)
