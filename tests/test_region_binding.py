"""What a node says of itself: under SuperNode authentication each region's key has one node id, and no other
node may speak for it; a self-description whose counts make no sense keeps its node out."""

from __future__ import annotations

from collections import Counter

import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from cloudless_fl.config import compose, validate
from cloudless_fl.errors import ConfigError
from cloudless_fl.strategy import AsyncGradAccum, Metered, ModelAveraging
from cloudless_fl.strategy.membership import Roster
from cloudless_fl.training import protocol
from strategy_helpers import Federation
from test_validation import three_regions

STRATEGIES = {
    "ma": lambda fed: ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter()),
    "asgd_ga_delta": lambda fed: AsyncGradAccum(lr=1.0, accumulation_steps=2, batch_size=16, update="delta",
                                                local_lr=0.1, balance=False, tau_max=100, meter=fed.meter(),
                                                reply_timeout=3.0),
    "fedavg": lambda fed: Metered(FedAvg(fraction_evaluate=0.0, min_available_nodes=3), fed.meter()),
    # the roll call travelling with the first jobs: their replies name the nodes, impostors among them
    "ma_first_jobs": lambda fed: ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter(),
                                                roll_call="first_jobs"),
    "asgd_ga_delta_first_jobs": lambda fed: AsyncGradAccum(lr=1.0, accumulation_steps=2, batch_size=16,
                                                           update="delta", local_lr=0.1, balance=False, tau_max=100,
                                                           meter=fed.meter(), reply_timeout=3.0,
                                                           roll_call="first_jobs"),
}
ROUNDS = {"ma": 3, "asgd_ga_delta": 30, "fedavg": 2, "ma_first_jobs": 3, "asgd_ga_delta_first_jobs": 30}


def run(tmp_path, strategy: str, bound: dict[str, int] | None, restart_at: int | None = None,
        described: dict[str, object] | None = None):
    """`strategy` on three in-process regions (node 3 is region "c"), bound as given; optionally node 3
    restarts (under a new id, still claiming "c") once `restart_at` versions are done.
    `described`: metrics node 3 puts in each self-description (its query reply, or a first job's reply).
    Returns the strategy, the restarted node's new id (if any) and the train messages sent to each node."""
    fed = Federation(tmp_path, three_regions())
    sent, push = Counter(), fed.grid.push_messages
    if described:
        deliver = fed.grid._deliver

        def describing(msg):
            reply = deliver(msg)
            metrics = reply.content.metric_records.get(protocol.METRICS) if not reply.has_error() else None
            if msg.metadata.dst_node_id == 3 and metrics is not None and "resident-examples" in metrics:
                metrics.update(described)
            return reply

        fed.grid._deliver = describing

    def counting_push(messages):
        messages = list(messages)
        sent.update(m.metadata.dst_node_id for m in messages if m.metadata.message_type == "train")
        return push(messages)

    fed.grid.push_messages = counting_push
    s = STRATEGIES[strategy](fed)
    if bound is not None:
        s.roster.bind(bound)
    if strategy.startswith("asgd_ga_delta"):
        s.rejoin_every = 1
    config = fed.config
    if strategy == "fedavg":
        config = ConfigRecord({**dict(config), **protocol.WorkOrder(lr=0.1, batch_size=16, epochs=0.5).to_config()})
    restarted = []

    def restart(version, arrays):
        if restart_at is not None and version >= restart_at and not restarted:
            restarted.append(fed.grid.restart(3))
        return None

    s.start(fed.grid, fed.initial, num_rounds=ROUNDS[strategy], train_config=config, evaluate_fn=restart)
    return s, restarted, sent


def jobs_of(s, region: str) -> int:
    account = s.meter.ledger.accounts.get(region)
    return 0 if account is None else account.invocations


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_node_claiming_a_region_whose_key_is_not_its_own_gets_no_say(tmp_path, strategy):
    honest, _, _ = run(tmp_path / "honest", strategy, {"a": 1, "b": 2, "c": 3})
    assert jobs_of(honest, "c") > 0  # bound to its own key, "c" takes part
    impostor, _, sent = run(tmp_path / "impostor", strategy, {"a": 1, "b": 2, "c": 99})
    assert jobs_of(impostor, "c") == 0 and jobs_of(impostor, "a") > 0 and jobs_of(impostor, "b") > 0
    assert sent[3] <= 1  # found out by its first job's reply (or the roll call before it): no more work
    assert 3 in impostor.roster.refused
    reasons = [e.get("reason", "") for e in impostor.history.events]
    assert any("claims region c, whose registered key is node 99's" in r for r in reasons), reasons
    refusals = [(e["node"], e["region"]) for e in impostor.history.events if e["event"] == "node_refused"]
    assert refusals == ([(3, "c")] if strategy == "fedavg" else [])  # the others turn it away at the roll call
    assert impostor.history.entries[-1]["version"] == ROUNDS[strategy]  # the run went on without it


@pytest.mark.parametrize("described, strategy", [  # each value once, each roll call (FedAvg reads no description)
    ({"resident-examples": float("nan")}, "ma"), ({"resident-examples": -500}, "asgd_ga_delta"),
    ({"resident-examples": 0}, "ma_first_jobs"), ({"resident-examples": 2.5}, "asgd_ga_delta_first_jobs"),
    ({protocol.MAX_WORKERS: 0}, "asgd_ga_delta"), ({protocol.MAX_WORKERS: float("inf")}, "ma_first_jobs")],
    ids=["nan", "negative", "zero", "fraction", "no_workers", "inf_workers"])
def test_a_node_whose_self_description_makes_no_sense_is_kept_out(tmp_path, strategy, described):
    """Resident examples weigh the regions (data shares) and a worker cap sizes the scheduler's plans. Before, NaN
    ended the run (`int(nan)`), and a negative count made the other regions' shares over 1."""
    s, _, sent = run(tmp_path, strategy, None, described=described)
    (key, value), = described.items()
    failed = [e["reason"] for e in s.history.events if e["event"] == "region_failed"]
    assert failed == [f"region c says its {key} is {value!r}; a whole number >= 1 is expected"]
    assert jobs_of(s, "c") == 0 and sent[3] <= 1  # a first job may have gone out with the roll call
    assert s.roster.shares.keys() == {"a", "b"} and 3 in s.roster.refused
    assert s.history.entries[-1]["version"] == ROUNDS[strategy]  # the run went on without it


def test_a_restarted_node_of_a_bound_region_is_not_taken_in_under_another_key(tmp_path):
    unbound, restarted, _ = run(tmp_path / "unbound", "asgd_ga_delta", None, restart_at=5)
    assert restarted and unbound.history.counters["rejoined_regions"] == 1  # without keys: the new node is "c"
    bound, restarted, _ = run(tmp_path / "bound", "asgd_ga_delta", {"a": 1, "b": 2, "c": 3}, restart_at=5)
    assert restarted[0] in bound.roster.refused
    assert bound.history.counters["rejoined_regions"] == 0
    assert "c" not in bound.roster.live_names()


def test_impostor_names_the_reason():
    roster = Roster()
    assert roster.impostor(5, "a") is None  # nothing bound: nothing checked
    roster.bind({"a": 1})
    assert roster.impostor(1, "a") is None
    assert roster.impostor(5, "a") == "claims region a, whose registered key is node 1's"
    assert roster.impostor(5, "z") == "claims region z, which has no registered key"


@pytest.mark.parametrize("override, message", [
    ("region_nodes={ap-beijing:1}", "missing: ap-chengdu, ap-guangzhou, ap-shanghai"),
    ("region_nodes={ap-beijing:1,ap-shanghai:2,ap-guangzhou:3,ap-chengdu:4,mars:5}", "unknown: mars"),
    ("region_nodes={ap-beijing:1,ap-shanghai:2,ap-guangzhou:3,ap-chengdu:x}", "region_nodes.ap-chengdu='x'"),
    ("region_nodes=5", "must map each region"),
])
def test_region_nodes_must_bind_every_region_to_a_node_id(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose([override]))
    validate(compose(["region_nodes={ap-beijing:1,ap-shanghai:2,ap-guangzhou:3,ap-chengdu:18416244718050819670}"]))
