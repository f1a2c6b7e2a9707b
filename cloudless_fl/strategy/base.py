"""What ASGD-GA and MA share: region discovery, metering, evaluation, stop rules.

Both drive Flower's `Grid` themselves (push/pull, no round barrier imposed by
Flower) and keep the same books: a `Meter` for time and money, a `History` for
results.json, and per-region positions in the resident-data stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..training import protocol
from ..checkpoint import Checkpointer
from ..control.costmodel import JobTiming
from ..errors import ConfigError
from ..control.meter import Job, Meter, record_bytes
from ..reporting.results import History
from ..control.scheduler import Plan, Scheduler
from .validation import RejectedUpdate, UpdateLimits, UpdateValidator
from .regions import RegionInfo, data_shares, discover_regions, query_messages, read_query_reply
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
    order: protocol.WorkOrder
    arrays: ArrayRecord  # the model it was sent: a checkpoint re-sends it on resume
    sent_at: float = field(default_factory=time.monotonic)  # real time, for reply timeouts

    def state_dict(self) -> dict[str, Any]:
        job = asdict(self.job)
        return {"region": self.region, "version": self.version, "order": dict(self.order.to_config()), "job": job}


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
    scheduler : Scheduler, optional
        The elastic scheduler: its plan sets each region's workers and local work
        (replacing the configured local work) and it re-plans every `replan_every`
        versions/periods from what the jobs measured; lost regions are excluded and
        re-admitted when they rejoin.
    replan_every : int
        Versions (ASGD-GA) or periods (MA) between re-plans.
    rejoin_every : int
        Versions/periods between looks for nodes the run does not know: a
        restarted SuperNode, or a lost one that answers again. They are asked who
        they are without waiting for the answer; a region of the run that answers
        is admitted and gets work (a new node of a region still in the run
        replaces that region's old node, whose job is lost).
    limits : UpdateLimits, optional
        What makes an update bad (beyond not matching the model, or NaN/Inf) and
        when a region sending them is quarantined.
    checkpointer : Checkpointer, optional
        Write the run's state every `checkpointer.every` versions/periods and at the end.
    resume : bool
        Continue from `checkpointer`'s checkpoint instead of starting afresh.
    """

    def __init__(self, *, meter: Meter | None = None, eval_every: int = 1, stop: StopRules | None = None,
                 reply_timeout: float = 600.0, scheduler: Scheduler | None = None, replan_every: int = 5,
                 rejoin_every: int = 5, limits: UpdateLimits | None = None, checkpointer: Checkpointer | None = None,
                 resume: bool = False) -> None:
        if resume and checkpointer is None:
            raise ValueError("resume=True needs a checkpointer that says where the checkpoint is")
        self.meter = meter or Meter.measured()
        self.eval_every = max(1, int(eval_every))
        self.stop = stop or StopRules()
        self.reply_timeout = reply_timeout
        self.scheduler = scheduler
        self.replan_every = max(1, int(replan_every))
        self.rejoin_every = max(1, int(rejoin_every))
        self._asking: dict[str, int] = {}  # query message id → node not (yet) in the run
        self._refused: set[int] = set()  # nodes that cannot take part: never asked again
        self._looked_at = -1  # the step of the last look for new nodes
        self.planned_steps: dict[str, int] | None = None
        self.limits = limits or UpdateLimits()
        self.validator: UpdateValidator | None = None
        self.quarantined: set[int] = set()
        self._quarantined_regions: dict[int, str] = {}
        self.checkpointer = checkpointer
        self.resume = resume
        self.step = 0  # versions (ASGD-GA) or periods (MA) done
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
               evaluate_fn: EvaluateFn | None, **optimizer: Any) -> tuple[ConfigRecord, ArrayRecord]:
        """Start of every run: log the settings, find the regions, set up the server optimizer, then
        either evaluate the initial model or restore a checkpoint. Returns the config every job
        carries and the model to go on from."""
        config = train_config or ConfigRecord()
        self.summary()
        self._join(grid, config)
        self.optimizer = ServerOptimizer.from_arrays(initial_arrays, **optimizer)
        self.validator = UpdateValidator(self.optimizer.state, self.limits)
        self.history.rejections = self.validator.rejections
        if self.resume:
            self._restore(grid, config)
            return config, self.optimizer.arrays()
        if self.scheduler is not None:
            self._start_plan(initial_arrays)
        self._evaluate(0, initial_arrays, evaluate_fn, force=True)
        return config, initial_arrays

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, force: bool = False) -> None:
        """Write the run's state if one is due (or `force`): model, momentum, books, plan, jobs in flight."""
        if self.checkpointer is None or not (force or self.checkpointer.due(self.step)):
            return
        sent = {}
        for flight in self._inflight.values():
            sent.setdefault(str(flight.version), flight.arrays.to_torch_state_dict())
        meta = {"step": self.step, "samples": self.samples, "offsets": self.offsets, "shares": self.shares,
                "meter": self.meter.state_dict(), "history": self.history.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "planned_steps": self.planned_steps,
                "quarantined": sorted({self._quarantined_regions[n] for n in self.quarantined}),
                "inflight": [f.state_dict() for f in self._inflight.values()], **self._extra_state()}
        self.checkpointer.save(meta, {"optimizer": self.optimizer.state_dict(), "sent": sent})

    def _extra_state(self) -> dict[str, Any]:
        """A subclass's own JSON-able state for the checkpoint."""
        return {}

    def _load_extra_state(self, meta: dict[str, Any]) -> None:
        """Restore what `_extra_state` saved."""

    def _restore(self, grid: Grid, config: ConfigRecord) -> None:
        """Continue from the checkpoint: same model, momentum, books and plan; jobs in flight re-sent."""
        meta, tensors = self.checkpointer.load()
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.step, self.samples = int(meta["step"]), int(meta["samples"])
        self.offsets.update(meta["offsets"])
        self.shares = dict(meta["shares"])
        self.meter.load_state_dict(meta["meter"])
        self.history.load_state_dict(meta["history"])
        if self.scheduler is not None and meta["scheduler"] is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
        self.planned_steps = meta["planned_steps"]
        by_name = {info.name: node for node, info in self.regions.items()}
        for region in meta["quarantined"]:
            if region in by_name:
                self.quarantined.add(by_name[region])
                self._quarantined_regions[by_name[region]] = region
                self.regions.pop(by_name[region])
        for saved in meta["inflight"]:
            node = by_name.get(saved["region"])
            if node is None or node not in self.regions:
                continue  # its region did not come back: the job is lost with it
            arrays = ArrayRecord(tensors["sent"][str(saved["version"])])
            order = protocol.WorkOrder.from_config(ConfigRecord(saved["order"]))
            job_fields = dict(saved["job"])
            timing = job_fields.pop("timing")
            job = Job(**job_fields, timing=None if timing is None else JobTiming(**timing))
            [mid] = grid.push_messages([self._train_message(node, arrays, config, order)])
            self._inflight[mid] = InFlight(node, saved["region"], int(saved["version"]), job, order, arrays)
        self._load_extra_state(meta)
        self.history.event("resumed", self.meter.clock.now(), step=self.step)
        log.info("resumed from %s at step %d (t=%.1f s)", self.checkpointer.path, self.step, self.meter.clock.now())

    def _join(self, grid: Grid, train_config: ConfigRecord) -> None:
        """Find out which node is which region (once, before training)."""
        nodes = list(grid.get_node_ids())
        found, failed = discover_regions(grid, nodes, train_config, timeout=self.reply_timeout)
        self._refused.update(failed)
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
        node_ids = [n for n in node_ids if n in self.regions]  # lost or quarantined since: no work
        if self.planned_steps is not None:
            steps = self.planned_steps
            node_ids = [n for n in node_ids if self.regions[n].name in steps]  # the plan may leave regions out
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
            self._inflight[mid] = InFlight(node_id, region, version, job, order, arrays)

    def _complete(self, flight: InFlight, reply: Message, mode: str) -> tuple[dict | None, MetricRecord]:
        """Meter a successful reply; return its validated tensors (None if rejected) and metrics.

        A rejected update was still computed and moved, so it is charged; it never
        reaches the model, and its region is quarantined once it has sent too many.
        """
        arrays = reply.content[protocol.ARRAYS]
        metrics = reply.content[protocol.METRICS]
        bytes_up = record_bytes(arrays)
        samples = int(metrics.get("num-examples", 0))
        compute_s, transfer_s = self.meter.complete(flight.job, bytes_up=bytes_up, samples=samples,
                                                    compute_s=float(metrics.get("compute-seconds", 0.0)))
        try:
            tensors = self.validator.check(flight.region, arrays, mode, base=self.optimizer.state)
        except RejectedUpdate:
            self.history.counters["rejected_updates"] += 1
            if self.validator.quarantined(flight.region):
                self._quarantine(flight)
            return None, metrics
        self.samples += samples
        if self.scheduler is not None:
            self.scheduler.observe(flight.region, samples=samples, compute_s=compute_s,
                                   workers=self.meter.workers(flight.region),
                                   nbytes=flight.job.bytes_down + bytes_up, transfer_s=transfer_s)
        return tensors, metrics

    def _quarantine(self, flight: InFlight) -> None:
        log.warning("region %s quarantined after %d bad updates; it gets no more work", flight.region,
                    sum(self.validator.rejections[flight.region].values()))
        self.quarantined.add(flight.node_id)
        self._quarantined_regions[flight.node_id] = flight.region
        self.history.counters["quarantined_regions"] += 1
        self.history.event("region_quarantined", self.meter.clock.now(), region=flight.region)
        self._drop_region(flight.node_id, flight.region)

    def _lose(self, flight: InFlight, reason: str) -> None:
        """A node that errs or times out leaves the loop; the run goes on."""
        log.warning("region %s (node %s) lost: %s", flight.region, flight.node_id, reason)
        self.history.counters["lost_regions"] += 1
        self.history.event("region_lost", self.meter.clock.now(), region=flight.region, reason=reason)
        self._drop_region(flight.node_id, flight.region)

    def _drop_region(self, node_id: int, region: str) -> None:
        self.regions.pop(node_id, None)
        if self.scheduler is not None and region not in {info.name for info in self.regions.values()}:
            self.scheduler.exclude(region)
            self._adopt(self.scheduler.replan(self.meter.clock.now()))

    # ------------------------------------------------------------------ the elastic scheduler
    def _start_plan(self, arrays: ArrayRecord) -> None:
        """Plan for the regions that joined: their resident data sizes and the model's size."""
        names = {info.name for info in self.regions.values()}
        unknown = names - set(self.scheduler.topology.region_names)
        if unknown:
            raise ConfigError(f"the scheduler's topology has no region(s) {', '.join(sorted(unknown))}; "
                              "name each SuperNode's region (node-config region='...') after the topology")
        sizes = {info.name: info.examples if info.examples is not None else 1 for info in self.regions.values()}
        self.scheduler.set_workload(data_sizes=sizes, model_bytes=record_bytes(arrays))
        for name in set(self.scheduler.topology.region_names) - names:
            self.scheduler.exclude(name)
        self._adopt(self.scheduler.start(self.meter.clock.now()))

    def _adopt(self, plan: Plan | None) -> None:
        """Rent the plan's workers from now on and use its local work."""
        if plan is None:
            return
        now = self.meter.clock.now()
        if self.meter.ledger is not None:
            for name, decision in plan.regions.items():
                self.meter.ledger.set_workers(name, decision.workers, at=now)
        self.planned_steps = plan.local_steps()
        change = self.scheduler.changes[-1]
        self.history.event("plan", now, reason=change["reason"], plan=change["plan"])

    def _replan(self, step: int) -> None:
        """Every `replan_every` steps: re-plan from what the jobs measured."""
        if self.scheduler is not None and step % self.replan_every == 0:
            self._adopt(self.scheduler.replan(self.meter.clock.now()))

    # ------------------------------------------------------------------ nodes that (re)join
    def _newcomers(self, grid: Grid, config: ConfigRecord, step: int) -> list[int]:
        """Nodes admitted now, so the caller can give them work.

        Every `rejoin_every` steps the nodes the run does not know are asked who
        they are; answers are read on every call, so nothing waits for a slow one.
        """
        if step % self.rejoin_every == 0 and step != self._looked_at:
            self._looked_at = step
            asked = set(self._asking.values())
            unknown = [n for n in grid.get_node_ids()
                       if n not in self.regions and n not in self.quarantined and n not in self._refused
                       and n not in asked]
            if unknown:
                self._asking.update(zip(grid.push_messages(query_messages(unknown, config)), unknown))
        if not self._asking:
            return []
        admitted = []
        for reply in grid.pull_messages(list(self._asking)):
            node = self._asking.pop(reply.metadata.reply_to_message_id)
            answer = read_query_reply(reply)
            if isinstance(answer, RegionInfo) and self._admit(answer):
                admitted.append(node)
            elif not isinstance(answer, RegionInfo):
                self._refused.add(node)
        return admitted

    def _admit(self, info: RegionInfo) -> bool:
        """Take a (re)joining node into the run; a region not in it at the start, or quarantined, is refused."""
        refusal = ("was not in this run at its start" if info.name not in self.shares
                   else "is quarantined" if info.name in self._quarantined_regions.values() else None)
        if refusal is not None:
            log.warning("node %s is region %s, which %s: not admitted", info.node_id, info.name, refusal)
            self._refused.add(info.node_id)
            return False
        for old, known in list(self.regions.items()):
            if known.name == info.name:  # the region's SuperNode restarted under a new node id
                self._refused.add(old)
                self._retire(old, f"replaced by node {info.node_id}")
        self.regions[info.node_id] = info
        self.offsets.setdefault(info.name, 0)
        now = self.meter.clock.now()
        log.info("region %s (node %s) joins the run", info.name, info.node_id)
        self.history.counters["rejoined_regions"] += 1
        self.history.event("region_back", now, region=info.name, node=info.node_id)
        if self.scheduler is not None:
            self.scheduler.readmit(info.name)
            self._adopt(self.scheduler.replan(now))
        return True

    def _retire(self, node_id: int, reason: str) -> None:
        """A node leaves the run: lost with its job if it has one in flight, else simply forgotten."""
        flights = [k for k, f in self._inflight.items() if f.node_id == node_id]
        for key in flights:
            self._lose(self._inflight.pop(key), reason)
        if not flights:
            self.regions.pop(node_id, None)

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
