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
  with a bound that follows the run instead of a fixed number. Honest local SGD
  spikes now and then (geo4, heterogeneity-aware MA: about one update per run,
  up to 8.5x the median, the region's next update back in line), while a scaled
  attack is over the bound every time; so in MA a region's first excess after
  an update within the bound is **scaled down to the bound** (counted as
  clipped), and held back only when the region's previous update was over it
  too, or it has none (`tolerate_once`). Dropping such a spike in a run's last
  period cost geo4 MA 3 points of final accuracy; an attacker gains one bounded
  update per honest one it sends.
- **Agreement with itself** (synchronous MA). A region's consecutive changes
  point the same way (cosine 0.80-0.98 measured): its data and the model move
  slowly. Noise, or anything not computed from the region's data, does not
  (cosine ≈ 0).

ASGD-GA's updates come from different model versions and regions of very
different speed: a fast region fills any recent window, and a region's
consecutive updates need not agree (measured, see
`AsyncGradAccum.comparable_updates`). Its screen therefore compares each update
with **every region's latest** norm per √step (the median over regions, so one
region of three or more cannot move it; a fast region counts once) and applies
a length bound, with an opt-in clip (Kardam-style filtering for asynchronous
SGD, Damaskinos et al. 2018, arXiv 1805.10032, with the norm bound of Sun et
al. in place of its Lipschitz test):

- holds back an update over `norm_factor` x that median (honest geo4 updates
  measured at 0.14-3.5x; × −10 of one at a median 24x);
- opt-in, scales an admitted update down to `clip_factor` x that median
  (clipping as in DP-SGD/robust FL). Off by default: at 1x it scales down
  every update over the median, on label-skewed data the same regions'
  (those the model fits least) on nearly every arrival, so their data count
  below their share (FedNova's objective inconsistency, as with a capped
  balance weight), their updates grow, and the length bound ends up holding
  them back. Measured (ASGD-GA delta, seed 1, in-process, docs/reliability.md):
  tabular 0.886 with the clip, 0.924 without (the no-screen accuracy); geo4
  0.964 / 0.972; without it every attacked run (a fast region's × −10, × 1e4,
  noise; the largest world5 region's × −10) ends where the attacker's
  absence ends or higher.

On strongly non-IID data an honest region's length can differ from that median
by more than any attack's (generated tabular workload, before the balance
weights were scaled together at their cap: an under-served region's honest
updates at 1.8-7.9x, a fast region's × −10 at 2-6x). The opt-in **share
budget** (`share_budget`) judges influence instead of length: a region's
recent movement of the model (the decaying sum of its admitted updates'
applied weight x norm) is kept within `share_budget` x its data share of the
other regions' movement, so an honest
region below its share always passes, and an attacker moves the model at most
that much (scaled down to the room left, held back when none is). It trusts
the regions' reported data sizes, as FedAvg's weights do; measured trade-off
in docs/reliability.md.

Held-back updates are counted (`screened_updates`) and recorded, never applied;
they do not count towards quarantine, so an honest region caught by a false
positive loses that update only. Clipped ones count in `clipped_updates`. Not
caught (the threat model, docs/reliability.md): a region that sends a
consistent, normal-length wrong update (its honest change × −1, training on
poisoned labels); in ASGD-GA such an update moves the model at most a typical
step per arrival.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

WINDOW = 16  # norms per √step of the recent updates the length bound is relative to
MOVED_HALF_LIFE = 500  # share_budget: judged updates after which a region's past movement counts half
SPENT = 1e-6  # share_budget: room under this fraction of the budget is none (a region at its cap stays there)
RECENT = 0.5  # weight of a region's recent direction against its newest update (min_relatedness)


@dataclass(frozen=True)
class Verdict:
    """The screen's decision on one update: held back (`reason`), or admitted and applied × `scale` (≤ 1)."""

    reason: str | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class Candidate:
    """One region's update as the strategy will apply it: its change to the model and the local steps behind it."""

    region: str
    change: Mapping[str, torch.Tensor]
    steps: int | None = None
    weight: float = 1.0  # the factor the strategy applies it with before the screen's (share_budget)


class UpdateScreen:
    """Admits, clips or holds back well-formed updates; state: recent norms and each region's last update.

    Parameters
    ----------
    norm_factor : float, optional
        An update whose norm per √(local steps) exceeds this multiple of the reference
        median is held back (None: no such check).
    model_bound : bool
        Hold back an update longer than the model it changes.
    min_agreement : float, optional
        An update whose cosine with its region's previous update is below this is
        held back (None: no agreement check).
    per_region : bool
        The reference is the median of each region's latest norm per √step (asynchronous
        updates) instead of the median of the recent `WINDOW` updates (synchronous periods).
    clip_factor : float, optional
        An admitted update longer than this multiple of the reference is scaled down to it
        (None: never scaled).
    min_relatedness : float, optional
        An update whose |cosine| with its region's recent direction (a moving average of
        its admitted updates' directions) is below this many spreads of the cosine random
        noise of the same per-entry lengths would score (1/√parameters for evenly spread
        lengths) is held back as unrelated to the region's data (None: no such check).
    tolerate_once : bool
        An update over `norm_factor` x the reference whose region's previous update was within
        it is scaled down to the bound instead of held back (a transient spike, not an attack).
    share_budget : float, optional
        A region's recent movement of the model (the decaying sum of its admitted updates'
        weight x norm) is kept within this multiple of its data share of the other regions'
        movement: an update is scaled down to the room left, held back when none is (None: no
        budget). Needs `shares` in `admit`.
    """

    def __init__(self, norm_factor: float | None = 5.0, min_agreement: float | None = 0.05,
                 model_bound: bool = True, per_region: bool = False, clip_factor: float | None = None,
                 min_relatedness: float | None = None, tolerate_once: bool = False,
                 share_budget: float | None = None) -> None:
        self.norm_factor, self.min_agreement, self.model_bound = norm_factor, min_agreement, model_bound
        self.per_region, self.clip_factor, self.min_relatedness = per_region, clip_factor, min_relatedness
        self.tolerate_once, self.share_budget = tolerate_once, share_budget
        self.moved: dict[str, float] = {}  # share_budget: region → its decaying sum of applied weight x norm
        self.within: dict[str, bool] = {}  # region → its latest update was within the length bound
        self.norms: deque[float] = deque(maxlen=WINDOW)
        self.latest: dict[str, float] = {}  # per_region: region → its latest norm per √step
        self.last: dict[str, torch.Tensor] = {}
        self.direction: dict[str, torch.Tensor] = {}  # min_relatedness: region → recent direction (unit-ish)

    def admit(self, candidates: Sequence[Candidate], model_norm: float,
              shares: Mapping[str, float] | None = None) -> list[Verdict]:
        """Per candidate, a Verdict. Judged together, as one aggregation uses them.

        `shares`: every region's data share (needed with `share_budget`).

        An update longer than the model it changes is never a step from it (the
        bound that holds without history). The length bound and the clip need a
        reference: once three updates (per_region: three regions) have been seen,
        their median; before that, of the candidates, if three or more.
        """
        flats = [torch.cat([t.reshape(-1).float() for t in c.change.values()]) for c in candidates]
        per_step = [float(f.norm()) / math.sqrt(max(1, c.steps or 1)) for f, c in zip(flats, candidates)]
        reference = self._reference(per_step)
        verdicts = []
        for candidate, flat, norm in zip(candidates, flats, per_step):
            reason, scale = None, 1.0
            if self.model_bound and model_norm > 0 and float(flat.norm()) > model_norm:
                reason = f"norm {float(flat.norm()):.3g} exceeds the model's own norm {model_norm:.3g}"
            elif self.norm_factor is not None and reference is not None and norm > self.norm_factor * reference:
                if self.tolerate_once and self.within.get(candidate.region, False):
                    scale = self.norm_factor * reference / norm
                else:
                    reason = (f"norm per √step {norm:.3g} is over {self.norm_factor:g}x the {self._what} "
                              f"{reference:.3g}")
            if self.norm_factor is not None and reference is not None:
                self.within[candidate.region] = norm <= self.norm_factor * reference
            previous = self.last.get(candidate.region)
            if reason is None and self.min_agreement is not None and previous is not None:
                agreement = float(torch.nn.functional.cosine_similarity(flat, previous, dim=0))
                if not agreement >= self.min_agreement:
                    reason = (f"agrees with the region's previous update by {agreement:.2f} (cosine), "
                              f"below min_agreement {self.min_agreement:g}")
            if reason is None and self.min_relatedness is not None:
                reason = self._unrelated(candidate.region, flat, [t.numel() for t in candidate.change.values()])
            if reason is None and self.clip_factor is not None and reference is not None and norm > 0:
                scale = min(1.0, self.clip_factor * reference / norm)
            if self.min_agreement is not None:
                self.last[candidate.region] = flat
            if math.isfinite(norm):  # held-back ones too: the median follows the run (a minority cannot move it)
                self.norms.append(norm)
                self.latest[candidate.region] = norm
            if self.share_budget is not None:
                reason, scale = self._budgeted(candidate, float(flat.norm()) * scale, shares, reason, scale)
            verdicts.append(Verdict(reason, scale))
        return verdicts

    def _unrelated(self, region: str, flat: torch.Tensor, sizes: Sequence[int]) -> str | None:
        """Why `flat` is unrelated to the region's recent direction, or None (then it joins that direction).

        Measured in spreads of noise: the cosine that random noise with the update's own
        per-entry lengths (`sizes`: the entries' element counts) would score against that
        direction has standard deviation √(Σ |u_t|² |d_t|² / n_t) / (|u| |d|) (1/√parameters
        when the lengths are spread evenly; more when one small entry carries most of it).
        |cosine|, not cosine: an honest region's gradient can swing against its recent
        direction (measured on geo4, gradient mode: down to −0.82). Near convergence it
        gets noise-like too (a stock ClientApp's measured at 0.62-2.9 spreads): hence opt-in."""
        unit = flat / flat.norm().clamp_min(1e-30)
        previous = self.direction.get(region)
        if previous is not None:
            direction = previous / previous.norm().clamp_min(1e-30)
            cosine = float(torch.dot(unit, direction))
            spread = math.sqrt(sum(float(u.square().sum() * d.square().sum()) / n for u, d, n in
                                   zip(unit.split(list(sizes)), direction.split(list(sizes)), sizes)))
            if abs(cosine) < self.min_relatedness * spread:
                return (f"unrelated to the region's recent updates (cosine {cosine:.2g}, {abs(cosine) / spread:.2g} "
                        f"spreads of noise, below min_relatedness {self.min_relatedness:g})")
        self.direction[region] = unit if previous is None else RECENT * previous + (1 - RECENT) * unit
        return None

    def _budgeted(self, candidate: Candidate, length: float, shares: Mapping[str, float], reason: str | None,
                  scale: float) -> tuple[str | None, float]:
        """(reason, scale) with the region's movement kept within share_budget x its share of the others'.

        `length`: the update's norm as admitted so far (after any clip). Every judged update
        ages every region's movement; only an admitted one adds to its region's. Until another
        region has moved the model there is nothing to compare with: the update passes."""
        decay = 0.5 ** (1 / MOVED_HALF_LIFE)
        self.moved = {r: m * decay for r, m in self.moved.items()}
        if reason is not None:
            return reason, scale
        region, applied = candidate.region, candidate.weight * length
        moved = self.moved.get(region, 0.0)
        others = [r for r in self.moved if r != region]
        others_share = sum(shares[r] for r in others)
        factor = 1.0
        if others_share > 0 and applied > 0:
            fair = sum(self.moved[r] for r in others) * shares[region] / others_share
            room = self.share_budget * fair - moved
            if room <= SPENT * self.share_budget * fair:
                return (f"its region moved the model {moved / max(fair, 1e-30):.3g}x its data share of the "
                        f"other regions' movement, over share_budget {self.share_budget:g}"), scale
            factor = min(1.0, room / applied)
        self.moved[region] = moved + applied * factor
        return None, scale * factor

    @property
    def _what(self) -> str:
        return "regions' median" if self.per_region else "recent median"

    def _reference(self, candidates_norms: Sequence[float]) -> float | None:
        """The median length the bounds are multiples of."""
        seen = list(self.latest.values()) if self.per_region else self.norms
        if len(seen) >= 3:
            return _median(seen)
        return _median(candidates_norms) if len(candidates_norms) >= 3 else None

    def state_dict(self) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
        """(JSON-able norms, tensors) for a checkpoint: resume judges the next update exactly as the run would."""
        return ({"recent": list(self.norms), "latest": dict(self.latest), "within": dict(self.within),
                 "moved": dict(self.moved)},
                {"last": dict(self.last), "direction": dict(self.direction)})

    def load_state_dict(self, norms: dict, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.norms = deque(norms["recent"], maxlen=WINDOW)
        self.latest = dict(norms["latest"])
        self.within = dict(norms.get("within", {}))  # checkpoints written before tolerate_once: none known
        self.moved = dict(norms.get("moved", {}))  # checkpoints written before share_budget: nothing moved
        self.last = dict(tensors["last"])
        self.direction = dict(tensors["direction"])


def _median(values) -> float:
    """The median; for an even count the mean of the two middle values (so with four regions, one cannot set it)."""
    return float(torch.tensor(list(values), dtype=torch.float64).quantile(0.5))
