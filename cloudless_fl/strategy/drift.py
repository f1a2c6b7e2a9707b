"""The server's side of drift correction (SCAFFOLD, Karimireddy et al., ICML 2020): MA's and ASGD-GA's.

**MA** (`DriftBooks`): which job each region corrects from, and the scale of
the step since. A region derives SCAFFOLD's `c` from the server's step (`training/region_link.py`):
`(x' − x) / scale`. That is the regions' mean gradient only while the last
step's `c` was the weighted mean of the regions' `c_i` with that step's own
weights. A step that leaves a sent region out (held back, late, lost), scales
one down, mixes corrected and uncorrected jobs or weighs the regions otherwise
than the step before breaks it, and the error would stay in every later `c`: a
constant pull on every region (it diverged within 30 periods in the first
tabular run without this rule). So after such a step the next period runs
uncorrected, which founds `c` afresh from the regions' plain gradients.

The update screen (screen.py) judges a region's change by its length and by its
agreement with the region's previous change: measures of plain local SGD. A
corrected change is the region's work minus the consensus, and beside the
region's uncorrected one (after a reset) it looks unrelated: in the first
tabular run the screen held back 48 updates of 68 periods, each one a reset,
and the correction did nothing (0.920 final; 0.934 with the agreement check
off). So the screen is shown the change with the correction taken out — what
the region's own gradients did, `change − lr · H · correction` — which the
server works out as the region does: it mirrors each region's mean gradient
from that region's last change.

**ASGD-GA** (`ControlVariates`): no step of the server's is the regions'
average, so nothing can be read off the model; each job is sent its correction
`c − c_r` (SCAFFOLD sends `c` with the model too; here in int8, or the run's
codec if it compresses: `GeoStrategy.drift_codec`). The server mirrors
`c_r`, the region's mean gradient over its last job, from that job's change as
applied: `K` steps at rate `lr`, each corrected by `corr`, move the model by
`lr · K · (c_r + corr)`. `c` is the data-share mean of the live regions' `c_r`,
so the corrections sent at one moment sum to zero weighted by share. Measured
on the tabular study: README, "ASGD-GA's drift correction".

A mirror is only as good as the update it came from, and one bad mirror
reaches every region's correction by its data share. So a region whose latest
update was not admitted (held back by the screen, refused, too stale) is left
out of `c` and sent no correction until an update of its is admitted again:
an attacker whose bad update slips through once poisons `c` only until its
next one is held back (measured, one region sending × −10: README), and an
honest region whose corrected update the screen holds back (the feedback in
"ASGD-GA's drift correction") founds its mirror afresh from a plain job.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch

from ..training.protocol import WorkOrder

Tensors = dict[str, torch.Tensor]


def corrects_drift(aggregation: str, outer_momentum: float) -> bool:
    """Whether MA's step is the regions' plain weighted average, which a region can read `c` off."""
    return aggregation == "mean" and not outer_momentum


class DriftBooks:
    """What the next period's work orders say about drift, kept from the last period's step.

    Parameters
    ----------
    parameters : names, optional
        The model's parameters: the entries a region corrects (not buffers such as batch-norm statistics).
        None: every floating-point entry.
    """

    def __init__(self, parameters: Iterable[str] | None = None) -> None:
        self.parameters = None if parameters is None else frozenset(parameters)
        self.previous_start: Tensors | None = None  # the model the last period's jobs started from
        self.gradients: dict[str, Tensors] = {}  # region → its last job's mean gradient, as the region keeps it
        self.kept: dict[str, int] = {}  # region → its job of the last period (the start and gradient it kept)
        self.scale: float | None = None  # the last step per unit of mean gradient; None: next period uncorrected
        self.weights: dict[str, float] = {}  # the last step's weight of each region
        self.pinned: dict[str, int] = {}  # region → the job a resume from the last checkpoint names
        self.sent: set[str] = set()  # regions sent a job this period

    def begin_period(self) -> None:
        self.sent = set()

    def amend(self, region: str, order: WorkOrder) -> WorkOrder:
        """`order` keeping its state for the next job and, if the last step allows, correcting from the last."""
        self.sent.add(region)
        pinned = self.pinned.get(region)
        keep_from = order.keep_from if pinned is None else min(order.keep_from, pinned)
        previous = self.kept.get(region) if self.scale else None
        return replace(order, drift=True, keep_from=keep_from, drift_from=previous,
                       drift_scale=None if previous is None else self.scale)

    def plain_change(self, region: str, order: WorkOrder, start: Tensors, change: Tensors,
                     corrected: bool) -> Tensors:
        """`change` (start − the region's result) without its correction, if `corrected` (the region says): `lr ·
        H` times the region's mean gradient, which is mirrored for the region's next job."""
        mirrored = self.gradients.get(region)
        plain = dict(change)
        if corrected and mirrored is not None and self.previous_start is not None:
            work = order.lr * order.steps
            for k, g in mirrored.items():
                plain[k] = change[k] - work * ((self.previous_start[k] - start[k]) / order.drift_scale - g)
        if order.lr > 0:
            self.gradients[region] = {k: v / (order.lr * order.steps) for k, v in plain.items()
                                      if self.parameters is None or k in self.parameters}
        return plain

    def settle(self, answered: dict[str, int], corrected: set[str], weights: dict[str, float],
               scale: float | None, start: Tensors) -> None:
        """After a step: `answered` region → job (each kept its state), `corrected` the regions whose job was,
        `weights` those the step took up in full with their weights, `scale` its size per unit of gradient
        (None: no plain weighted step), `start` the model the period's jobs started from."""
        same_weights = weights.keys() == self.weights.keys() and all(
            math.isclose(w, self.weights[r], rel_tol=1e-9) for r, w in weights.items())
        consistent = not corrected or (corrected == set(weights) and same_weights)
        whole = set(weights) == self.sent
        self.kept = dict(answered)
        self.scale = scale if consistent and whole and scale else None
        self.weights = dict(weights)
        self.previous_start = {k: v.clone() for k, v in start.items()}  # the step changes the server's in place

    def pin(self) -> None:
        """A checkpoint is written: a resume re-sends the next period naming the jobs kept now."""
        self.pinned = dict(self.kept)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensors]]:
        """(JSON-able books, tensors) for the checkpoint."""
        tensors = {f"gradient/{r}": g for r, g in self.gradients.items()}
        if self.previous_start is not None:
            tensors["previous_start"] = self.previous_start
        return {"kept": self.kept, "scale": self.scale, "weights": self.weights}, tensors

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, Tensors]) -> None:
        self.kept = {r: int(k) for r, k in state["kept"].items()}
        self.scale, self.weights = state["scale"], dict(state["weights"])
        self.previous_start = tensors.get("previous_start")
        self.gradients = {key.split("/", 1)[1]: g for key, g in tensors.items() if key.startswith("gradient/")}
        self.pin()


class ControlVariates:
    """ASGD-GA's drift correction: each region's mean gradient mirrored from its changes, and each job's
    correction `c − c_r` from them.

    Parameters
    ----------
    parameters : names, optional
        The model's parameters: the entries a region corrects (not buffers). None: every floating-point entry.
    """

    def __init__(self, parameters: Iterable[str] | None = None) -> None:
        self.parameters = None if parameters is None else frozenset(parameters)
        self.gradients: dict[str, Tensors] = {}  # region → its last admitted job's mean gradient (c_r)
        self.ignored: set[str] = set()  # regions whose ClientApp trained a corrected job plainly (a stock one)
        self.distrusted: set[str] = set()  # regions whose latest update was not admitted: out of `c`, uncorrected

    def correction(self, region: str, shares: Mapping[str, float]) -> Tensors | None:
        """`c − c_r` for `region`'s next job, `c` the mean of the `shares` regions' trusted gradients weighted by
        share; None until each of them has had one, or if the region's own is distrusted or its ClientApp does not
        correct."""
        if region in self.ignored or region in self.distrusted or any(r not in self.gradients for r in shares):
            return None
        trusted = {r: shares[r] for r in sorted(shares) if r not in self.distrusted}  # summed in one order always
        total = sum(trusted.values())
        own = self.gradients[region]
        return {k: sum((s / total) * self.gradients[r][k] for r, s in trusted.items()) - g for k, g in own.items()}

    def distrust(self, region: str) -> None:
        """The region's latest update was not admitted: its mirror leaves `c` until one is."""
        self.distrusted.add(region)

    def observe(self, region: str, order: WorkOrder, change: Tensors, correction: Tensors | None,
                corrected: bool | None) -> None:
        """An admitted `change` (start − result, as applied) of `order`'s job; `correction` what it was sent,
        `corrected` what the region said (None: nothing, a ClientApp that knows no drift correction)."""
        if correction is not None and corrected is None:
            self.ignored.add(region)  # it will not correct: stop sending what it ignores
        self.distrusted.discard(region)
        if order.lr <= 0:  # at the cooldown's end a change says nothing of the gradient
            return
        work = order.lr * order.steps
        taken = correction if correction is not None and corrected else None
        self.gradients[region] = {k: v.float() / work - (0.0 if taken is None else taken[k])
                                  for k, v in change.items() if self.parameters is None or k in self.parameters}

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensors]]:
        """(JSON-able books, tensors) for the checkpoint."""
        return ({"ignored": sorted(self.ignored), "distrusted": sorted(self.distrusted)},
                {f"gradient/{r}": g for r, g in self.gradients.items()})

    def load_state_dict(self, state: dict[str, Any], tensors: dict[str, Tensors]) -> None:
        self.ignored, self.distrusted = set(state["ignored"]), set(state.get("distrusted", ()))
        self.gradients = {key.split("/", 1)[1]: g for key, g in tensors.items() if key.startswith("gradient/")}
