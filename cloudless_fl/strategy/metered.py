"""`Metered`: charge every round of any Flower Message-API strategy to the cost model.

The baseline is Flower's own `FedAvg`, wrapped, not re-implemented: the wrapper
forwards every call and, when a round's replies come back, charges each region's
job (download + compute + upload from the round's start). The round ends with
its slowest participant; everyone else waits at the barrier — and under
instance billing pays for the wait.

A round waits at most `reply_timeout` for its replies, pulled as promptly as
ASGD-GA's and MA's (`PromptReplies`; Flower's `HttpGrid` pulls every 3 s).
Flower's FedAvg waits forever for `min_available_nodes` before a round; when a
region's SuperNode is gone, the wrapper waits `reply_timeout` for it and then lowers the inner
strategy's minimums to the regions still connected (recorded as lost), so the
run goes on without it, and with it again if it comes back.

Stop rules (time, cost, target) end Flower's round loop after the round that
crosses them, as they end MA's and ASGD-GA's, so budgets compare across strategies.

With a lossy `compression` codec, the one message Flower's FedAvg builds for all
nodes becomes one per node carrying the compressed change from the model that
node holds (downlink.py), and each compressed reply (a change, encoded by the
region) is decoded into the new weights FedAvg averages.

The books (history, evaluation, checkpoints) are a `RunBook` and the node →
region map a `Roster`, as for ASGD-GA and MA; an inner strategy that keeps a
`roster` of its own (`SelectiveFedAvg`) shares it, so there is one map.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..checkpoint import Checkpointer
from ..control.jobs import Reported
from ..control.meter import Meter, record_bytes
from ..reporting.results import History
from ..training.compression import Codec
from ..training.protocol import (ARRAYS, CONFIG, MODE_DELTA, MODE_WEIGHTS, WorkOrder, reply_arrays, reply_encoding,
                                 reply_region)
from .downlink import Downlink
from .inflight import PromptReplies
from .membership import RegionInfo, Roster, wait_for_nodes
from .runbook import EvaluateFn, RunBook, StopRules
from .validation import SCREEN, RejectedUpdate, UpdateLimits, UpdateValidator

log = logging.getLogger("cloudless_fl")


class _StopRuleFired(Exception):
    """Ends Flower's round loop (which has no other exit) once a stop rule fires; carries the model."""

    def __init__(self, arrays: ArrayRecord) -> None:
        super().__init__("stop rule fired")
        self.arrays = arrays


def _alike(replies: list[Message]) -> None:
    """Name every reply's one ArrayRecord and one MetricRecord as the first reply does, and trim each MetricRecord
    to the keys every reply has: Flower's FedAvg raises on replies whose record names or metric keys differ (one
    region's ClientApp naming its records its own way, or reporting one metric more, would end the run)."""
    if not replies:
        return
    first = replies[0].content
    array_name, metric_name = next(iter(first.array_records)), next(iter(first.metric_records))
    shared = set.intersection(*(set(next(iter(m.content.metric_records.values()))) for m in replies))
    for msg in replies:
        (arrays_as, arrays), = msg.content.array_records.items()
        (metrics_as, metrics), = msg.content.metric_records.items()
        del msg.content[arrays_as], msg.content[metrics_as]
        msg.content[array_name] = arrays
        msg.content[metric_name] = MetricRecord({k: v for k, v in metrics.items() if k in shared})


class Metered(Strategy):
    """Wrap `strategy` so each round is timed and charged.

    Parameters
    ----------
    strategy : Strategy
        Any Flower Message-API strategy (e.g. `flwr.serverapp.strategy.FedAvg`).
    meter : Meter, optional
        Clock and cost model; by default the wall clock with no prices.
    eval_every : int (default: 1)
        Run the central `evaluate_fn` every k rounds (and after the last).
    stop : StopRules, optional
        Time, cost or target-accuracy budget checked after every round; the run
        ends after the first round past it (evaluated, checkpointed).
    limits : UpdateLimits, optional
        Update validation: replies whose weights are bad never reach `strategy`;
        a region that keeps sending them gets no more rounds. The screen of
        well-formed updates (`norm_factor`, `min_agreement`, ...) is not applied:
        a setting of it changed from its default is named in a warning.
    checkpointer : Checkpointer, optional
        Write the model and the books every `checkpointer.every` rounds and at the end.
    resume : bool
        Continue from `checkpointer`'s checkpoint: the remaining rounds, on its model.
    reply_timeout : float (default: 600)
        Real seconds a round waits for replies, and for a missing region's node to reconnect.
    compression : Codec, optional
        How models and updates cross the WAN (docs/compression.md); the ClientApp must take part (the
        region ClientApp, or a stock one with the Mod). Default: uncompressed.
    """

    def __init__(self, strategy: Strategy, meter: Meter | None = None, eval_every: int = 1,
                 stop: StopRules | None = None, limits: UpdateLimits | None = None,
                 checkpointer: Checkpointer | None = None, resume: bool = False,
                 reply_timeout: float = 600.0, compression: Codec | None = None) -> None:
        self.inner = strategy
        self.meter = meter or Meter.measured()
        self.book = RunBook(self.meter, eval_every=eval_every, stop=stop, checkpointer=checkpointer, resume=resume)
        self.roster: Roster = getattr(strategy, "roster", None) or Roster()
        self.roster.book = self.book
        self.limits = limits or UpdateLimits()
        self.validator: UpdateValidator | None = None
        self.reply_timeout = reply_timeout
        self._round_messages: list[Message] = []  # the current round's (ids set when Flower pushes them)
        self.round_offset = 0  # rounds done before a resume
        self._round_start = 0.0
        self._bytes_down: dict[int, int] = {}  # node → bytes of this round's download
        self._global: dict | None = None
        self.downlink = Downlink(compression or Codec())  # keyed by node id: FedAvg learns regions from replies

    @property
    def history(self) -> History:
        return self.book.history

    @property
    def stop_reason(self) -> str | None:
        return self.book.stop_reason

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round_start = self.meter.clock.now()
        self._global = arrays.to_torch_state_dict()
        if self.validator is None:
            self.validator = UpdateValidator(self._global, self.limits)
            self.book.count_with(self.validator)
        self._wait_for_regions(grid)
        messages = self.inner.configure_train(server_round + self.round_offset, arrays, config, grid)
        messages = [m for m in messages if m.metadata.dst_node_id not in self.roster.refused
                    and not self.roster.is_quarantined(self.roster.region_of(m.metadata.dst_node_id))]
        if self.downlink.codec.lossy:
            messages = [self._compressed(m, server_round + self.round_offset, arrays) for m in messages]
        self._bytes_down = {m.metadata.dst_node_id: record_bytes(m.content[ARRAYS]) for m in messages}
        self._round_messages = messages
        return messages

    def _compressed(self, msg: Message, server_round: int, arrays: ArrayRecord) -> Message:
        """The round's message to one node, its download the compressed change from the model the node holds."""
        node = msg.metadata.dst_node_id
        down = self.downlink.download(str(node), server_round, arrays)
        order = WorkOrder.from_config(msg.content[CONFIG])
        order.compression, order.base, order.layout = self.downlink.codec.spec(), down.base, down.layout
        order.keep_from = self.downlink.keep_from(str(node), down.base, server_round)
        config = ConfigRecord({**dict(msg.content[CONFIG]), **order.to_config()})
        return Message(RecordDict({ARRAYS: down.payload, CONFIG: config}), dst_node_id=node,
                       message_type=msg.metadata.message_type, group_id=msg.metadata.group_id)

    def _wait_for_regions(self, grid: Grid) -> None:
        """Wait up to `reply_timeout` for the inner strategy's `min_available_nodes`, then go on with fewer."""
        needed = int(getattr(self.inner, "min_available_nodes", 0))
        nodes = wait_for_nodes(grid, needed, self.reply_timeout)
        if len(nodes) >= needed:
            return
        if not nodes:
            raise RuntimeError(f"no region is connected after waiting {self.reply_timeout:g} s; "
                               "restart the SuperNodes and resume the run (resume=<run dir>)")
        gone = sorted({r for n, r in self.roster.named.items() if n not in nodes})
        log.warning("%d of %d regions connected after %g s (gone: %s); the rounds go on with them",
                    len(nodes), needed, self.reply_timeout, ", ".join(gone) or "unknown")
        self.book.event("regions_lost", counter="lost_regions", count=needed - len(nodes), regions=gone,
                        connected=len(nodes))
        self.inner.min_available_nodes = len(nodes)
        self.inner.min_train_nodes = min(int(getattr(self.inner, "min_train_nodes", 0)), len(nodes))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = []
        replies = list(replies)
        self._note_incomplete_round(server_round, replies)
        # region order, not arrival order: the books' and the average's float sums do not depend on it
        for msg in sorted(replies, key=lambda m: (reply_region(m) or "", m.metadata.src_node_id)):
            if msg.has_error():
                accepted.append(msg)  # the inner strategy logs and skips it
                continue
            region = reply_region(msg) or f"node-{msg.metadata.src_node_id}"
            if (why := self.roster.impostor(msg.metadata.src_node_id, region)) is not None:
                if msg.metadata.src_node_id not in self.roster.refused:  # its replies are dropped from now on
                    self.roster.refuse(RegionInfo(msg.metadata.src_node_id, region, None), why)
                continue
            self.roster.learn(msg.metadata.src_node_id, region)
            self.downlink.delivered(str(msg.metadata.src_node_id), server_round + self.round_offset)
            job = self.meter.dispatch(region, bytes_down=self._bytes_down.get(msg.metadata.src_node_id, 0),
                                      at=self._round_start)
            bytes_up = sum(record_bytes(r) for r in msg.content.array_records.values())
            try:
                takes = (MODE_WEIGHTS,) if reply_encoding(msg) == "none" else (MODE_DELTA,)  # compressed: a change
                _, reported = self.validator.check_report(region, msg, one_of_each=True, takes=takes)
            except RejectedUpdate:  # charged its transfer: what it computed on is unknown
                self.meter.complete(job, bytes_up=bytes_up, reported=Reported(samples=0))
                self.roster.reject(msg.metadata.src_node_id, region, self.validator)
                continue
            self.meter.complete(job, bytes_up=bytes_up, reported=reported)
            if not self.roster.is_quarantined(region) and self._valid(region, msg):
                self.book.samples += reported.samples
                accepted.append(msg)
        _alike([m for m in accepted if not m.has_error()])
        return self.inner.aggregate_train(server_round + self.round_offset, accepted)

    def _note_incomplete_round(self, server_round: int, replies: list[Message]) -> None:
        """Count and record the regions whose reply failed or did not come within `reply_timeout`."""
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in self._round_messages}
        replied = {m.metadata.reply_to_message_id for m in replies}
        # an error the SuperLink writes for a vanished node comes from the SuperLink: name the node by the message
        region_of = self.roster.region_of
        failed = {region_of(node_of.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)): m.error.reason
                  for m in replies if m.has_error()}
        missing = sorted(region_of(node) for mid, node in node_of.items() if mid not in replied)
        if not failed and not missing:
            return
        log.warning("round %d: %s", server_round + self.round_offset,
                    "; ".join([f"{r} failed: {why}" for r, why in sorted(failed.items())]
                              + [f"{r}: no reply within {self.reply_timeout:g} s" for r in missing]))
        self.book.event("round_incomplete", counter="failed_replies", count=len(failed) + len(missing),
                        round=server_round + self.round_offset, failed=failed, missing=missing)

    def _valid(self, region: str, msg: Message) -> bool:
        """Check every ArrayRecord of a reply (full weights) against the model; count a rejection.
        A compressed reply (a change) is decoded, checked, and replaced by the weights it arrives at."""
        try:
            encoding = reply_encoding(msg)
            if encoding != "none":
                delta = self.validator.check(region, reply_arrays(msg), MODE_DELTA, codec=self.downlink.codec,
                                             encoding=encoding)
                (name, _), = msg.content.array_records.items()  # one: checked with the metrics
                msg.content[name] = ArrayRecord({k: v - delta[k] for k, v in self._global.items()})
                return True
            for record in msg.content.array_records.values():
                self.validator.check(region, record, MODE_WEIGHTS, base=self._global)
        except RejectedUpdate:
            self.roster.reject(msg.metadata.src_node_id, region, self.validator)
            return False
        return True

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.round_offset, replies)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: EvaluateFn | None = None) -> Result:
        """Flower's round loop, with each round's time, cost and accuracy recorded (and checkpointed)."""
        if ignored := self.limits.changed(SCREEN):
            log.warning("%s does not screen updates (the screen is MA's and ASGD-GA's): it ignores %s. What holds a "
                        "bad region back here is the aggregation rule (Flower's FedMedian, FedTrimmedAvg) and "
                        "validation.max_norm", type(self.inner).__name__, ", ".join(ignored))
        if self.book.resume:
            initial_arrays = self._restore()

        def evaluate_and_record(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            done = server_round + self.round_offset
            if server_round == 0 and self.round_offset:  # a resumed run's start: already recorded
                return None
            self.book.step = done
            res = self.book.record(done, arrays, evaluate_fn, self.book.evaluation_due(done, force=done == num_rounds))
            stopping = self.book.should_stop(None if res is None else res.get("accuracy"))
            if self.book.checkpoint_due(done, force=done == num_rounds or stopping):
                downlink, downlink_models = self.downlink.state_dict()
                self.book.save({"quarantined": sorted(self.roster.quarantined), "downlink": downlink},
                               {"model": arrays.to_torch_state_dict(), "downlink": downlink_models})
                self.downlink.pin()  # a round's end: nothing in flight
            if stopping:
                raise _StopRuleFired(arrays)
            return res

        try:
            return super().start(PromptReplies(grid), initial_arrays, num_rounds=num_rounds - self.round_offset,
                                 timeout=min(timeout, self.reply_timeout),
                                 train_config=train_config, evaluate_config=evaluate_config,
                                 evaluate_fn=evaluate_and_record)
        except _StopRuleFired as stopped:
            log.info("%s after round %d", self.book.stop_reason, self.book.step)
            return self.book.result(stopped.arrays)

    def _restore(self) -> ArrayRecord:
        meta, tensors = self.book.load()
        self.round_offset = self.book.step
        self.roster.restore_quarantine(meta["quarantined"])
        self.downlink.load_state_dict(meta["downlink"], tensors["downlink"])
        return ArrayRecord(tensors["model"])
