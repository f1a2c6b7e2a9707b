"""Compressed WAN traffic end to end: the server's downloads and the region's rebuild agree bit for bit,
errors do not pile up, bytes charged are the encoded payloads, bad encodings are refused."""

from __future__ import annotations

from collections import OrderedDict, defaultdict

import pytest
import torch
from flwr.app import ArrayRecord

from cloudless_fl.config import compose
from cloudless_fl.control.meter import record_bytes
from cloudless_fl.deployment.grid import InProcessGrid
from cloudless_fl.errors import DataError
from cloudless_fl.run import run
from cloudless_fl.strategy.downlink import Downlink
from cloudless_fl.strategy.validation import RejectedUpdate, UpdateValidator
from cloudless_fl.training import protocol
from cloudless_fl.training.compression import Int8, TopK
from cloudless_fl.training.protocol import pack_tensors, unpack_tensors
from cloudless_fl.training.region_link import RegionLink
from conftest import small_run_overrides


def _t(record: ArrayRecord, name: str) -> torch.Tensor:
    return torch.from_numpy(record[name].numpy())


def _model(seed: int) -> ArrayRecord:
    g = torch.Generator().manual_seed(seed)
    return ArrayRecord(OrderedDict([("w", torch.randn(300, generator=g)), ("b", torch.randn(7, generator=g)),
                                    ("steps", torch.tensor(seed))]))


@pytest.mark.parametrize("codec", [Int8(16), TopK(0.05)])
def test_the_region_rebuilds_exactly_what_the_server_expects_and_errors_do_not_pile_up(codec, tmp_path):
    downlink = Downlink(codec)
    server_model = _model(0)
    errors = []
    for job in range(30):
        key = 10 * job
        down = downlink.download("r", key, server_model)
        payload, base = down.payload, down.base
        assert (base is None) == (job == 0)  # the first download is the whole model, then changes
        assert (down.layout is not None) == (job == 0 and not codec.sparse)  # quantised, it says how to rebuild
        order = protocol.WorkOrder(lr=0.1, batch_size=1, steps=1, compression=codec.spec(), base=base, offset=key,
                                   layout=down.layout)
        link = RegionLink(order, tmp_path)
        region = link.received(payload)
        expected = downlink.pending["r"][1].to_torch_state_dict()
        for name in expected:
            assert torch.equal(region[name], expected[name]), name
        assert torch.equal(region["steps"], _t(server_model, "steps"))  # integers travel exactly
        errors.append(float((region["w"] - _t(server_model, "w")).norm()))
        link.reply({"w": torch.zeros(300), "b": torch.zeros(7)})  # the region keeps its snapshot
        downlink.delivered("r", key)
        step = _model(job + 1).to_torch_state_dict()  # the server model moves on by a small random step
        server_model = ArrayRecord(OrderedDict((k, _t(server_model, k) + (0.01 * v if v.is_floating_point() else 1))
                                               for k, v in step.items()))
    assert errors[0] == 0.0 if codec.sparse else 0 < errors[0] < 0.5  # int8: the weights quantised once
    # what one download leaves out is sent with the next, so the gap stays at about one step's error
    assert max(errors[10:]) < 3 * max(errors[1:10]) and max(errors) < 0.5


def test_a_region_that_lost_its_snapshot_says_how_to_fix_it(tmp_path):
    order = protocol.WorkOrder(lr=0.1, batch_size=1, steps=1, compression="int8:16", base=40, offset=50)
    with pytest.raises(DataError, match="state-dir"):
        RegionLink(order, tmp_path).received(Int8(16).encode(_model(0).to_torch_state_dict()))
    with pytest.raises(DataError, match="state-dir"):
        RegionLink(order, None)


def test_a_forgotten_region_gets_the_whole_model_again(tmp_path):
    downlink = Downlink(Int8(16))
    downlink.download("r", 0, _model(0))
    downlink.delivered("r", 0)
    assert downlink.download("r", 10, _model(1)).base == 0
    downlink.forget("r")  # lost, or rejoined under a new node
    down = downlink.download("r", 20, _model(2))
    assert down.base is None and down.layout is not None  # the whole model (quantised) again


def test_a_region_keeps_its_base_and_whatever_the_last_checkpoint_may_send_again():
    """keep_from: a delta's base (not the job's own key) and, while pinned, the checkpoint's oldest key;
    pin: a region's held model or its job in flight, whichever is older (mutation gaps of downlink.py)."""
    downlink = Downlink(Int8(16))
    downlink.download("r", 4, _model(0))
    downlink.delivered("r", 4)
    assert downlink.keep_from("s", base=3, key=5) == 3  # nothing pinned: the base it rebuilds from
    downlink.pin(in_flight=[("r", 6)])
    assert downlink.pinned == {"r": 4}  # the held model (job 4) is older than the job in flight
    downlink.pin(in_flight=[("r", 2)])
    assert downlink.pinned == {"r": 2}
    assert downlink.keep_from("r", base=None, key=9) == 2  # a resume may ask r for job 2 again
    assert downlink.keep_from("r", base=4, key=9) == 2


def test_snapshots_before_keep_from_are_deleted(tmp_path):
    for key, keep_from in ((0, 0), (10, 0), (20, 10), (30, 30)):
        order = protocol.WorkOrder(lr=0.1, batch_size=1, steps=1, compression="int8:16", offset=key, keep_from=keep_from)
        link = RegionLink(order, tmp_path)
        link.received(_model(key))
        link.reply({"w": torch.ones(300), "b": torch.ones(7)})
    assert sorted(p.name for p in tmp_path.glob("job-*.pt")) == ["job-000000000030.pt"]


def test_validation_runs_on_the_decoded_update():
    reference = _model(0).to_torch_state_dict()
    validator = UpdateValidator(reference)
    codec = Int8(16)
    good = codec.encode({k: torch.zeros_like(v) for k, v in reference.items()})
    decoded = validator.check("r", good, protocol.MODE_DELTA, codec=codec, encoding=codec.spec())
    assert set(decoded) == set(reference) and float(decoded["w"].abs().max()) == 0.0
    nan_scale = unpack_tensors(good)
    nan_scale["w@scale"] = torch.full_like(nan_scale["w@scale"], float("nan"))
    with pytest.raises(RejectedUpdate, match="w@scale") as rejected:
        validator.check("r", pack_tensors(nan_scale), protocol.MODE_DELTA, codec=codec, encoding=codec.spec())
    assert rejected.value.reason == "malformed"
    huge = codec.encode({k: (torch.full_like(v, 3e38) if v.is_floating_point() else v) for k, v in reference.items()})
    huge_scaled = unpack_tensors(huge)
    huge_scaled["w@scale"] = torch.full_like(huge_scaled["w@scale"], 3e38)  # decodes to Inf
    with pytest.raises(RejectedUpdate) as rejected:
        validator.check("r", pack_tensors(huge_scaled), protocol.MODE_DELTA, codec=codec,
                        encoding=codec.spec())
    assert rejected.value.reason == "non_finite"
    with pytest.raises(RejectedUpdate, match="missing") as rejected:  # says int8, is not
        validator.check("r", ArrayRecord(reference), protocol.MODE_DELTA, codec=codec, encoding=codec.spec())
    assert rejected.value.reason == "malformed"
    with pytest.raises(RejectedUpdate, match="topk") as rejected:  # another codec than the run's
        validator.check("r", TopK(0.5).encode(reference), protocol.MODE_DELTA, codec=codec, encoding="topk:0.5")
    assert rejected.value.reason == "malformed"
    assert sum(validator.rejections["r"].values()) == 4  # every one counts toward quarantine


class CountingGrid(InProcessGrid):
    """Records, per node and in order, the encoded size of every train message and train reply,
    and the config every train message carries."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.down: dict[int, list[int]] = defaultdict(list)
        self.up: dict[int, list[int]] = defaultdict(list)
        self.configs: dict[int, list] = defaultdict(list)

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "train":
                self.down[m.metadata.dst_node_id].append(record_bytes(m.content[protocol.ARRAYS]))
                self.configs[m.metadata.dst_node_id].append(m.content[protocol.CONFIG])
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for m in replies:
            if m.metadata.message_type == "train" and not m.has_error():
                self.up[m.metadata.src_node_id].append(record_bytes(m.content[protocol.ARRAYS]))
        return replies


@pytest.mark.parametrize("strategy", ["fedavg", "ma", "asgd_ga", "asgd_ga_delta"])
def test_the_bytes_charged_are_the_encoded_payloads(two_region_topology, tmp_path, strategy, monkeypatch):
    grids = []

    def counting(app, n):
        grids.append(CountingGrid(app, n))
        return grids[-1]

    monkeypatch.setattr("cloudless_fl.run.InProcessGrid", counting)
    figures = {}
    for compression in ("none", "int8"):
        cfg = compose(small_run_overrides(two_region_topology, strategy=strategy, compression=compression,
                                          **{"strategy.num_rounds": 30 if strategy.startswith("asgd") else 6}))
        payload = run(cfg, tmp_path / compression)
        for node, region in enumerate(("fast", "slow"), start=1):  # in-process node i is the topology's i-th region
            charged, jobs = payload["regions"][region], payload["regions"][region]["jobs"]
            assert charged["bytes_down"] == sum(grids[-1].down[node][:jobs])  # a job is charged when it ends
            assert charged["bytes_up"] == sum(grids[-1].up[node][:jobs])
        assert grids[-1].up[2], "the slow region never replied: the test would not cross the WAN"
        figures[compression] = payload
    moved = {c: sum(r["bytes_up"] + r["bytes_down"] for r in p["regions"].values()) for c, p in figures.items()}
    assert 2.5 < moved["none"] / moved["int8"] < 4.0  # int8 is ~4x smaller; a region's first download is whole
    assert figures["int8"]["summary"]["wan_bytes"] < figures["none"]["summary"]["wan_bytes"]



def test_fedavgs_compressed_downloads_follow_each_node_from_round_to_round(two_region_topology, tmp_path, monkeypatch):
    """Flower's FedAvg builds one message for all nodes; each node's compressed download must be the change
    from the model *that node* rebuilt in the round before, and tell it to keep what the last checkpoint
    (every 3 rounds here) may send again."""
    grids = []
    monkeypatch.setattr("cloudless_fl.run.InProcessGrid", lambda app, n: grids.append(CountingGrid(app, n)) or grids[-1])
    cfg = compose(small_run_overrides(two_region_topology, strategy="fedavg", compression="int8",
                                      **{"strategy.num_rounds": 5, "checkpoint.every": 3}))
    payload = run(cfg, tmp_path / "run")
    assert payload["summary"]["failed_replies"] == 0
    for node in (1, 2):
        orders = [protocol.WorkOrder.from_config(config) for config in grids[-1].configs[node]]
        assert [o.round for o in orders] == [1, 2, 3, 4, 5]
        assert [o.base for o in orders] == [None, 1, 2, 3, 4]  # the whole model once, then changes
        assert [o.keep_from for o in orders] == [1, 1, 2, 3, 3]  # round 5: the checkpoint of round 3 may re-send 3


def test_mas_compressed_downloads_tell_each_region_what_it_must_keep(two_region_topology, tmp_path, monkeypatch):
    """MA (jobs named by their stream offsets): each period's download is the change from the region's last
    model, which it must keep; once a checkpoint is written (period 3), also what a resume from it may send
    again — the job of period 3, whose model the region rebuilt — until the next checkpoint."""
    grids = []
    monkeypatch.setattr("cloudless_fl.run.InProcessGrid", lambda app, n: grids.append(CountingGrid(app, n)) or grids[-1])
    cfg = compose(small_run_overrides(two_region_topology, strategy="ma", compression="int8",
                                      **{"strategy.num_rounds": 5, "checkpoint.every": 3}))
    payload = run(cfg, tmp_path / "run")
    assert payload["summary"]["failed_replies"] == 0
    for node, region in enumerate(("fast", "slow"), start=1):  # the first jobs carry every region's order
        orders = [protocol.WorkOrder.from_config(protocol.region_config(config, region))
                  for config in grids[-1].configs[node]]
        keys = [o.offset for o in orders]
        assert len(keys) == 5 and keys == sorted(set(keys))  # one job a period, each further on
        assert [o.base for o in orders] == [None, *keys[:4]]  # the whole model once, then changes
        assert [o.keep_from for o in orders] == [keys[0], keys[0], keys[1], keys[2], keys[2]]


def test_a_model_layout_round_trips_and_a_bad_one_is_refused():
    model = _model(3).to_torch_state_dict()
    like = protocol.layout_tensors(protocol.layout_of(model))
    assert {k: (tuple(v.shape), v.dtype) for k, v in like.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in model.items()}
    for bad in ('[["w", [3], "os"]]', '{"w": 1}', '[["w", ["x"], "float32"]]', "not json"):
        with pytest.raises(ValueError, match="model-layout"):
            protocol.layout_tensors(bad)


def test_a_region_that_cannot_write_its_state_says_how_to_fix_it(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    order = protocol.WorkOrder(lr=0.1, batch_size=1, steps=1, compression="int8:16", offset=0)
    link = RegionLink(order, blocked / "region")
    link.received(_model(0))
    with pytest.raises(DataError, match="writable --node-config"):
        link.reply({"w": torch.ones(300), "b": torch.ones(7)})
