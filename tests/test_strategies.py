"""ASGD-GA and MA: equivalences with plain SGD / FedAvg, staleness, balance, faults, determinism."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg

from clients.region_app import make_client_app
from cloudless_fl.deployment.grid import InProcessGrid
from cloudless_fl.training.data import load_source
from cloudless_fl.training.models import build_model
from cloudless_fl.training.protocol import WorkOrder
from cloudless_fl.strategy import AsyncGradAccum, Metered, ModelAveraging, SelectiveFedAvg
from cloudless_fl.strategy.asgd_ga import inverse_sqrt
from cloudless_fl.strategy.validation import UpdateLimits
from cloudless_fl.training.local import make_batches
from conftest import TWO_REGIONS
from strategy_helpers import HIDDEN, Federation, solo_topology, topology


def _assert_same(arrays: ArrayRecord, state: dict, atol=1e-6):
    got = arrays.to_torch_state_dict()
    for k, v in state.items():
        torch.testing.assert_close(got[k], v, atol=atol, rtol=0)


def _centralized_sgd(fed: Federation, region: str, lr: float, batches: list[np.ndarray]) -> dict:
    data = fed.resident(region)
    model = build_model("mlp", (1, 8, 8), 10, hidden=HIDDEN)
    model.load_state_dict(fed.initial.to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for rows in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(data.x[rows])),
                                          torch.from_numpy(data.y[rows])).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("roll_call", ["query", "first_jobs"])
def test_asgd_ga_single_region_equals_minibatch_sgd(tmp_path, roll_call):
    fed = Federation(tmp_path, solo_topology())
    # the algorithm alone: one 16-sample gradient scores like noise to the relatedness screen (measured 0.85
    # spreads; docs/reliability.md), which would hold it back
    strategy = AsyncGradAccum(lr=0.2, momentum=0.0, accumulation_steps=1, batch_size=16, staleness="none",
                              balance=False, meter=fed.meter(), limits=UpdateLimits(min_relatedness=None),
                              roll_call=roll_call)
    result = strategy.start(fed.grid, fed.initial, num_rounds=6, train_config=fed.config)
    n = len(fed.resident("solo"))
    batches = make_batches(n, 16, seed=0, offset=0, samples=6 * 16)
    _assert_same(result.arrays, _centralized_sgd(fed, "solo", 0.2, batches))
    assert strategy.version == 6


def test_asgd_ga_accumulation_equals_one_step_on_the_concatenated_batch(tmp_path):
    fed = Federation(tmp_path, solo_topology())
    strategy = AsyncGradAccum(lr=0.2, accumulation_steps=3, batch_size=16, staleness="none", balance=False,
                              meter=fed.meter())
    result = strategy.start(fed.grid, fed.initial, num_rounds=1, train_config=fed.config)
    rows = np.concatenate(make_batches(len(fed.resident("solo")), 16, seed=0, offset=0, samples=48))
    _assert_same(result.arrays, _centralized_sgd(fed, "solo", 0.2, [rows]))


def test_ma_with_equal_steps_equals_flower_fedavg(tmp_path):
    fed = Federation(tmp_path, topology())
    ma = ModelAveraging(lr=0.1, local_steps=5, batch_size=16, meter=fed.meter())
    ma_result = ma.start(fed.grid, fed.initial, num_rounds=2, train_config=fed.config)
    work = WorkOrder(lr=0.1, batch_size=16, steps=5, data_seed=0)
    fedavg = Metered(FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2), fed.meter())
    config = ConfigRecord({**dict(fed.config), **work.to_config()})
    fedavg_result = fedavg.start(fed.grid, fed.initial, num_rounds=2, train_config=config)
    _assert_same(ma_result.arrays, fedavg_result.arrays.to_torch_state_dict())
    # both were charged the same way: same modelled time for the same work, after MA's roll call (asking
    # who is who: slow's 10 ms latency both ways), which Flower's FedAvg does not make
    assert ma.meter.clock.now() == pytest.approx(fedavg.meter.clock.now() + 0.02)


@pytest.mark.parametrize("slow_steps", [2, 1])
def test_ma_fednova_normalises_unequal_steps(tmp_path, slow_steps):
    fed = Federation(tmp_path, topology())
    ma = ModelAveraging(lr=0.1, local_steps={"fast": 8, "slow": slow_steps}, batch_size=16, meter=fed.meter())
    result = ma.start(fed.grid, fed.initial, num_rounds=1, train_config=fed.config)
    # recompute by hand: each region's change / its steps, weights by samples, times tau_eff
    start = fed.initial.to_torch_state_dict()
    finals = {}
    steps = {"fast": 8, "slow": slow_steps}
    for region, h in steps.items():
        data = fed.resident(region)
        finals[region] = _centralized_sgd(
            fed, region, 0.1, make_batches(len(data), 16, seed=0, offset=0, samples=h * 16))
    p = {r: h / sum(steps.values()) for r, h in steps.items()}  # samples processed: steps x the same batch
    tau_eff = sum(p[r] * h for r, h in steps.items())
    expected = {k: start[k] - tau_eff * sum(p[r] * (start[k] - finals[r][k]) / h for r, h in steps.items())
                for k in start}
    _assert_same(result.arrays, expected, atol=1e-5)


def test_ma_outer_nesterov_momentum_changes_the_step(tmp_path):
    fed = Federation(tmp_path, topology())
    plain = ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter())
    plain_result = plain.start(fed.grid, fed.initial, num_rounds=2, train_config=fed.config)
    diloco = ModelAveraging(lr=0.1, local_steps=3, batch_size=16, outer_lr=0.7, outer_momentum=0.9,
                            meter=fed.meter())
    diloco_result = diloco.start(fed.grid, fed.initial, num_rounds=2, train_config=fed.config)
    a, b = plain_result.arrays.to_torch_state_dict(), diloco_result.arrays.to_torch_state_dict()
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    assert all("momentum_buffer" in state for state in diloco.optimizer.optimizer.state.values())
    assert diloco.optimizer.optimizer.param_groups[0]["nesterov"]  # DiLoCo's outer step is Nesterov
    assert not plain.optimizer.optimizer.state  # plain averaging keeps no momentum


def test_staleness_bound_drops_and_counts(tmp_path):
    """A region 2.5x slower than the other arrives 1 to 3 versions stale: with tau_max=2, up to 2 is applied."""
    regions = {"fast": TWO_REGIONS["regions"]["fast"],
               "slow": {**TWO_REGIONS["regions"]["slow"], "samples_per_s": 400,
                        "link": TWO_REGIONS["regions"]["fast"]["link"]}}
    fed = Federation(tmp_path, topology(regions))
    strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, tau_max=2, meter=fed.meter())
    strategy.start(fed.grid, fed.initial, num_rounds=40, train_config=fed.config)
    applied = strategy.history.staleness
    assert max(applied) == 2  # exactly tau_max stale is still applied
    assert strategy.history.counters["dropped_stale"] > 0
    assert [e["version"] for e in strategy.history.entries] == list(range(41))  # a dropped update is no version
    assert sum(applied.values()) == 40


def test_without_a_staleness_bound_the_slow_regions_updates_are_applied(tmp_path):
    """The default (tau_max=None): a region far slower than the others still moves the model."""
    fed = Federation(tmp_path, topology())
    strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, meter=fed.meter())
    strategy.start(fed.grid, fed.initial, num_rounds=40, train_config=fed.config)
    assert not strategy.history.counters.get("dropped_stale")
    assert max(strategy.history.staleness) > 2  # the same stale updates the bound of 2 drops above
    assert sum(strategy.history.staleness.values()) == 40


def _class_split(count_per_class=60):
    digits = load_source("digits")
    keep = np.concatenate([np.flatnonzero(digits.y == c)[:count_per_class] for c in (0, 1)])
    return type(digits)(digits.x[keep], digits.y[keep])


def _predicted_share_of_class0(fed, arrays):
    model = build_model("mlp", (1, 8, 8), 10, hidden=HIDDEN)
    model.load_state_dict(arrays.to_torch_state_dict())
    digits = _class_split()
    with torch.no_grad():
        pred = model(torch.from_numpy(digits.x)).argmax(1).numpy()
    return float(np.mean(pred == 0))


def test_balance_keeps_a_fast_region_from_dominating(tmp_path):
    """Region "fast" holds only 0s, "slow" only 1s, equal shares: unbalanced async SGD drifts to 0s."""
    shares = []
    for balance in (False, True):
        fed = Federation(tmp_path / str(balance), topology(), alpha=0.001, data=_class_split())
        labels = {r: set(fed.resident(r).y.tolist()) for r in ("fast", "slow")}
        assert labels["fast"].isdisjoint(labels["slow"])  # one class each
        strategy = AsyncGradAccum(lr=0.05, accumulation_steps=1, batch_size=8, tau_max=1000, staleness="none",
                                  balance=balance, max_weight=100.0, meter=fed.meter())
        result = strategy.start(fed.grid, fed.initial, num_rounds=60, train_config=fed.config)
        fast_class = next(iter(labels["fast"]))
        share = _predicted_share_of_class0(fed, result.arrays)
        shares.append(share if fast_class == 0 else 1 - share)
    unbalanced, balanced = shares
    assert unbalanced > 0.9  # the fast region's class wins
    assert balanced < unbalanced - 0.2


def test_a_region_whose_updates_are_never_applied_does_not_inflate_the_others_steps(tmp_path):
    """Balance weights average 1 over the arrivals that are applied: the fast region sends NaN every time
    (rejected, never quarantined here), so the slow one's updates are all that moves the model, at weight 1.
    Counting the fast region's arrival rate would weigh them up to `max_weight` (measured: 4)."""
    fed = Federation(tmp_path, topology())
    honest = fed.grid._app

    def broken_fast_region(msg, context):
        reply = honest(msg, context)
        if context.node_id == 1 and msg.metadata.message_type == "train" and not reply.has_error():
            arrays = reply.content["arrays"].to_torch_state_dict()
            reply.content["arrays"] = ArrayRecord({k: torch.full_like(v, float("nan")) if v.is_floating_point()
                                                   else v for k, v in arrays.items()})
        return reply

    fed.grid._app = broken_fast_region
    strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, tau_max=1000, meter=fed.meter(),
                              limits=UpdateLimits(quarantine_after=0))
    weights = []
    weight_of = strategy._balance_weight
    strategy._balance_weight = lambda region: weights.append((region, weight_of(region))) or weights[-1][1]
    strategy.start(fed.grid, fed.initial, num_rounds=8, train_config=fed.config)
    assert strategy.history.counters["rejected_updates"] > 8  # the fast region kept sending
    slow = [w for region, w in weights if region == "slow"]
    assert len(slow) == 8 and all(abs(w - 1.0) < 0.05 for w in slow[2:])  # once its rejections are counted


def test_asgd_ga_carries_on_when_a_node_disappears(tmp_path):
    fed = Federation(tmp_path, topology())

    def take_slow_offline(version, arrays):
        if version == 10:
            fed.grid.set_offline(2)  # node 2 is partition 1: "slow"
        return MetricRecord({"accuracy": 0.0, "loss": 0.0})

    strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, tau_max=100, meter=fed.meter(),
                              reply_timeout=600)
    # Flower's start(timeout=...) bounds the wait for a reply, as in Flower's own strategies
    strategy.start(fed.grid, fed.initial, num_rounds=30, timeout=0.3, train_config=fed.config,
                   evaluate_fn=take_slow_offline)
    assert strategy.version == 30
    assert strategy.history.counters["lost_regions"] == 1
    assert [e["region"] for e in strategy.history.events] == ["slow"]


def test_a_node_the_superlink_reports_unavailable_at_start_up_is_named_by_its_message(tmp_path):
    from flwr.app import Error, Message
    from flwr.common.constant import SUPERLINK_NODE_ID

    from cloudless_fl.strategy.membership import ask

    fed = Federation(tmp_path, topology())
    deliver = fed.grid._deliver

    def superlink_answers_for_node_2(msg):  # as Flower's SuperLink does for a node that missed its heartbeats
        if msg.metadata.dst_node_id != 2:
            return deliver(msg)
        reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        return reply

    fed.grid._deliver = superlink_answers_for_node_2
    found, failed = ask(fed.grid, [1, 2], fed.config, timeout=5)
    assert set(found) == {1} and failed == {2: "Node Unavailable"}


def test_asgd_ga_readmits_a_lost_node_that_answers_again(tmp_path):
    fed = Federation(tmp_path, topology())
    jobs_when_back = {}

    def outage(version, arrays):
        if version == 8:
            fed.grid.set_offline(2)  # "slow" stops answering: lost after reply_timeout
        if strategy.history.counters["lost_regions"] and not jobs_when_back:  # it is back, as a node unknown
            fed.grid.set_offline(2, False)
            jobs_when_back["slow"] = strategy.meter.ledger.accounts["slow"].invocations
        return None

    strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, tau_max=100, meter=fed.meter(),
                              reply_timeout=0.3, rejoin_every=5)
    strategy.start(fed.grid, fed.initial, num_rounds=40, train_config=fed.config, evaluate_fn=outage)
    assert strategy.version == 40
    assert [(e["event"], e["region"]) for e in strategy.history.events] == [("region_lost", "slow"),
                                                                          ("region_back", "slow")]
    assert strategy.history.events[0]["reason"] == "no reply within 0.3 s"
    assert strategy.history.counters["lost_regions"] == 1 and strategy.history.counters["rejoined_regions"] == 1
    assert strategy.meter.ledger.accounts["slow"].invocations > jobs_when_back["slow"]  # it got work again


def test_asgd_ga_gives_a_node_that_joins_while_it_waits_work_at_once(tmp_path):
    """No reply can come (the one region's node restarted; its job died with it): the new node, answering
    its roll call while the run waits, gets work then, or the run would end with no job in flight."""
    fed = Federation(tmp_path, solo_topology())
    restarted, pulls = {}, []

    def restart(version, arrays):
        if version == 10 and not restarted:
            restarted["node"] = fed.grid.restart(1)  # the job the old node is sent next never answers
        return None

    pull = fed.grid.pull_messages

    def pull_and_wake(message_ids):  # the new node, asked at version 10, answers a few polls into the wait
        if restarted:
            pulls.append(1)
            fed.grid.set_offline(restarted["node"], len(pulls) <= 5)
        return pull(message_ids)

    fed.grid.pull_messages = pull_and_wake
    strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, meter=fed.meter(), reply_timeout=600,
                              rejoin_every=5)
    strategy.start(fed.grid, fed.initial, num_rounds=30, train_config=fed.config, evaluate_fn=restart)
    assert strategy.version == 30
    assert {info.name: node for node, info in strategy.roster.live.items()} == {"solo": restarted["node"]}


def test_asgd_ga_takes_a_restarted_node_in_place_of_its_old_one(tmp_path):
    fed = Federation(tmp_path, topology())
    restarted = {}

    def restart_slow(version, arrays):
        if version == 10:
            restarted["node"] = fed.grid.restart(2)  # its job in flight dies with the old process
            restarted["slow_jobs"] = strategy.meter.ledger.accounts["slow"].invocations
        return None

    strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, tau_max=100, meter=fed.meter(),
                              reply_timeout=600, rejoin_every=5)
    strategy.start(fed.grid, fed.initial, num_rounds=30, train_config=fed.config, evaluate_fn=restart_slow)
    new = restarted["node"]
    lost, back = strategy.history.events
    assert (lost["event"], lost["region"], lost["reason"]) == ("region_lost", "slow", f"replaced by node {new}")
    assert (back["event"], back["region"], back["node"]) == ("region_back", "slow", new)
    assert {info.name: node for node, info in strategy.roster.live.items()} == {"fast": 1, "slow": new}
    assert strategy.version == 30  # no 600 s wait for the old node's reply
    assert strategy.meter.ledger.accounts["slow"].invocations > restarted["slow_jobs"]  # the new node trains


def test_fedavg_goes_on_without_a_vanished_region_and_takes_it_back(tmp_path, caplog):
    fed = Federation(tmp_path, topology())
    work = WorkOrder(lr=0.1, batch_size=16, steps=2, data_seed=0)
    config = ConfigRecord({**dict(fed.config), **work.to_config()})
    fedavg = Metered(FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2), fed.meter(),
                     reply_timeout=0.2)
    jobs = {}

    def outage(server_round, arrays):
        if server_round == 1:
            fed.grid.set_offline(2)
        if server_round == 3:
            fed.grid.set_offline(2, False)
            jobs["slow"] = fedavg.meter.ledger.accounts["slow"].invocations
        return None

    with caplog.at_level("WARNING", logger="cloudless_fl"):
        fedavg.start(fed.grid, fed.initial, num_rounds=5, train_config=config, evaluate_fn=outage)
    assert "1 of 2 regions connected after 0.2 s (gone: slow); the rounds go on with them" in caplog.messages
    assert [e["version"] for e in fedavg.history.entries] == [0, 1, 2, 3, 4, 5]
    kinds = [e["event"] for e in fedavg.history.events]
    assert kinds == ["regions_lost"]  # round 2 found "slow" gone and went on with "fast"
    assert (fedavg.history.events[0]["regions"], fedavg.history.events[0]["connected"]) == (["slow"], 1)
    assert fedavg.history.counters["lost_regions"] == 1
    assert fedavg.meter.ledger.accounts["slow"].invocations == jobs["slow"] + 2  # rounds 4 and 5: back in


def _three_region_fedavg(tmp_path):
    """Flower's FedAvg, metered, over three regions ("fast" is node 1, "slow" 2, "slower" 3); 0.2 s timeouts."""
    two = TWO_REGIONS["regions"]
    regions = {"fast": two["fast"], "slow": {**two["slow"], "data_share": 0.3},
               "slower": {**two["slow"], "data_share": 0.2}}
    fed = Federation(tmp_path, topology(regions))
    config = ConfigRecord({**dict(fed.config), **WorkOrder(lr=0.1, batch_size=16, steps=2, data_seed=0).to_config()})
    fedavg = Metered(FedAvg(fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3), fed.meter(),
                     reply_timeout=0.2)
    return fed, fedavg, config


def _fedavg_after_outage(tmp_path, offline: list[int], before_start: bool = False) -> Metered:
    """The `offline` nodes vanish after round 1 (or before the run) for good."""
    fed, fedavg, config = _three_region_fedavg(tmp_path)

    def outage(server_round, arrays):
        for node in offline if server_round == (0 if before_start else 1) else ():
            fed.grid.set_offline(node)

    outage(0, None)
    fedavg.start(fed.grid, fed.initial, num_rounds=3, train_config=config, evaluate_fn=outage)
    return fedavg


def test_fedavg_counts_every_region_it_goes_on_without(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        fedavg = _fedavg_after_outage(tmp_path, offline=[2, 3])
    assert "1 of 3 regions connected after 0.2 s (gone: slow, slower); the rounds go on with them" in caplog.messages
    [lost] = fedavg.history.events
    assert (lost["event"], lost["regions"], lost["connected"]) == ("regions_lost", ["slow", "slower"], 1)
    assert fedavg.history.counters["lost_regions"] == 2
    assert (fedavg.inner.min_available_nodes, fedavg.inner.min_train_nodes) == (1, 1)  # what Flower waits for


def test_fedavg_starts_without_a_region_that_never_came(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        fedavg = _fedavg_after_outage(tmp_path, offline=[3], before_start=True)
    assert "2 of 3 regions connected after 0.2 s (gone: unknown); the rounds go on with them" in caplog.messages
    assert [e["version"] for e in fedavg.history.entries] == [0, 1, 2, 3]


def test_fedavg_stops_with_what_to_do_when_every_region_is_gone(tmp_path):
    with pytest.raises(RuntimeError) as stopped:
        _fedavg_after_outage(tmp_path, offline=[1, 2, 3])
    assert str(stopped.value) == ("no region is connected after waiting 0.2 s; "
                                  "restart the SuperNodes and resume the run (resume=<run dir>)")


def test_fedavg_evaluates_every_eval_every_rounds_and_its_last(tmp_path):
    fed = Federation(tmp_path, topology())
    config = ConfigRecord({**dict(fed.config), **WorkOrder(lr=0.1, batch_size=16, steps=2, data_seed=0).to_config()})
    fedavg = Metered(FedAvg(fraction_evaluate=0.0, min_available_nodes=2), fed.meter(), eval_every=4)
    fedavg.start(fed.grid, fed.initial, num_rounds=5, train_config=config, evaluate_fn=fed.evaluator())
    assert [e["version"] for e in fedavg.history.entries if e["accuracy"] is not None] == [0, 4, 5]


def test_the_wrapped_start_has_flowers_defaults():
    """`Metered` drops into a ServerApp that calls `strategy.start(...)` as Flower documents it."""
    import inspect

    from flwr.serverapp.strategy import Strategy

    ours, flowers = (inspect.signature(f).parameters for f in (Metered.start, Strategy.start))
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in flowers.items()}


def test_fedavg_evaluates_on_the_regions_own_test_data_when_asked(tmp_path):
    """Flower's federated evaluation passes through the wrapper: with `fraction_evaluate` > 0 each region
    scores the round's model on its own test split (here: its first 30 training examples)."""
    fed, _, config = _three_region_fedavg(tmp_path)
    for region in fed.topology.region_names:
        with np.load(tmp_path / region / "train.npz") as z:
            x, y = z["x"], z["y"]
        np.savez(tmp_path / region / "train.npz", x=x, y=y, x_test=x[:30], y_test=y[:30])
    fedavg = Metered(FedAvg(fraction_evaluate=1.0, min_available_nodes=3, min_evaluate_nodes=3), fed.meter())
    result = fedavg.start(fed.grid, fed.initial, num_rounds=2, train_config=config, evaluate_config=fed.config)
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    for metrics in result.evaluate_metrics_clientapp.values():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0


def test_fedavg_records_the_regions_that_vanish_mid_round(tmp_path, caplog):
    fed, fedavg, config = _three_region_fedavg(tmp_path)
    pushed = fed.grid.push_messages

    def push_then_vanish(messages):  # "slow" and "slower" die after their round-2 jobs were sent
        ids = pushed(messages)
        if fedavg.history.entries[-1]["version"] == 1:
            fed.grid.set_offline(2)
            fed.grid.set_offline(3)
        return ids

    fed.grid.push_messages = push_then_vanish
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        fedavg.start(fed.grid, fed.initial, num_rounds=3, train_config=config)
    incomplete = [e for e in fedavg.history.events if e["event"] == "round_incomplete"]
    assert [(e["round"], e["missing"], e["failed"]) for e in incomplete] == [(2, ["slow", "slower"], {})]
    assert "round 2: slow: no reply within 0.2 s; slower: no reply within 0.2 s" in caplog.messages
    assert fedavg.history.counters["failed_replies"] == 2
    assert [e["version"] for e in fedavg.history.entries] == [0, 1, 2, 3]


def test_ma_period_deadline_drops_the_straggler_and_goes_on(tmp_path):
    fed = Federation(tmp_path, topology())
    # "slow" needs ~0.1 s + 80 samples / 100 per s per period; a 0.5 s deadline cuts it off
    ma = ModelAveraging(lr=0.1, local_steps=5, batch_size=16, deadline_s=0.5, meter=fed.meter())
    ma.start(fed.grid, fed.initial, num_rounds=3, train_config=fed.config)
    assert ma.history.counters["dropped_late"] == 3
    assert [e["version"] for e in ma.history.entries] == [0, 1, 2, 3]
    # every period ended at its deadline, after the roll call (slow's latency both ways)
    assert ma.meter.clock.now() == pytest.approx(0.02 + 1.5)


def test_a_simulated_run_starts_after_its_roll_call(tmp_path):
    """Asking the nodes who they are is one message trip: the slowest region's start-up and latency."""
    for start_up in (2.0, 0.0):
        slow = {**TWO_REGIONS["regions"]["slow"], "job_start_s": start_up}
        fed = Federation(tmp_path / str(start_up), topology({"fast": TWO_REGIONS["regions"]["fast"], "slow": slow}))
        ma = ModelAveraging(lr=0.1, local_steps=2, batch_size=16, meter=fed.meter())
        ma.start(fed.grid, fed.initial, num_rounds=1, train_config=fed.config)
        assert ma.history.entries[0]["time_s"] == pytest.approx(start_up + 2 * 0.010)


def _folded_and_queried(tmp_path, strategy: str, offline: tuple[int, ...] = ()):
    """The same run twice on the virtual clock: regions asked by query first, and with their first jobs sent
    with the roll call. Returns, per roll call, the strategy, its result, the message types of each push and
    the job versions of each push that carried jobs."""
    slow = {**TWO_REGIONS["regions"]["slow"], "job_start_s": 2.0}
    topo = topology({"fast": TWO_REGIONS["regions"]["fast"], "slow": slow})
    runs = {}
    for roll_call in ("query", "first_jobs"):
        fed = Federation(tmp_path / roll_call, topo)
        for node in offline:
            fed.grid.set_offline(node)
        if strategy == "ma":
            s = ModelAveraging(lr=0.1, local_steps={"fast": 6, "slow": 2}, batch_size=16, meter=fed.meter(),
                               roll_call=roll_call)
        else:
            s = AsyncGradAccum(lr=0.1, accumulation_steps={"fast": 4, "slow": 2}, batch_size=16, update="delta",
                               meter=fed.meter(), roll_call=roll_call)
        pushes, versions, push = [], [], fed.grid.push_messages

        def recording_push(messages, push=push, pushes=pushes, versions=versions):
            messages = list(messages)
            pushes.append([m.metadata.message_type for m in messages])
            versions.append(sorted(_job_versions(messages)))
            return push(messages)

        fed.grid.push_messages = recording_push
        result = s.start(fed.grid, fed.initial, num_rounds=5, train_config=fed.config, evaluate_fn=fed.evaluator())
        runs[roll_call] = (s, result, pushes, [v for v in versions if v])
    return runs


def test_each_job_carries_the_runs_data_seed_and_its_place_in_the_run(tmp_path):
    """A job's work order draws its batches with the run's `data-seed` (`train_config`: two seeds, two
    different models) and is labelled with its place in the run (MA: its period, as Flower's server round)."""
    from cloudless_fl.training import protocol

    finals = {}
    for seed in (0, 1):
        fed = Federation(tmp_path / str(seed), topology())
        orders, push = [], fed.grid.push_messages

        def recording(messages, orders=orders, push=push):
            messages = list(messages)
            orders.extend((m.metadata.dst_node_id, WorkOrder.from_config(m.content[protocol.CONFIG]))
                          for m in messages if m.metadata.message_type == "train")
            return push(messages)

        fed.grid.push_messages = recording
        ma = ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter())
        result = ma.start(fed.grid, fed.initial, num_rounds=3, train_config=ConfigRecord({**dict(fed.config),
                                                                                           "data-seed": seed}))
        finals[seed] = result.arrays.to_torch_state_dict()
        assert {order.data_seed for _, order in orders} == {seed}
        for node in (1, 2):
            assert [order.version for n, order in orders if n == node] == [1, 2, 3]
    assert not all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def _job_versions(messages) -> set[int]:
    """The model versions the training jobs in `messages` are labelled with (a roll call's jobs: every
    region's, from the table each node is sent)."""
    import json

    from cloudless_fl.training import protocol

    found = set()
    for message in messages:
        if message.metadata.message_type == "train":
            config = message.content[protocol.CONFIG]
            orders = (json.loads(config[protocol.PER_REGION]).values() if protocol.PER_REGION in config
                      else [config])
            found |= {int(order["model-version"]) for order in orders}
    return found


@pytest.mark.parametrize("strategy", ["ma", "asgd_ga"])
def test_first_jobs_sent_with_the_roll_call_save_its_trip_and_change_nothing_else(tmp_path, strategy):
    """`roll_call="first_jobs"`: no query goes out; each node's first message carries every region's work
    order and the node takes its own; the replies name the nodes. The run is the queried run bit for bit
    (model, evaluations, data shares, what each region was paid for), one message trip sooner: the slowest
    region's start-up and latency both ways (2 s + 2 x 10 ms)."""
    runs = _folded_and_queried(tmp_path, strategy)
    (queried, q_result, q_pushes, q_versions), (folded, f_result, f_pushes, f_versions) = (runs["query"],
                                                                                          runs["first_jobs"])
    assert q_pushes[0] == ["query", "query"] and f_pushes[0] == ["train", "train"]
    assert f_versions == q_versions  # the first jobs are labelled as the queried run's (MA: period 1)
    assert all("query" not in push for push in f_pushes)
    _assert_same(f_result.arrays, q_result.arrays.to_torch_state_dict(), atol=0)
    assert [e["accuracy"] for e in folded.history.entries] == [e["accuracy"] for e in queried.history.entries]
    assert [e["version"] for e in folded.history.entries] == [e["version"] for e in queried.history.entries]
    trip = 2.0 + 2 * 0.010
    assert [e["time_s"] for e in folded.history.entries] == pytest.approx(
        [e["time_s"] - trip for e in queried.history.entries])
    assert folded.roster.shares == queried.roster.shares and folded.offsets == queried.offsets
    q_books, f_books = queried.meter.ledger.accounts, folded.meter.ledger.accounts
    assert {r: (a.invocations, a.bytes_down, a.bytes_up, a.busy_s, a.egress_usd) for r, a in f_books.items()} == {
        r: (a.invocations, a.bytes_down, a.bytes_up, a.busy_s, a.egress_usd) for r, a in q_books.items()}


@pytest.mark.parametrize("strategy", ["ma", "asgd_ga"])
def test_a_region_without_a_node_leaves_no_trace_of_its_first_job(tmp_path, strategy):
    """slow's SuperNode is not there at the start: its first job was planned but never sent to anyone; the
    run is the one-region run a query would have made, and nothing of slow is left in its books."""
    runs = _folded_and_queried(tmp_path, strategy, offline=(2,))
    (queried, q_result, *_), (folded, f_result, *_) = runs["query"], runs["first_jobs"]
    _assert_same(f_result.arrays, q_result.arrays.to_torch_state_dict(), atol=0)
    assert folded.roster.live_names() == queried.roster.live_names() == {"fast"}
    assert set(folded.offsets) == {"fast"} and folded.meter.ledger.accounts["slow"].invocations == 0


@pytest.mark.parametrize("strategy", ["ma", "asgd_ga"])
def test_a_node_that_never_answers_its_first_job_is_left_behind_after_the_reply_timeout(tmp_path, strategy):
    """slow's node vanishes once its first job is out: the run starts with fast alone after `reply_timeout`,
    as it would when a node does not answer the roll call."""
    fed = Federation(tmp_path, topology())
    pushed = fed.grid.push_messages

    def push_then_vanish(messages):
        ids = pushed(messages)
        fed.grid.set_offline(2)
        return ids

    fed.grid.push_messages = push_then_vanish
    common = dict(batch_size=16, meter=fed.meter(), reply_timeout=0.3, roll_call="first_jobs")
    s = (ModelAveraging(lr=0.1, local_steps=3, **common) if strategy == "ma"
         else AsyncGradAccum(lr=0.1, accumulation_steps=2, update="delta", **common))
    s.start(fed.grid, fed.initial, num_rounds=3, train_config=fed.config)
    assert s.roster.live_names() == {"fast"} and s.step == 3
    assert s.meter.ledger.accounts["slow"].invocations == 0


@pytest.mark.parametrize("strategy", ["ma", "asgd_ga"])
def test_a_second_node_of_a_region_at_the_start_works_from_its_next_job(tmp_path, strategy):
    """Two SuperNodes say they are slow: the first named takes slow's first job; the other's first reply is
    not used, and it takes part from its next job."""
    from flwr.app import Context, RecordDict

    fed = Federation(tmp_path, topology())
    fed.grid._contexts[3] = Context(run_id=1, node_id=3, node_config={"partition-id": 1, "num-partitions": 2},
                                    state=RecordDict(), run_config={})
    common = dict(batch_size=16, meter=fed.meter(), roll_call="first_jobs")
    s = (ModelAveraging(lr=0.1, local_steps=3, **common) if strategy == "ma"
         else AsyncGradAccum(lr=0.1, accumulation_steps=2, update="delta", **common))
    worked = []
    original = s._train_message

    def spy(node_id, arrays, config, order, correction=None):
        worked.append(node_id)
        return original(node_id, arrays, config, order, correction)

    s._train_message = spy
    s.start(fed.grid, fed.initial, num_rounds=3, train_config=fed.config)
    assert sorted(s.roster.nodes_of("slow")) == [2, 3] and 3 in worked and s.step == 3


def test_ma_takes_a_node_restarted_elsewhere_between_periods_in_place_of_its_old_one(tmp_path):
    """slow's SuperNode restarts on another machine between periods (a new node id, an empty state-dir, no job
    in flight): the old node leaves the run without a job being sent to it, and under a lossy codec the new one
    is sent the whole model, not a change from a model only the old node held."""
    from cloudless_fl.training.compression import Int8

    fed = Federation(tmp_path, topology())
    config = ConfigRecord({**dict(fed.config), "state-dir": str(tmp_path / "state")})
    restarted = {}

    def restart_slow(version, arrays):
        if version == 2 and not restarted:
            restarted["node"] = fed.grid.restart(2)
            fed.grid._contexts[restarted["node"]].node_config["state-dir"] = str(tmp_path / "elsewhere")
            restarted["slow_jobs"] = s.meter.ledger.accounts["slow"].invocations
        return None

    s = ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter(), rejoin_every=1, reply_timeout=0.3,
                       compression=Int8())
    s.start(fed.grid, fed.initial, num_rounds=6, train_config=config, evaluate_fn=restart_slow)
    new = restarted["node"]
    assert [(e["event"], e["region"], e.get("node")) for e in s.history.events] == [("region_back", "slow", new)]
    assert {info.name: node for node, info in s.roster.live.items()} == {"fast": 1, "slow": new}
    assert s.meter.ledger.accounts["slow"].invocations == restarted["slow_jobs"] + 4  # the new node's 4 periods


def test_asgd_ga_takes_a_node_restarted_while_every_job_is_out(tmp_path):
    """fast's SuperNode restarts while the first jobs are out and slow's reply is not back yet: with no reply to
    apply, ASGD-GA looks for new nodes while it waits, asks the new one who it is, retires the old node (its job
    is lost) and gives the new one work, instead of waiting for a reply before it looks."""
    import threading

    from flwr.app import MessageType

    fed = Federation(tmp_path, topology())

    class RestartWhileBusy(InProcessGrid):
        restarted: int | None = None

        def pull_messages(self, message_ids):
            message_ids = list(message_ids)
            if self.restarted is None and s.jobs:  # the first jobs are out: fast's SuperNode restarts
                self.restarted = self.restart(1)
            if self.restarted not in s.roster.live:  # slow's job is still running
                message_ids = [m for m in message_ids if m not in self._inbox
                               or self._inbox[m].metadata.message_type != MessageType.TRAIN]
            return super().pull_messages(message_ids)

    grid = RestartWhileBusy(make_client_app(tmp_path), 2)
    s = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, meter=fed.meter(), rejoin_every=5)
    run = threading.Thread(target=s.start, args=(grid, fed.initial), daemon=True,
                           kwargs={"num_rounds": 4, "train_config": fed.config})
    run.start()
    run.join(timeout=60)
    assert not run.is_alive(), "the run waits for a reply before it looks for the restarted node"
    assert [(e["event"], e["region"], e.get("node") or e["reason"]) for e in s.history.events] == [
        ("region_lost", "fast", f"replaced by node {grid.restarted}"), ("region_back", "fast", grid.restarted)]
    assert {info.name: node for node, info in s.roster.live.items()} == {"fast": grid.restarted, "slow": 2}
    assert s.version == 4


def test_the_scheduler_plans_equal_data_sizes_when_a_node_did_not_say_its_own(tmp_path):
    """A Mod app without `resident-examples` says no size: the scheduler is told the live regions' sizes by
    `data_sizes` (equal, the mean of those said), never 1 sample beside the others' hundreds."""
    from cloudless_fl.strategy.membership import RegionInfo

    fed = Federation(tmp_path, topology())
    s = ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter())
    s.roster.live = {1: RegionInfo(1, "fast", 700), 2: RegionInfo(2, "slow", None), 3: RegionInfo(3, "far", 501)}
    assert s._workload(fed.initial)[0] == {"fast": 600, "slow": 600, "far": 600}


def test_local_steps_per_region_without_a_live_regions_value_is_an_error_naming_it(tmp_path):
    fed = Federation(tmp_path, topology())
    s = ModelAveraging(lr=0.1, local_steps={"fast": 3}, batch_size=16, meter=fed.meter())
    with pytest.raises(KeyError, match=r"no value for region 'slow' in \{'fast': 3\}; give every region one"):
        s.start(fed.grid, fed.initial, num_rounds=1, train_config=fed.config)


def test_a_compressed_first_download_to_a_region_without_a_node_is_forgotten(tmp_path):
    """Under a lossy codec the server keeps what each region will rebuild from its download; a region whose
    first job found no node keeps nothing (a checkpoint would otherwise carry its model)."""
    from cloudless_fl.training.compression import Int8

    fed = Federation(tmp_path, topology())
    fed.grid.set_offline(2)
    s = ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter(), roll_call="first_jobs",
                       compression=Int8())
    config = ConfigRecord({**dict(fed.config), "state-dir": str(tmp_path / "state")})  # where regions keep models
    s.start(fed.grid, fed.initial, num_rounds=1, train_config=config)
    assert set(s.downlink.held) | set(s.downlink.pending) == {"fast"}


@pytest.mark.parametrize("roll_call", ["query", "first_jobs"])
def test_a_node_silent_at_the_start_is_waited_for_only_until_the_reply_timeout(tmp_path, roll_call):
    """slow's node is connected but never answers the roll call (or its first job): the run starts after
    `reply_timeout` without it, instead of waiting for it for ever."""
    import threading

    from clients.region_app import make_client_app
    from test_membership import SlowGrid

    fed = Federation(tmp_path, topology())
    grid = SlowGrid(make_client_app(tmp_path), 2)
    grid.holding.add(2)
    s = ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter(), roll_call=roll_call,
                       reply_timeout=0.5)
    run = threading.Thread(target=s.start, args=(grid, fed.initial), daemon=True,
                           kwargs={"num_rounds": 2, "train_config": fed.config})
    run.start()
    run.join(timeout=60)
    assert not run.is_alive(), "the run still waits for the silent node"
    assert s.roster.live_names() == {"fast"} and s.step == 2


@pytest.mark.parametrize("roll_call", ["query", "first_jobs"])
def test_a_region_that_cannot_serve_at_the_start_is_recorded_and_the_others_go_on(tmp_path, roll_call, caplog):
    """slow's resident data is gone: its answer (to the query, or to its first job) is an error; the node is
    refused, said in a warning and recorded as `region_failed` (node, reason; counted in lost_regions)."""
    import shutil

    fed = Federation(tmp_path, topology())
    shutil.rmtree(tmp_path / "slow")
    s = ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter(), roll_call=roll_call)
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        s.start(fed.grid, fed.initial, num_rounds=2, train_config=fed.config)
    [failed] = [e for e in s.history.events if e["event"] == "region_failed"]
    assert failed["node"] == 2 and "slow" in failed["reason"] and s.history.counters["lost_regions"] == 1
    assert f"node 2 cannot take part: {failed['reason']}" in caplog.text
    assert s.roster.live_names() == {"fast"} and 2 in s.roster.refused and s.step == 2


def test_ma_evaluates_its_last_period_whatever_eval_every(tmp_path):
    """Every `eval_every` periods, and the last one always: the run's final accuracy is its model's."""
    fed = Federation(tmp_path, topology())
    ma = ModelAveraging(lr=0.1, local_steps=2, batch_size=16, meter=fed.meter(), eval_every=3)
    ma.start(fed.grid, fed.initial, num_rounds=4, train_config=fed.config, evaluate_fn=fed.evaluator())
    assert [e["version"] for e in ma.history.entries if e.get("accuracy") is not None] == [0, 3, 4]


def test_asgd_ga_evaluates_its_last_version_whatever_eval_every(tmp_path):
    fed = Federation(tmp_path, topology())
    strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, meter=fed.meter(), eval_every=4)
    strategy.start(fed.grid, fed.initial, num_rounds=10, train_config=fed.config, evaluate_fn=fed.evaluator())
    assert [e["version"] for e in strategy.history.entries if e.get("accuracy") is not None] == [0, 4, 8, 10]


@pytest.mark.parametrize("eval_every", [1000, 1])
def test_asgd_ga_evaluates_the_model_it_ends_with_when_its_budget_runs_out_on_a_dropped_update(tmp_path,
                                                                                             eval_every):
    """The stop rules are checked after every reply, a version comes only from an applied one: a run whose
    time budget runs out on a dropped update ends with a version evaluation may not have been due for (or
    was, earlier), recorded at the time the run ended, so its summary's time and cost are the whole run's."""
    from cloudless_fl.strategy import StopRules

    fed = Federation(tmp_path, topology())  # "slow"'s updates are always stale: tau_max=0 drops them

    def run(stop):
        strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, tau_max=0, meter=fed.meter(),
                                  eval_every=eval_every, stop=stop)
        drops, count = [], strategy.book.count
        strategy.book.count = lambda counter, n=1: (drops.append(strategy.meter.clock.now())
                                                   if counter == "dropped_stale" else None, count(counter, n))
        strategy.start(fed.grid, fed.initial, num_rounds=40, train_config=fed.config, evaluate_fn=fed.evaluator())
        return strategy, drops

    _, drops = run(None)
    strategy, _ = run(StopRules(max_time_s=drops[0]))  # runs out exactly as the first dropped update comes
    assert strategy.stop_reason.startswith("time budget") and strategy.history.counters["dropped_stale"] == 1
    last = strategy.history.entries[-1]
    assert last["version"] == strategy.version and last["accuracy"] is not None
    assert last["time_s"] == drops[0] and strategy.history.entries[-2]["time_s"] < drops[0]


def test_a_wall_clock_asgd_ga_run_stopping_on_a_version_ends_with_that_versions_entry(tmp_path):
    """Measured time always moves on: a run whose stop rule fires on the version it just evaluated keeps that
    entry (its time is the time to target) instead of evaluating the same model again later."""
    from cloudless_fl.control.meter import Meter
    from cloudless_fl.strategy import StopRules

    fed = Federation(tmp_path, topology())
    evaluated, evaluate = [], fed.evaluator()
    strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, meter=Meter.measured(fed.topology),
                              stop=StopRules(target_accuracy=0.0))  # the first version reaches it
    strategy.start(fed.grid, fed.initial, num_rounds=10, train_config=fed.config,
                   evaluate_fn=lambda version, arrays: (evaluated.append(version), evaluate(version, arrays))[1])
    assert strategy.stop_reason.startswith("target accuracy") and evaluated == [0, 1]
    assert [e["version"] for e in strategy.history.entries] == [0, 1]


def test_an_ma_reply_landing_exactly_at_the_deadline_is_on_time(tmp_path):
    """The deadline is inclusive: slow's job ending at the very instant is averaged in, a hair earlier
    deadline drops it (first jobs at t=0, so the period starts at 0 and the deadline is exactly its end)."""
    def period_one(deadline_s):
        fed = Federation(tmp_path / str(deadline_s), topology())
        ma = ModelAveraging(lr=0.1, local_steps=5, batch_size=16, meter=fed.meter(), deadline_s=deadline_s,
                            roll_call="first_jobs")
        ma.start(fed.grid, fed.initial, num_rounds=1, train_config=fed.config)
        return ma

    slow_end = period_one(None).meter.clock.now()  # the slower region's job sets the period's end
    assert period_one(slow_end).history.counters.get("dropped_late", 0) == 0
    assert period_one(slow_end * (1 - 1e-9)).history.counters["dropped_late"] == 1


def _pace(grid, delays: dict[int, float]) -> None:
    """Make an in-process grid's nodes answer a training job only `delays[node]` real seconds after it was
    sent (a region slower than a period's deadline, on the wall clock)."""
    import time

    push, pull, sent = grid.push_messages, grid.pull_messages, {}

    def due(message_id) -> bool:
        message = grid._inbox.get(message_id)
        return message is not None and (message.metadata.message_type != "train" or time.monotonic() - sent[
            message_id] >= delays.get(message.metadata.dst_node_id, 0.0))

    def push_messages(messages):
        ids = list(push(messages))
        sent.update(dict.fromkeys(ids, time.monotonic()))
        return ids

    grid.push_messages = push_messages
    grid.pull_messages = lambda message_ids: pull([i for i in message_ids if due(i)])


def test_ma_on_the_wall_clock_cuts_off_the_replies_after_its_deadline(tmp_path):
    """Measured time: each period waits for the replies until its deadline and no longer. A region answering
    within it (0.1 s) is averaged in; one answering after it (3 s) is dropped as late, every period, and the
    run does not wait for it (its reply timeout is far away)."""
    from cloudless_fl.control.meter import Meter

    base = TWO_REGIONS["regions"]["fast"]
    regions = {name: {**base, "data_share": 1 / 3} for name in ("a", "b", "c")}
    fed = Federation(tmp_path, topology(regions))
    _pace(fed.grid, {2: 0.1, 3: 3.0})  # node 2 holds b's data, node 3 c's
    ma = ModelAveraging(lr=0.1, local_steps=2, batch_size=16, deadline_s=0.8, roll_call="query",
                        meter=Meter.measured(fed.topology))
    averaged, aggregate = [], ma.aggregate_train

    def counted(period, replies):
        averaged.append(len(replies))
        return aggregate(period, replies)

    ma.aggregate_train = counted
    ma.start(fed.grid, fed.initial, num_rounds=2, train_config=fed.config)
    assert averaged == [2, 2] and ma.history.counters["dropped_late"] == 2
    assert ma.roster.live_names() == {"a", "b", "c"}  # late is not lost: c has a job again next period
    assert ma.meter.clock.now() < 2.9  # two periods of 0.8 s, not c's 3 s each


@pytest.mark.parametrize("aggregation", ["mean", "median"])
def test_ma_reports_how_many_regions_its_step_combined(tmp_path, aggregation):
    fed = Federation(tmp_path, topology())
    ma = ModelAveraging(lr=0.1, local_steps=2, batch_size=16, meter=fed.meter(), aggregation=aggregation)
    reported, aggregate = [], ma.aggregate_train

    def recorded(period, replies):
        arrays, metrics = aggregate(period, replies)
        reported.append(dict(metrics))
        return arrays, metrics

    ma.aggregate_train = recorded
    ma.start(fed.grid, fed.initial, num_rounds=2, train_config=fed.config)
    assert reported == [{"regions": 2}, {"regions": 2}]


def test_ma_hands_the_screen_each_regions_local_steps(tmp_path):
    """The screen compares a change's length per √(its local steps): it must be told each region's steps."""
    fed = Federation(tmp_path, topology())
    ma = ModelAveraging(lr=0.1, local_steps={"fast": 9, "slow": 4}, batch_size=16, meter=fed.meter())
    seen, screened = [], ma._screened

    def recorded(candidates):
        seen.append({c.region: c.steps for c in candidates})
        return screened(candidates)

    ma._screened = recorded
    ma.start(fed.grid, fed.initial, num_rounds=2, train_config=fed.config)
    assert seen == [{"fast": 9, "slow": 4}] * 2


def test_our_strategies_start_like_flowers():
    """Drop-in: `start` takes Flower's parameters with Flower's defaults (3 rounds, an hour's timeout)."""
    import inspect

    from flwr.serverapp.strategy import Strategy

    flower = inspect.signature(Strategy.start).parameters
    for strategy in (ModelAveraging, AsyncGradAccum, Metered):
        ours = inspect.signature(strategy.start).parameters
        assert [(p.name, p.default) for p in ours.values()][:len(flower)] == [
            (p.name, p.default) for p in flower.values()], strategy.__name__


def test_ma_ends_the_run_when_no_region_is_left(tmp_path):
    """Both nodes gone: the period that lost them is recorded, the run ends saying why, and returns its model."""
    fed = Federation(tmp_path, topology())

    def take_everyone_offline(period, arrays):
        if period == 1:
            fed.grid.set_offline(1)
            fed.grid.set_offline(2)
        return MetricRecord({"accuracy": 0.5, "loss": 1.0})

    ma = ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter(), reply_timeout=0.3)
    result = ma.start(fed.grid, fed.initial, num_rounds=5, train_config=fed.config, evaluate_fn=take_everyone_offline)
    assert ma.stop_reason == "no region left" and ma.history.counters["lost_regions"] == 2
    assert [e["version"] for e in ma.history.entries] == [0, 1, 2] and result.arrays is not None


class VanishingGrid(InProcessGrid):
    """Every node vanishes once `after` replies have been read."""

    def __init__(self, app, num_nodes: int, after: int) -> None:
        super().__init__(app, num_nodes)
        self.after = after

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.after -= len(replies)
        if self.after <= 0:
            for node in list(self.get_node_ids()):
                self.set_offline(node)
        return replies


@pytest.mark.parametrize("strategy", [
    lambda meter: ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=meter, eval_every=1000,
                                 reply_timeout=0.3),
    lambda meter: AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, meter=meter, eval_every=1000,
                                 reply_timeout=0.3)], ids=["ma", "asgd_ga"])
def test_a_run_that_loses_every_region_says_so_and_evaluates_the_model_it_ends_with(tmp_path, strategy):
    """Every SuperNode vanishes after a few steps: the run ends before `num_rounds`, its stop reason says why
    (not "num_rounds done"), and the model it ends with is evaluated although `eval_every` did not make its
    version due (the run's final accuracy is its final model's)."""
    fed = Federation(tmp_path, topology())
    s = strategy(fed.meter())
    s.start(VanishingGrid(make_client_app(tmp_path), 2, after=6), fed.initial, num_rounds=40,
            train_config=fed.config, evaluate_fn=fed.evaluator())
    assert s.stop_reason == "no region left" and s.history.counters["lost_regions"] == 2
    last = s.history.entries[-1]
    assert 0 < last["version"] == s.step < 40 and last["accuracy"] is not None
    versions = [e["version"] for e in s.history.entries]
    assert versions == sorted(set(versions))  # one entry per version: the last one evaluated after the fact


@pytest.mark.parametrize("make", [
    lambda meter, **kw: ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=meter, **kw),
    lambda meter, **kw: AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, meter=meter, **kw)],
    ids=["ma", "asgd_ga"])
def test_a_resumed_run_whose_every_region_is_quarantined_ends_at_once_saying_so(tmp_path, make):
    """Every update is rejected and one rejection quarantines: the run ends with every region quarantined, and
    its last checkpoint says so. Extending it (a larger `num_rounds`) sends no work and counts no step in which
    nothing happened: it ends where it was, with the stop reason and the same model."""
    from cloudless_fl.checkpoint import Checkpointer

    fed = Federation(tmp_path / "data", topology())
    limits = UpdateLimits(max_norm=1e-9, quarantine_after=1)

    def run(rounds, resume):
        s = make(fed.meter(), limits=limits, resume=resume, reply_timeout=2.0,
                 checkpointer=Checkpointer(tmp_path / "checkpoint.pt", every=1))
        result = s.start(fed.grid, fed.initial, num_rounds=rounds, train_config=fed.config,
                         evaluate_fn=fed.evaluator())
        return s, result.arrays.to_torch_state_dict()

    first, model = run(4, resume=False)
    assert first.stop_reason == "no region left" and first.history.counters["quarantined_regions"] == 2
    pushed, push = [], fed.grid.push_messages

    def recorded(messages):
        messages = list(messages)
        pushed.extend(m for m in messages if m.metadata.message_type == "train")
        return push(messages)

    fed.grid.push_messages = recorded
    resumed, resumed_model = run(8, resume=True)
    assert pushed == [] and resumed.stop_reason == "no region left"
    assert resumed.step == first.step and resumed.history.entries[-1]["version"] == first.step
    for name, tensor in model.items():
        assert torch.equal(resumed_model[name], tensor), name


def test_ma_goes_on_when_a_node_disappears(tmp_path):
    fed = Federation(tmp_path, topology())

    def take_slow_offline(period, arrays):
        if period == 1:
            fed.grid.set_offline(2)
        return None

    ma = ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter(), reply_timeout=0.3)
    ma.start(fed.grid, fed.initial, num_rounds=4, train_config=fed.config, evaluate_fn=take_slow_offline)
    assert [e["version"] for e in ma.history.entries] == [0, 1, 2, 3, 4]
    assert ma.history.counters["lost_regions"] == 1


@pytest.mark.parametrize("make", [
    lambda m: AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, meter=m),
    lambda m: ModelAveraging(lr=0.1, local_steps={"fast": 6, "slow": 2}, batch_size=16, meter=m),
])
def test_same_seed_same_history(tmp_path, make):
    histories = []
    for name in ("a", "b"):
        fed = Federation(tmp_path / name, topology())
        strategy = make(fed.meter(seed=3))
        strategy.start(fed.grid, fed.initial, num_rounds=8, train_config=fed.config)
        histories.append(strategy.history.entries)
    assert histories[0] == histories[1]


def _asgd_ga_stopped_by(meter, stop):
    return AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, meter=meter, eval_every=5, stop=stop)


def _ma_stopped_by(meter, stop):
    return ModelAveraging(lr=0.1, local_steps=2, batch_size=16, meter=meter, eval_every=5, stop=stop)


def _fedavg_stopped_by(meter, stop):
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    return Metered(inner, meter, eval_every=5, stop=stop)


@pytest.mark.parametrize("rule, reason", [
    ({"max_time_s": 1.0}, "time budget"),
    ({"max_cost_usd": 0.003}, "cost budget"),
    ({"target_accuracy": 0.5}, "target accuracy"),
])
@pytest.mark.parametrize("make", [_asgd_ga_stopped_by, _ma_stopped_by, _fedavg_stopped_by],
                         ids=["asgd_ga", "ma", "fedavg"])
def test_stop_rules_end_the_run_at_the_first_step_past_them(tmp_path, rule, reason, make, caplog):
    from cloudless_fl.strategy import StopRules

    fed = Federation(tmp_path, topology())
    strategy = make(fed.meter(), StopRules(**rule))
    config = fed.config
    if isinstance(strategy, Metered):  # Flower's FedAvg sends one work order to every region
        config = ConfigRecord({**dict(fed.config), **WorkOrder(lr=0.1, batch_size=16, steps=2, data_seed=0).to_config()})
    with caplog.at_level("INFO", logger="cloudless_fl"):
        result = strategy.start(fed.grid, fed.initial, num_rounds=10_000, train_config=config,
                                evaluate_fn=fed.evaluator())
    assert strategy.stop_reason.startswith(reason)
    entries = strategy.history.entries
    if isinstance(strategy, Metered):  # Flower's loop says nothing of why it ended early: the wrapper does
        assert f"{strategy.stop_reason} after round {entries[-1]['version']}" in caplog.messages
    # the run returns the model its last evaluation scored (a budget spent forces that evaluation)
    assert fed.evaluator()(0, result.arrays)["accuracy"] == entries[-1]["accuracy"]

    def past(entry):
        if "max_time_s" in rule:
            return entry["time_s"] >= rule["max_time_s"]
        if "max_cost_usd" in rule:
            return entry["cost_usd"]["instance"] >= rule["max_cost_usd"]
        return entry["accuracy"] is not None and entry["accuracy"] >= rule["target_accuracy"]

    assert past(entries[-1]) and not any(past(e) for e in entries[:-1])  # stopped at the first, not later
    assert len(entries) > 3  # and not at once
    assert entries[-1]["accuracy"] is not None  # the model the run ends with is evaluated, due or not


def test_asgd_ga_scales_each_update_by_its_staleness(tmp_path, monkeypatch):
    from cloudless_fl.strategy.server_optimizer import ServerOptimizer

    scales = []
    step = ServerOptimizer.step
    monkeypatch.setattr(ServerOptimizer, "step", lambda self, g, scale=1.0: (scales.append(scale), step(self, g, scale)))
    fed = Federation(tmp_path, topology())
    strategy = AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, balance=False, meter=fed.meter())
    strategy.start(fed.grid, fed.initial, num_rounds=20, train_config=fed.config)
    expected = sorted((1 + tau) ** -0.5 for tau, n in strategy.history.staleness.items() for _ in range(n))
    assert sorted(scales) == pytest.approx(expected)
    assert min(scales) < 1  # some updates were stale, and scaled down


def test_the_balance_weights_are_capped_together_keeping_their_ratio(tmp_path):
    """Over the cap, every weight is scaled by the same factor: capping the slow region's alone would count
    its data below its share (the run converges to another objective)."""
    from cloudless_fl.strategy.membership import RegionInfo

    strategy = AsyncGradAccum(max_weight=2.0)
    strategy.roster.live = {1: RegionInfo(1, "fast", 900), 2: RegionInfo(2, "slow", 100)}
    strategy.roster.shares = {"fast": 0.5, "slow": 0.5}
    strategy._intervals = {"fast": 1.0, "slow": 10.0}  # slow arrives 10x less often: uncapped weights 0.55, 5.5
    strategy._work = {"fast": 4, "slow": 4}
    assert strategy._balance_weight("slow") == pytest.approx(2.0)
    assert strategy._balance_weight("fast") == pytest.approx(0.55 * 2.0 / 5.5)
    # weight x rate per region: equal, as their equal shares ask
    assert strategy._balance_weight("fast") * 1.0 == pytest.approx(strategy._balance_weight("slow") * 0.1)
    strategy.max_weight = 10.0  # under the cap: the weights themselves
    assert strategy._balance_weight("slow") == pytest.approx(5.5)
    assert strategy._balance_weight("fast") == pytest.approx(0.55)


def test_the_balance_weight_counts_the_arriving_update_as_applied():
    """Shares and the summed rate count each region by the fraction of its arrivals applied (smoothed); the
    arriving update's own region counts this arrival as applied, the others as they stand."""
    from cloudless_fl.strategy.membership import RegionInfo

    strategy = AsyncGradAccum(max_weight=100.0)
    strategy.roster.live = {1: RegionInfo(1, "fast", 900), 2: RegionInfo(2, "slow", 100)}
    strategy.roster.shares = {"fast": 0.5, "slow": 0.5}
    strategy._intervals = {"fast": 1.0, "slow": 10.0}  # rates 1 and 0.1
    strategy._work = {"fast": 4, "slow": 4}
    strategy._applied = {"fast": 1.0, "slow": 0.5}  # half of slow's arrivals were held back
    slow = 0.7 * 0.5 + 0.3 * 1.0  # with this one applied
    assert strategy._balance_weight("slow") == pytest.approx(0.5 / (0.5 + 0.5 * slow) * (1.0 + 0.1 * slow) / 0.1)
    assert strategy._balance_weight("fast") == pytest.approx(0.5 / (0.5 + 0.5 * 0.5) * (1.0 + 0.1 * 0.5) / 1.0)


@pytest.mark.parametrize("update", ["delta", "gradient"])
def test_the_balance_weight_counts_each_arrivals_local_steps(tmp_path, update):
    """Equal job times, local steps in proportion to the data shares (the elastic scheduler's `G_r`): a
    delta of 30 steps moves the model 3x as far as one of 10, so the regions already weigh by their
    shares and the weights are 1; a gradient is a mean whatever its steps, so arrivals alone count and
    the bigger region's weighs 1.5 (3/4 of the data, half the arrivals)."""
    fed = Federation(tmp_path, topology())
    strategy = AsyncGradAccum(lr=0.1, accumulation_steps={"fast": 30, "slow": 10}, batch_size=16, update=update,
                              max_weight=100.0, meter=fed.meter())
    strategy.start(fed.grid, fed.initial, num_rounds=2, train_config=fed.config)
    assert strategy._work == ({"fast": 30, "slow": 10} if update == "delta" else {"fast": 1, "slow": 1})
    strategy.roster.shares = {"fast": 0.75, "slow": 0.25}
    strategy._intervals, strategy._applied = {"fast": 2.0, "slow": 2.0}, {}
    expected = {"delta": (1.0, 1.0), "gradient": (1.5, 0.5)}[update]
    assert (strategy._balance_weight("fast"), strategy._balance_weight("slow")) == pytest.approx(expected)


def test_asgd_ga_defaults_are_the_documented_ones():
    strategy = AsyncGradAccum()
    assert (strategy.lr, strategy.momentum, strategy.nesterov, strategy.accumulation_steps, strategy.batch_size,
            strategy.tau_max, strategy.staleness, strategy.update, strategy.local_lr, strategy.balance,
            strategy.max_weight, strategy.aggregation, strategy.trim_fraction, strategy.buffer_regions) == (
        0.1, 0.0, False, 4, 32, None, inverse_sqrt, "gradient", 0.1, True, 4.0, "mean", 0.25, 3)
    assert AsyncGradAccum(update="delta").lr == 1.0  # a delta is already a step


def test_the_wrapper_shares_the_selective_strategys_roster():
    """SelectiveFedAvg picks nodes by region; the wrapper learns which node is which region from replies."""
    selective = SelectiveFedAvg(round_times={"a": 1.0}, deadline_s=1.0)
    assert Metered(selective).roster is selective.roster
    assert Metered(FedAvg()).roster is not Metered(FedAvg()).roster


def test_the_wrapper_defaults_are_the_documented_ones():
    from cloudless_fl.strategy import StopRules
    from cloudless_fl.strategy.validation import UpdateLimits

    metered = Metered(FedAvg())
    assert (metered.book.eval_every, metered.reply_timeout, metered.limits, metered.downlink.codec.spec(),
            metered.book.stop, metered.book.resume) == (1, 600.0, UpdateLimits(), "none", StopRules(), False)
    assert not metered.meter.clock.modelled  # the wall clock, with no prices


@pytest.mark.parametrize("strategy, setting, message", [
    (AsyncGradAccum, {"update": "weights"}, "update must be one of gradient, delta, got 'weights'"),
    (AsyncGradAccum, {"aggregation": "mode"}, "aggregation must be one of mean, median, trimmed_mean, got 'mode'"),
    (AsyncGradAccum, {"buffer_regions": 2}, "buffer_regions=2 cannot outvote a bad region; use 3 or more"),
    (AsyncGradAccum, {"aggregation": "trimmed_mean", "trim_fraction": 0.2},
     "trim_fraction=0.2 of buffer_regions=3 trims nothing: raise either (e.g. 0.25 of 4), or use aggregation=median"),
    (AsyncGradAccum, {"staleness": "linear"}, "unknown staleness function 'linear'; use inverse_sqrt, none"),
    (ModelAveraging, {"aggregation": "mode"}, "aggregation must be one of mean, median, trimmed_mean, got 'mode'"),
    (ModelAveraging, {"weight_by": "steps"}, "weight_by must be one of samples, shares, got 'steps'"),
    (ModelAveraging, {"roll_call": "shout"}, "roll_call must be one of query, first_jobs, got 'shout'"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_a_strategy_refuses_a_bad_setting_naming_the_choices(strategy, setting, message):
    with pytest.raises(ValueError) as refused:
        strategy(**setting)
    assert str(refused.value) == message


def test_asgd_ga_logs_its_settings_at_the_start(caplog):
    """The line a run logs first (`summary`) names the strategy and says how it is set up, the buffered rule
    included."""
    caplog.set_level(logging.INFO, logger="cloudless_fl")
    AsyncGradAccum(lr=0.5, momentum=0.9, accumulation_steps={"a": 3}, batch_size=8, tau_max=6, update="delta",
                   balance=False).summary()
    assert [r.getMessage() for r in caplog.records] == [
        "AsyncGradAccum: server lr=0.5 momentum=0.9, G={'a': 3}, batch=8, tau_max=6, update=delta, balance=False"]
    assert AsyncGradAccum(aggregation="median", buffer_regions=4).describe().endswith(", buffered median of 4")
    assert AsyncGradAccum(lr_cooldown=0.3).describe().endswith(", lr cooldown over the budget's last 30%")


def test_ma_logs_its_settings_at_the_start(caplog):
    caplog.set_level(logging.INFO, logger="cloudless_fl")
    ModelAveraging(lr=0.2, local_steps={"a": 7}, batch_size=8, normalize=False, outer_lr=0.7, outer_momentum=0.9,
                   deadline_s=30.0).summary()
    assert [r.getMessage() for r in caplog.records] == [
        "ModelAveraging: local lr=0.2, H={'a': 7}, batch=8, FedNova=False, outer lr=0.7 momentum=0.9, deadline=30.0"]
    cooled = ModelAveraging(lr_cooldown=0.25).describe()
    assert cooled.endswith(", deadline=None, lr cooldown over the budget's last 25%")


def test_asgd_ga_starts_from_its_evaluated_model_with_the_server_optimizer_it_was_given(tmp_path):
    fed = Federation(tmp_path, topology())
    strategy = AsyncGradAccum(lr=0.1, momentum=0.9, nesterov=True, accumulation_steps=2, batch_size=16,
                              meter=fed.meter())
    strategy.start(fed.grid, fed.initial, num_rounds=3, train_config=fed.config,
                   evaluate_fn=lambda version, arrays: MetricRecord({"accuracy": 0.5 + version / 10, "loss": 1.0}))
    assert [(e["version"], e["accuracy"]) for e in strategy.history.entries] == [(0, 0.5), (1, 0.6), (2, 0.7),
                                                                               (3, 0.8)]
    group = strategy.optimizer.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.1, 0.9, True)


def test_asgd_ga_measures_a_regions_arrival_interval_on_the_wall_clock():
    """The interval since the region's previous arrival (its first: since its job left), smoothed; a region that
    left and came back starts again from its new job."""
    from cloudless_fl.control.meter import Meter
    from conftest import SetClock

    strategy = AsyncGradAccum(meter=Meter(SetClock()))
    clock = strategy.meter.clock
    clock.t = 3.0
    strategy._observe_arrival("a", dispatched_at=1.0)
    assert strategy._intervals["a"] == pytest.approx(2.0)
    clock.t = 7.0
    strategy._observe_arrival("a", dispatched_at=6.0)  # 4 s after its previous arrival
    assert strategy._intervals["a"] == pytest.approx(0.7 * 2.0 + 0.3 * 4.0)
    strategy._region_left("a")
    clock.t = 10.0
    strategy._observe_arrival("a", dispatched_at=9.5)  # back: 0.5 s after its new job left
    assert strategy._intervals["a"] == pytest.approx(0.7 * (0.7 * 2.0 + 0.3 * 4.0) + 0.3 * 0.5)


def test_asgd_ga_balances_by_measured_arrivals_on_the_wall_clock(tmp_path, monkeypatch):
    """Deployment's lock-step, in-process: the region model says the regions differ 27x in pace, but on the
    wall clock every region's job is done when the server pulls, so all arrive equally often. The balance
    weights must follow the arrivals (data share x regions: 0.4 ... 1.6), not the model (0.14 ... 4 diverged)."""
    from cloudless_fl.control.meter import Meter

    shares = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}
    base = TWO_REGIONS["regions"]["fast"]
    regions = {name: {**base, "samples_per_s": speed, "data_share": shares[name],
                      "link": {"up_mbps": mbps, "down_mbps": mbps, "latency_ms": 10}}
               for name, speed, mbps in zip(shares, (4000, 2500, 1200, 500), (10000, 200, 60, 20))}
    fed = Federation(tmp_path, topology(regions), alpha=0.3)
    weights: dict[str, list[float]] = {name: [] for name in shares}
    balance_weight = AsyncGradAccum._balance_weight

    def recorded(self, region):
        weights[region].append(balance_weight(self, region))
        return weights[region][-1]

    monkeypatch.setattr(AsyncGradAccum, "_balance_weight", recorded)
    strategy = AsyncGradAccum(update="delta", accumulation_steps=10, local_lr=0.3, batch_size=16, eval_every=20,
                              meter=Meter.measured(fed.topology))
    strategy.start(fed.grid, fed.initial, num_rounds=120, train_config=fed.config, evaluate_fn=fed.evaluator())
    for name, share in shares.items():  # once every region has arrived twice; the median: a busy machine jitters
        assert float(np.median(weights[name][2:])) == pytest.approx(share * 4, rel=0.15), name
    later = [e["accuracy"] for e in strategy.history.entries if e["version"] >= 40 and e["accuracy"] is not None]
    assert sum(later) / len(later) > 0.8  # measured: 0.88 (0.65 with the region model's rates)


def test_the_server_optimizer_takes_nesterov_steps():
    """Nesterov SGD by hand: v = m v + g; w -= lr (g + m v)."""
    from cloudless_fl.strategy.server_optimizer import ServerOptimizer

    w0, g1, g2, lr, m = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 0.25]), 0.7, 0.9
    opt = ServerOptimizer({"w": w0}, lr=lr, momentum=m, nesterov=True)
    opt.step({"w": g1})
    opt.step({"w": g2})
    v1 = g1
    w1 = w0 - lr * (g1 + m * v1)
    v2 = m * v1 + g2
    assert torch.allclose(opt.state["w"], w1 - lr * (g2 + m * v2))


def test_the_served_model_is_an_exponential_moving_average_of_the_versions():
    from cloudless_fl.strategy.server_optimizer import ServerOptimizer

    w0, decay = torch.tensor([1.0, -2.0]), 0.8
    opt = ServerOptimizer({"w": w0, "count": torch.tensor(3)}, lr=0.5, average_decay=decay)
    average = w0.clone()
    for g in (torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 0.25]), torch.tensor([2.0, 0.0])):
        opt.step({"w": g})
        average = decay * average + (1 - decay) * opt.state["w"]
    served = opt.served(opt.arrays()).to_torch_state_dict()
    assert torch.allclose(served["w"], average) and not torch.allclose(served["w"], opt.state["w"])
    assert int(served["count"]) == 3
    last = opt.arrays()
    assert ServerOptimizer({"w": w0}, lr=0.5).served(last) is last  # no average kept: the last version
    restored = ServerOptimizer({"w": w0, "count": torch.tensor(3)}, lr=0.5, average_decay=decay)
    restored.load_state_dict(opt.state_dict())
    assert torch.equal(restored.average["w"], opt.average["w"])
    with pytest.raises(ValueError, match="the checkpoint holds no averaged model; resume with the first run's "
                                         "strategy.average_decay"):
        restored.load_state_dict(ServerOptimizer({"w": w0, "count": torch.tensor(3)}, lr=0.5).state_dict())
    assert ServerOptimizer({"w": w0}, lr=0.5, average_decay=0.0).average is not None  # 0: serve the last
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"average_decay must be in \[0, 1\), got {bad}"):
            ServerOptimizer({"w": w0}, lr=0.5, average_decay=bad)


def test_the_server_optimizer_takes_plain_momentum_steps_unless_asked_for_nesterov():
    """Heavy-ball momentum by default: v = m v + g; w -= lr v."""
    from cloudless_fl.strategy.server_optimizer import ServerOptimizer

    w0, g1, g2, lr, m = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 0.25]), 0.7, 0.9
    opt = ServerOptimizer({"w": w0}, lr=lr, momentum=m)
    opt.step({"w": g1})
    opt.step({"w": g2})
    assert torch.allclose(opt.state["w"], w0 - lr * g1 - lr * (m * g1 + g2))


def test_asgd_ga_evaluates_and_returns_the_average_it_serves(tmp_path):
    fed = Federation(tmp_path, topology())
    strategy = AsyncGradAccum(lr=1.0, accumulation_steps=2, batch_size=16, update="delta", local_lr=0.1,
                              balance=False, meter=fed.meter(), eval_every=5, average_decay=0.9)
    evaluated = []

    def evaluate_fn(version, arrays):
        evaluated.append(arrays.to_torch_state_dict())
        return fed.evaluator()(version, arrays)

    result = strategy.start(fed.grid, fed.initial, num_rounds=20, train_config=fed.config, evaluate_fn=evaluate_fn)
    final = result.arrays.to_torch_state_dict()
    assert all(torch.equal(final[k], strategy.optimizer.average[k]) for k in final)
    assert not all(torch.equal(final[k], strategy.optimizer.state[k]) for k in final)  # not the last version
    assert all(torch.equal(evaluated[-1][k], final[k]) for k in final)  # the run's final accuracy is its own
