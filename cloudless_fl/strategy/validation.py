"""Server-side update validation: a bad update never reaches the global model.

Every strategy passes each region's reply through one `UpdateValidator` before
using it. An update is rejected when its arrays are not exactly the model's
(names, shapes, dtypes), cannot be decoded, hold NaN/Inf, or when its norm
exceeds `max_norm` (or it is clipped to `max_norm`, if so configured). The norm
is that of the *change* the update makes: the gradient or delta as sent, or
`w_region - w_global` for full weights. Rejections are counted per region and
reason, logged once per (region, reason), and a region whose rejections reach
`quarantine_after` is quarantined (it gets no more work).

A reply's metrics are checked too (`UpdateValidator.check_report`): they say how
many examples an update was computed on — Flower's FedAvg and MA weight by it —
and how long the job took, which the scheduler learns from. A reply without
its one MetricRecord, or with a count or a duration that is not a number of
them, is rejected as `malformed` like a bad update, instead of stopping the run
(Flower's FedAvg raises on it) or weighting the average by a negative count.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from ..control.jobs import Reported
from ..training import protocol
from ..training.compression import Codec
from ..errors import ConfigError

log = logging.getLogger("cloudless_fl")
NORM_POLICIES = ("reject", "clip")
AUTO = "auto"  # a screen setting the strategy chooses (UpdateLimits.min_relatedness)
PER_REGION_SCREEN = ("clip_factor", "share_budget", "min_relatedness")  # ASGD-GA's screen only (screen.py)
SCREEN = ("norm_factor", "min_agreement", *PER_REGION_SCREEN)  # MA's and ASGD-GA's screen (screen.py); not FedAvg's


class RejectedUpdate(Exception):
    """An update that failed validation; `reason` is one of the counted kinds."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class UpdateLimits:
    """What counts as a bad update, and what happens to it.

    Parameters
    ----------
    max_norm : float, optional
        Bound on the L2 norm of an update's change; None: no bound.
    on_norm : "reject" | "clip"
        What to do with an update over `max_norm`.
    quarantine_after : int
        Rejections after which a region gets no more work (0: never).
    norm_factor, min_agreement : float, optional
        The screen of well-formed updates (screen.py): hold back one longer than
        the model, or whose norm per √step is over `norm_factor` x the median (MA:
        of the recent updates; ASGD-GA: of the regions' latest), or (MA) whose
        cosine with its region's previous update is below `min_agreement`. None:
        that check off (`norm_factor`: every length check).
    clip_factor : float, optional
        ASGD-GA: an admitted update whose norm per √step is over this multiple of
        the regions' median is scaled down to it. None (default): no clipping —
        at 1x it under-counts the regions whose honest updates are longest
        (docs/reliability.md).
    share_budget : float, optional
        ASGD-GA: keep each region's recent movement of the model (its admitted updates'
        applied weight x norm, decaying) within this multiple of its data share of the
        other regions' movement; an update is scaled down to the room left, or held back
        when none is. None (default): no budget.
    min_relatedness : float | "auto", optional
        ASGD-GA: hold back an update whose |cosine| with its region's recent
        direction is below this many spreads of what noise scores. None: no such
        check. "auto" (default): the strategy's own choice — 2 in ASGD-GA's
        gradient mode, where noise of a gradient's length is otherwise applied
        (measured: 0.889 vs 0.950 clean on geo4), off in delta mode, where noise
        barely hurts and honest updates near convergence score like noise.
    """

    max_norm: float | None = None
    on_norm: str = "reject"
    quarantine_after: int = 5
    norm_factor: float | None = 5.0
    min_agreement: float | None = 0.05
    clip_factor: float | None = None
    share_budget: float | None = None
    min_relatedness: float | str | None = AUTO

    def __post_init__(self) -> None:
        if self.max_norm is not None and not (isinstance(self.max_norm, (int, float)) and self.max_norm > 0):
            raise ConfigError(f"validation.max_norm={self.max_norm!r} must be a number > 0 (or null for no bound)")
        if self.on_norm not in NORM_POLICIES:
            raise ConfigError(f"validation.on_norm={self.on_norm!r} is unknown; use one of {', '.join(NORM_POLICIES)}")
        if self.norm_factor is not None and not (isinstance(self.norm_factor, (int, float)) and self.norm_factor > 1):
            raise ConfigError(f"validation.norm_factor={self.norm_factor!r} must be a number > 1 (or null: no check)")
        if self.min_agreement is not None and not (isinstance(self.min_agreement, (int, float))
                                                   and -1 <= self.min_agreement <= 1):
            raise ConfigError(f"validation.min_agreement={self.min_agreement!r} must be in [-1, 1] (or null: no check)")
        if self.clip_factor is not None and not (isinstance(self.clip_factor, (int, float)) and self.clip_factor > 0):
            raise ConfigError(f"validation.clip_factor={self.clip_factor!r} must be a number > 0 "
                              "(or null: no clipping)")
        if self.share_budget is not None and not (isinstance(self.share_budget, (int, float))
                                                  and self.share_budget > 1):
            raise ConfigError(f"validation.share_budget={self.share_budget!r} must be a number > 1 (at 1 every "
                              "region waits for the others) or null (no budget)")
        if self.min_relatedness not in (None, AUTO) and not (
                isinstance(self.min_relatedness, (int, float)) and self.min_relatedness >= 0):
            raise ConfigError(f"validation.min_relatedness={self.min_relatedness!r} must be a number ≥ 0, "
                              f"{AUTO} (the strategy's choice) or null (no check)")
        if not isinstance(self.quarantine_after, int) or self.quarantine_after < 0:
            raise ConfigError(f"validation.quarantine_after={self.quarantine_after!r} must be an integer ≥ 0")

    def changed(self, names: Iterable[str]) -> list[str]:
        """Those of the settings `names` given other than their defaults, as `validation.clip_factor=2.0`: what
        a strategy that does not use them names when it says it ignores them."""
        return [f"validation.{name}={getattr(self, name)!r}" for name in names
                if getattr(self, name) != getattr(UpdateLimits, name)]


class UpdateValidator:
    """Checks updates against the model's layout; counts and logs rejections.

    Parameters
    ----------
    reference : mapping name → tensor
        The global model: what a full-weights update must look like.
    limits : UpdateLimits
    """

    def __init__(self, reference: Mapping[str, torch.Tensor], limits: UpdateLimits = UpdateLimits()) -> None:
        self.limits = limits
        self.layout = {name: (tuple(t.shape), _dtype_name(t)) for name, t in reference.items()}
        self.float_names = {name for name, t in reference.items() if t.is_floating_point()}
        self.like = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in reference.items()}
        self.rejections: dict[str, Counter] = defaultdict(Counter)
        self.clipped: Counter = Counter()

    def expected_names(self, mode: str) -> set[str]:
        """Gradients cover the floating-point entries; weights and deltas cover all."""
        return set(self.float_names) if mode == protocol.MODE_GRADIENT else set(self.layout)

    def check(self, region: str, arrays: ArrayRecord, mode: str, base: Mapping[str, torch.Tensor] | None = None,
              codec: Codec | None = None, encoding: str = "none") -> dict[str, torch.Tensor]:
        """The update's tensors if it passes, clipped if so configured; else `RejectedUpdate`, counted.

        `encoding` is what the reply says its arrays are: `none` (as they are) or the run's `codec`'s spec."""
        try:
            return self._check(region, arrays, mode, base, codec, encoding)
        except RejectedUpdate as exc:
            self._count(region, exc)
            raise

    def check_report(self, region: str, reply: Message, one_of_each: bool = False,
                     takes: tuple[str, ...] = protocol.MODES) -> tuple[MetricRecord, Reported]:
        """A train reply's MetricRecord (`metrics`, or its only one) and what it reports about the job, once its
        counts (`num-examples` at least 1, `steps`, `workers`) are whole numbers and its durations finite and not
        negative; else `RejectedUpdate` (`malformed`), counted. `one_of_each`: the reply must also hold exactly
        one ArrayRecord and one MetricRecord, as Flower's own strategies require (they raise otherwise).
        `takes`: the update kinds the job can be answered with; another is `wrong_kind`."""
        try:
            return _checked_report(reply, one_of_each, takes)
        except RejectedUpdate as exc:
            self._count(region, exc)
            raise

    def quarantined(self, region: str) -> bool:
        after = self.limits.quarantine_after
        return after > 0 and sum(self.rejections[region].values()) >= after

    def _check(self, region: str, arrays: ArrayRecord, mode: str, base: Mapping[str, torch.Tensor] | None,
               codec: Codec | None, encoding: str) -> dict[str, torch.Tensor]:
        expected = self.expected_names(mode)
        if encoding != "none" and (codec is None or encoding != codec.spec()):
            raise RejectedUpdate("malformed", f"encoded as {encoding!r}; the run uses "
                                              f"{'none' if codec is None else codec.spec()!r}")
        if encoding != "none":
            try:
                tensors = codec.decode(arrays, {n: t for n, t in self.like.items() if n in expected})
            except (TypeError, ValueError) as exc:
                raise RejectedUpdate("malformed", str(exc)) from None
        else:
            tensors = self._decode(arrays, expected)
        change = {n: (tensors[n] - base[n] if mode == protocol.MODE_WEIGHTS and base is not None else tensors[n])
                  for n in expected if n in self.float_names}
        norms = [torch.linalg.vector_norm(t) for t in change.values()]
        norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        if not math.isfinite(norm):  # NaN/Inf propagate into the norm; the slow check only on this path
            bad = next((n for n, t in change.items() if not bool(torch.isfinite(t).all())), None)
            if bad is not None:
                raise RejectedUpdate("non_finite", f"{bad} holds NaN or Inf")
            raise RejectedUpdate("norm", "norm overflows")
        bound = self.limits.max_norm
        if bound is not None and norm > bound:
            if self.limits.on_norm == "reject":
                raise RejectedUpdate("norm", f"norm {norm:.4g} exceeds max_norm {bound:g}")
            self.clipped[region] += 1
            scale = bound / norm
            for name, t in change.items():
                tensors[name] = base[name] + t * scale if mode == protocol.MODE_WEIGHTS and base is not None \
                    else t * scale
        return tensors

    def _decode(self, arrays: ArrayRecord, expected: set[str]) -> dict[str, torch.Tensor]:
        """An uncompressed update's tensors, once their names, shapes and dtypes match the model."""
        names = set(arrays.keys())
        if expected - names:
            raise RejectedUpdate("missing_array", f"missing {sorted(expected - names)[:3]}")
        if names - expected:
            raise RejectedUpdate("unexpected_array", f"unexpected {sorted(names - expected)[:3]}")
        for name in expected:
            array = arrays[name]
            shape, dtype = self.layout[name]
            if tuple(array.shape) != shape:
                raise RejectedUpdate("wrong_shape", f"{name} has shape {tuple(array.shape)}, the model {shape}")
            if array.dtype != dtype:
                raise RejectedUpdate("wrong_dtype", f"{name} has dtype {array.dtype}, the model {dtype}")
        try:
            return protocol.decode_tensors(arrays)
        except (TypeError, ValueError) as exc:
            raise RejectedUpdate("malformed", str(exc)) from None

    def _count(self, region: str, exc: RejectedUpdate) -> None:
        first = self.rejections[region][exc.reason] == 0
        self.rejections[region][exc.reason] += 1
        if first:
            log.warning("region %s sent a bad update (%s); rejected, and counted from now on", region, exc)


_COUNTS = {"num-examples": 1, "steps": 0, "workers": 1}  # the least each may be; num-examples must be given
_DURATIONS = ("compute-seconds", "startup-seconds", "load-seconds", "pace-behind-seconds")


def _checked_report(reply: Message, one_of_each: bool, takes: tuple[str, ...]) -> tuple[MetricRecord, Reported]:
    records = reply.content.metric_records
    arrays = len(reply.content.array_records)
    if one_of_each and (len(records) != 1 or arrays != 1):
        raise RejectedUpdate("malformed", f"{arrays} ArrayRecords and {len(records)} MetricRecords; "
                                          "Flower's strategies take one of each")
    if protocol.METRICS in records:
        metrics = records[protocol.METRICS]
    elif len(records) == 1:
        metrics = next(iter(records.values()))
    else:
        raise RejectedUpdate("malformed", f"{len(records)} MetricRecords, none named {protocol.METRICS!r}; "
                                          "a train reply carries one, with num-examples")
    for key, least in _COUNTS.items():
        value = metrics.get(key)
        if (value is not None or key == "num-examples") and not is_whole(value, least):
            raise RejectedUpdate("malformed", f"{key} is {value!r}; a whole number >= {least} is expected")
    for key in _DURATIONS:
        value = metrics.get(key)
        if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise RejectedUpdate("malformed", f"{key} is {value!r}; seconds >= 0 are expected")
    try:
        sent_as = protocol.reply_update(reply)
    except ValueError as exc:
        raise RejectedUpdate("malformed", str(exc)) from None
    if sent_as not in takes:
        raise RejectedUpdate("wrong_kind", f"its arrays are {sent_as}; the job asked for {' or '.join(takes)}")
    return metrics, protocol.job_report(reply, metrics)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole(value: object, least: int) -> bool:
    """A count a region reports: a finite whole number (int or float, not bool) of at least `least`."""
    return _is_number(value) and math.isfinite(value) and value == int(value) and value >= least


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.cpu().numpy().dtype)
