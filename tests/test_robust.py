"""Robust aggregation: the rules by hand, and one attacking region of four against MA and Flower's FedAvg."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from cloudless_fl.strategy import Metered, ModelAveraging
from cloudless_fl.strategy.robust import coordinate_median, trimmed_mean
from cloudless_fl.training.protocol import WorkOrder
from conftest import TWO_REGIONS
from strategy_helpers import Federation, topology

UPDATES = [{"w": torch.tensor([1.0, -4.0])}, {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([3.0, 1.0])},
           {"w": torch.tensor([100.0, 2.0])}]


def test_coordinate_median_by_hand():
    assert torch.equal(coordinate_median(UPDATES)["w"], torch.tensor([2.5, 0.5]))  # mean of the two middle values
    assert torch.equal(coordinate_median(UPDATES[:3])["w"], torch.tensor([2.0, 0.0]))


def test_trimmed_mean_by_hand():
    assert torch.equal(trimmed_mean(UPDATES, 0.25)["w"], torch.tensor([2.5, 0.5]))  # drops 1 of each side
    assert torch.equal(trimmed_mean(UPDATES, 0.0)["w"], torch.tensor([26.5, -0.25]))  # the plain mean
    with pytest.raises(ValueError, match="leaves nothing"):
        trimmed_mean(UPDATES[:2], 0.5)


def four_regions():
    region = TWO_REGIONS["regions"]["slow"]
    return topology({name: copy.deepcopy(region) for name in ("a", "b", "c", "d")},
                    shares={"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25})


def attacked(fed: Federation, factor: float = -10.0) -> None:
    """Region 'a' (node 1) replies with w_sent + factor * (its honest change): finite, so validation passes."""
    honest = fed.grid._app

    def app(msg, context):
        reply = honest(msg, context)
        if context.node_id != 1 or msg.metadata.message_type != "train" or reply.has_error():
            return reply
        sent = msg.content["arrays"].to_torch_state_dict()
        new = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord({k: sent[k] + factor * (new[k] - sent[k]) if v.is_floating_point()
                                               else v for k, v in new.items()})
        return reply

    fed.grid._app = app


def _final_accuracy(result) -> float:
    return result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]["accuracy"]


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean"])
def test_ma_holds_against_one_region_sending_minus_ten_times_its_update(tmp_path, aggregation):
    accuracy = {}
    for name, attack, rule in (("clean", False, "mean"), ("mean", True, "mean"), ("robust", True, aggregation)):
        fed = Federation(tmp_path / name, four_regions(), alpha=100.0)
        if attack:
            attacked(fed)
        ma = ModelAveraging(lr=0.1, local_steps=10, batch_size=16, meter=fed.meter(), aggregation=rule)
        accuracy[name] = _final_accuracy(ma.start(fed.grid, fed.initial, num_rounds=12, train_config=fed.config,
                                                  evaluate_fn=fed.evaluator()))
    assert accuracy["clean"] > 0.7
    assert accuracy["mean"] < 0.3  # the attack works on the plain average (chance: 0.1)...
    assert accuracy["robust"] > 0.75 * accuracy["clean"]  # ...and not on the robust rule (measured: 0.70 vs 0.85)


@pytest.mark.parametrize("robust", [FedMedian, FedTrimmedAvg])
def test_fedavg_baseline_takes_flowers_robust_rules(tmp_path, robust):
    accuracy = {}
    config = None
    for name, attack, rule in (("clean", False, FedAvg), ("mean", True, FedAvg), ("robust", True, robust)):
        fed = Federation(tmp_path / name, four_regions(), alpha=100.0)
        config = ConfigRecord({**dict(fed.config), **WorkOrder(lr=0.1, batch_size=16, epochs=1.0).to_config()})
        if attack:
            attacked(fed)
        extra = {"beta": 0.25} if rule is FedTrimmedAvg else {}
        strategy = Metered(rule(fraction_evaluate=0.0, min_available_nodes=4, min_train_nodes=4, **extra), fed.meter())
        accuracy[name] = _final_accuracy(strategy.start(fed.grid, fed.initial, num_rounds=4, train_config=config,
                                                        evaluate_fn=fed.evaluator()))
    assert accuracy["clean"] > 0.7 and accuracy["mean"] < 0.3
    assert accuracy["robust"] > 0.75 * accuracy["clean"]  # measured: 0.66 vs 0.86 after 4 rounds
