"""The books every strategy keeps: a checkpoint that cannot be written, and one read back."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

from cloudless_fl.checkpoint import Checkpointer
from cloudless_fl.control.costmodel import CostModel
from cloudless_fl.control.meter import Meter
from cloudless_fl.control.topology import load_topology
from cloudless_fl.strategy.runbook import RunBook, StopRules
from cloudless_fl.strategy.validation import UpdateValidator
from conftest import TWO_REGIONS, SetClock


def book_at(step: int, checkpointer: Checkpointer | None = None, resume: bool = False) -> RunBook:
    clock = SetClock()
    clock.t = 7.5
    book = RunBook(Meter(clock, CostModel(load_topology(TWO_REGIONS), seed=0)), checkpointer=checkpointer,
                   resume=resume)
    book.step, book.samples = step, 10 * step
    return book


def test_a_checkpoint_that_cannot_be_written_is_logged_counted_and_recorded_and_the_run_goes_on(tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    book = book_at(3, Checkpointer(tmp_path / "a-file" / "checkpoint.pt"))  # its folder is a file: OSError
    with caplog.at_level(logging.ERROR, logger="cloudless_fl"):
        book.save({}, {})
        book.save({}, {})
    assert book.history.counters["failed_checkpoints"] == 2
    event = book.history.events[0]
    assert (event["event"], event["time_s"], event["step"]) == ("checkpoint_failed", 7.5, 3)
    assert "a-file" in event["reason"]
    message = caplog.records[0].getMessage()
    assert message.startswith("checkpoint at step 3 not written (") and "a-file" in message
    assert message.endswith("; the run goes on, but cannot resume from it")


def test_a_checkpoint_read_back_restores_the_books_and_records_the_resume(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoint.pt")
    book_at(4, checkpointer).save({"mine": 1}, {})
    resumed = book_at(0, checkpointer, resume=True)
    assert resumed.resume is True  # what a strategy's start reads to restore instead of starting afresh
    meta, _ = resumed.load()
    assert (resumed.step, resumed.samples, meta["mine"]) == (4, 40, 1)
    assert [(e["event"], e["step"]) for e in resumed.history.events] == [("resumed", 4)]


@pytest.mark.parametrize("rules, figures, accuracy, says", [
    ({"max_time_s": 60.0}, {"time_s": 60.0}, None, "time budget 60 s reached"),
    ({"max_cost_usd": 0.5}, {"time_s": 1.0, "cost_usd": {"instance": 0.5}}, None, "cost budget $0.5 reached"),
    ({"target_accuracy": 0.95}, {"time_s": 1.0}, 342 / 360, "target accuracy 0.95 reached"),  # 342 of 360 digits
])
def test_a_budget_or_target_met_exactly_ends_the_run(rules, figures, accuracy, says):
    assert StopRules(**rules).reason(figures, accuracy) == says
    key = next(iter(rules))
    below = {**figures, "time_s": 59.9} if key == "max_time_s" else (
        {**figures, "cost_usd": {"instance": 0.49}} if key == "max_cost_usd" else figures)
    assert StopRules(**rules).reason(below, 0.9 if accuracy else None) is None


def test_an_evaluation_records_its_accuracy_and_loss():
    book = book_at(2)
    evaluate = lambda version, arrays: MetricRecord({"accuracy": 0.5, "loss": 1.25})  # noqa: E731
    assert book.record(2, ArrayRecord(), evaluate, due=True)["loss"] == 1.25
    book.record(3, ArrayRecord(), evaluate, due=False)
    assert [(e["version"], e["accuracy"], e["loss"]) for e in book.history.entries] == [(2, 0.5, 1.25),
                                                                                        (3, None, None)]


def test_a_resumed_runs_rejection_and_clip_counts_go_on():
    book = book_at(5)
    book.history.rejections = {"r": Counter(norm=2)}
    book.history.clipped = Counter(r=3)
    validator = UpdateValidator({"w": torch.zeros(2)})
    book.count_with(validator)
    validator.clipped["r"] += 1
    assert book.history.clipped == Counter(r=4) and book.history.rejections["r"]["norm"] == 2


def test_evaluation_is_due_every_eval_every_steps_when_forced_or_once_a_budget_is_spent(tmp_path):
    assert all(book_at(0).evaluation_due(v) for v in (1, 2, 3))  # by default every step
    clock = SetClock()
    book = RunBook(Meter(clock, CostModel(load_topology(TWO_REGIONS), seed=0)), eval_every=5,
                   stop=StopRules(max_time_s=10.0))
    assert [v for v in range(1, 11) if book.evaluation_due(v)] == [5, 10]
    assert book.evaluation_due(3, force=True)
    clock.t = 10.0  # the run ends with this model: its accuracy is the final one
    assert book.evaluation_due(3)


def test_a_checkpoint_is_due_every_checkpointer_every_steps_or_when_forced(tmp_path):
    book = book_at(0, Checkpointer(tmp_path / "checkpoint.pt", every=4))
    assert [s for s in range(1, 9) if book.checkpoint_due(s)] == [4, 8]
    assert book.checkpoint_due(3, force=True)
    assert not book_at(0).checkpoint_due(4, force=True)  # no checkpointer: never


def test_resuming_needs_a_checkpointer():
    with pytest.raises(ValueError, match="^resume=True needs a checkpointer that says where the checkpoint is$"):
        book_at(0, resume=True)
