"""What ASGD-GA and MA share: region discovery, metering, evaluation, stop rules.

Both drive Flower's `Grid` themselves (push/pull, no round barrier imposed by
Flower) and keep the same books: a `Meter` for time and money, a `History` for
results.json, and per-region positions in the resident-data stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from .. import protocol
from ..meter import Job, Meter, record_bytes
from ..results import History
from .regions import RegionInfo, data_shares, discover_regions
from .server_optimizer import ServerOptimizer

log = logging.getLogger("cloudless_fl")
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class StopRules:
    """Whichever comes first ends the run."""

    max_time_s: float | None = None
    max_cost_usd: float | None = None  # instance billing
    target_accuracy: float | None = None

    def reason(self, figures: dict, accuracy: float | None) -> str | None:
        if self.max_time_s is not None and figures["time_s"] >= self.max_time_s:
            return f"time budget {self.max_time_s:g} s reached"
        cost = figures.get("cost_usd")
        if self.max_cost_usd is not None and cost and cost["instance"] >= self.max_cost_usd:
            return f"cost budget ${self.max_cost_usd:g} reached"
        if self.target_accuracy is not None and accuracy is not None and accuracy >= self.target_accuracy:
            return f"target accuracy {self.target_accuracy:g} reached"
        return None


@dataclass
class InFlight:
    """A train message on its way: to whom, from which model version, how it is metered."""

    node_id: int
    region: str
    version: int
    job: Job
    sent_at: float = field(default_factory=time.monotonic)  # real time, for reply timeouts


class GeoStrategy(Strategy):
    """Base for strategies that run their own event loop over the Grid.

    Parameters
    ----------
    meter : Meter, optional
        Clock + cost model. Default: wall clock, no prices (plain Flower projects).
    eval_every : int
        Central evaluation every k model versions (rounds for MA).
    stop : StopRules, optional
        Time / cost budget and target accuracy.
    reply_timeout : float
        Seconds (real time) to wait for a reply before the node counts as lost.
    """

    def __init__(self, *, meter: Meter | None = None, eval_every: int = 1, stop: StopRules | None = None,
                 reply_timeout: float = 600.0) -> None:
        self.meter = meter or Meter.measured()
        self.eval_every = max(1, int(eval_every))
        self.stop = stop or StopRules()
        self.reply_timeout = reply_timeout
        self.history = History()
        self.samples = 0
        self.regions: dict[int, RegionInfo] = {}
        self.shares: dict[str, float] = {}
        self.offsets: dict[str, int] = {}
        self.stop_reason: str | None = None
        self._inflight: dict[str, InFlight] = {}  # message id → job on its way
        self.optimizer: ServerOptimizer | None = None

    # Flower's Strategy interface: the loop in start() drives these per node/update.
    def summary(self) -> None:
        log.info("%s: %s", type(self).__name__, self.describe())

    def describe(self) -> str:
        return ""

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the coordinator evaluates centrally (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ shared machinery
    def _begin(self, grid: Grid, train_config: ConfigRecord | None, initial_arrays: ArrayRecord,
               evaluate_fn: EvaluateFn | None, **optimizer: Any) -> ConfigRecord:
        """Start of every run: log the settings, find the regions, set up the server optimizer,
        evaluate the initial model. Returns the config every job carries."""
        config = train_config or ConfigRecord()
        self.summary()
        self._join(grid, config)
        self.optimizer = ServerOptimizer.from_arrays(initial_arrays, **optimizer)
        self._evaluate(0, initial_arrays, evaluate_fn, force=True)
        return config

    def _join(self, grid: Grid, train_config: ConfigRecord) -> None:
        """Find out which node is which region (once, before training)."""
        nodes = list(grid.get_node_ids())
        found, failed = discover_regions(grid, nodes, train_config, timeout=self.reply_timeout)
        for node, reason in failed.items():
            log.warning("node %s cannot take part: %s", node, reason)
            self.history.counters["lost_regions"] += 1
            self.history.event("region_failed", self.meter.clock.now(), node=node, reason=reason)
        if not found:
            raise RuntimeError("no region could take part; see the warnings above")
        self.regions = found
        self.shares = data_shares(found.values())
        for info in found.values():
            self.offsets.setdefault(info.name, 0)

    def _train_message(self, node_id: int, arrays: ArrayRecord, config: ConfigRecord,
                       order: protocol.WorkOrder) -> Message:
        content = ConfigRecord({**dict(config), **order.to_config()})
        return Message(RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: content}), dst_node_id=node_id,
                       message_type=MessageType.TRAIN)

    def _send_jobs(self, grid: Grid, node_ids: Iterable[int], arrays: ArrayRecord, config: ConfigRecord, *,
                   steps: int | Mapping[str, int], lr: float, mode: str, batch_size: int, version: int) -> None:
        """Send each node a job of its region's `steps` mini-batches, metered from now.

        The region's stream offset advances by the samples the job will use, so
        successive jobs walk through its data.
        """
        nbytes = record_bytes(arrays)
        for node_id in sorted(node_ids):
            region = self.regions[node_id].name
            count = per_region(steps, region)
            samples = count * batch_size
            order = protocol.WorkOrder(lr=lr, batch_size=batch_size, steps=count, mode=mode,
                                       data_seed=int(config.get("data-seed", 0)), offset=self.offsets[region],
                                       version=version)
            self.offsets[region] += samples
            job = self.meter.dispatch(region, bytes_down=nbytes, samples=samples)
            [mid] = grid.push_messages([self._train_message(node_id, arrays, config, order)])
            self._inflight[mid] = InFlight(node_id, region, version, job)

    def _complete(self, flight: InFlight, reply: Message) -> tuple[ArrayRecord, MetricRecord]:
        """Meter a successful reply and return its arrays and metrics."""
        arrays = reply.content[protocol.ARRAYS]
        metrics = reply.content[protocol.METRICS]
        self.meter.complete(flight.job, bytes_up=record_bytes(arrays), samples=int(metrics["num-examples"]),
                            compute_s=float(metrics.get("compute-seconds", 0.0)))
        self.samples += int(metrics["num-examples"])
        return arrays, metrics

    def _lose(self, flight: InFlight, reason: str) -> None:
        """A node that errs or times out leaves the loop; the run goes on."""
        log.warning("region %s (node %s) lost: %s", flight.region, flight.node_id, reason)
        self.history.counters["lost_regions"] += 1
        self.history.event("region_lost", self.meter.clock.now(), region=flight.region, reason=reason)
        self.regions.pop(flight.node_id, None)

    def _evaluate(self, version: int, arrays: ArrayRecord, evaluate_fn: EvaluateFn | None,
                  force: bool = False) -> float | None:
        """Record a history entry; evaluate centrally when due. Returns the accuracy if evaluated."""
        due = force or version % self.eval_every == 0
        res = evaluate_fn(version, arrays) if evaluate_fn and due else None
        accuracy = None if res is None else res.get("accuracy")
        self.history.record(version, self.meter.figures(), self.samples, accuracy=accuracy,
                            loss=None if res is None else res.get("loss"))
        return accuracy

    def _should_stop(self, accuracy: float | None) -> bool:
        if self.stop_reason is None:
            self.stop_reason = self.stop.reason(self.meter.figures(), accuracy)
        return self.stop_reason is not None

    def _result(self, arrays: ArrayRecord) -> Result:
        result = Result()
        result.arrays = arrays
        for entry in self.history.entries:
            if entry["accuracy"] is not None:
                metrics = {k: entry[k] for k in ("accuracy", "loss") if entry[k] is not None}
                result.evaluate_metrics_serverapp[entry["version"]] = MetricRecord(metrics)
        return result


def per_region(value: int | Mapping[str, int], region: str) -> int:
    """A setting given once for all regions or per region name."""
    if isinstance(value, Mapping):
        if region not in value:
            raise KeyError(f"no value for region {region!r} in {dict(value)}")
        return int(value[region])
    return int(value)
