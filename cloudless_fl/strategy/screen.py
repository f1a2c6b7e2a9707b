"""Screening well-formed updates for a bad region: too long for its work, or unlike its own last one.

Validation (validation.py) refuses what is malformed; a malicious or broken
region can still send a finite, well-shaped update that is wrong. Measured on
4 label-skewed regions (docs/reliability.md): one region sending its honest
change × −10 or × 1e4 drives MA to chance accuracy, and random noise of the
update's norm costs 17 points. Coordinate-wise median and trimmed mean
(robust.py) bound such an update, but with regions holding different data the
honest regions disagree so much that the median costs as much as the attack.
Three properties of honest updates separate them instead:

- **Shorter than the model.** An update longer than the model it changes is
  not a step from it (× 1e4 is); the one bound that needs no history.
- **Length per √step** (synchronous MA). Within a period every region starts
  from the same model, and an honest change's norm divided by the square root of
  its local steps stays within a small factor of the recent median (0.4-4x
  measured on geo4): × −10 and × 1e4 are far outside. √steps, not steps: the
  change of H local SGD steps grows like H while the gradient dominates and
  like √H once noise does (a random walk); regions given unequal steps (the
  elastic scheduler) are compared on the slower growth, so extra steps never
  look like an attack. Norm bounding after Sun et al. 2019 (arXiv 1911.07963),
  with a bound that follows the run instead of a fixed number. Measured false
  positives: one honest update of 160 in geo4 MA + elastic scheduler (seed 1;
  the run's summary unchanged), none in plain MA on geo4 or world5.
- **Agreement with itself** (synchronous MA). A region's consecutive changes
  point the same way (cosine 0.80-0.98 measured): its data and the model move
  slowly. Noise, or anything not computed from the region's data, does not
  (cosine ≈ 0).

ASGD-GA gets the first check only: its updates come from different model
versions, and neither of the other two separates an attacker there (measured,
see `AsyncGradAccum.comparable_updates`). Held-back updates are counted
(`screened_updates`) and recorded, never applied; they do not count towards
quarantine, so an honest region caught by a false positive loses that update
only. Not caught (the threat model, docs/reliability.md): a region that sends a
consistent, normal-length wrong update (its honest change × −1, training on
poisoned labels), and in ASGD-GA anything shorter than the model.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

WINDOW = 16  # norms per √step of the recent updates the length bound is relative to


@dataclass(frozen=True)
class Candidate:
    """One region's update as the strategy will apply it: its change to the model and the local steps behind it."""

    region: str
    change: Mapping[str, torch.Tensor]
    steps: int | None = None


class UpdateScreen:
    """Admits or holds back well-formed updates; state: recent norms and each region's last update.

    Parameters
    ----------
    norm_factor : float, optional
        An update whose norm per √(local steps) exceeds this multiple of the recent
        median is held back (None: no such check).
    model_bound : bool
        Hold back an update longer than the model it changes.
    min_agreement : float, optional
        An update whose cosine with its region's previous update is below this is
        held back (None: no agreement check).
    """

    def __init__(self, norm_factor: float | None = 5.0, min_agreement: float | None = 0.05,
                 model_bound: bool = True) -> None:
        self.norm_factor, self.min_agreement, self.model_bound = norm_factor, min_agreement, model_bound
        self.norms: deque[float] = deque(maxlen=WINDOW)
        self.last: dict[str, torch.Tensor] = {}

    def admit(self, candidates: Sequence[Candidate], model_norm: float) -> list[str | None]:
        """Per candidate, None (admit) or why it is held back. Judged together, as one aggregation uses them.

        An update longer than the model it changes is never a step from it (the
        bound that holds without history). Once three updates have been seen the
        length bound is `norm_factor` x the median of the recent ones (before
        that, of the candidates, if three or more).
        """
        flats = [torch.cat([t.reshape(-1).float() for t in c.change.values()]) for c in candidates]
        per_step = [float(f.norm()) / math.sqrt(max(1, c.steps or 1)) for f, c in zip(flats, candidates)]
        reference = (_median(self.norms) if len(self.norms) >= 3
                     else _median(per_step) if len(candidates) >= 3 else None)
        reasons = []
        for candidate, flat, norm in zip(candidates, flats, per_step):
            reason = None
            if self.model_bound and model_norm > 0 and float(flat.norm()) > model_norm:
                reason = f"norm {float(flat.norm()):.3g} exceeds the model's own norm {model_norm:.3g}"
            elif self.norm_factor is not None and reference is not None and norm > self.norm_factor * reference:
                reason = f"norm per √step {norm:.3g} is over {self.norm_factor:g}x the recent median {reference:.3g}"
            previous = self.last.get(candidate.region)
            if reason is None and self.min_agreement is not None and previous is not None:
                agreement = float(torch.nn.functional.cosine_similarity(flat, previous, dim=0))
                if not agreement >= self.min_agreement:
                    reason = (f"agrees with the region's previous update by {agreement:.2f} (cosine), "
                              f"below min_agreement {self.min_agreement:g}")
            if self.min_agreement is not None:
                self.last[candidate.region] = flat
            if math.isfinite(norm):  # held-back ones too: the median follows the run (a minority cannot move it)
                self.norms.append(norm)
            reasons.append(reason)
        return reasons

    def state_dict(self) -> tuple[list[float], dict[str, torch.Tensor]]:
        """(JSON-able norms, tensors) for a checkpoint: resume judges the next update exactly as the run would."""
        return list(self.norms), dict(self.last)

    def load_state_dict(self, norms: list[float], last: Mapping[str, torch.Tensor]) -> None:
        self.norms = deque(norms, maxlen=WINDOW)
        self.last = dict(last)


def _median(values) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).median())
