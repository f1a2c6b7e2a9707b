"""The step size that moves the model as the run's budget runs out: constant, then a linear cooldown to zero.

Local SGD from one model on non-IID regions does not converge to the optimum at a
constant step size: each region drifts towards its own data for `H` steps, and
the average of the drifts leaves the model a distance proportional to the step
size away (Li et al., "On the Convergence of FedAvg on Non-IID Data", ICLR 2020:
the step size must decay). A constant step followed by a short linear decay at
the end of a known budget reaches what a decay over the whole run reaches
(Hägele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations", 2024), and leaves the run as it was before the cooldown starts — so
the time to a target reached earlier does not change.

The budget is the run's time or cost budget (`StopRules`), whichever is nearer
to being spent; a run with neither (a wall-clock `auto` budget, a drop-in
strategy without one) has no end to cool down towards and keeps its step size.
"""

from __future__ import annotations


def cooldown_factor(spent: float | None, fraction: float | None) -> float:
    """What the step size is multiplied by when `spent` of the budget is gone.

    1 until the last `fraction` of the budget, then falling linearly to 0 at its end;
    1 throughout when there is no budget (`spent` None) or no cooldown (`fraction` None or 0).
    """
    if spent is None or not fraction:
        return 1.0
    return min(1.0, max(0.0, (1.0 - spent) / fraction))
