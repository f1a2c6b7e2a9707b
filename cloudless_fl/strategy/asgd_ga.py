"""ASGD-GA: asynchronous SGD with gradient accumulation, staleness-aware, no barriers.

Every region always has one job in flight: it accumulates gradients over `G_r`
mini-batches at the weights it was sent and returns them. The server applies
each arrival at once through its optimizer, scaled by a staleness factor
`alpha(tau)` and by a data-balance weight, then sends that region the newest
model. Updates staler than `tau_max` (if set) are dropped and counted.

Data balance: a fast region arrives more often; on non-IID data that drags the
model toward its data. Each update is therefore weighted by
`share_r * R / rate_r` (its data share over its share of the work applied, `R`
the summed rate; mean weight 1 per unit of work). Where the largest weight would
exceed `max_weight`, all are scaled down together, so a rare, stale update
cannot blow up a step and every region's data still counts by its share (a
slower pace instead of a biased model). A rate is arrivals per second, times
the local steps of each (delta mode: a change of `G_r` steps moves the model
about `G_r` times as far, the count FedNova normalises MA's average by; a
gradient is a mean whatever `G_r`). With `G_r` in proportion to the data shares
over equal job times the weights stay near 1; counted by arrivals alone they were
about `N * share_r`, and a region's data counted as its share squared (geo4,
under the scheduler when it planned such `G_r`: final 0.947/0.956/0.942 by
arrivals, 0.950/0.958/0.950 by work, as unscheduled).

A rate is how often the region's updates actually arrive, read from the clock
that orders them: under the virtual clock the modelled job duration (known at
dispatch; one job in flight per region, so it is the interval between
arrivals), under the wall clock the measured interval between the region's
arrivals. The region model's durations must never stand in for measured
arrivals: on a real federation whose start-ups put the regions in lock-step
they claimed ap-chengdu arrives 27x less often than ap-beijing, and weights of
0.14 … 4 (summing to 2.3x an unweighted cycle) drove the model to one
region's data (docs/deployment.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from ..control.jobs import moving_average
from ..training import protocol
from ..training.compression import codec_from_spec
from .base import NO_REGION_LEFT, EvaluateFn, GeoStrategy
from .inflight import POLL_S
from .robust import AGGREGATIONS, coordinate_median, trimmed_mean
from .drift import ControlVariates
from .screen import Candidate

RATE_EMA = 0.3


def inverse_sqrt(tau: int) -> float:
    """The default staleness factor `(1 + tau) ** -0.5`."""
    return (1.0 + tau) ** -0.5


def no_scaling(tau: int) -> float:
    return 1.0


STALENESS_FUNCTIONS: dict[str, Callable[[int], float]] = {"inverse_sqrt": inverse_sqrt, "none": no_scaling}
UPDATES = (protocol.MODE_GRADIENT, protocol.MODE_DELTA)  # what a job returns
DELTA_AVERAGE_DECAY = 0.9  # delta mode serves about the last 10 versions' average by default


class AsyncGradAccum(GeoStrategy):
    """ASGD-GA as a Flower strategy; `start()` runs the asynchronous event loop.

    Parameters
    ----------
    lr : float, optional
        Server learning rate, applied to the accumulated gradient or to the delta.
        Default: 0.1 for gradients, 1.0 for deltas (a delta is applied as sent).
    momentum, nesterov :
        Server optimizer (SGD) momentum.
    accumulation_steps : int or mapping region → int
        `G_r`, mini-batches accumulated per job.
    batch_size : int
        Mini-batch size on the regions.
    tau_max : int or None
        Updates staler than this many versions are dropped; None (the default):
        none is, staleness only weighs them down. A hard bound drops every update
        of a region slower than `tau_max` arrivals of the others (measured on geo4:
        the two slowest regions, 70 % of the data).
    staleness : callable or name
        `alpha(tau)`; "inverse_sqrt" (default) or "none", or any callable.
    update : "gradient" | "delta"
        `gradient`: true gradient accumulation at the sent weights. `delta`:
        `G_r` local SGD steps at `local_lr`, the region returns `w_sent - w_new`;
        a stock Flower ClientApp that returns its new weights works too (the
        server takes the difference to the model it sent).
    balance : bool
        Weight updates so each region's data counts by its share, not its speed.
    max_weight : float
        The largest balance weight; where the shares would need more, every weight is scaled down by the
        same factor (the ratios, and so each region's share, are kept).
    aggregation : "mean" | "median" | "trimmed_mean"
        "mean" (default): apply each arrival at once. Otherwise the optional buffered
        robust rule: each region's latest admitted update (scaled as it would have been
        applied) waits in its region's slot; once `buffer_regions` regions have one, the
        coordinate-wise median or trimmed mean of the slots is applied as one version and the
        slots empty (robust.py): FedBuff's buffered step (Nguyen et al. 2022, arXiv 2106.06639)
        with a robust rule in place of its mean. The slots are computed from nearly the same
        model, so their sum would be one step too long (measured: unstable). A fast region's
        update replaced in its slot before a flush is charged but never applied: the price of
        the robust rule. (Mid-run checkpoints follow a flush, so the slots are empty; what waits
        at the very end is dropped.)
    trim_fraction : float
        `trimmed_mean`: fraction dropped of each side per entry.
    buffer_regions : int
        Regions whose updates make one buffered step (at least 3: a median of 3 outvotes one bad region).
    drift_correction : bool
        Delta mode: SCAFFOLD's drift correction of the regions' local steps (Karimireddy et al., ICML 2020),
        each job sent its correction `c − c_r` beside the model (strategy/drift.py; in int8 unless the run
        compresses: a quarter of an uncompressed model more per download while it is on). A ClientApp that
        ignores it (a stock one) trains plainly and is no longer sent it; a region whose update was not admitted
        is left out of `c` until one is.
    drift_warmup : float
        With `drift_correction`: the share of the time or cost budget spent before the correction starts (as
        MA's: early on, while the model moves fast, a region's last gradient is a poor guess of its next).
    parameter_names : names, optional
        With `drift_correction`: the model's parameters, the entries a region corrects. None: every entry.
    average_decay : float or None
        Serve (evaluate, return) an exponential moving average of the versions with this decay per version.
        Default: 0.9 for deltas, whose versions swing with each region's non-IID update, so the final model
        is not one sample of that swing (README, "The served model"); None (the last version) for gradients,
        whose versions do not swing. As `conf/strategy/asgd_ga*.yaml`.
    **kwargs :
        `meter`, `eval_every`, `stop`, `reply_timeout`, `scheduler`, `replan_every`, `rejoin_every`, ... (see
        `GeoStrategy`).
    """

    # Measured on geo4 (docs/reliability.md): a region's consecutive updates agree by -0.1..0.85 (cosine; the
    # others' are applied in between), and the fast regions' updates, which fill any recent window, are up to
    # 27x shorter per step than the slow ones'. Neither check separates an attacker here.
    comparable_updates = False

    @property
    def default_relatedness(self) -> float | None:
        """`validation.min_relatedness=auto`: 2 spreads in gradient mode, where noise of a gradient's length
        is otherwise applied (geo4: 0.889 against 0.950 clean; 0.967 held back); off in delta mode, where noise
        barely hurts (0.936 undefended) and the check would hold back honest updates of a converging model."""
        return 2.0 if self.update == protocol.MODE_GRADIENT else None

    def __init__(self, *, lr: float | None = None, momentum: float = 0.0, nesterov: bool = False,
                 accumulation_steps: int | Mapping[str, int] = 4, batch_size: int = 32, tau_max: int | None = None,
                 staleness: str | Callable[[int], float] = "inverse_sqrt", update: str = protocol.MODE_GRADIENT,
                 local_lr: float = 0.1, balance: bool = True, max_weight: float = 4.0, aggregation: str = "mean",
                 trim_fraction: float = 0.25, buffer_regions: int = 3, drift_correction: bool = False,
                 drift_warmup: float = 0.0, parameter_names: Iterable[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("average_decay", DELTA_AVERAGE_DECAY if update == protocol.MODE_DELTA else None)
        super().__init__(**kwargs)
        if update not in UPDATES:
            raise ValueError(f"update must be one of {', '.join(UPDATES)}, got {update!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        if buffer_regions < 3:
            raise ValueError(f"buffer_regions={buffer_regions} cannot outvote a bad region; use 3 or more")
        if aggregation == "trimmed_mean" and int(trim_fraction * buffer_regions) == 0:
            raise ValueError(f"trim_fraction={trim_fraction} of buffer_regions={buffer_regions} trims nothing: raise "
                             "either (e.g. 0.25 of 4), or use aggregation=median")
        if drift_correction and (update != protocol.MODE_DELTA or aggregation != "mean"):
            raise ValueError("drift_correction corrects local steps and trusts every admitted update: it needs "
                             "update='delta' and aggregation='mean'")
        if not 0.0 <= drift_warmup <= 1.0:
            raise ValueError(f"drift_warmup must be a share of the budget in [0, 1], got {drift_warmup}")
        if isinstance(staleness, str):
            if staleness not in STALENESS_FUNCTIONS:
                raise ValueError(f"unknown staleness function {staleness!r}; use {', '.join(STALENESS_FUNCTIONS)}")
            staleness = STALENESS_FUNCTIONS[staleness]
        if lr is None:  # a delta is already a step; a gradient needs a learning rate
            lr = 1.0 if update == protocol.MODE_DELTA else 0.1
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.accumulation_steps = accumulation_steps
        self.batch_size = batch_size
        self.tau_max = tau_max
        self.staleness = staleness
        self.update = update
        self.local_lr = local_lr
        self.balance = balance
        self.max_weight = max_weight
        self.aggregation, self.trim_fraction, self.buffer_regions = aggregation, trim_fraction, buffer_regions
        self.drift_warmup = drift_warmup if drift_correction else None
        self.drift = ControlVariates(parameter_names) if drift_correction else None
        self._slots: dict[str, dict[str, torch.Tensor]] = {}  # buffered rule: region → its latest scaled update
        self._intervals: dict[str, float] = {}  # region → smoothed seconds between its arrivals
        self._work: dict[str, int] = {}  # region → the local steps its latest job counts for (gradient mode: 1)
        self._last_arrival: dict[str, float] = {}  # wall clock only: when the region's last reply was taken
        self._applied: dict[str, float] = {}  # region → smoothed fraction of its arrivals that were applied

    @property
    def version(self) -> int:
        """Model versions so far: the step count checkpoints and stop rules go by."""
        return self.step

    @version.setter
    def version(self, value: int) -> None:
        self.step = value

    def describe(self) -> str:
        buffered = "" if self.aggregation == "mean" else f", buffered {self.aggregation} of {self.buffer_regions}"
        return (f"server lr={self.lr} momentum={self.momentum}, G={self.accumulation_steps}, "
                f"batch={self.batch_size}, tau_max={self.tau_max}, update={self.update}, balance={self.balance}"
                f"{buffered}{self._drift_setting()}{self._cooldown_setting()}")

    def _drift_setting(self) -> str:
        if self.drift is None:
            return ""
        return ", drift correction" + (f" after the budget's first {self.drift_warmup:.0%}" if self.drift_warmup
                                       else "") + f" (sent as {self.drift_codec.spec()})"

    # ------------------------------------------------------------------ Strategy interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One job for every idle region (a live node with no job out), from model version `server_round`
        (metered from now)."""
        busy = self.jobs.nodes()
        idle = [node for node in self.roster.live if node not in busy]
        messages = self._job_messages(idle, arrays, config, steps=self.accumulation_steps, lr=self.local_lr,
                                      mode=self.update, batch_size=self.batch_size, version=server_round)
        for message in messages:
            flight = self.jobs.staged(message)
            self._work[flight.region] = 1 if self.update == protocol.MODE_GRADIENT else flight.order.steps
            if self.meter.clock.modelled:  # the pace is known at dispatch
                self._observe_interval(flight.region, flight.job.timing.end - flight.job.dispatched_at)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply each reply at once (staleness- and balance-scaled); None arrays if all were dropped."""
        applied = False
        metrics = None
        for reply in replies:
            flight = self.jobs.pop(reply.metadata.reply_to_message_id)
            if not self.meter.clock.modelled:
                self._observe_arrival(flight.region, flight.job.dispatched_at)
            update, metrics = self._complete(flight, reply, self.update)
            tau = self.version - flight.version
            staleness, balance = self.staleness(tau), self._balance_weight(flight.region)
            scale = self._admitted(flight, update, staleness * balance)
            if self.drift is not None:
                if scale is None:  # its mirror leaves `c` until an update of its is admitted
                    self.drift.distrust(flight.region)
                else:  # mirrored from the change as the screen lets it in
                    self._mirror(flight, {k: v * scale for k, v in update.items()}, metrics)
            self._applied[flight.region] = moving_average(self._applied.get(flight.region), float(scale is not None),
                                                          RATE_EMA)
            if scale is None:  # the region simply gets the newest model again
                continue
            self.history.staleness[tau] += 1  # of applied (or buffered) updates
            weight = scale * staleness * balance
            if self.update == protocol.MODE_GRADIENT:  # the server's step is the one that cools
                weight *= self._cooldown()
            if self.aggregation == "mean":
                self.optimizer.step(update, scale=weight)
            else:
                self._slots[flight.region] = {k: v.float() * weight for k, v in update.items()}
                if len(self._slots) < self.buffer_regions:
                    continue
                self._step_buffered()
            self.version += 1
            applied = True
        return (self.optimizer.arrays() if applied else None), metrics

    def _drift_correction(self, region: str) -> dict[str, torch.Tensor] | None:
        """`c − c_r` over the live regions, once the warm-up share of the budget is spent."""
        if self.drift is None:
            return None
        if self.drift_warmup:
            spent = self.book.stop.spent(self.meter.figures())
            if spent is None or spent < self.drift_warmup:
                return None
        live, shares = self.roster.live_names(), self.roster.shares
        if any(r not in shares for r in live):  # a region that has not answered yet (nor mirrored a gradient)
            return None
        return self.drift.correction(region, {r: shares[r] for r in live})

    def _mirror(self, flight, change: dict[str, torch.Tensor], metrics: MetricRecord) -> None:
        """Mirror the region's mean gradient from its admitted change, the correction it was sent taken out."""
        sent = None
        if flight.correction is not None:  # as the region decodes it
            sent = codec_from_spec(flight.order.drift_encoding).decode(flight.correction, {
                k: v for k, v in self.optimizer.state.items()
                if k in change and (self.drift.parameters is None or k in self.drift.parameters)})
        said = metrics.get(protocol.DRIFT_CORRECTED)
        self.drift.observe(flight.region, flight.order, change, sent, None if said is None else said == 1)

    def _step_buffered(self) -> None:
        """One version from the full buffer: its robust aggregate; then empty it."""
        updates = list(self._slots.values())
        self.optimizer.step(coordinate_median(updates) if self.aggregation == "median"
                            else trimmed_mean(updates, self.trim_fraction))
        self._slots.clear()

    def _admitted(self, flight, update, weight: float) -> float | None:
        """The factor the screen lets `update` in with; None if it was rejected, held back or too stale.

        `weight`: the staleness x balance weight it is applied with if admitted (the share budget counts it)."""
        if update is None:
            return None
        steps = None if self.update == protocol.MODE_GRADIENT else flight.order.steps  # a mean gradient: no scaling
        scale = self._screened([Candidate(flight.region, update, steps, weight)])[0]
        if scale is not None and self.tau_max is not None and self.version - flight.version > self.tau_max:
            self.book.count("dropped_stale")
            return None
        return scale

    # ------------------------------------------------------------------ the event loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: EvaluateFn | None = None) -> Result:
        """Run until `num_rounds` model versions (or a stop rule); returns the final model."""
        config, arrays = self._begin(grid, train_config, initial_arrays, evaluate_fn, timeout, first_round=0,
                                     lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        self.jobs.push(grid, self.configure_train(self.version, arrays, config, grid))
        arrived: dict[str, Message] = {}
        arrival_order: list[str] = []
        stopped_between_versions = False  # a stop rule fired on a reply that made no version
        while self.version < num_rounds and self.jobs:
            for reply in self.jobs.pull(grid, skip=arrived):
                arrived[reply.metadata.reply_to_message_id] = reply
                arrival_order.append(reply.metadata.reply_to_message_id)
            key = self.meter.clock.pick({k: f.job for k, f in self.jobs.items()}, arrival_order)
            if key is None:
                self._drop_expired(answered=arrived)
                if self._newcomers(grid, config, self.version):
                    self.jobs.push(grid, self.configure_train(self.version, arrays, config, grid))
                time.sleep(POLL_S)
                continue
            reply = arrived.pop(key)
            arrival_order.remove(key)
            if reply.has_error():
                self._lose(key, reply.error.reason)
                continue
            before = self.version
            new_arrays, _ = self.aggregate_train(self.version, [reply])
            if new_arrays is not None:
                arrays = new_arrays
            accuracy = None
            if self.version != before:
                last = self.version >= num_rounds
                accuracy = self._evaluate(self.version, arrays, evaluate_fn, force=last)
                self._newcomers(grid, config, self.version)  # admitted nodes get work below
                if self.plan is not None:
                    self.plan.maybe_replan(self.version)
            if self.book.should_stop(accuracy):
                stopped_between_versions = self.version == before
                break
            self.jobs.push(grid, self.configure_train(self.version, arrays, config, grid))
            if self.version != before:
                self._checkpoint()
        if self.version < num_rounds and self.book.stop_reason is None:  # no job out: every region was lost
            self.book.stop_reason = NO_REGION_LEFT
        if evaluate_fn is not None and (self.history.entries[-1]["accuracy"] is None or stopped_between_versions):
            # the run ended on a version not due for evaluation, or after it (a stop rule fired on a reply that
            # made no version, dropped or held back, or no region is left): its final entry is its model's
            # accuracy at the time and cost the run ended with
            self._evaluate(self.version, arrays, evaluate_fn, force=True)
        return self._finish(arrays)

    # ------------------------------------------------------------------ helpers

    def _extra_state(self) -> dict:
        # "durations": the rates' historic key
        drift = {} if self.drift is None else {"drift": self.drift.state_dict()[0]}
        return {"durations": self._intervals, "applied": self._applied, "work": self._work, **drift}

    def _extra_tensors(self) -> dict:
        return {} if self.drift is None else self.drift.state_dict()[1]

    def _load_extra_state(self, meta: dict, tensors: dict | None = None) -> None:
        self._intervals = dict(meta["durations"])
        self._applied = dict(meta["applied"])
        self._work = dict(meta.get("work", {}))  # absent from earlier checkpoints: balanced from the next jobs
        if self.drift is not None and "drift" in meta:
            self.drift.load_state_dict(meta["drift"], tensors or {})

    def _region_left(self, region: str) -> None:
        super()._region_left(region)
        self._last_arrival.pop(region, None)  # if it comes back, its next interval starts from that job

    def _observe_arrival(self, region: str, dispatched_at: float) -> None:
        """Wall clock: the seconds since the region's previous arrival (or since this job left, if none)."""
        now = self.meter.clock.now()
        self._observe_interval(region, now - self._last_arrival.get(region, dispatched_at))
        self._last_arrival[region] = now

    def _observe_interval(self, region: str, seconds: float) -> None:
        self._intervals[region] = moving_average(self._intervals.get(region), seconds, RATE_EMA)

    def _balance_weight(self, region: str) -> float:
        """`share_r * R / rate_r` (rates of work: arrivals x their steps); shares and `R` count only what gets
        applied. Where the largest weight would exceed `max_weight`, every weight is scaled by the same factor.

        Scaled together, not capped one by one: capping the slow region's weight alone under-counts its data
        and the run converges to another objective (FedNova's objective inconsistency, Wang et al., NeurIPS
        2020). Measured (tabular, seed 1, 200 s): final 0.869 capped one by one (27 of the slowest region's
        updates held back by the screen, test loss climbing from 0.51 to 0.81), 0.903 scaled together (none
        held back, loss flat at 0.46); the studies' seeds 1-3 (README, "ASGD-GA's balance weights"): tabular
        0.871 -> 0.886, geo4 0.956 -> 0.964 with 95 % later (20.2 s instead of 12.2 s).

        The weight of `region`'s arriving update if it is admitted (its applied fraction counting
        this arrival as applied): known before the screen's verdict, which the share budget needs.

        Mean weight 1 per unit of applied work: each region's rate and data share count by the
        fraction of its arrivals that move the model. Counting a region whose updates are held
        back or rejected in `R` inflates everyone else's steps by the rate it no longer moves the
        model with (measured: a fast attacker held back on every update drove geo4 to 0.58); in
        the shares, it shrinks them, as if its data were still being learnt.
        """
        live = sorted(self.roster.live_names())  # sums in one order: a run does not depend on the hash seed
        if not self.balance or len(live) < 2 or any(r not in self._intervals or r not in self._work for r in live):
            return 1.0
        # work relative to this region's: with equal steps everywhere, the arrival rates bit for bit
        rates = {r: (self._work[r] / self._work[region]) / max(self._intervals[r], 1e-9) for r in live}
        applied = {r: self._applied.get(r, 1.0) for r in live}
        applied[region] = moving_average(self._applied.get(region), 1.0, RATE_EMA)
        shares = self.roster.shares
        share_total = sum(shares[r] * applied[r] for r in live)
        applied_rate = sum(rates[r] * applied[r] for r in live)
        weights = {r: (shares[r] / share_total) * applied_rate / rates[r] for r in live}
        return weights[region] * min(1.0, self.max_weight / max(weights.values()))
