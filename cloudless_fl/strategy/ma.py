"""MA: inter-region model averaging with heterogeneity-aware local steps.

Each period every region runs `H_r` local SGD steps from the global model and
returns its weights. The server averages them weighted by samples processed
(or, under the scheduler, whose plan gives fast regions extra steps, by data share),
normalised for unequal `H_r` as in FedNova (each region's change is divided by
its step count, the average is rescaled by the effective step count), and
applies the result through an outer optimizer: plain replacement by default,
Nesterov momentum on the averaged pseudo-gradient as in DiLoCo when
`outer_momentum > 0`. With `drift_correction` each region's local steps are
corrected for its drift from the others, as in SCAFFOLD, at no extra WAN
bytes (`training/region_link.py` derives how). A region that misses the period's deadline does not hold
the others: its result is dropped and counted. Updates go through the screen
(screen.py) first: held back, or scaled down (a region's one-off spike).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from ..training import protocol
from .base import NO_REGION_LEFT, EvaluateFn, GeoStrategy
from .drift import DriftBooks, corrects_drift
from .inflight import POLL_S
from .robust import AGGREGATIONS, coordinate_median, trimmed_mean
from .screen import Candidate

WEIGHT_BY = ("samples", "shares")  # what a region's weight in the average is


class ModelAveraging(GeoStrategy):
    """MA as a Flower strategy; `start()` runs one period per "round".

    Parameters
    ----------
    lr : float
        Local SGD learning rate on the regions.
    local_steps : int or mapping region → int
        `H_r`, local steps per period.
    batch_size : int
        Mini-batch size on the regions.
    normalize : bool
        FedNova normalisation for unequal `H_r` (no effect when all are equal). Needs
        every reply to report its `steps`; a period with a stock Flower reply (new
        weights and `num-examples` only) is a plain weighted average.
    outer_lr, outer_momentum, nesterov :
        Outer optimizer on the averaged pseudo-gradient; `outer_lr=1, outer_momentum=0`
        is plain averaging.
    deadline_s : float, optional
        Seconds after a period starts by which results must be in; later ones are dropped.
    weight_by : "samples" | "shares", optional
        A region's weight in the average: samples it processed this period, or its
        share of all resident data. Default: shares with a scheduler (its extra
        steps must not mean extra weight), samples without.
    aggregation : "mean" | "median" | "trimmed_mean"
        How the regions' changes are combined: the (FedNova-normalised, weighted)
        mean, or robustly (robust.py): coordinate-wise median, or a mean after
        trimming `trim_fraction` of each side; the robust ones count every region once.
    trim_fraction : float
        For `trimmed_mean`: the fraction of largest and of smallest values dropped per entry.
    drift_correction : bool
        SCAFFOLD's drift correction (Karimireddy et al., ICML 2020) of the regions' local steps: each step's
        gradient gets `c − c_i`, the regions' mean gradient minus the region's own, both from the last period;
        the region reads `c` off the model it is sent (each work order carries the scale of the server's last
        step), so nothing more crosses the WAN. For non-IID regions, whose local steps pull towards their own
        optimum. Needs `aggregation="mean"` and `outer_momentum=0` (the step must be the regions' average), a
        ClientApp that keeps state between jobs (this project's, with a `state-dir`). After a step that took
        not every region's change whole (strategy/drift.py) the next period runs uncorrected.
    drift_warmup : float
        With `drift_correction`: the share of the time or cost budget spent before the correction starts; its
        first period after runs uncorrected, founding `c`. A correction is last period's drift, and early on,
        while the model moves far each period, a stale one overshoots (as control variates go stale in variance-
        reduced SGD early in training: Defazio & Bottou, NeurIPS 2019). 0: from the first period (SCAFFOLD);
        above 0 and no budget: not at all.
    parameter_names : names, optional
        With `drift_correction`: the model's parameters, the entries a region corrects (buffers such as
        batch-norm statistics are not). None: every floating-point entry (right for models without buffers).
    **kwargs :
        `meter`, `eval_every`, `stop`, `reply_timeout`, `scheduler`, `replan_every`, `rejoin_every`, ... (see
        `GeoStrategy`).
    """

    def __init__(self, *, lr: float = 0.1, local_steps: int | Mapping[str, int] = 10, batch_size: int = 32,
                 normalize: bool = True, outer_lr: float = 1.0, outer_momentum: float = 0.0, nesterov: bool = True,
                 deadline_s: float | None = None, weight_by: str | None = None, aggregation: str = "mean",
                 trim_fraction: float = 0.25, drift_correction: bool = False, drift_warmup: float = 0.0,
                 parameter_names: Iterable[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        if drift_correction and not corrects_drift(aggregation, outer_momentum):
            raise ValueError("drift_correction reads the regions' average step off the model: it needs "
                             "aggregation='mean' and outer_momentum=0")
        if not 0.0 <= drift_warmup <= 1.0:
            raise ValueError(f"drift_warmup must be a share of the budget in [0, 1], got {drift_warmup}")
        self.drift_warmup = drift_warmup if drift_correction else None
        self.parameter_names = parameter_names
        self.drift: DriftBooks | None = None  # once the warm-up is over (`_begin_drift_correction`)
        self.aggregation, self.trim_fraction = aggregation, trim_fraction
        weight_by = weight_by or ("shares" if self.plan is not None else "samples")
        if weight_by not in WEIGHT_BY:
            raise ValueError(f"weight_by must be one of {', '.join(WEIGHT_BY)}, got {weight_by!r}")
        self.weight_by = weight_by
        self.lr = lr
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.normalize = normalize
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        self.deadline_s = deadline_s

    def describe(self) -> str:
        return (f"local lr={self.lr}, H={self.local_steps}, batch={self.batch_size}, FedNova={self.normalize}, "
                f"outer lr={self.outer_lr} momentum={self.outer_momentum}, deadline={self.deadline_s}"
                f"{self._drift_setting()}{self._cooldown_setting()}")

    def _drift_setting(self) -> str:
        if self.drift_warmup is None:
            return ""
        return ", drift correction" + (f" after the budget's first {self.drift_warmup:.0%}" if self.drift_warmup
                                       else "")

    def _begin_drift_correction(self) -> None:
        """Start keeping the drift books once the warm-up is over (the next period founds `c`)."""
        if self.drift is None and self.drift_warmup is not None:
            spent = self.book.stop.spent(self.meter.figures()) if self.drift_warmup else 0.0
            if spent is not None and spent >= self.drift_warmup:
                self.drift = DriftBooks(self.parameter_names)

    def _amend_order(self, region: str, order: protocol.WorkOrder) -> protocol.WorkOrder:
        return order if self.drift is None else self.drift.amend(region, order)

    def _extra_state(self) -> dict:
        if self.drift is None:
            return {}
        self.drift.pin()  # a checkpoint is being written
        return {"drift": self.drift.state_dict()[0]}

    def _extra_tensors(self) -> dict:
        return {} if self.drift is None else self.drift.state_dict()[1]

    def _load_extra_state(self, meta: dict, tensors: dict | None = None) -> None:
        if self.drift_warmup is not None and "drift" in meta:  # saved after the warm-up
            self.drift = self.drift or DriftBooks(self.parameter_names)
            self.drift.load_state_dict(meta["drift"], tensors or {})

    # ------------------------------------------------------------------ Strategy interface
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Every live region's work for the period (`H_r` steps), metered from now."""
        self._begin_drift_correction()
        if self.drift is not None:
            self.drift.begin_period()
        return self._job_messages(self.roster.live, arrays, config, steps=self.local_steps, lr=self.lr,
                                  mode=protocol.MODE_WEIGHTS, batch_size=self.batch_size, version=server_round)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedNova-normalised, sample-weighted average of on-time replies, through the outer optimizer."""
        start = self.optimizer.state
        regions, changes, weights, steps, screened = [], [], [], [], []
        answered, corrected, lr = {}, set(), None  # a region that answered kept its job's state, taken up or not
        for reply in replies:
            flight = self.jobs.pop(reply.metadata.reply_to_message_id)
            answered[flight.region], lr = flight.order.offset, flight.order.lr
            local, metrics = self._complete(flight, reply, protocol.MODE_WEIGHTS)
            if flight.order.drift_from is not None and metrics.get(protocol.DRIFT_CORRECTED) == 1:
                corrected.add(flight.region)  # asked, and as the region says: it may have lacked the state
            if local is None:  # rejected: the period goes on without it
                continue
            regions.append(flight.region)
            changes.append({k: start[k] - local[k] for k in start if start[k].is_floating_point()})
            screened.append(changes[-1] if self.drift is None  # the screen judges the region's own work
                            else self.drift.plain_change(flight.region, flight.order, start, changes[-1],
                                                         corrected=flight.region in corrected))
            weights.append(float(metrics["num-examples"]) if self.weight_by == "samples"
                           else self.roster.shares[flight.region])
            steps.append(max(1, int(metrics["steps"])) if "steps" in metrics else None)  # stock replies: none
        scales = self._screened([Candidate(r, c, h) for r, c, h in zip(regions, screened, steps)]) if changes else []
        whole = [r for r, factor in zip(regions, scales) if factor == 1.0]  # taken up as they came
        changes = [c if scale in (None, 1.0) else {k: v * scale for k, v in c.items()}  # a tolerated spike
                   for c, scale in zip(changes, scales)]
        changes, weights, steps = ([x for x, scale in zip(xs, scales) if scale is not None]
                                   for xs in (changes, weights, steps))
        if not changes:
            self._settle_drift(answered, corrected, {}, None, start)
            return None, None
        if self.aggregation != "mean":
            robust = (coordinate_median(changes) if self.aggregation == "median"  # (no drift correction)
                      else trimmed_mean(changes, self.trim_fraction))
            self.optimizer.step(robust)
            return self.optimizer.arrays(), MetricRecord({"regions": len(changes)})
        total = sum(weights)
        p = [w / total for w in weights]
        if self.normalize and None not in steps:  # FedNova needs every region's step count
            tau_eff = sum(pi * h for pi, h in zip(p, steps))
            coeffs = [pi * tau_eff / h for pi, h in zip(p, steps)]
        else:
            coeffs = p
        # the step is outer_lr · lr · Σ p_i H_r times the regions' mean (corrected) gradient
        scale = None if None in steps else self.outer_lr * lr * sum(pi * h for pi, h in zip(p, steps))
        taken = [r for r, factor in zip(regions, scales) if factor is not None]
        self._settle_drift(answered, corrected, {r: pi for r, pi in zip(taken, p) if r in whole}, scale, start)
        pseudo_gradient = {k: sum(c * d[k] for c, d in zip(coeffs, changes)) for k in changes[0]}
        self.optimizer.step(pseudo_gradient)
        return self.optimizer.arrays(), MetricRecord({"regions": len(changes)})

    def _settle_drift(self, answered: dict[str, int], corrected: set[str], weights: dict[str, float],
                      scale: float | None, start: dict) -> None:
        if self.drift is not None:
            self.drift.settle(answered, corrected, weights, scale, start)

    # ------------------------------------------------------------------ the period loop
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: EvaluateFn | None = None) -> Result:
        """Run `num_rounds` periods (or until a stop rule); returns the final model."""
        config, arrays = self._begin(grid, train_config, initial_arrays, evaluate_fn, timeout,
                                     first_round=self.step + 1, lr=self.outer_lr, momentum=self.outer_momentum,
                                     nesterov=self.nesterov)
        for period in range(self.step + 1, num_rounds + 1):
            if not self.roster.live:  # a resumed run whose regions are all quarantined
                self.book.stop_reason = NO_REGION_LEFT
                break
            if not self.jobs:  # else the first period's jobs went out with the roll call (`_begin`)
                self.jobs.push(grid, self.configure_train(period, arrays, config, grid))
            period_start = min((f.job.dispatched_at for f in self.jobs.values()), default=self.meter.clock.now())
            deadline = None if self.deadline_s is None else period_start + self.deadline_s
            on_time = self._collect(grid, deadline)
            new_arrays, _ = self.aggregate_train(period, on_time)
            if new_arrays is not None:
                arrays = new_arrays
            self.step = period
            if not self.roster.live:  # set before the evaluation: the run ends with this model, evaluated
                self.book.stop_reason = NO_REGION_LEFT
            accuracy = self._evaluate(period, arrays, evaluate_fn, force=period == num_rounds)
            if self.book.should_stop(accuracy):
                break
            self._newcomers(grid, config, period)  # (re)joined regions take part from the next period
            if self.plan is not None:
                self.plan.maybe_replan(period)
            self._checkpoint()
        return self._finish(arrays)

    def _collect(self, grid: Grid, deadline: float | None) -> list[Message]:
        """Replies that make the deadline; late ones are cut off (charged up to it) and counted."""
        clock = self.meter.clock
        late = set()
        if deadline is not None and clock.modelled:  # modelled ends are known at dispatch
            late = {k for k, f in self.jobs.items() if f.job.timing.end > deadline}
        replies: dict[str, Message] = {}
        while True:
            if not any(k not in replies and k not in late for k in self.jobs):
                break
            for reply in self.jobs.pull(grid, skip=set(replies) | late):
                replies[reply.metadata.reply_to_message_id] = reply
            if not clock.modelled and deadline is not None and clock.now() > deadline:
                late |= {k for k in self.jobs if k not in replies}
            self._drop_expired(answered=set(replies) | late)
            if any(k not in replies and k not in late for k in self.jobs):
                time.sleep(POLL_S)
        for key in late:
            flight = self.jobs.pop(key)
            self.meter.abandon(flight.job, at=deadline)
            self.book.count("dropped_late")
        on_time = []
        arrived = sorted((self.jobs.jobs[k].region, k) for k in replies if k in self.jobs and k not in late)
        for _, key in arrived:  # region order: the average's float sums do not depend on arrival order
            reply = replies[key]
            if reply.has_error():
                self._lose(key, reply.error.reason)
            else:
                on_time.append(reply)
        if late:
            clock.wait_until(deadline)
        return on_time
