"""What ASGD-GA and MA share: a Flower `Strategy` whose `start()` runs its own loop over the Grid.

The base is thin; the work is done by small collaborators each strategy owns:

- `RunBook` (runbook.py): history, counters, stop rules, evaluation, checkpoint books;
- `Roster` (membership.py): which node is which region, who is lost, back, quarantined;
- `InFlightJobs` (inflight.py): the jobs `configure_train` built, pushed, awaited, timed out;
- `PlanFollower` (planning.py): the elastic scheduler's plan (workers, local work, re-plans);
- `UpdateValidator` (validation.py) and `ServerOptimizer` (server_optimizer.py).

As in Flower, `configure_train` returns the messages and `start()` pushes them.
"""

from __future__ import annotations

import json
import logging
from abc import abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from ..checkpoint import Checkpointer
from ..control.jobs import Reported
from ..control.meter import Meter, record_bytes
from ..control.scheduler import Scheduler
from ..errors import ConfigError
from ..reporting.results import History
from ..training import protocol
from ..training.compression import Codec, Int8, wire_bytes
from .cooldown import cooldown_factor
from .downlink import Downlink
from .inflight import InFlight, InFlightJobs, await_replies
from .membership import RegionInfo, Roster, data_sizes, read_answers, wait_for_nodes
from .planning import REPLAN_EVERY, PlanFollower
from .runbook import EvaluateFn, RunBook, StopRules
from .server_optimizer import ServerOptimizer
from .screen import Candidate, UpdateScreen
from .validation import AUTO, PER_REGION_SCREEN, RejectedUpdate, UpdateLimits, UpdateValidator

log = logging.getLogger("cloudless_fl")

NO_REGION_LEFT = "no region left"  # the stop reason of a run whose every region was lost or quarantined
ROLL_CALLS = ("query", "first_jobs")  # how nodes are asked who they are at start-up (GeoStrategy's roll_call)

__all__ = ["EvaluateFn", "GeoStrategy", "StopRules", "per_region"]


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
        Seconds (real time) to wait for a reply before the node counts as lost
        (`start(timeout=...)` lowers it, as in Flower).
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
    query_regions : bool, optional
        Ask each node its region and resident data size with a `query` message
        (the region ClientApp answers). Default: only when `meter` knows a
        topology. Without it (a plain Flower project) nodes are `node-<id>` with
        equal data shares, stock ClientApps never see a message they cannot
        handle, and no node joins later.
    roll_call : "query" | "first_jobs"
        How the nodes are asked who they are at start-up (with `query_regions`): a `query` to every node,
        answered before the first jobs go out; or `first_jobs`: the first jobs go out at once, each
        message carrying every region's work order (the node takes its region's row), and their replies
        name the nodes — one message trip less, which in Flower 1.42 deployment is a ClientApp process
        start (7–9 s measured). Needs the region ClientApp (a stock one cannot read the table, even with
        the Mod) and a topology; a run resuming a checkpoint asks by query. With a scheduler, whose plan
        needs every region's data, the first jobs are the strategy's own (as unscheduled) and the first
        plan (from the profiles, as at the start) is adopted when the first step ends; with `query`,
        before the first jobs.
    min_available_nodes : int
        Wait (up to `reply_timeout`) for this many SuperNodes before starting.
    average_decay : float, optional
        Evaluate and return an exponential moving average of the model versions with this decay per
        version/period (server_optimizer.py) instead of the last version; None: the last version.
    compression : Codec, optional
        How models and updates cross the WAN (training/compression.py): downloads become the compressed
        change from the model a region holds (downlink.py), uploads the compressed change with error
        feedback at the region. Default: uncompressed.
    lr_cooldown : float, optional
        Over this last share of the time or cost budget (`stop`), the step size that moves the model
        falls linearly to zero (cooldown.py): the regions' local SGD rate, or in gradient mode the
        server's. None: constant (also when `stop` sets no time or cost budget).
    """

    # Updates are comparable across regions and with each region's previous one (synchronous periods from one
    # model): screen.py's recent-median length and agreement checks apply. Otherwise (asynchronous) its
    # per-region length bound and clip do.
    comparable_updates = True
    default_relatedness: float | None = None  # what `min_relatedness="auto"` means for this strategy

    def __init__(self, *, meter: Meter | None = None, eval_every: int = 1, stop: StopRules | None = None,
                 reply_timeout: float = 600.0, scheduler: Scheduler | None = None, replan_every: int = REPLAN_EVERY,
                 rejoin_every: int = 5, limits: UpdateLimits | None = None, checkpointer: Checkpointer | None = None,
                 resume: bool = False, query_regions: bool | None = None, roll_call: str = "query",
                 min_available_nodes: int = 1, average_decay: float | None = None,
                 compression: Codec | None = None, lr_cooldown: float | None = None) -> None:
        if roll_call not in ROLL_CALLS:
            raise ValueError(f"roll_call must be one of {', '.join(ROLL_CALLS)}, got {roll_call!r}")
        self.roll_call = roll_call
        self.meter = meter or Meter.measured()
        self.downlink = Downlink(compression or Codec())
        self.average_decay = average_decay
        if lr_cooldown is not None and not 0.0 <= lr_cooldown <= 1.0:
            raise ValueError(f"lr_cooldown must be a share of the budget in [0, 1], got {lr_cooldown}")
        self.lr_cooldown = lr_cooldown
        self.query_regions = self.meter.cost_model is not None if query_regions is None else query_regions
        self.min_available_nodes = max(1, int(min_available_nodes))
        self.book = RunBook(self.meter, eval_every=eval_every, stop=stop, checkpointer=checkpointer, resume=resume)
        self.roster = Roster(self.book)
        self.jobs = InFlightJobs(reply_timeout)
        self.plan = PlanFollower(scheduler, self.meter, self.book, replan_every) if scheduler is not None else None
        self.rejoin_every = max(1, int(rejoin_every))
        self.limits = limits or UpdateLimits()
        self.validator: UpdateValidator | None = None
        self.offsets: dict[str, int] = {}  # each region's position in its resident-data stream
        self.optimizer: ServerOptimizer | None = None

    @property
    def history(self) -> History:
        return self.book.history

    @property
    def step(self) -> int:
        """Versions (ASGD-GA) or periods (MA) done."""
        return self.book.step

    @step.setter
    def step(self, value: int) -> None:
        self.book.step = value

    @property
    def stop_reason(self) -> str | None:
        return self.book.stop_reason

    # Flower's Strategy interface: the loop in start() drives these per node/update.
    def summary(self) -> None:
        log.info("%s: %s", type(self).__name__, self.describe())

    @abstractmethod
    def describe(self) -> str:
        """The strategy's settings, for the line `summary` logs at the start of a run."""

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the coordinator evaluates centrally (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ start of a run
    def _begin(self, grid: Grid, train_config: ConfigRecord | None, initial_arrays: ArrayRecord,
               evaluate_fn: EvaluateFn | None, timeout: float, first_round: int,
               **optimizer: Any) -> tuple[ConfigRecord, ArrayRecord]:
        """Start of every run: log the settings, find the regions, set up the server optimizer, then
        either evaluate the initial model or restore a checkpoint. Returns the config every job
        carries and the model to go on from. With `roll_call="first_jobs"` the jobs of `first_round`
        are in flight (and answered) when it returns."""
        config = train_config or ConfigRecord()
        self.jobs.reply_timeout = min(self.jobs.reply_timeout, timeout)
        self.summary()
        nodes = wait_for_nodes(grid, self.min_available_nodes, self.jobs.reply_timeout)
        first_jobs = None
        if (self.query_regions and self.roll_call == "first_jobs" and not self.book.resume
                and self.meter.cost_model is not None):
            first_jobs = self._send_first_jobs(grid, nodes, initial_arrays, config, first_round)
        elif self.query_regions:
            self.roster.discover(grid, nodes, config, timeout=self.jobs.reply_timeout)
            self.meter.roll_call(info.name for info in self.roster.live.values())
        else:
            self.roster.take_unasked(nodes)
            log.info("%d nodes named node-<id> with equal data shares (not asked their region: "
                     "query_regions=False)", len(nodes))
        for info in self.roster.live.values():
            self.offsets.setdefault(info.name, 0)
        self.optimizer = ServerOptimizer.from_arrays(initial_arrays, average_decay=self.average_decay, **optimizer)
        self.validator = UpdateValidator(self.optimizer.state, self.limits)
        comparable, factor = self.comparable_updates, self.limits.norm_factor
        if comparable and (ignored := self.limits.changed(PER_REGION_SCREEN)):
            log.warning("%s ignores %s: ASGD-GA's per-region screen settings (its updates are compared across "
                        "regions and with each region's previous one: validation.norm_factor, min_agreement)",
                        type(self).__name__, ", ".join(ignored))
        # a sparsified update is a different slice of the region's change each time: unlike its last by design
        agreement = self.limits.min_agreement if comparable and not self.downlink.codec.sparse else None
        self.screen = UpdateScreen(factor, agreement, model_bound=factor is not None, per_region=not comparable,
                                   clip_factor=None if comparable else self.limits.clip_factor,
                                   min_relatedness=None if comparable else self._min_relatedness(),
                                   tolerate_once=comparable,
                                   share_budget=None if comparable else self.limits.share_budget)
        self.book.count_with(self.validator)
        if self.book.resume:
            self._restore(grid, config)
            return config, self.optimizer.arrays()
        if self.plan is not None and first_jobs is None:
            self.plan.start(*self._workload(initial_arrays))
        self._evaluate(0, initial_arrays, evaluate_fn, force=True)
        if first_jobs is not None:
            self._take_first_replies(grid, *first_jobs)
            if self.plan is not None:  # the data sizes the plan needs are known now; it is adopted after this step
                self.plan.prepare(*self._workload(initial_arrays))
        return config, initial_arrays

    def _workload(self, arrays: ArrayRecord) -> tuple[dict[str, int], int, dict[str, int]]:
        """What the scheduler plans for: the live regions' resident data, the model's wire size and the
        most workers each region's SuperNode said it starts (`data_sizes`: equal where one is unknown)."""
        live = self.roster.live.values()
        caps = {i.name: i.workers_max for i in live if i.workers_max is not None}
        return data_sizes(live), wire_bytes(self.downlink.codec, protocol.decode_tensors(arrays)), caps

    def _send_first_jobs(self, grid: Grid, nodes: list[int], arrays: ArrayRecord, config: ConfigRecord,
                         first_round: int) -> tuple[dict[str, int], dict[str, InFlight]]:
        """The roll call folded into the first jobs: `configure_train` builds the first job of every
        topology region (for a stand-in node each: nobody is named yet) and every node gets one message
        with all their work orders (`protocol.PER_REGION`) and the model — a region's first download is the
        whole model, the same for all (downlink.py). Returns message key → node and region → its job."""
        regions = self.meter.cost_model.topology.region_names
        self.roster.live = {-(i + 1): RegionInfo(-(i + 1), name, None) for i, name in enumerate(regions)}
        for name in regions:
            self.offsets.setdefault(name, 0)
        staged = self.jobs.unstage(self.configure_train(first_round, arrays, config, grid))
        self.roster.live = {}
        flights = {flight.region: flight for flight in staged}
        table = json.dumps({region: flight.order.to_config() for region, flight in flights.items()})
        content = ConfigRecord({**dict(config), protocol.PER_REGION: table})
        payload = staged[0].payload
        messages = [Message(RecordDict({protocol.ARRAYS: payload, protocol.CONFIG: content}), dst_node_id=node,
                            message_type=MessageType.TRAIN) for node in nodes]
        return dict(zip(grid.push_messages(messages), nodes)), flights

    def _take_first_replies(self, grid: Grid, asked: dict[str, int], flights: dict[str, InFlight]) -> None:
        """Await the first jobs' replies; they name the run's regions (as the roll call's would), and each
        region's first job becomes its node's, answered. A region no node answered for is charged nothing
        and keeps no stream position or download; a second node of one region takes part from its next
        job (its first reply is not used)."""
        replies = await_replies(grid, asked, self.jobs.reply_timeout)
        self.roster.settle(*read_answers(asked, replies))
        nodes = {node: key for key, node in asked.items()}
        for node, info in sorted(self.roster.live.items()):
            flight = flights.pop(info.name, None)
            if flight is not None:
                flight.node_id = node
                self.jobs.adopt(nodes[node], flight, replies[nodes[node]])
        for region in flights:  # no node of it answered: as if it had never been planned
            del self.offsets[region]
            self.downlink.forget(region)

    # ------------------------------------------------------------------ jobs
    def _train_message(self, node_id: int, arrays: ArrayRecord, config: ConfigRecord,
                       order: protocol.WorkOrder, correction: ArrayRecord | None = None) -> Message:
        content = RecordDict({protocol.ARRAYS: arrays,
                              protocol.CONFIG: ConfigRecord({**dict(config), **order.to_config()})})
        if correction is not None:
            content[protocol.CORRECTION] = correction
        return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN)

    def _cooldown_setting(self) -> str:
        """The cooldown as the start-of-run line names it ("" without one)."""
        return "" if not self.lr_cooldown else f", lr cooldown over the budget's last {self.lr_cooldown:.0%}"

    def _cooldown(self) -> float:
        """The step size's share of its configured value now (1 until `lr_cooldown` of the budget is left)."""
        if not self.lr_cooldown:  # no cooldown: nothing to measure (this runs for every job)
            return 1.0
        return cooldown_factor(self.book.stop.spent(self.meter.figures()), self.lr_cooldown)

    def _job_messages(self, node_ids: Iterable[int], arrays: ArrayRecord, config: ConfigRecord, *,
                      steps: int | Mapping[str, int], lr: float, mode: str, batch_size: int,
                      version: int) -> list[Message]:
        """A job of its region's `steps` mini-batches for each node, metered from now.

        The region's stream offset advances by the samples the job will use, so
        successive jobs walk through its data. The plan's local work, if any,
        replaces `steps` (and may leave regions out).
        """
        node_ids = [n for n in node_ids if n in self.roster.live]  # lost or quarantined since: no work
        if mode != protocol.MODE_GRADIENT:  # a gradient is taken at the sent weights: no local rate to cool
            lr *= self._cooldown()
        if self.plan is not None and self.plan.steps is not None:
            steps = self.plan.steps
            node_ids = [n for n in node_ids if self.roster.live[n].name in steps]
        messages = []
        for node_id in sorted(node_ids):
            region = self.roster.live[node_id].name
            count = per_region(steps, region)
            samples = count * batch_size
            key = self.offsets[region]
            down = self.downlink.download(region, key, arrays)
            order = protocol.WorkOrder(lr=lr, batch_size=batch_size, steps=count, mode=mode,
                                       data_seed=int(config.get("data-seed", 0)), offset=key,
                                       version=version, workers=self.meter.workers(region),
                                       compression=self.downlink.codec.spec(), base=down.base, layout=down.layout,
                                       keep_from=self.downlink.keep_from(region, down.base, key))
            order = self._amend_order(region, order)
            correction = self._drift_correction(region)
            if correction is not None:
                order = replace(order, drift_encoding=self.drift_codec.spec())
                correction = self.drift_codec.encode(correction)
            self.offsets[region] += samples
            job = self.meter.dispatch(region, samples=samples, bytes_down=record_bytes(down.payload) + (
                0 if correction is None else record_bytes(correction)))
            message = self._train_message(node_id, down.payload, config, order, correction)
            messages.append(self.jobs.stage(message, InFlight(node_id, region, version, job, order, arrays,
                                                              down.payload, correction)))
        return messages

    def _complete(self, flight: InFlight, reply: Message, mode: str) -> tuple[dict | None, MetricRecord]:
        """Meter a successful reply; return its validated update in `mode` (None if rejected) and metrics.

        A rejected update was still computed and moved, so it is charged (its transfer
        only, if its metrics are malformed: what it computed is unknown); it never
        reaches the model, and its region is quarantined once it has sent too many.
        A reply of new weights (a stock Flower ClientApp's) where a delta was asked
        for becomes the delta against the model the job was sent, and a delta where
        weights were asked for (a compressed upload) becomes new weights. A gradient
        where weights or a delta were asked for (or the other way) ends the run with
        what to set up if it is the run's first update, else is that region's bad update.
        """
        arrays = protocol.reply_arrays(reply)
        bytes_up = record_bytes(arrays)
        self.downlink.delivered(flight.region, flight.order.offset)
        try:
            metrics, reported = self.validator.check_report(flight.region, reply, takes=protocol.ANSWERS[mode])
        except RejectedUpdate as exc:
            if exc.reason == "wrong_kind" and not self.book.samples:  # no update taken yet: how the apps are set up
                raise self._wrong_kind(flight.region, mode, protocol.reply_update(reply)) from None
            # charged its transfer: what it computed on is unknown
            self.meter.complete(flight.job, bytes_up=bytes_up, reported=Reported(samples=0))
            self._reject(flight)
            return None, MetricRecord()
        sent_as = protocol.reply_update(reply)
        work_s, transfer_s, overhead_s = self.meter.complete(flight.job, bytes_up=bytes_up, reported=reported)
        base = flight.arrays.to_torch_state_dict() if sent_as != mode else self.optimizer.state
        try:
            tensors = self.validator.check(flight.region, arrays, sent_as, base=base, codec=self.downlink.codec,
                                           encoding=protocol.reply_encoding(reply))
        except RejectedUpdate:
            self._reject(flight)
            return None, metrics
        if sent_as == protocol.MODE_WEIGHTS and mode == protocol.MODE_DELTA:  # the change a delta job reports
            tensors = {k: base[k] - v for k, v in tensors.items() if v.is_floating_point()}
        elif sent_as == protocol.MODE_DELTA and mode == protocol.MODE_WEIGHTS:  # the weights it arrived at
            tensors = {k: base[k] - v for k, v in tensors.items()}
        self.book.samples += reported.samples
        if self.plan is not None:
            self.plan.observe(flight.job, reported, work_s=work_s, transfer_s=transfer_s, overhead_s=overhead_s,
                              nbytes=flight.job.bytes_down + bytes_up)
        return tensors, metrics

    def _wrong_kind(self, region: str, mode: str, sent_as: str) -> ConfigError:
        """The run's first update is of a kind the strategy cannot use: the ClientApps are set up for another
        (later, one region's wrong kind is its bad update: `wrong_kind`, rejected)."""
        return ConfigError(
            f"{type(self).__name__} asked region {region} for {mode} updates but its ClientApp sent "
            f"{sent_as}{' (a stock Flower reply: new weights)' if sent_as == protocol.MODE_WEIGHTS else ''}. "
            "Use update='delta' (any ClientApp that returns its new weights), or have the ClientApp send "
            f"{mode} updates and say so in its reply (docs/drop-in.md)")

    def _reject(self, flight: InFlight) -> None:
        """Count a rejected reply; a region quarantined for it has left the plan."""
        if self.roster.reject(flight.node_id, flight.region, self.validator):
            self._region_left(flight.region)

    def _screened(self, candidates: list[Candidate]) -> list[float | None]:
        """Per update, the factor to apply it with (screen.py: < 1 if clipped), or None if held back.

        Held-back ones are counted and recorded; clipped ones counted in `clipped_updates`."""
        model_norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(t.float()) for t in self.optimizer.state.values() if t.is_floating_point()])))
        scales = []
        for candidate, verdict in zip(candidates, self.screen.admit(candidates, model_norm, self.roster.shares)):
            if verdict.reason is not None:
                if not self.book.history.counters.get("screened_updates"):
                    log.warning("update from region %s held back: %s (counted as screened_updates; "
                                "see docs/reliability.md)", candidate.region, verdict.reason)
                self.book.event("update_screened", counter="screened_updates", region=candidate.region,
                                reason=verdict.reason)
                scales.append(None)
                continue
            if verdict.scale < 1.0:
                self.validator.clipped[candidate.region] += 1
            scales.append(verdict.scale)
        return scales

    def _lose(self, key: str, reason: str) -> None:
        """The job's node errs or times out: it leaves the run, which goes on."""
        flight = self.jobs.pop(key)
        self.roster.lose(flight.node_id, flight.region, reason)
        self.downlink.forget(flight.region)
        self._region_left(flight.region)

    def _drop_expired(self, answered: Iterable[str] = ()) -> None:
        """Lose every job (other than `answered`) whose node has not replied within the reply timeout."""
        for key in self.jobs.expired(answered):
            self._lose(key, f"no reply within {self.jobs.reply_timeout:g} s")

    def _region_left(self, region: str) -> None:
        if self.plan is not None:
            self.plan.region_left(region, self.roster.live_names())

    # ------------------------------------------------------------------ nodes that (re)join
    def _newcomers(self, grid: Grid, config: ConfigRecord, step: int) -> bool:
        """Admit the nodes that (re)joined; True if any was, so a caller with no work out can give them some.

        Every `rejoin_every` steps the nodes the run does not know are asked who
        they are; answers are read on every call, so nothing waits for a slow one.
        """
        if not self.query_regions:
            return False
        admitted = False
        for info in self.roster.poll(grid, config, ask_now=self.roster.due(step, self.rejoin_every)):
            admitted = self._admit(info) or admitted
        return admitted

    def _admit(self, info: RegionInfo) -> bool:
        """Take a (re)joining node into the run; a region not in it at the start, or quarantined, is refused."""
        refusal = self.roster.refusal(info)
        if refusal is not None:
            self.roster.refuse(info, refusal)
            return False
        for old in self.roster.nodes_of(info.name):  # the region's SuperNode restarted under a new node id
            self.roster.refused.add(old)
            self._retire(old, f"replaced by node {info.node_id}")
        self.roster.admit(info)
        self.downlink.forget(info.name)
        if self.plan is not None:
            self.plan.region_back(info.name)
        return True

    def _retire(self, node_id: int, reason: str) -> None:
        """A node leaves the run: lost with its job if it has one in flight, else simply forgotten."""
        keys = self.jobs.keys_of(node_id)
        for key in keys:
            self._lose(key, reason)
        if not keys:
            self.roster.drop(node_id)

    # ------------------------------------------------------------------ books
    def _evaluate(self, version: int, arrays: ArrayRecord, evaluate_fn: EvaluateFn | None,
                  force: bool) -> float | None:
        """Record a history entry; evaluate the served model (`arrays`, or the average of the versions)
        centrally when due. Returns the accuracy if evaluated."""
        due = self.book.evaluation_due(version, force)
        res = self.book.record(version, self.optimizer.served(arrays) if due else arrays, evaluate_fn, due)
        return None if res is None else res.get("accuracy")

    def _min_relatedness(self) -> float | None:
        """The screen's relatedness bound: the one set, or for `auto` this strategy's default."""
        setting = self.limits.min_relatedness
        return self.default_relatedness if setting == AUTO else setting

    def _finish(self, arrays: ArrayRecord) -> Result:
        """The run's end: stop awaiting the jobs still out (a checkpoint keeps them for a resume), write
        the last checkpoint, return the result (served model)."""
        self.jobs.replies.stop()
        self.roster.replies.stop()
        self._checkpoint(force=True)
        return self.book.result(self.optimizer.served(arrays))

    def _checkpoint(self, force: bool = False) -> None:
        """Write the run's state if one is due (or `force`): model, momentum, books, plan, jobs in flight."""
        if not self.book.checkpoint_due(self.step, force):
            return
        flights = list(self.jobs.values())
        sent = {}
        for flight in flights:
            sent.setdefault(str(flight.version), flight.arrays.to_torch_state_dict())
        payloads = {str(i): f.payload.to_torch_state_dict() for i, f in enumerate(flights) if f.payload is not f.arrays}
        corrections = {str(i): f.correction.to_torch_state_dict() for i, f in enumerate(flights)
                       if f.correction is not None}
        plan = self.plan.state_dict() if self.plan is not None else {"scheduler": None, "planned_steps": None}
        downlink, downlink_models = self.downlink.state_dict()
        meta = {"offsets": self.offsets, "shares": self.roster.shares, **plan,
                "quarantined": sorted(self.roster.quarantined), "downlink": downlink,
                "inflight": [f.state_dict() for f in flights], **self._extra_state()}
        norms, last = self.screen.state_dict()
        self.book.save({**meta, "screen_norms": norms},
                       {"optimizer": self.optimizer.state_dict(), "sent": sent, "payloads": payloads,
                        "corrections": corrections,
                        "downlink": downlink_models, "screen": last, "extra": self._extra_tensors()})
        self.downlink.pin((f.region, key) for f in flights for key in (f.order.base, f.order.offset)
                          if key is not None)  # regions may forget what this checkpoint cannot ask for

    def _amend_order(self, region: str, order: protocol.WorkOrder) -> protocol.WorkOrder:
        """A subclass's additions to a region's work order (MA: drift correction)."""
        return order

    @property
    def drift_codec(self) -> Codec:
        """How a drift correction crosses the WAN: in the run's codec, or int8 if the run sends models whole (a
        correction is a small, smooth pull on each step; int8 keeps its extra download a quarter of a model's)."""
        return self.downlink.codec if self.downlink.codec.lossy else Int8()

    def _drift_correction(self, region: str) -> dict[str, Any] | None:
        """What a region's next job adds to each local step's gradient, sent with it (ASGD-GA: `c − c_r`)."""
        return None

    def _extra_state(self) -> dict[str, Any]:
        """A subclass's own JSON-able state for the checkpoint."""
        return {}

    def _extra_tensors(self) -> dict[str, Any]:
        """A subclass's own tensors for the checkpoint."""
        return {}

    def _load_extra_state(self, meta: dict[str, Any], tensors: dict[str, Any] | None = None) -> None:
        """Restore what `_extra_state` and `_extra_tensors` saved."""

    def _restore(self, grid: Grid, config: ConfigRecord) -> None:
        """Continue from the checkpoint: same model, momentum, books and plan; jobs in flight re-sent."""
        meta, tensors = self.book.load()
        self.optimizer.load_state_dict(tensors["optimizer"])
        self.screen.load_state_dict(meta["screen_norms"], tensors["screen"])
        self.offsets.update(meta["offsets"])
        self.roster.shares = dict(meta["shares"])
        if self.plan is not None:
            self.plan.load_state_dict(meta)
        self.roster.restore_quarantine(meta["quarantined"])
        self.downlink.load_state_dict(meta["downlink"], tensors["downlink"])
        by_name = {info.name: node for node, info in self.roster.live.items()}
        messages = []
        for i, saved in enumerate(meta["inflight"]):
            node = by_name.get(saved["region"])
            if node is None:
                continue  # its region did not come back: the job is lost with it
            payload, correction = tensors["payloads"].get(str(i)), tensors.get("corrections", {}).get(str(i))
            flight = InFlight.from_state_dict(saved, node, ArrayRecord(tensors["sent"][str(saved["version"])]),
                                              None if payload is None else ArrayRecord(payload),
                                              None if correction is None else ArrayRecord(correction))
            messages.append(self.jobs.stage(self._train_message(node, flight.payload, config, flight.order,
                                                                flight.correction), flight))
        self.jobs.push(grid, messages)
        self._load_extra_state(meta, tensors.get("extra", {}))
        log.info("resumed from %s at step %d (t=%.1f s)", self.book.checkpointer.path, self.step,
                 self.meter.clock.now())


def per_region(value: int | Mapping[str, int], region: str) -> int:
    """A setting given once for all regions or per region name."""
    if isinstance(value, Mapping):
        if region not in value:
            raise KeyError(f"no value for region {region!r} in {dict(value)}; give every region one, or one "
                           "number for all")
        return int(value[region])
    return int(value)
