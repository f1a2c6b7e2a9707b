"""The roster: who takes part, who is named, refused or quarantined, and what is recorded of it."""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import Error as MessageError
from flwr.app import Message

from clients.region_app import make_client_app
from cloudless_fl.deployment.grid import InProcessGrid
from cloudless_fl.strategy.membership import RegionInfo, Roster, data_shares, data_sizes, wait_for_nodes
from cloudless_fl.strategy.runbook import RunBook
from cloudless_fl.strategy.validation import UpdateLimits, UpdateValidator
from strategy_helpers import Federation, topology


@pytest.fixture
def fed(tmp_path):
    return Federation(tmp_path, topology())  # node 1 holds region fast's data, node 2 slow's


def _roster(fed) -> Roster:
    return Roster(RunBook(fed.meter()))


def _pushes_to(grid) -> list[int]:
    """Record the node every message pushed to `grid` from now on goes to."""
    sent, push = [], grid.push_messages

    def recorded(messages):
        messages = list(messages)
        sent.extend(m.metadata.dst_node_id for m in messages)
        return push(messages)

    grid.push_messages = recorded
    return sent


def test_unasked_nodes_take_part_as_node_ids_with_equal_shares(fed):
    roster = _roster(fed)
    roster.take_unasked([3, 5])
    assert roster.live == {3: RegionInfo(3, "node-3", None), 5: RegionInfo(5, "node-5", None)}
    assert roster.shares == {"node-3": 0.5, "node-5": 0.5} and roster.region_of(5) == "node-5"
    with pytest.raises(RuntimeError, match="^no node is connected; start the SuperNodes first$"):
        _roster(fed).take_unasked([])


def test_names_asks_each_unnamed_node_once_and_never_a_refused_one(fed):
    roster = _roster(fed)
    roster.refused.add(3)
    sent = _pushes_to(fed.grid)
    assert roster.names(fed.grid, [1, 2, 3], fed.config, timeout=5.0) == {1: "fast", 2: "slow", 3: ""}
    assert roster.names(fed.grid, [2, 1], fed.config, timeout=5.0) == {2: "slow", 1: "fast"}
    assert sorted(sent) == [1, 2]  # asked once, and node 3 never


def test_names_refuses_an_impostor_and_waits_for_a_silent_node_only_until_the_timeout(fed, caplog):
    """An impostor is refused for good; a node that does not answer in time stays unnamed, to be asked again."""
    roster = _roster(fed)
    roster.bind({"fast": 1, "slow": 1})  # slow's registered key is node 1's: node 2 may not speak for it
    fed.grid.set_offline(1)
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        assert roster.names(fed.grid, [1, 2], fed.config, timeout=0.3) == {1: "", 2: ""}
    assert roster.refused == {2} and caplog.messages == [
        "node 2 cannot take part: claims region slow, whose registered key is node 1's"]
    fed.grid.set_offline(1, False)
    assert roster.names(fed.grid, [1, 2], fed.config, timeout=5.0) == {1: "fast", 2: ""}


def test_a_node_that_rejoins_is_named_and_recorded(fed, caplog):
    roster = _roster(fed)
    with caplog.at_level("INFO", logger="cloudless_fl"):
        roster.admit(RegionInfo(7, "slow", 100))
    assert roster.live == {7: RegionInfo(7, "slow", 100)} and roster.region_of(7) == "slow"
    assert "region slow (node 7) joins the run" in caplog.messages
    assert roster.book.history.counters["rejoined_regions"] == 1
    assert [(e["event"], e["region"], e["node"]) for e in roster.book.history.events] == [("region_back", "slow", 7)]


def test_a_refused_node_is_recorded_and_never_asked_again(fed, caplog):
    roster = _roster(fed)
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        roster.refuse(RegionInfo(2, "slow", 100), "region slow is quarantined")
    assert roster.refused == {2} and "node 2 not admitted: region slow is quarantined" in caplog.messages
    assert [(e["event"], e["node"], e["reason"]) for e in roster.book.history.events] == [
        ("node_refused", 2, "region slow is quarantined")]
    sent = _pushes_to(fed.grid)
    roster.poll(fed.grid, fed.config, ask_now=True)
    assert sent == [1]


def test_why_a_rejoining_node_may_not_take_part(fed):
    roster = _roster(fed)
    roster.settle({1: RegionInfo(1, "fast", 100), 2: RegionInfo(2, "slow", 100)}, {})
    roster.bind({"fast": 1, "slow": 2})
    assert roster.refusal(RegionInfo(2, "slow", 100)) is None  # its own key
    assert roster.refusal(RegionInfo(3, "slow", 100)) == "claims region slow, whose registered key is node 2's"
    roster.bind({"fast": 1, "slow": 2, "west": 4})
    assert roster.refusal(RegionInfo(4, "west", 100)) == "region west was not in this run at its start"
    roster.quarantined.add("slow")
    assert roster.refusal(RegionInfo(2, "slow", 100)) == "region slow is quarantined"


def test_a_resumed_run_keeps_its_quarantined_regions_out(fed):
    """A checkpoint names the quarantined regions: after a resume they get no work, and their nodes are not
    asked to (re)join."""
    roster = _roster(fed)
    roster.settle({1: RegionInfo(1, "fast", 100), 2: RegionInfo(2, "slow", 100)}, {})
    roster.restore_quarantine(["slow"])
    assert roster.quarantined == {"slow"} and roster.live_names() == {"fast"}
    assert roster.remaining() == {"fast"}
    sent = _pushes_to(fed.grid)
    roster.poll(fed.grid, fed.config, ask_now=True)
    assert sent == []  # node 1 is live, node 2's region quarantined


def test_a_region_is_quarantined_at_its_nth_rejected_update_and_only_then(fed, caplog):
    """`reject` says True only when the region is quarantined by this rejection: the strategy then plans
    without it. Its node is dropped and never asked to rejoin; the log names the region and the count."""
    roster = _roster(fed)
    roster.settle({1: RegionInfo(1, "fast", 100), 2: RegionInfo(2, "slow", 100)}, {})
    validator = UpdateValidator({"w": torch.zeros(2)}, UpdateLimits(quarantine_after=2))
    said = []
    for _ in range(2):
        validator.rejections["slow"]["non_finite"] += 1  # what the validator does when it rejects one
        with caplog.at_level("WARNING", logger="cloudless_fl"):
            said.append(roster.reject(2, "slow", validator))
        assert roster.live_names() == ({"fast", "slow"} if not said[-1] else {"fast"})
    assert said == [False, True] and roster.quarantined == {"slow"}
    assert roster.book.history.counters["rejected_updates"] == 2
    assert roster.book.history.counters["quarantined_regions"] == 1
    assert caplog.messages == ["region slow quarantined after 2 bad updates; it gets no more work"]
    assert [(e["event"], e["region"]) for e in roster.book.history.events] == [("region_quarantined", "slow")]
    sent = _pushes_to(fed.grid)
    roster.poll(fed.grid, fed.config, ask_now=True)
    assert sent == []  # node 2 is not asked to rejoin


def test_a_lost_node_leaves_the_run_and_is_recorded(fed, caplog):
    roster = _roster(fed)
    roster.settle({1: RegionInfo(1, "fast", 100), 2: RegionInfo(2, "slow", 100)}, {})
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        roster.lose(2, "slow", "no reply within 3 s")
    assert roster.live_names() == {"fast"} and roster.remaining() == {"fast"}
    assert caplog.messages == ["region slow (node 2) lost: no reply within 3 s"]
    assert [(e["event"], e["region"], e["reason"]) for e in roster.book.history.events] == [
        ("region_lost", "slow", "no reply within 3 s")]


def test_the_regions_remaining_are_the_live_ones_or_without_a_roll_call_those_replies_named(fed):
    """MA and ASGD-GA keep a membership (live nodes); Flower's FedAvg only learns names from replies."""
    roster = _roster(fed)
    roster.learn(1, "fast")
    roster.learn(2, "slow")
    roster.quarantined.add("slow")
    assert roster.remaining() == {"fast"}
    roster.settle({1: RegionInfo(1, "fast", 100), 2: RegionInfo(2, "slow", 100)}, {})
    roster.drop(1)
    assert roster.remaining() == set()  # fast's node is gone, slow is quarantined; names alone would say fast


def test_the_roll_call_waits_for_a_silent_node_only_until_its_timeout(fed):
    roster = _roster(fed)
    fed.grid.set_offline(2)
    roster.discover(fed.grid, [1, 2], fed.config, timeout=0.3)
    assert roster.live_names() == {"fast"} and roster.region_of(1) == "fast"
    assert roster.region_of(2) == "node-2"  # never named: logs and results call it by its id


def test_new_nodes_are_looked_for_every_few_steps_once_per_step(fed):
    roster = _roster(fed)
    assert [roster.due(step, 5) for step in (0, 0, 3, 5, 5, 6, 10)] == [True, False, False, True, False, False,
                                                                         True]
    # the first step a run asks at may be any step: version 1 with rejoin_every=1 is due
    assert _roster(fed).due(1, 1)


class SlowGrid(InProcessGrid):
    """Nodes in `holding` do not answer yet; nodes in `failing` answer every query with that error."""

    def __init__(self, app, num_nodes: int) -> None:
        super().__init__(app, num_nodes)
        self.holding: set[int] = set()
        self.failing: dict[int, str] = {}

    def pull_messages(self, message_ids):
        return super().pull_messages([m for m in message_ids if m not in self._inbox
                                      or self._inbox[m].metadata.dst_node_id not in self.holding])

    def _deliver(self, msg):
        if msg.metadata.dst_node_id in self.failing:
            return Message(MessageError(code=0, reason=self.failing[msg.metadata.dst_node_id]), reply_to=msg)
        return super()._deliver(msg)


def test_data_shares_follow_the_resident_examples_and_are_equal_when_one_is_unknown():
    assert data_shares([RegionInfo(1, "a", 30), RegionInfo(2, "b", 10)]) == {"a": 0.75, "b": 0.25}
    assert data_shares([RegionInfo(1, "a", 30), RegionInfo(2, "b", None), RegionInfo(3, "c", 10)]) == {
        "a": 1 / 3, "b": 1 / 3, "c": 1 / 3}


def test_data_sizes_are_as_said_or_all_the_mean_of_those_said_when_one_is_unknown():
    """Never 1 sample for the region that did not say beside the others' hundreds; none said: 1 each."""
    assert data_sizes([RegionInfo(1, "a", 700), RegionInfo(2, "b", 500)]) == {"a": 700, "b": 500}
    assert data_sizes([RegionInfo(1, "a", 700), RegionInfo(2, "b", None), RegionInfo(3, "c", 501)]) == {
        "a": 600, "b": 600, "c": 600}
    assert data_sizes([RegionInfo(1, "a", None), RegionInfo(2, "b", None)]) == {"a": 1, "b": 1}


def test_the_start_up_answers_make_the_run_and_each_failure_is_refused_and_recorded(fed, caplog):
    roster = _roster(fed)
    roster.bind({"fast": 1, "slow": 9, "mid": 4})  # node 2 may not speak for slow
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        roster.settle({1: RegionInfo(1, "fast", 60), 2: RegionInfo(2, "slow", 20), 4: RegionInfo(4, "mid", 20)},
                      {3: "its data holds NaN"})
    assert roster.live == {1: RegionInfo(1, "fast", 60), 4: RegionInfo(4, "mid", 20)}
    assert roster.named == {1: "fast", 4: "mid"} and roster.refused == {2, 3}
    assert roster.shares == {"fast": 0.75, "mid": 0.25}
    assert sorted(caplog.messages) == ["node 2 cannot take part: claims region slow, whose registered key is node 9's",
                                       "node 3 cannot take part: its data holds NaN"]
    assert sorted((e["event"], e["node"], e["reason"]) for e in roster.book.history.events) == [
        ("region_failed", 2, "claims region slow, whose registered key is node 9's"),
        ("region_failed", 3, "its data holds NaN")]
    assert roster.book.history.counters["lost_regions"] == 2
    with pytest.raises(RuntimeError, match="^no region could take part; see the warnings above$"):
        _roster(fed).settle({}, {3: "its data holds NaN"})


def test_a_poll_asks_only_unknown_nodes_and_never_waits_for_their_answers(fed):
    grid = SlowGrid(make_client_app(fed.root), 2)
    roster = _roster(fed)
    roster.discover(grid, [1, 2], fed.config, timeout=5.0)
    fast, slow = roster.live[1].examples, roster.live[2].examples
    new_fast, new_slow, refused = grid.restart(1), grid.restart(2), grid.restart(1)  # nodes 3, 4, 5
    grid.set_offline(1, False), grid.set_offline(2, False)  # 1 live, 2 (below) quarantined: all five connected
    roster.restore_quarantine(["slow"])
    roster.refused.add(refused)
    grid.holding.add(new_fast)
    sent = _pushes_to(grid)
    assert roster.poll(grid, fed.config, ask_now=False) == [] and sent == []  # nothing asked yet
    started = time.monotonic()
    assert roster.poll(grid, fed.config, ask_now=True) == [RegionInfo(new_slow, "slow", slow)]
    assert time.monotonic() - started < 1.0 and sorted(sent) == [new_fast, new_slow]  # node 3 not awaited
    assert roster.poll(grid, fed.config, ask_now=True) == [RegionInfo(new_slow, "slow", slow)]
    assert sorted(sent) == [new_fast, new_slow, new_slow]  # node 3 is still being asked: not asked twice
    grid.holding.clear()
    assert roster.poll(grid, fed.config, ask_now=False) == [RegionInfo(new_fast, "fast", fast)]


def test_a_node_that_fails_its_query_is_refused_and_never_asked_again(fed):
    grid = SlowGrid(make_client_app(fed.root), 3)
    roster = _roster(fed)
    roster.discover(grid, [1, 2], fed.config, timeout=5.0)
    grid.failing[3] = "RuntimeError: no data"
    sent = _pushes_to(grid)
    assert roster.poll(grid, fed.config, ask_now=True) == [] and roster.refused == {3}
    assert roster.poll(grid, fed.config, ask_now=True) == [] and sent == [3]


def test_waiting_for_nodes_ends_when_they_are_there_or_at_the_timeout(fed):
    started = time.monotonic()
    assert wait_for_nodes(fed.grid, 2, timeout=5.0) == [1, 2]
    assert time.monotonic() - started < 0.4  # there already: no sleep
    started = time.monotonic()
    assert wait_for_nodes(fed.grid, 3, timeout=0.2) == [1, 2]
    assert 0.2 <= time.monotonic() - started < 1.2  # one half-second look past the timeout, then the nodes there
