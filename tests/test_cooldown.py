"""The step size's cooldown at the end of a budget: the factor, what counts as spent, and where it is applied."""

from __future__ import annotations

import pytest
import torch

from cloudless_fl.strategy import AsyncGradAccum, ModelAveraging
from cloudless_fl.strategy import base
from cloudless_fl.strategy.cooldown import cooldown_factor
from cloudless_fl.strategy.runbook import StopRules
from cloudless_fl.training.protocol import WorkOrder
from strategy_helpers import Federation, topology


@pytest.mark.parametrize("spent, fraction, factor", [
    (0.0, 0.3, 1.0), (0.7, 0.3, 1.0), (0.85, 0.3, 0.5), (0.94, 0.3, 0.2), (1.0, 0.3, 0.0), (1.2, 0.3, 0.0),
    (0.5, 1.0, 0.5), (0.9, None, 1.0), (0.9, 0.0, 1.0), (None, 0.3, 1.0)])
def test_the_rate_is_constant_then_falls_linearly_to_zero_over_the_last_share(spent, fraction, factor):
    assert cooldown_factor(spent, fraction) == pytest.approx(factor)


def test_spent_is_the_share_of_the_budget_nearest_its_end():
    figures = {"time_s": 30.0, "cost_usd": {"instance": 0.8, "serverless": 0.1}}
    assert StopRules(max_time_s=100.0).spent(figures) == pytest.approx(0.3)
    assert StopRules(max_cost_usd=1.0).spent(figures) == pytest.approx(0.8)
    assert StopRules(max_time_s=100.0, max_cost_usd=1.0).spent(figures) == pytest.approx(0.8)
    assert StopRules(max_time_s=40.0, max_cost_usd=1.0).spent(figures) == pytest.approx(0.8)
    assert StopRules(max_time_s=20.0, max_cost_usd=2.0).spent(figures) == pytest.approx(1.5)
    assert StopRules(max_cost_usd=1.0).spent({"time_s": 30.0, "cost_usd": None}) is None  # no topology: no $
    assert StopRules(target_accuracy=0.9).spent(figures) is None  # a target is not a budget


def _record_orders(strategy) -> list[tuple[float, float]]:
    """(dispatch time, local lr) of every job the strategy sends."""
    sent: list[tuple[float, float]] = []
    make = strategy._train_message

    def spy(node_id, arrays, config, order: WorkOrder, correction=None):
        sent.append((strategy.meter.clock.now(), order.lr))
        return make(node_id, arrays, config, order, correction)

    strategy._train_message = spy
    return sent


def _ma(fed: Federation, **kwargs) -> ModelAveraging:
    return ModelAveraging(lr=0.1, local_steps=5, batch_size=16, meter=fed.meter(), roll_call="first_jobs", **kwargs)


def test_ma_cools_its_local_rate_over_the_last_share_of_its_time_budget(tmp_path):
    fed = Federation(tmp_path, topology())
    free = _ma(fed)
    free.start(fed.grid, fed.initial, num_rounds=8, train_config=fed.config)
    budget = free.meter.clock.now() * 0.999  # the eighth period ends past it

    for cooldown in (None, 0.5):
        ma = _ma(fed, stop=StopRules(max_time_s=budget), lr_cooldown=cooldown)
        sent = _record_orders(ma)
        ma.start(fed.grid, fed.initial, num_rounds=100, train_config=fed.config)
        assert ma.stop_reason.startswith("time budget") and len(sent) == 16  # 8 periods of 2 regions
        if cooldown is None:
            assert {lr for _, lr in sent} == {0.1}
            continue
        expected = [0.1 * min(1.0, (1 - t / budget) / cooldown) for t, _ in sent]
        assert [lr for _, lr in sent] == pytest.approx(expected)
        assert sent[0][1] == 0.1 and sent[-1][1] < 0.1 / 4  # constant at first, near zero at the end


@pytest.fixture
def cooldown_is_zero(monkeypatch):
    """Any configured cooldown scales the step to nothing (the factor itself is tested above)."""
    monkeypatch.setattr(base, "cooldown_factor", lambda spent, fraction: 0.0 if fraction else 1.0)


def test_delta_asgd_ga_cools_the_regions_rate_and_gradient_mode_the_servers(tmp_path, cooldown_is_zero):
    fed = Federation(tmp_path, topology())
    budget = StopRules(max_time_s=1e6)
    delta = AsyncGradAccum(update="delta", local_lr=0.1, accumulation_steps=2, batch_size=16, meter=fed.meter(),
                           stop=budget, lr_cooldown=0.3)
    sent = _record_orders(delta)
    delta.start(fed.grid, fed.initial, num_rounds=4, train_config=fed.config)
    assert sent and {lr for _, lr in sent} == {0.0}

    gradient = AsyncGradAccum(update="gradient", lr=0.1, accumulation_steps=2, batch_size=16, meter=fed.meter(),
                              stop=budget, lr_cooldown=0.3)
    sent = _record_orders(gradient)
    result = gradient.start(fed.grid, fed.initial, num_rounds=4, train_config=fed.config)
    assert gradient.version == 4 and {lr for _, lr in sent} == {0.1}  # the region's rate: unused, as sent
    start, end = fed.initial.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    assert all(torch.equal(start[k], end[k]) for k in start)  # every server step scaled to nothing


def test_a_cooldown_that_is_not_a_share_of_the_budget_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"lr_cooldown must be a share of the budget in \[0, 1\], got 1.5"):
        ModelAveraging(lr_cooldown=1.5)
