"""Jobs in flight and join queries: a reply whose pull blocks (a region that died mid-upload) holds up
only its own message."""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.http_grid import HttpGrid

from cloudless_fl.control.jobs import Job, JobTiming
from cloudless_fl.strategy import inflight
from cloudless_fl.strategy.inflight import InFlight, InFlightJobs, PromptReplies, ReplyPuller
from cloudless_fl.strategy.metered import Metered
from cloudless_fl.training.protocol import WorkOrder
from cloudless_fl.strategy.membership import Roster
from cloudless_fl.training import protocol
from strategy_helpers import Federation, topology

STUCK_FOR_S = 3.0  # how long the stuck pull blocks: far beyond every wait below


class UploadStalledGrid:
    """Replies for every node at once, except node 2's, whose pull blocks as Flower's `HttpGrid` does on
    a reply whose arrays never finish uploading (it retries until the SuperLink expires the upload)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.nodes: dict[str, int] = {}

    def push_messages(self, messages):
        keys = []
        for message in messages:
            key = f"job-{message}"
            self.nodes[key] = message
            keys.append(key)
        return keys

    def pull_messages(self, message_ids):
        replies = []
        for key in message_ids:
            if self.nodes[key] == 2:
                self.released.wait(STUCK_FOR_S)
                continue
            replies.append(f"reply-{key}")
        return replies


def _two_jobs(jobs: InFlightJobs, grid: UploadStalledGrid) -> None:
    messages = [jobs.stage(node, InFlight(node_id=node, region=f"r{node}", version=0, job=None, order=None,
                                          arrays=None)) for node in (1, 2)]
    jobs.push(grid, messages)


def _replies_within(jobs: InFlightJobs, grid, seconds: float) -> tuple[list, float]:
    start = time.monotonic()
    replies = []
    while not replies and time.monotonic() - start < seconds:
        replies = jobs.pull(grid)
        time.sleep(0.01)
    return replies, time.monotonic() - start


def test_a_stalled_reply_does_not_hold_up_the_others_and_times_out():
    grid = UploadStalledGrid()
    jobs = InFlightJobs(reply_timeout=0.5, watch=True)
    _two_jobs(jobs, grid)
    replies, waited = _replies_within(jobs, grid, 2.0)
    assert replies == ["reply-job-1"] and waited < 1.0
    jobs.pop("job-1")
    time.sleep(0.6)
    assert jobs.pull(grid) == [] and jobs.expired() == ["job-2"]  # lost like any unanswered job
    jobs.pop("job-2")
    jobs.replies.stop()
    grid.released.set()


def test_without_watching_a_stalled_reply_blocks_every_pull():
    """The control: the same grid pulled on the caller's thread, as an in-memory grid is."""
    grid = UploadStalledGrid()
    jobs = InFlightJobs(reply_timeout=0.5, watch=False)
    _two_jobs(jobs, grid)
    replies, waited = _replies_within(jobs, grid, 2.0)
    assert replies == ["reply-job-1"] and waited >= STUCK_FOR_S


def test_a_failed_pull_is_raised_on_the_strategys_thread():
    class BrokenGrid(UploadStalledGrid):
        def pull_messages(self, message_ids):
            raise ConnectionError("SuperLink gone")

    grid = BrokenGrid()
    jobs = InFlightJobs(reply_timeout=10, watch=True)
    _two_jobs(jobs, grid)
    deadline = time.monotonic() + 2
    try:
        while time.monotonic() < deadline:
            jobs.pull(grid)
            time.sleep(0.01)
    except ConnectionError as exc:
        assert "SuperLink gone" in str(exc)
    else:
        raise AssertionError("the pull's error was swallowed")


class QueryStalledGrid:
    """Nodes 1 and 2 not yet in the run; node 2 dies while answering who it is (its answer's pull blocks)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.sent: dict[str, Message] = {}

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        keys = []
        for message in messages:
            key = f"query-{message.metadata.dst_node_id}"
            message.metadata.__dict__["_message_id"] = key
            self.sent[key] = message
            keys.append(key)
        return keys

    def pull_messages(self, message_ids):
        replies = []
        for key in message_ids:
            query = self.sent[key]
            if query.metadata.dst_node_id == 2:
                self.released.wait(STUCK_FOR_S)
                continue
            replies.append(Message(RecordDict({protocol.INFO: ConfigRecord({"region": "r1"})}), reply_to=query))
        return replies


def test_a_node_dying_mid_answer_does_not_stall_the_look_for_joining_nodes(monkeypatch):
    for name, value in {"_task_id": 1, "_run_id": 1, "_node_id": 2}.items():  # as the engines set it, for replies
        monkeypatch.setattr(TaskIdentity, name, value)
    grid = QueryStalledGrid()
    roster = Roster()
    roster.replies.watch = True
    start = time.monotonic()
    answers = roster.poll(grid, ConfigRecord({}), ask_now=True)
    while not answers and time.monotonic() - start < 2.0:
        time.sleep(0.01)
        answers = roster.poll(grid, ConfigRecord({}), ask_now=False)
    assert [(a.node_id, a.name) for a in answers] == [(1, "r1")] and time.monotonic() - start < 1.0
    roster.replies.stop()
    grid.released.set()


def test_a_job_expires_only_past_the_reply_timeout_and_never_once_answered(monkeypatch):
    """`expired`: unanswered for longer than `reply_timeout` (strictly), on the monotonic clock."""
    import cloudless_fl.strategy.inflight as inflight

    now = [100.0]
    monkeypatch.setattr(inflight.time, "monotonic", lambda: now[0])
    jobs = InFlightJobs(reply_timeout=5.0, watch=False)
    _two_jobs(jobs, UploadStalledGrid())
    now[0] = 105.0
    assert jobs.expired() == []  # exactly the timeout: not yet
    now[0] = 105.5
    assert jobs.expired() == ["job-1", "job-2"]
    assert jobs.expired(answered=["job-1"]) == ["job-2"]


class RepliesOnPull:
    """Each pushed message's reply comes on the `nth` pull (never, with None); a caller still pulling after
    `max_pulls` is stuck (the test fails instead of hanging)."""

    def __init__(self, nth: int | None, max_pulls: int = 200) -> None:
        self.nth, self.pulls, self.max_pulls = nth, 0, max_pulls

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        assert self.pulls <= self.max_pulls, "still pulling: the timeout was not kept"
        if self.nth is None or self.pulls < self.nth:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=key)) for key in message_ids]


def test_flowers_round_loop_waits_for_its_replies_promptly(monkeypatch):
    """`Metered` runs Flower's round loop on `PromptReplies`: between pulls it waits `WATCH_POLL_S` (as ASGD-GA
    and MA's watches do at first), not the 3 s of Flower's `HttpGrid.send_and_receive`."""
    slept = []
    monkeypatch.setattr(inflight.time, "sleep", slept.append)
    grid = RepliesOnPull(nth=4)
    replies = PromptReplies(grid).send_and_receive(["a", "b"], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert slept == [inflight.WATCH_POLL_S] * 3 and grid.pulls == 4


def test_flowers_round_loop_gives_up_at_its_timeout_with_the_replies_it_has():
    start = time.monotonic()
    assert PromptReplies(RepliesOnPull(nth=None)).send_and_receive(["a"], timeout=0.2) == []
    assert 0.2 <= time.monotonic() - start < 2.0


def test_flowers_round_loop_without_a_timeout_waits_for_every_reply(monkeypatch):
    monkeypatch.setattr(inflight.time, "sleep", lambda s: None)
    replies = PromptReplies(RepliesOnPull(nth=50)).send_and_receive(["a", "b"], timeout=None)
    assert len(replies) == 2


class HttpGridLike(HttpGrid):
    """Flower's `HttpGrid` as `ReplyPuller` sees it (its type), answering each reply on the `nth` pull."""

    def __init__(self, nth: int) -> None:  # no SuperLink: only the type and the pulls matter
        self.replies = RepliesOnPull(nth)

    def pull_messages(self, message_ids):
        return self.replies.pull_messages(message_ids)


def _pull_until(puller: ReplyPuller, grid, keys, seconds: float = 5.0) -> list:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if replies := puller.pull(grid, keys):
            return replies
        time.sleep(0.01)
    return []


def test_replies_over_a_superlink_are_watched_on_daemon_threads_until_they_come():
    """Over Flower's `HttpGrid` each reply is pulled on its own daemon thread (a stuck pull never keeps the
    ServerApp from exiting), pulling again until the reply comes."""
    grid = HttpGridLike(nth=3)
    puller = ReplyPuller()
    assert puller.pull(grid, ["m0"]) == []  # watched, not pulled here
    [watch] = puller._watches.values()
    assert watch._thread.daemon
    [reply] = _pull_until(puller, grid, ["m0"])
    assert reply.metadata.reply_to_message_id == "m0" and grid.replies.pulls == 3
    puller.pull(grid, ["m1"])
    watch = puller._watches["m1"]
    puller.forget("m1")
    assert watch._dropped.is_set() and "m1" not in puller._watches


def test_a_watched_jobs_pulls_thin_out_as_it_ages():
    """Pulled every 0.05 s at first, then every 5 % of the job's age, at least once a second: a reply waits
    for its pull at most 5 % of its job's time, and a long job costs the SuperLink about log(age) pulls."""
    assert inflight.watch_interval(0.0) == inflight.watch_interval(1.0) == 0.05
    assert inflight.watch_interval(10.0) == pytest.approx(0.5)
    assert inflight.watch_interval(600.0) == 1.0


def test_a_watch_pulls_at_the_interval_its_age_calls_for(monkeypatch):
    """Over 1.5 s with the lag raised to 50 % of the age: pulls at 0, 0.05, 0.1, then every half-age (0.15,
    0.225, 0.34, 0.51, 0.76, 1.14): 9 pulls; every 0.05 s would be 30."""
    monkeypatch.setattr(inflight, "WATCH_LAG", 0.5)
    grid = HttpGridLike(nth=None)
    grid.replies.max_pulls = 1000
    watch = inflight.ReplyWatch(grid, "m0")
    time.sleep(1.5)
    watch.drop()
    assert 8 <= grid.replies.pulls <= 12


def test_an_in_memory_grid_is_pulled_on_the_callers_thread():
    puller = ReplyPuller()
    [reply] = puller.pull(RepliesOnPull(nth=1), ["m0"])
    assert reply.metadata.reply_to_message_id == "m0" and not puller._watches


def test_a_job_sent_uncompressed_carries_its_model_as_its_payload():
    flight = InFlight(node_id=1, region="a", version=0, job=None, order=None, arrays="the model")
    assert flight.payload == "the model"
    assert InFlight(node_id=1, region="a", version=0, job=None, order=None, arrays="the model",
                    payload="a change").payload == "a change"


@pytest.mark.parametrize("timing", [None, JobTiming(start=2.0, download_s=0.5, compute_s=3.0, upload_s=0.25)],
                         ids=["measured", "modelled"])
def test_a_job_kept_by_a_checkpoint_comes_back_as_it_was_sent(timing):
    """What a checkpoint keeps of a job (JSON) brings back the same job: region, version, order, metering
    (with its modelled timing, or none when no cost model times it), to the region's node now."""
    order = WorkOrder(lr=0.05, batch_size=16, steps=7, mode=protocol.MODE_DELTA, offset=112, version=9, workers=2,
                      compression="int8", base=3, keep_from=2)
    job = Job(region="a", job_id=4, dispatched_at=1.5, bytes_down=1234, timing=timing, workers=2)
    sent = InFlight(node_id=1, region="a", version=9, job=job, order=order, arrays="the model",
                    payload="a change")
    state = json.loads(json.dumps(sent.state_dict()))
    back = InFlight.from_state_dict(state, 7, "the model", "a change")
    assert (back.node_id, back.region, back.version, back.order, back.job, back.arrays, back.payload) == (
        7, "a", 9, order, job, "the model", "a change")
    assert InFlight.from_state_dict(state, 7, "the model").payload == "the model"


def test_fedavgs_rounds_pull_their_replies_through_the_prompt_grid(tmp_path):
    """Flower's own `send_and_receive` is never called by the baseline's round loop."""
    fed = Federation(tmp_path, topology())

    def flowers_own(*args, **kwargs):
        raise AssertionError("Flower's send_and_receive (3 s between pulls over a SuperLink) was used")

    fed.grid.send_and_receive = flowers_own
    work = WorkOrder(lr=0.1, batch_size=16, steps=2, data_seed=0)
    fedavg = Metered(FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2), fed.meter())
    fedavg.start(fed.grid, fed.initial, num_rounds=2, train_config=ConfigRecord({**dict(fed.config),
                                                                                 **work.to_config()}))
    assert [e["version"] for e in fedavg.history.entries] == [0, 1, 2]


def test_a_job_taken_off_the_books_stops_its_reply_watch():
    """A job popped before its reply (lost, its region gone) no longer has a thread pulling for it."""
    grid = UploadStalledGrid()
    jobs = InFlightJobs(reply_timeout=10, watch=True)
    _two_jobs(jobs, grid)
    jobs.pull(grid)  # both watched now
    watch = jobs.replies._watches["job-2"]
    jobs.pop("job-2")
    assert watch._dropped.is_set() and "job-2" not in jobs.replies._watches and "job-2" not in jobs
    grid.released.set()
