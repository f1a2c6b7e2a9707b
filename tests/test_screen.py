"""The update screen: too long for the model or the run, or unlike the region's own last update; the async clip."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless_fl.strategy.screen import MOVED_HALF_LIFE, WINDOW, Candidate, UpdateScreen, Verdict

MODEL_NORM = 1e3


def held(screen: UpdateScreen, candidates, model_norm) -> list[str | None]:
    """Per candidate, why it is held back (None: admitted)."""
    return [verdict.reason for verdict in screen.admit(candidates, model_norm)]


def change(vector) -> dict[str, torch.Tensor]:
    vector = torch.as_tensor(vector, dtype=torch.float32)
    return {"w": vector[:-2].reshape(-1, 2) if len(vector) > 4 else vector[:-2], "b": vector[-2:]}


def test_an_update_longer_than_the_model_is_held_back_without_any_history():
    screen = UpdateScreen(norm_factor=None, min_agreement=None)
    reasons = held(screen, [Candidate("a", change([3.0, 4.0, 0.0, 0.0]))], model_norm=4.9)
    assert reasons[0] is not None and "exceeds the model's own norm 4.9" in reasons[0]
    assert held(screen, [Candidate("a", change([3.0, 4.0, 0.0, 0.0]))], model_norm=5.1) == [None]
    assert held(screen, [Candidate("a", change([0.6, 0.0, 0.0, 0.0]))], model_norm=0.5)[0] is not None  # under 1 too


def test_a_change_far_longer_per_step_than_the_others_is_held_back():
    screen = UpdateScreen(norm_factor=5.0, min_agreement=None)
    honest = [Candidate(r, change([1.0, 0.0, 0.0, 0.0])) for r in "bcd"]
    reasons = held(screen, [*honest, Candidate("a", change([-10.0, 0.0, 0.0, 0.0]))], MODEL_NORM)
    assert reasons[:3] == [None, None, None]
    assert "norm per √step 10 is over 5x the recent median 1" in reasons[3]


def test_length_is_judged_per_root_of_local_steps():
    screen = UpdateScreen(norm_factor=5.0, min_agreement=None)
    held(screen, [Candidate(r, change([1.0, 0.0, 0.0, 0.0]), steps=4) for r in "abc"], MODEL_NORM)
    # 36x the steps: up to 6x the length (√36) is in line, over 5 x 6 = 30x is not
    assert held(screen, [Candidate("d", change([29.0, 0.0, 0.0, 0.0]), steps=144)], MODEL_NORM) == [None]
    assert held(screen, [Candidate("e", change([31.0, 0.0, 0.0, 0.0]), steps=144)], MODEL_NORM)[0] is not None
    assert held(screen, [Candidate("f", change([6.0, 0.0, 0.0, 0.0]), steps=4)], MODEL_NORM)[0] is not None


def test_a_regions_one_off_spike_is_scaled_to_the_bound_and_a_repeated_or_first_one_held_back():
    """MA's screen (`tolerate_once`): honest local SGD spikes once in a while, a scaled attack every time."""
    screen = UpdateScreen(norm_factor=5.0, min_agreement=None, tolerate_once=True)
    assert held(screen, [Candidate(r, change([4.0, 0.0, 0.0, 0.0])) for r in "abcd"], MODEL_NORM) == [None] * 4
    spike = screen.admit([Candidate("a", change([32.0, 0.0, 0.0, 0.0]))], MODEL_NORM)[0]
    assert spike.reason is None and spike.scale == pytest.approx(20.0 / 32.0)  # a's last was within: to the bound
    again = held(screen, [Candidate("a", change([32.0, 0.0, 0.0, 0.0]))], MODEL_NORM)[0]
    assert again is not None and "norm per √step 32 is over 5x the recent median 4" in again  # a's last was over
    assert screen.admit([Candidate("a", change([4.0, 0.0, 0.0, 0.0]))], MODEL_NORM)[0].scale == 1.0  # back in line
    assert held(screen, [Candidate("e", change([32.0, 0.0, 0.0, 0.0]))], MODEL_NORM)[0] is not None  # e's first
    restored = UpdateScreen(norm_factor=5.0, min_agreement=None, tolerate_once=True)
    norms, tensors = screen.state_dict()
    restored.load_state_dict(json.loads(json.dumps(norms)), tensors)  # as a checkpoint's JSON holds it
    assert restored.admit([Candidate("a", change([32.0, 0.0, 0.0, 0.0]))], MODEL_NORM)[0].scale < 1  # kept: a within
    older = UpdateScreen(norm_factor=5.0, min_agreement=None, tolerate_once=True)  # a checkpoint from before
    older.load_state_dict({k: v for k, v in norms.items() if k != "within"}, tensors)  # tolerate_once: none known
    assert held(older, [Candidate("a", change([32.0, 0.0, 0.0, 0.0]))], MODEL_NORM)[0] is not None
    strict = UpdateScreen(norm_factor=5.0, min_agreement=None)  # ASGD-GA's (and the default of the class)
    held(strict, [Candidate(r, change([4.0, 0.0, 0.0, 0.0])) for r in "abcd"], MODEL_NORM)
    assert held(strict, [Candidate("a", change([32.0, 0.0, 0.0, 0.0]))], MODEL_NORM)[0] is not None


def test_an_update_unlike_its_regions_previous_one_is_held_back():
    screen = UpdateScreen(norm_factor=None, min_agreement=0.2)
    assert held(screen, [Candidate("a", change([1.0, 1.0, 0.0, 0.0]))], MODEL_NORM) == [None]  # nothing to agree with
    assert held(screen, [Candidate("a", change([1.0, 0.8, 0.1, 0.0]))], MODEL_NORM) == [None]
    reason = held(screen, [Candidate("a", change([0.0, 0.0, 1.0, -1.0]))], MODEL_NORM)[0]
    assert reason is not None and "below min_agreement 0.2" in reason
    assert held(screen, [Candidate("b", change([0.0, 0.0, 1.0, -1.0]))], MODEL_NORM) == [None]  # b's own first


def test_the_length_bound_follows_the_run_so_a_common_growth_cannot_lock_everyone_out():
    screen = UpdateScreen(norm_factor=5.0, min_agreement=None)
    held(screen, [Candidate(r, change([1.0, 0.0, 0.0, 0.0])) for r in "abcd"], MODEL_NORM)
    reasons = [held(screen, [Candidate(r, change([20.0, 0.0, 0.0, 0.0])) for r in "abcd"], MODEL_NORM)
               for _ in range(4)]
    assert any(r is not None for r in reasons[0])  # at first the jump looks like an attack...
    assert reasons[-1] == [None] * 4  # ...but once it is the run's normal, it is admitted


def test_a_restored_screen_judges_as_the_original():
    original = UpdateScreen()
    held(original, [Candidate(r, change([1.0, float(i), 0.0, 0.0])) for i, r in enumerate("abcd")], MODEL_NORM)
    restored = UpdateScreen()
    restored.load_state_dict(*original.state_dict())
    probe = [Candidate("a", change([-1.0, 0.5, 0.0, 0.0])), Candidate("b", change([30.0, 0.0, 0.0, 0.0]))]
    reasons = held(restored, probe, MODEL_NORM)
    assert reasons == held(original, probe, MODEL_NORM)
    assert all(r is not None for r in reasons)  # a disagrees with its last update, b is too long: both need history
    assert restored.norms.maxlen == original.norms.maxlen == WINDOW  # the length bound's window, restored


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
        reasons = held(screen, candidates, MODEL_NORM)
        assert reasons[1:] == [None] * (regions - 1), reasons
        if attacker != "noise" or round_ > 0:  # noise needs a previous update to disagree with
            assert reasons[0] is not None


def test_without_the_model_bound_nothing_is_held_for_length_alone():
    screen = UpdateScreen(norm_factor=None, min_agreement=None, model_bound=False)
    assert held(screen, [Candidate("a", change([3e4, 4e4, 0.0, 0.0]))], model_norm=1.0) == [None]


def one(screen: UpdateScreen, region: str, vector, steps=None):
    return screen.admit([Candidate(region, change(vector), steps)], MODEL_NORM)[0]


def test_asynchronous_updates_are_judged_against_every_regions_latest_not_the_recent_window():
    """A fast region filling the window with short updates must not make a slow region's long one look bad."""
    screen = UpdateScreen(norm_factor=5.0, min_agreement=None, per_region=True, clip_factor=None)
    for region, length in (("slow1", 8.0), ("slow2", 8.0)):
        assert one(screen, region, [length, 0, 0, 0]).reason is None
    for _ in range(20):  # the fast region arrives often with short updates
        assert one(screen, "fast", [1.0, 0, 0, 0]).reason is None
    assert one(screen, "slow1", [8.0, 0, 0, 0]).reason is None  # the recent window would hold this back (8 > 5 x 1)
    verdict = one(screen, "fast", [-41.0, 0, 0, 0])  # × −10 of an update 4.1 long: over 5 x 8
    assert verdict.reason is not None and "over 5x the regions' median 8" in verdict.reason


def test_one_region_cannot_move_the_per_region_median():
    screen = UpdateScreen(norm_factor=5.0, min_agreement=None, per_region=True, clip_factor=None)
    for region in "abc":
        one(screen, region, [1.0, 0, 0, 0])
    for _ in range(5):  # the attacker's own huge updates are held back and do not raise the bound
        assert one(screen, "x", [100.0, 0, 0, 0]).reason is not None
    assert one(screen, "x", [6.0, 0, 0, 0]).reason is not None


def test_an_admitted_asynchronous_update_is_clipped_to_the_regions_median():
    screen = UpdateScreen(norm_factor=5.0, min_agreement=None, per_region=True, clip_factor=1.0)
    assert one(screen, "a", [2.0, 0, 0, 0]).scale == 1.0  # no reference yet: nothing to clip to
    one(screen, "b", [2.0, 0, 0, 0])
    one(screen, "c", [4.0, 0, 0, 0])  # latest: a 2, b 2, c 4 → median 2
    verdict = one(screen, "d", [3.0, 4.0, 0, 0])  # 5 long, under 5 x 2: admitted at 2 / 5
    assert verdict.reason is None and abs(verdict.scale - 0.4) < 1e-6
    assert one(screen, "a", [1.0, 0, 0, 0]).scale == 1.0  # shorter than the median: as sent
    # per √step 8 / √4 = 4; latest a 1, b 2, c 4, d 5 → median 3: scaled by 3 / 4
    verdict = one(screen, "b", [0, 0, 8.0, 0], steps=4)
    assert abs(verdict.scale - 0.75) < 1e-6


def test_a_restored_asynchronous_screen_clips_as_the_original():
    original = UpdateScreen(per_region=True, min_agreement=None, clip_factor=1.0)
    for region, length in zip("abcd", (1.0, 2.0, 3.0, 4.0)):
        one(original, region, [length, 0, 0, 0])
    restored = UpdateScreen(per_region=True, min_agreement=None, clip_factor=1.0)
    norms, last = original.state_dict()
    restored.load_state_dict(json.loads(json.dumps(norms)), last)  # as a checkpoint's JSON holds it
    verdict = one(restored, "e", [3.0, 0, 0, 0])
    assert verdict == one(original, "e", [3.0, 0, 0, 0])
    assert abs(verdict.scale - 2.5 / 3.0) < 1e-6  # the median of 1, 2, 3, 4 is 2.5


def test_noise_unrelated_to_its_regions_recent_updates_is_held_back_but_a_reversal_is_not():
    """|cosine| with the region's recent direction: noise is orthogonal, an honest swing of the gradient is not."""
    gen = torch.Generator().manual_seed(0)
    size = 40_000
    screen = UpdateScreen(norm_factor=None, min_agreement=None, per_region=True, min_relatedness=5.0)
    direction = torch.randn(size, generator=gen)
    assert one(screen, "a", direction).reason is None  # the first: nothing to relate to
    assert one(screen, "a", -0.8 * direction + 0.6 * torch.randn(size, generator=gen)).reason is None  # a swing
    for _ in range(20):  # noise of the same length: |cosine| about 1/√size, well under 5/√size
        noise = torch.randn(size, generator=gen)
        verdict = one(screen, "a", noise * direction.norm() / noise.norm())
        assert verdict.reason is not None and "unrelated to the region's recent updates" in verdict.reason
    assert one(screen, "b", torch.randn(size, generator=gen)).reason is None  # b's own first
    assert one(screen, "a", direction + 0.5 * torch.randn(size, generator=gen)).reason is None  # a back on course


def _relatedness_screen() -> UpdateScreen:
    return UpdateScreen(norm_factor=None, min_agreement=None, per_region=True, min_relatedness=5.0)


def test_relatedness_is_judged_by_direction_whatever_the_updates_length():
    """The same updates at 1e-4, 1 and 1e4 times their length get the same verdicts, and a held-back one is
    reported in spreads of noise: |cosine| × √parameters for an update spread evenly."""
    gen = torch.Generator().manual_seed(1)
    size = 10_000
    course = torch.randn(size, generator=gen)
    noise = torch.randn(size, generator=gen)
    updates = [course, course + 0.5 * torch.randn(size, generator=gen), noise, course]
    verdicts = {}
    for scale in (1e-4, 1.0, 5.0):  # (longer ones are held back for their length: MODEL_NORM)
        screen = _relatedness_screen()
        verdicts[scale] = [one(screen, "a", scale * u).reason for u in updates]
    assert [[reason is None for reason in verdicts[s]] for s in (1e-4, 1.0, 5.0)] == [[True, True, False, True]] * 3
    direction = course / course.norm() / 2 + updates[1] / updates[1].norm() / 2
    cosine = float(torch.nn.functional.cosine_similarity(noise, direction, dim=0))
    spreads = float(verdicts[1.0][2].split(", ")[1].split(" spreads")[0])
    assert spreads == pytest.approx(abs(cosine) * size ** 0.5, rel=0.05)


def test_a_regions_direction_is_the_even_average_of_its_admitted_updates():
    """RECENT = 0.5: after e1 and then e1 + e2, the region's direction is ½ e1 + ½ (e1 + e2)/√2; an update
    orthogonal to that average is unrelated, although it is not orthogonal to either update alone."""
    size = 10_000
    e1 = torch.cat([torch.ones(size // 2), torch.zeros(size // 2)])
    e2 = torch.cat([torch.zeros(size // 2), torch.ones(size // 2)])
    screen = _relatedness_screen()
    assert one(screen, "a", e1).reason is None
    assert one(screen, "a", e1 + e2).reason is None
    average = 0.5 * e1 / e1.norm() + 0.5 * (e1 + e2) / (e1 + e2).norm()  # 0.0121 e1 + 0.0050 e2, per entry
    orthogonal = average[size // 2] * e1 - average[0] * e2
    assert abs(float(torch.dot(orthogonal, average))) < 1e-6
    assert one(screen, "a", orthogonal).reason is not None
    assert one(_fresh_after(e1), "a", orthogonal).reason is None  # against e1 alone: related


def _fresh_after(update) -> UpdateScreen:
    screen = _relatedness_screen()
    one(screen, "a", update)
    return screen


def test_a_region_moves_the_model_at_most_share_budget_times_its_data_share_of_the_others():
    """ASGD-GA's share budget: applied length (weight x norm) counts, not norm alone; a long update from a region
    below its share passes whole, a region's × 10 is scaled to the room left and then held back."""
    screen = UpdateScreen(norm_factor=None, min_agreement=None, model_bound=False, per_region=True, share_budget=2.0)
    shares = {"a": 0.5, "b": 0.25, "c": 0.25}
    aged = 0.5 ** (1 / MOVED_HALF_LIFE)  # every judged update ages every region's movement

    def judge(region, length, weight=1.0) -> Verdict:
        return screen.admit([Candidate(region, change([length, 0.0, 0.0, 0.0]), weight=weight)], MODEL_NORM,
                            shares)[0]

    assert judge("a", 0.1, weight=3.0) == Verdict()  # nobody else has moved: nothing to compare with
    # b's fair movement: a's 0.3 (aged once) x 0.25 / 0.5; 2.9x a's length, but within 2x that
    assert judge("b", 0.29) == Verdict()
    assert screen.moved == pytest.approx({"a": 0.3 * aged, "b": 0.29})
    fair = (0.3 * aged ** 2 + 0.29 * aged) * 0.25 / 0.75
    attack = judge("c", 1.0)
    assert attack.reason is None and attack.scale == pytest.approx(2.0 * fair / 1.0)
    again = judge("c", 1.0).reason
    assert again is not None and "moved the model 2x its data share" in again and "share_budget 2" in again
    assert judge("a", 0.1) == Verdict()  # the others are far below their share
    assert judge("c", 0.1).scale == pytest.approx(2.0 / 3.0, rel=0.01)  # room from a's 0.1: x 0.25 / 0.75 x 2
    held_back = screen.moved["c"]
    assert judge("c", 1.0, weight=0.0) == Verdict()  # nothing applied: nothing counted
    assert screen.moved["c"] == pytest.approx(held_back * aged)


def test_a_region_with_under_a_millionth_of_its_budget_left_has_none():
    """Room is measured against the budget (k x fair): a region at its cap, up to rounding, stays there."""
    screen = UpdateScreen(norm_factor=None, min_agreement=None, model_bound=False, per_region=True, share_budget=2.0)
    shares = {"a": 0.5, "c": 0.5}
    for left, verdict in [(1e-3, "held back"), (3e-3, "admitted")]:  # of a budget of 2000: under / over 2e-3
        screen.moved = {"a": 1000.0, "c": 2000.0 - left}
        got = screen.admit([Candidate("c", change([1.0, 0.0, 0.0, 0.0]))], MODEL_NORM, shares)[0]
        assert (got.reason is not None) == (verdict == "held back")


def test_a_restored_share_budget_judges_as_the_original():
    screen = UpdateScreen(norm_factor=None, min_agreement=None, model_bound=False, per_region=True, share_budget=1.5)
    shares = {"a": 0.6, "b": 0.4}
    for region, length in [("a", 2.0), ("b", 1.0), ("a", 1.0), ("b", 5.0)]:
        screen.admit([Candidate(region, change([length, 0.0, 0.0, 0.0]))], MODEL_NORM, shares)
    norms, tensors = screen.state_dict()
    restored = UpdateScreen(norm_factor=None, min_agreement=None, model_bound=False, per_region=True,
                            share_budget=1.5)
    restored.load_state_dict(json.loads(json.dumps(norms)), tensors)
    probe = [Candidate("b", change([4.0, 0.0, 0.0, 0.0]))]
    assert restored.admit(probe, MODEL_NORM, shares) == screen.admit(probe, MODEL_NORM, shares)
    assert restored.moved == screen.moved and screen.moved["b"] > 0
