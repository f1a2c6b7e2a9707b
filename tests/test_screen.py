"""The update screen: too long for the model or the run, or unlike the region's own last update."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless_fl.strategy.screen import Candidate, UpdateScreen

MODEL_NORM = 1e3


def change(vector) -> dict[str, torch.Tensor]:
    vector = torch.as_tensor(vector, dtype=torch.float32)
    return {"w": vector[:-2].reshape(-1, 2) if len(vector) > 4 else vector[:-2], "b": vector[-2:]}


def test_an_update_longer_than_the_model_is_held_back_without_any_history():
    screen = UpdateScreen(norm_factor=None, min_agreement=None)
    reasons = screen.admit([Candidate("a", change([3.0, 4.0, 0.0, 0.0]))], model_norm=4.9)
    assert reasons[0] is not None and "exceeds the model's own norm 4.9" in reasons[0]
    assert screen.admit([Candidate("a", change([3.0, 4.0, 0.0, 0.0]))], model_norm=5.1) == [None]


def test_a_change_far_longer_per_step_than_the_others_is_held_back():
    screen = UpdateScreen(norm_factor=5.0, min_agreement=None)
    honest = [Candidate(r, change([1.0, 0.0, 0.0, 0.0])) for r in "bcd"]
    reasons = screen.admit([*honest, Candidate("a", change([-10.0, 0.0, 0.0, 0.0]))], MODEL_NORM)
    assert reasons[:3] == [None, None, None]
    assert "norm per √step 10 is over 5x the recent median 1" in reasons[3]


def test_length_is_judged_per_root_of_local_steps():
    screen = UpdateScreen(norm_factor=5.0, min_agreement=None)
    screen.admit([Candidate(r, change([1.0, 0.0, 0.0, 0.0]), steps=4) for r in "abc"], MODEL_NORM)
    # 36x the steps: up to 6x the length (√36) is in line, over 5 x 6 = 30x is not
    assert screen.admit([Candidate("d", change([29.0, 0.0, 0.0, 0.0]), steps=144)], MODEL_NORM) == [None]
    assert screen.admit([Candidate("e", change([31.0, 0.0, 0.0, 0.0]), steps=144)], MODEL_NORM)[0] is not None
    assert screen.admit([Candidate("f", change([6.0, 0.0, 0.0, 0.0]), steps=4)], MODEL_NORM)[0] is not None


def test_an_update_unlike_its_regions_previous_one_is_held_back():
    screen = UpdateScreen(norm_factor=None, min_agreement=0.2)
    assert screen.admit([Candidate("a", change([1.0, 1.0, 0.0, 0.0]))], MODEL_NORM) == [None]  # nothing to agree with
    assert screen.admit([Candidate("a", change([1.0, 0.8, 0.1, 0.0]))], MODEL_NORM) == [None]
    reason = screen.admit([Candidate("a", change([0.0, 0.0, 1.0, -1.0]))], MODEL_NORM)[0]
    assert reason is not None and "below min_agreement 0.2" in reason
    assert screen.admit([Candidate("b", change([0.0, 0.0, 1.0, -1.0]))], MODEL_NORM) == [None]  # b's own first


def test_the_length_bound_follows_the_run_so_a_common_growth_cannot_lock_everyone_out():
    screen = UpdateScreen(norm_factor=5.0, min_agreement=None)
    screen.admit([Candidate(r, change([1.0, 0.0, 0.0, 0.0])) for r in "abcd"], MODEL_NORM)
    held = [screen.admit([Candidate(r, change([20.0, 0.0, 0.0, 0.0])) for r in "abcd"], MODEL_NORM)
            for _ in range(4)]
    assert any(r is not None for r in held[0])  # at first the jump looks like an attack...
    assert held[-1] == [None] * 4  # ...but once it is the run's normal, it is admitted


def test_a_restored_screen_judges_as_the_original():
    original = UpdateScreen()
    original.admit([Candidate(r, change([1.0, float(i), 0.0, 0.0])) for i, r in enumerate("abcd")], MODEL_NORM)
    restored = UpdateScreen()
    restored.load_state_dict(*original.state_dict())
    probe = [Candidate("a", change([-1.0, 0.5, 0.0, 0.0])), Candidate("b", change([30.0, 0.0, 0.0, 0.0]))]
    reasons = restored.admit(probe, MODEL_NORM)
    assert reasons == original.admit(probe, MODEL_NORM)
    assert all(r is not None for r in reasons)  # a disagrees with its last update, b is too long: both need history


@settings(max_examples=60, deadline=None)
@given(regions=st.integers(3, 8), rounds=st.integers(2, 6), seed=st.integers(0, 2**16),
       attacker=st.sampled_from(["x-10", "x1e4", "noise"]))
def test_honest_regions_pass_and_the_attacker_is_held_back_from_its_second_update(regions, rounds, seed, attacker):
    """Honest: a steady direction per region, norms within 0.8-1.25 of each other, small drift between rounds."""
    gen = torch.Generator().manual_seed(seed)
    directions = [torch.randn(4096, generator=gen) for _ in range(regions)]
    screen = UpdateScreen(norm_factor=5.0, min_agreement=0.2)
    for round_ in range(rounds):
        candidates = []
        for r, direction in enumerate(directions):
            honest = direction + 0.2 * torch.randn(4096, generator=gen)
            honest = honest / honest.norm() * (0.8 + 0.45 * torch.rand(1, generator=gen).item())
            if r == 0:
                honest = {"x-10": -10 * honest, "x1e4": 1e4 * honest,
                          "noise": torch.randn(4096, generator=gen) / 64 * honest.norm()}[attacker]
            candidates.append(Candidate(f"r{r}", change(honest)))
        reasons = screen.admit(candidates, MODEL_NORM)
        assert reasons[1:] == [None] * (regions - 1), reasons
        if attacker != "noise" or round_ > 0:  # noise needs a previous update to disagree with
            assert reasons[0] is not None


def test_without_the_model_bound_nothing_is_held_for_length_alone():
    screen = UpdateScreen(norm_factor=None, min_agreement=None, model_bound=False)
    assert screen.admit([Candidate("a", change([3e4, 4e4, 0.0, 0.0]))], model_norm=1.0) == [None]
