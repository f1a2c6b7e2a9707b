"""A region's trainer kept warm between messages: the same replies as the ClientApp computing them, and never
needed — absent, crashed mid-job or of another version, the ClientApp computes the job itself."""

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients import warm_trainer
from clients.region_app import make_client_app
from cloudless_fl.config import compose, topology_of
from cloudless_fl.errors import DataError
from cloudless_fl.deployment.grid import InProcessGrid
from cloudless_fl.deployment.launch import Federation
from cloudless_fl.training import pacing, protocol
from cloudless_fl.training.data import load_source, split_dataset
from cloudless_fl.training.models import build_model


@pytest.fixture()
def sockets():
    """A short private folder for sockets (a Unix socket's path must fit in 108 bytes; pytest's may not)."""
    folder = Path(tempfile.mkdtemp(prefix="cfl-test-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    split_dataset(load_source("digits"), {"a": 0.5, "b": 0.5}, root)
    return root / "a"


def _train_message(mode=protocol.MODE_DELTA, num_classes=10, steps=3):
    model = build_model("mlp", (1, 8, 8), 10, seed=0, hidden=[32])
    spec = protocol.ModelSpec("mlp", num_classes, {"hidden": [32]})
    order = protocol.WorkOrder(lr=0.1, batch_size=16, steps=steps, offset=0, mode=mode)
    config = ConfigRecord({**spec.to_config(), **order.to_config(), "regions": "a,b"})
    return Message(RecordDict({protocol.ARRAYS: ArrayRecord(model.state_dict()), protocol.CONFIG: config}),
                   dst_node_id=1, message_type="train")


def _call(node_config: dict, **work) -> Message:
    """The region ClientApp's reply to a train message, computed in this process as a SuperNode's ClientApp
    process would (an exception becomes an error reply, as the engines make it)."""
    grid = InProcessGrid(make_client_app(), 1)
    grid._contexts[1].node_config.update(node_config)
    [reply] = grid.pull_messages(grid.push_messages([_train_message(**work)]))
    return reply


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content[protocol.ARRAYS].items()}


def _serving(socket_path: Path, jobs: int) -> threading.Thread:
    thread = threading.Thread(target=warm_trainer.serve, args=(socket_path, jobs), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        assert time.monotonic() < deadline, "the trainer did not listen"
        time.sleep(0.05)
    return thread


@pytest.mark.parametrize("mode", [protocol.MODE_DELTA, protocol.MODE_GRADIENT])
def test_the_warm_trainer_answers_a_job_as_the_clientapp_would_compute_it(data_dir, sockets, mode):
    node = {"region": "a", "data-dir": str(data_dir)}
    cold = _call(node, mode=mode)
    trainer = _serving(sockets / "a.sock", jobs=2)
    warm = _call({**node, warm_trainer.NODE_KEY: str(sockets / "a.sock")}, mode=mode)
    again = _call({**node, warm_trainer.NODE_KEY: str(sockets / "a.sock")}, mode=mode)
    trainer.join(10)
    assert not trainer.is_alive()  # it answered both
    for reply in (warm, again):
        assert reply.content[protocol.INFO]["computed-by"] == "trainer"
        assert reply.content[protocol.INFO]["update"] == cold.content[protocol.INFO]["update"]
        assert _arrays(reply).keys() == _arrays(cold).keys()
        assert all(np.array_equal(_arrays(reply)[k], _arrays(cold)[k]) for k in _arrays(cold))
        assert reply.content[protocol.METRICS]["num-examples"] == 48
        assert reply.content[protocol.METRICS]["startup-seconds"] >= 0  # the ClientApp process's, measured
    assert cold.content[protocol.INFO]["computed-by"] == "clientapp"


def test_a_job_that_fails_in_the_trainer_fails_as_it_would_in_the_clientapp(data_dir, sockets):
    node = {"region": "a", "data-dir": str(data_dir)}
    cold = _call(node, num_classes=5)  # digits has labels up to 9
    trainer = _serving(sockets / "a.sock", jobs=2)
    warm = _call({**node, warm_trainer.NODE_KEY: str(sockets / "a.sock")}, num_classes=5)
    assert cold.has_error() and cold.error.reason.startswith("DataError: region a")
    assert warm.has_error() and warm.error.reason == cold.error.reason
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    with pytest.raises(DataError, match="region a"):  # raised from the trainer's answer, not recomputed here
        warm_trainer.forward(sockets / "a.sock", "train", _train_message(num_classes=5).content, context, None,
                             "auto")
    trainer.join(10)
    assert not trainer.is_alive()  # it was the trainer that failed, both times


def test_without_a_trainer_at_the_socket_the_clientapp_computes_the_job(data_dir, sockets):
    node = {"region": "a", "data-dir": str(data_dir)}
    reply = _call({**node, warm_trainer.NODE_KEY: str(sockets / "nobody.sock")})
    cold = _call(node)
    assert reply.content[protocol.INFO]["computed-by"] == "clientapp"
    assert all(np.array_equal(_arrays(reply)[k], _arrays(cold)[k]) for k in _arrays(cold))


def test_a_request_of_another_protocol_version_is_refused_and_a_failure_travels_as_text():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    handlers = {"train": lambda *args: RecordDict()}
    assert warm_trainer._answer(handlers, (warm_trainer.PROTOCOL + 1, "train", RecordDict(), context, None,
                                           "auto"))[0] == "refused"
    assert warm_trainer._answer(handlers, (warm_trainer.PROTOCOL, "unknown", RecordDict(), context, None,
                                           "auto"))[0] == "refused"
    assert warm_trainer._answer(handlers, (warm_trainer.PROTOCOL, "train", RecordDict(), context, None,
                                           "auto"))[0] == "ok"

    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("not picklable")

    def fail(*args):
        raise Unpicklable("the job broke")

    status, error = warm_trainer._answer({"train": fail}, (warm_trainer.PROTOCOL, "train", RecordDict(), context,
                                                           None, "auto"))
    assert status == "error" and isinstance(error, RuntimeError) and "Unpicklable: the job broke" in str(error)


def test_a_request_the_trainer_cannot_read_is_refused_and_it_goes_on_serving(data_dir, sockets):
    """A request pickled by other code (a class this trainer lacks: another version's FAB) or of another
    shape is refused, and the trainer answers the next job."""
    socket_path = sockets / "a.sock"
    trainer = _serving(socket_path, jobs=3)
    key = warm_trainer.key_file(socket_path).read_bytes()
    unreadable = pickle.dumps(SimpleNamespace(job=1)).replace(b"types", b"nomod")  # unpickling raises
    for raw in (unreadable, pickle.dumps(("a", "tuple", "of", "another", "shape"))):
        with Client(str(socket_path), family="AF_UNIX", authkey=key) as conn:
            conn.send_bytes(raw)
            status, why = conn.recv()
        assert status == "refused" and "unreadable request" in why
    reply = _call({"region": "a", "data-dir": str(data_dir), warm_trainer.NODE_KEY: str(socket_path)})
    trainer.join(10)
    assert reply.content[protocol.INFO]["computed-by"] == "trainer"


@pytest.mark.subprocess
def test_a_trainer_killed_mid_job_leaves_the_job_to_the_clientapp(data_dir, sockets):
    """A real `cloudless-fl trainer` process, SIGKILLed while it computes: the ClientApp that handed it the
    job computes it itself, and the reply is the one a trainer-less ClientApp gives."""
    socket_path, log = sockets / "a.sock", sockets / "trainer.log"
    with open(log, "wb") as out:
        trainer = subprocess.Popen([sys.executable, "-m", "clients.warm_trainer", "--socket", str(socket_path)],
                                   stderr=out, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            assert time.monotonic() < deadline and trainer.poll() is None, log.read_text()
            time.sleep(0.1)
        # paced to 16 samples/s: the job's 48 samples take 3 s, long enough to be killed in
        node = {"region": "a", "data-dir": str(data_dir), pacing.NODE_KEY: 16.0}
        replies = []
        call = threading.Thread(target=lambda: replies.append(
            _call({**node, warm_trainer.NODE_KEY: str(socket_path)})))
        call.start()
        while "answering a train message" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        trainer.kill()
        trainer.wait()
        call.join(60)
    finally:
        trainer.kill()
        trainer.wait()
    [reply] = replies
    assert reply.content[protocol.INFO]["computed-by"] == "clientapp"
    cold = _call({"region": "a", "data-dir": str(data_dir)})
    assert all(np.array_equal(_arrays(reply)[k], _arrays(cold)[k]) for k in _arrays(cold))


@pytest.mark.subprocess
def test_launch_restarts_a_regions_trainer_that_exits_and_stops_it_at_the_end(tmp_path, data_dir):
    federation = Federation(topology_of(compose(["topology=geo4"])), tmp_path)
    with federation:
        federation.start_trainer("ap-beijing")
        socket_path = federation.trainer_socket("ap-beijing")
        first = federation.processes["trainer-ap-beijing"].pid
        federation.kill_trainer("ap-beijing")
        deadline = time.monotonic() + 60
        while federation.processes["trainer-ap-beijing"].pid == first or not socket_path.exists():
            assert time.monotonic() < deadline, "the trainer was not restarted"
            time.sleep(0.1)
        assert federation.trainer_restarts == {"ap-beijing": 1}
        context = Context(run_id=1, node_id=1, node_config={"region": "a", "data-dir": str(data_dir)},
                          state=RecordDict(), run_config={})
        describe = Message(RecordDict({protocol.CONFIG: ConfigRecord({"regions": "a,b"})}), dst_node_id=1,
                           message_type="query")
        answer = warm_trainer.forward(socket_path, "query", describe.content, context, None, "auto")
        assert answer is not None and answer[protocol.INFO]["region"] == "a"  # the new one answers
        restarted = federation.processes["trainer-ap-beijing"]
    assert restarted.poll() is not None  # stopped with the federation
    assert not socket_path.parent.exists()  # and its socket folder removed
