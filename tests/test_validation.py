"""Bad updates never reach the global model: each kind, in every strategy, plus fuzzed decoding."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.app import Error as MessageError
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudless_fl.training import protocol
from cloudless_fl.errors import ConfigError
from cloudless_fl.deployment.grid import InProcessGrid
from cloudless_fl.strategy import AsyncGradAccum, Metered, ModelAveraging
from cloudless_fl.strategy.validation import RejectedUpdate, UpdateLimits, UpdateValidator
from cloudless_fl.training.compression import make_codec
from conftest import TWO_REGIONS
from strategy_helpers import Federation, topology

REFERENCE = {"w": torch.ones(3, 2), "b": torch.zeros(2), "count": torch.tensor(3)}


def record(**arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in arrays.items()})


def corrupt(kind: str, arrays: ArrayRecord) -> ArrayRecord:
    """The same update, broken in one way (a compressed one inside its packed array: a NaN scale, say)."""
    if list(arrays.keys()) == [protocol.PACKED]:
        entries = {k: v.numpy() for k, v in protocol.unpack_tensors(arrays).items()}
        return protocol.pack_tensors({k: torch.from_numpy(v) for k, v in _corrupted(kind, entries).items()})
    return record(**_corrupted(kind, {k: v.numpy() for k, v in arrays.items()}))


def _corrupted(kind: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    state = {k: v.copy() for k, v in arrays.items()}
    name = next(k for k, v in state.items() if v.dtype.kind == "f")
    if kind == "wrong_shape":
        state[name] = np.zeros(3, dtype=state[name].dtype)
    elif kind == "wrong_dtype":
        state[name] = state[name].astype(np.float64)
    elif kind == "nan":
        state[name].flat[0] = np.nan
    elif kind == "inf":
        state[name].flat[-1] = -np.inf
    elif kind == "huge_norm":
        state[name] = state[name] * 0 + 1e4
    elif kind == "missing_array":
        del state[name]
    return state


REASONS = {"wrong_shape": "wrong_shape", "wrong_dtype": "wrong_dtype", "nan": "non_finite", "inf": "non_finite",
           "huge_norm": "norm", "missing_array": "missing_array"}
DETAILS = {"wrong_shape": "w has shape (3,), the model (3, 2)", "wrong_dtype": "w has dtype float64, the model float32",
           "nan": "w holds NaN or Inf", "inf": "w holds NaN or Inf",
           "huge_norm": "norm 2.449e+04 exceeds max_norm 100", "missing_array": "missing ['w']"}


@pytest.mark.parametrize("kind", REASONS)
def test_each_bad_kind_is_rejected_with_its_reason(kind):
    validator = UpdateValidator(REFERENCE, UpdateLimits(max_norm=100.0))
    good = record(**REFERENCE)
    validator.check("r", good, protocol.MODE_DELTA)  # a good one passes
    with pytest.raises(RejectedUpdate) as info:
        validator.check("r", corrupt(kind, good), protocol.MODE_DELTA)
    assert info.value.reason == REASONS[kind]
    assert info.value.detail == DETAILS[kind]  # the log names what is wrong, and where
    assert validator.rejections == {"r": {REASONS[kind]: 1}}


@pytest.mark.parametrize("name", ["w", "b"])
def test_a_non_finite_update_names_the_entry_that_holds_it(name):
    bad = {**REFERENCE, name: REFERENCE[name].clone()}
    bad[name].view(-1)[0] = float("nan")
    with pytest.raises(RejectedUpdate) as info:
        UpdateValidator(REFERENCE).check("r", record(**bad), protocol.MODE_DELTA)
    assert (info.value.reason, info.value.detail) == ("non_finite", f"{name} holds NaN or Inf")


def test_finite_entries_whose_norm_overflows_are_rejected_for_norm():
    huge = {**REFERENCE, "w": torch.full((3, 2), 3e38)}  # each entry finite in float32, their norm not
    with pytest.raises(RejectedUpdate) as info:
        UpdateValidator(REFERENCE).check("r", record(**huge), protocol.MODE_DELTA)
    assert (info.value.reason, info.value.detail) == ("norm", "norm overflows")


def test_a_gradient_of_a_model_without_floating_point_entries_is_empty_and_of_norm_zero():
    validator = UpdateValidator({"count": torch.tensor(3)}, UpdateLimits(max_norm=1e-9))
    assert validator.check("r", record(), protocol.MODE_GRADIENT) == {}


def test_a_long_list_of_wrong_names_is_cut_to_its_first_three():
    validator = UpdateValidator({name: torch.zeros(1) for name in "abcde"})
    with pytest.raises(RejectedUpdate) as missing:
        validator.check("r", record(), protocol.MODE_DELTA)
    assert missing.value.detail == "missing ['a', 'b', 'c']"
    extra = {f"x{i}": torch.zeros(1) for i in range(5)}
    with pytest.raises(RejectedUpdate) as unexpected:
        validator.check("r", record(**{name: torch.zeros(1) for name in "abcde"}, **extra), protocol.MODE_DELTA)
    assert unexpected.value.detail == "unexpected ['x0', 'x1', 'x2']"


@pytest.mark.parametrize("codec, says", [(None, "the run uses 'none'"), (make_codec("int8"), "the run uses 'int8:")])
def test_an_update_encoded_otherwise_than_the_run_is_malformed_and_says_both(codec, says):
    validator = UpdateValidator(REFERENCE)
    with pytest.raises(RejectedUpdate) as info:
        validator.check("r", record(**REFERENCE), protocol.MODE_DELTA, codec=codec, encoding="int4:64")
    assert info.value.reason == "malformed" and info.value.detail.startswith("encoded as 'int4:64'")
    assert says in info.value.detail


def test_unexpected_arrays_and_gradient_layout():
    validator = UpdateValidator(REFERENCE)
    with pytest.raises(RejectedUpdate, match="unexpected_array"):
        validator.check("r", record(**REFERENCE, extra=torch.zeros(1)), protocol.MODE_WEIGHTS)
    floats = {k: v for k, v in REFERENCE.items() if v.is_floating_point()}
    validator.check("r", record(**floats), protocol.MODE_GRADIENT)  # gradients: floating entries only
    with pytest.raises(RejectedUpdate, match="missing_array"):
        validator.check("r", record(**floats), protocol.MODE_WEIGHTS)


def test_weights_are_judged_by_their_change_and_clipped_to_the_bound():
    base = {k: v.clone() for k, v in REFERENCE.items()}
    moved = {**base, "w": base["w"] + 3.0}  # change norm = 3 * sqrt(6)
    validator = UpdateValidator(REFERENCE, UpdateLimits(max_norm=1.0, on_norm="clip"))
    out = validator.check("r", record(**moved), protocol.MODE_WEIGHTS, base=base)
    change = torch.cat([(out[k] - base[k]).flatten() for k in ("w", "b")])
    assert float(change.norm()) == pytest.approx(1.0, rel=1e-6)
    assert validator.clipped["r"] == 1 and not any(validator.rejections.values())
    assert torch.equal(out["b"], base["b"])  # the change is scaled, not the weights: b did not change
    validator.check("r", record(**moved), protocol.MODE_WEIGHTS, base=base)
    assert validator.clipped["r"] == 2  # every clip counted
    assert torch.allclose(out["w"] - base["w"], torch.full((3, 2), 1 / 6 ** 0.5))
    within = UpdateValidator(REFERENCE, UpdateLimits(max_norm=10.0))
    within.check("r", record(**moved), protocol.MODE_WEIGHTS, base=base)  # 7.3 < 10: passes as is


def test_mas_new_weights_are_bounded_by_their_change_from_the_model_sent(tmp_path):
    """`max_norm=2` lies between a period's change (under 2 here) and the weights' own norm (3.8): MA's replies
    of new weights pass it untouched, as if there were no bound; judged by the weights themselves, every one
    would be rejected."""
    finals = {}
    for bound in (None, 2.0):
        fed = Federation(tmp_path / str(bound), topology())
        ma = ModelAveraging(lr=0.1, local_steps=5, batch_size=16, meter=fed.meter(),
                            limits=UpdateLimits(max_norm=bound))
        finals[bound] = ma.start(fed.grid, fed.initial, num_rounds=4, train_config=fed.config).arrays
        assert not any(ma.validator.rejections.values())
    assert float(torch.linalg.vector_norm(torch.cat([t.flatten() for t in finals[2.0].to_torch_state_dict().values()
                                                     ]))) > 2.0
    unbounded, bounded = finals[None].to_torch_state_dict(), finals[2.0].to_torch_state_dict()
    assert all(torch.equal(unbounded[k], bounded[k]) for k in unbounded)


def test_weights_far_from_zero_with_a_small_change_pass_and_a_delta_is_its_own_change():
    base = {**REFERENCE, "w": torch.full((3, 2), 100.0)}
    validator = UpdateValidator(REFERENCE, UpdateLimits(max_norm=1.0))
    near = {**base, "b": torch.tensor([0.3, 0.4])}  # weights of norm 245, a change of 0.5
    assert torch.equal(validator.check("r", record(**near), protocol.MODE_WEIGHTS, base=base)["b"], near["b"])
    small = {"w": torch.full((3, 2), 0.1), "b": torch.zeros(2), "count": torch.tensor(3)}  # a delta of norm 0.24
    validator.check("r", record(**small), protocol.MODE_DELTA, base=base)  # the base does not make it a change of 245
    with pytest.raises(RejectedUpdate, match="norm 244.9 exceeds"):
        validator.check("r", record(**base), protocol.MODE_DELTA, base=small)
    clipping = UpdateValidator(REFERENCE, UpdateLimits(max_norm=0.1, on_norm="clip"))
    out = clipping.check("r", record(**small), protocol.MODE_DELTA, base=base)  # a delta clipped is a delta
    assert torch.allclose(out["w"], torch.full((3, 2), 0.1 / 6 ** 0.5))


def test_rejections_are_logged_once_per_region_and_reason(caplog):
    validator = UpdateValidator(REFERENCE, UpdateLimits(quarantine_after=3))
    bad = corrupt("nan", record(**REFERENCE))
    logged = []
    with caplog.at_level(logging.WARNING, logger="cloudless_fl"):
        for _ in range(3):
            with pytest.raises(RejectedUpdate):
                validator.check("r", bad, protocol.MODE_DELTA)
            logged.append(len([r for r in caplog.records if "bad update" in r.message]))
    assert logged == [1, 1, 1]  # at the first rejection, then never again
    assert caplog.records[0].getMessage().startswith("region r sent a bad update (non_finite")
    assert validator.quarantined("r") and not validator.quarantined("other")


@pytest.mark.parametrize("after", [0, 1, 2])
def test_a_region_is_quarantined_at_its_nth_rejection_or_never_with_zero(after):
    validator = UpdateValidator(REFERENCE, UpdateLimits(quarantine_after=after))
    bad = corrupt("nan", record(**REFERENCE))
    quarantined = []
    for _ in range(3):
        with pytest.raises(RejectedUpdate):
            validator.check("r", bad, protocol.MODE_DELTA)
        quarantined.append(validator.quarantined("r"))
    assert quarantined == [0 < after <= n for n in (1, 2, 3)]


def test_limits_are_validated():
    with pytest.raises(ConfigError, match="validation.on_norm='ignore' is unknown; use one of reject, clip"):
        UpdateLimits(on_norm="ignore")
    with pytest.raises(ConfigError, match="validation.max_norm"):
        UpdateLimits(max_norm=-1)


@pytest.mark.parametrize("key, bad, good, says", [
    ("max_norm", [0, "1", -1], [1e-9, 10, None], "must be a number > 0"),
    ("norm_factor", [1, 0.5, "5"], [1.01, 5, None], r"must be a number > 1 \(or null: no check\)"),
    ("min_agreement", [-1.01, 1.01, "0"], [-1, 0, 1, None], r"must be in \[-1, 1\] \(or null: no check\)"),
    ("clip_factor", [0, -2, "2"], [0.5, 2, None], "must be a number > 0"),
    ("share_budget", [1, 0, "2"], [1.01, 2.5, None], r"must be a number > 1 \(at 1 every region waits"),
    ("min_relatedness", [-0.1, "two"], [0, 2, "auto", None], "must be a number ≥ 0"),
    ("quarantine_after", [-1, 1.5], [0, 3], "must be an integer ≥ 0"),
])
def test_each_limit_refuses_what_is_out_of_its_range_and_takes_its_edges(key, bad, good, says):
    for value in bad:
        with pytest.raises(ConfigError, match=rf"validation.{key}={value!r} {says}"):
            UpdateLimits(**{key: value})
    for value in good:
        assert getattr(UpdateLimits(**{key: value}), key) == value


class FaultyGrid(InProcessGrid):
    """Node `bad_node`'s train replies from its `from_job`-th on are corrupted (or turned into errors)."""

    def __init__(self, app, num_nodes, bad_node: int, kind: str, from_job: int = 1) -> None:
        super().__init__(app, num_nodes)
        self.bad_node, self.kind, self.from_job, self.jobs = bad_node, kind, from_job, 0
        self.examples: list = []  # the num-examples of every train reply, as delivered

    def _deliver(self, msg):
        reply = self._faulty(msg)
        if msg.metadata.message_type == "train" and not reply.has_error() and protocol.METRICS in reply.content:
            self.examples.append(reply.content[protocol.METRICS].get("num-examples"))
        return reply

    def _faulty(self, msg):
        reply = super()._deliver(msg)
        if msg.metadata.dst_node_id != self.bad_node or msg.metadata.message_type != "train":
            return reply
        self.jobs += 1
        if self.jobs <= self.from_job or reply.has_error():
            return reply
        if self.kind == "error":
            return Message(MessageError(code=0, reason="region gone"), reply_to=msg)
        if self.kind in CONTENT_CHANGES:
            CONTENT_CHANGES[self.kind](reply.content)
        elif self.kind != "as_is":
            reply.content[protocol.ARRAYS] = corrupt(self.kind, reply.content[protocol.ARRAYS])
        return reply


def _set_metric(key: str, value):
    def apply(content) -> None:
        content[protocol.METRICS][key] = value
    return apply


def _renamed_metrics(content) -> None:  # a stock ClientApp's two records, neither named "metrics"
    metrics = content.pop(protocol.METRICS)
    content["train_metrics"], content["more_metrics"] = metrics, metrics


BAD_METRICS = {"no_metrics": lambda content: content.pop(protocol.METRICS),
               "unnamed_metrics": _renamed_metrics,
               "no_count": lambda content: content[protocol.METRICS].pop("num-examples"),
               "negative_count": _set_metric("num-examples", -40), "zero_count": _set_metric("num-examples", 0),
               "fractional_count": _set_metric("num-examples", 2.5),
               "nan_seconds": _set_metric("compute-seconds", float("nan")),
               "negative_seconds": _set_metric("compute-seconds", -1.0), "no_workers": _set_metric("workers", 0),
               "negative_steps": _set_metric("steps", -1),
               "unknown_update": lambda content: content[protocol.INFO].__setitem__("update", "gossip")}
_WHOLE, _SECONDS = "a whole number >= {} is expected", "seconds >= 0 are expected"
METRICS_DETAILS = {  # what the log says of the first one; FedAvg's: Flower's one record of each kind first
    "no_metrics": ("0 MetricRecords, none named 'metrics'; a train reply carries one, with num-examples",
                   "1 ArrayRecords and 0 MetricRecords; Flower's strategies take one of each"),
    "unnamed_metrics": ("2 MetricRecords, none named 'metrics'; a train reply carries one, with num-examples",
                        "1 ArrayRecords and 2 MetricRecords; Flower's strategies take one of each"),
    "no_count": f"num-examples is None; {_WHOLE.format(1)}",
    "negative_count": f"num-examples is -40; {_WHOLE.format(1)}",
    "zero_count": f"num-examples is 0; {_WHOLE.format(1)}",
    "fractional_count": f"num-examples is 2.5; {_WHOLE.format(1)}",
    "nan_seconds": f"compute-seconds is nan; {_SECONDS}", "negative_seconds": f"compute-seconds is -1.0; {_SECONDS}",
    "no_workers": f"workers is 0; {_WHOLE.format(1)}", "negative_steps": f"steps is -1; {_WHOLE.format(0)}",
    "unknown_update": "reply says its arrays are 'gossip'; expected one of weights, gradient, delta"}
def _other_kind(content) -> None:
    """A gradient where weights or a delta were asked for; weights where a gradient was."""
    info = content[protocol.INFO]
    info["update"] = protocol.MODE_WEIGHTS if info["update"] == protocol.MODE_GRADIENT else protocol.MODE_GRADIENT


def _renamed(name: str, to: str):  # a ClientApp that names a record its own way (Flower prescribes no names)
    def apply(content) -> None:
        content[to] = content.pop(name)
    return apply


ODD_CONTENT = {  # not bad: a metric the other regions do not report; a record named otherwise
    "one_more": _set_metric("surprise", 1.0), "metrics_named_otherwise": _renamed(protocol.METRICS, "train_metrics"),
    "arrays_named_otherwise": _renamed(protocol.ARRAYS, "weights")}
CONTENT_CHANGES = {**BAD_METRICS, **ODD_CONTENT, "no_arrays": lambda content: content.pop(protocol.ARRAYS),
                   "other_kind": _other_kind}


def three_regions():
    fast, slow = TWO_REGIONS["regions"]["fast"], TWO_REGIONS["regions"]["slow"]
    return topology({"a": {**fast, "data_share": 0.3}, "b": {**slow, "data_share": 0.3},
                     "c": {**slow, "data_share": 0.4}})


STRATEGIES = {
    "ma": lambda fed, limits: ModelAveraging(lr=0.1, local_steps=3, batch_size=16, meter=fed.meter(), limits=limits),
    "asgd_ga": lambda fed, limits: AsyncGradAccum(lr=0.1, accumulation_steps=2, batch_size=16, balance=False,
                                                  tau_max=100, meter=fed.meter(), limits=limits),
    "asgd_ga_delta": lambda fed, limits: AsyncGradAccum(lr=1.0, accumulation_steps=2, batch_size=16, update="delta",
                                                        local_lr=0.1, balance=False, tau_max=100,
                                                        meter=fed.meter(), limits=limits),
    "fedavg": lambda fed, limits: Metered(FedAvg(fraction_evaluate=0.0, min_available_nodes=3), fed.meter(),
                                          limits=limits),
}
ROUNDS = {"ma": 4, "asgd_ga": 60, "asgd_ga_delta": 60, "fedavg": 3}  # async: "c" replies ~1 in 10


def final_model(tmp_path, strategy: str, kind: str, rounds: int | None = None, bad_region: str = "c"):
    """The model a run ends with when `bad_region`'s replies after its first are made `kind`; the strategy;
    the grid."""
    fed = Federation(tmp_path, three_regions())
    fed.grid = FaultyGrid(fed.grid._app, 3, bad_node="abc".index(bad_region) + 1, kind=kind)  # nodes 1-3: a, b, c
    limits = UpdateLimits(max_norm=1000.0, quarantine_after=3)
    s = STRATEGIES[strategy](fed, limits)
    config = fed.config
    if strategy == "fedavg":
        config = ConfigRecord({**dict(config), **protocol.WorkOrder(lr=0.1, batch_size=16, epochs=0.5).to_config()})
    result = s.start(fed.grid, fed.initial, num_rounds=rounds or ROUNDS[strategy], train_config=config)
    return result.arrays.to_torch_state_dict(), s, fed.grid


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", REASONS)
def test_a_regions_bad_updates_leave_the_model_as_if_they_were_never_sent(tmp_path, strategy, kind):
    bad, s, _ = final_model(tmp_path / "bad", strategy, kind)
    without, _, _ = final_model(tmp_path / "without", strategy, "error")
    for name, tensor in without.items():
        assert torch.equal(bad[name], tensor), name
    rejected = s.history.rejections["c"]
    assert rejected[REASONS[kind]] >= 1 and set(rejected) == {REASONS[kind]}
    assert s.history.counters["rejected_updates"] == sum(rejected.values())
    assert all(torch.isfinite(t).all() for t in bad.values() if t.is_floating_point())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", BAD_METRICS)
def test_a_reply_whose_metrics_make_no_sense_is_rejected_and_leaves_the_model_as_if_never_sent(tmp_path, strategy,
                                                                                               kind, caplog):
    """Flower's FedAvg raises on a reply without its MetricRecord (the run would end), MA weights by a negative
    count, and the scheduler learns from NaN seconds: such replies are `malformed` updates. Region "a" sends
    them: its replies come first in a round, so the others' must still be taken after it."""
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        bad, s, _ = final_model(tmp_path / "bad", strategy, kind, bad_region="a")
    detail = METRICS_DETAILS[kind]
    if isinstance(detail, tuple):
        detail = detail[strategy == "fedavg"]
    assert f"region a sent a bad update (malformed: {detail}); rejected, and counted from now on" in caplog.messages
    without, plain, _ = final_model(tmp_path / "without", strategy, "error", bad_region="a")
    for name, tensor in without.items():
        assert torch.equal(bad[name], tensor), name
    assert set(s.history.rejections["a"]) == {"malformed"} and s.history.rejections["a"]["malformed"] >= 1
    assert s.history.counters["rejected_updates"] == s.history.rejections["a"]["malformed"]
    charged, unsent = s.meter.ledger.accounts["a"], plain.meter.ledger.accounts["a"]
    assert charged.bytes_up > unsent.bytes_up  # a malformed reply was moved: charged
    if strategy == "fedavg":  # ... but not for compute it cannot be said to have done (its work order has none)
        assert charged.busy_s == unsent.busy_s


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_reply_without_its_arrays_is_rejected(tmp_path, strategy):
    bad, s, _ = final_model(tmp_path / "bad", strategy, "no_arrays", bad_region="a")
    without, _, _ = final_model(tmp_path / "without", strategy, "error", bad_region="a")
    for name, tensor in without.items():
        assert torch.equal(bad[name], tensor), name
    reason = "malformed" if strategy == "fedavg" else "missing_array"  # FedAvg: Flower's one record of each kind
    assert set(s.history.rejections["a"]) == {reason}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_region_that_turns_to_another_kind_of_update_is_rejected_and_the_run_goes_on(tmp_path, strategy, caplog):
    """A wrong kind of update is a setup error (stock ClientApps under gradient mode: `test_drop_in.py`) only as
    the run's first update; once the run has taken updates, it is one region's bad update. Before, any region
    saying so ended MA's and ASGD-GA's run, and FedAvg averaged a reply labelled a gradient as weights."""
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        bad, s, _ = final_model(tmp_path / "bad", strategy, "other_kind", bad_region="a")
    without, _, _ = final_model(tmp_path / "without", strategy, "error", bad_region="a")
    for name, tensor in without.items():
        assert torch.equal(bad[name], tensor), name
    assert set(s.history.rejections["a"]) == {"wrong_kind"}
    asked = {"ma": "weights or delta", "fedavg": "weights", "asgd_ga": "gradient", "asgd_ga_delta": "delta or weights"}
    sent = "weights" if strategy == "asgd_ga" else "gradient"
    assert (f"region a sent a bad update (wrong_kind: its arrays are {sent}; the job asked for {asked[strategy]}); "
            "rejected, and counted from now on") in caplog.messages


@pytest.mark.parametrize("strategy", ["ma", "asgd_ga", "asgd_ga_delta"])
def test_the_runs_first_update_of_another_kind_is_a_setup_error(tmp_path, strategy):
    """Nothing taken yet: the ClientApps answer with a kind the strategy cannot use (a stock app under gradient
    mode), which no region's rejection would fix; the run stops with what to set up."""
    fed = Federation(tmp_path, three_regions())
    fed.grid = FaultyGrid(fed.grid._app, 3, bad_node=1, kind="other_kind", from_job=0)
    s = STRATEGIES[strategy](fed, UpdateLimits())
    asked, sent = ("gradient", "weights") if strategy == "asgd_ga" else \
        ("delta" if strategy == "asgd_ga_delta" else "weights", "gradient")
    kind = type(s).__name__
    stock = r" \(a stock Flower reply: new weights\)" if sent == "weights" else ""
    with pytest.raises(ConfigError, match=rf"^{kind} asked region a for {asked} updates but its ClientApp sent "
                                          rf"{sent}{stock}\. Use update='delta'"):
        s.start(fed.grid, fed.initial, num_rounds=ROUNDS[strategy], train_config=fed.config)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["metrics_named_otherwise", "arrays_named_otherwise"])
def test_a_replys_only_record_of_a_kind_counts_whatever_its_name(tmp_path, strategy, kind):
    """Flower prescribes no record names: a reply's one MetricRecord is its metrics (its count and steps are
    used), its one ArrayRecord its update. Before, Flower's FedAvg ended the run on a region naming either
    otherwise than the first reply of the round, and MA and ASGD-GA rejected arrays not named `arrays`."""
    renamed, s, _ = final_model(tmp_path / "renamed", strategy, kind)
    same, _, _ = final_model(tmp_path / "same", strategy, "as_is")
    for name, tensor in same.items():
        assert torch.equal(renamed[name], tensor), name
    assert not s.history.rejections


def test_fedavg_takes_a_region_that_reports_a_metric_more(tmp_path):
    """Flower's FedAvg raises unless every reply's MetricRecord has the same keys; the wrapper hands it the
    keys they share, so one region's ClientApp reporting one metric more neither ends the run nor loses
    its update."""
    more, s, grid = final_model(tmp_path / "more", "fedavg", "one_more")
    same, _, _ = final_model(tmp_path / "same", "fedavg", "as_is")
    for name, tensor in same.items():
        assert torch.equal(more[name], tensor), name
    assert s.history.counters["rejected_updates"] == 0
    assert s.history.entries[-1]["samples"] == sum(grid.examples)  # every reply's examples, counted once


def test_fedavg_bounds_the_change_a_reply_makes_not_its_weights(tmp_path):
    """`max_norm` bounds `w_region − w_global`: the model's own norm (3.8 here) is over the 2.0 bound, a
    round's change well under it, so nothing is rejected."""
    fed = Federation(tmp_path, topology())
    model_norm = torch.linalg.vector_norm(torch.cat([t.float().flatten()
                                                     for t in fed.initial.to_torch_state_dict().values()]))
    assert model_norm > 2.0
    fedavg = Metered(FedAvg(fraction_evaluate=0.0, min_available_nodes=2), fed.meter(),
                     limits=UpdateLimits(max_norm=2.0))
    order = protocol.WorkOrder(lr=0.1, batch_size=16, steps=2, data_seed=0).to_config()
    fedavg.start(fed.grid, fed.initial, num_rounds=3, train_config=ConfigRecord({**dict(fed.config), **order}))
    assert fedavg.history.counters["rejected_updates"] == 0 and fedavg.history.entries[-1]["version"] == 3


def test_fedavg_counts_a_bad_compressed_update_against_its_region(tmp_path):
    fed = Federation(tmp_path, three_regions())
    fed.grid = FaultyGrid(fed.grid._app, 3, bad_node=3, kind="nan")  # region "c"
    fedavg = Metered(FedAvg(fraction_evaluate=0.0, min_available_nodes=3), fed.meter(),
                     limits=UpdateLimits(max_norm=1000.0, quarantine_after=3), compression=make_codec("int8"))
    order = protocol.WorkOrder(lr=0.1, batch_size=16, epochs=0.5).to_config()
    config = ConfigRecord({**dict(fed.config), **order, "state-dir": str(tmp_path / "region-state")})
    fedavg.start(fed.grid, fed.initial, num_rounds=3, train_config=config)
    assert fedavg.history.rejections == {"c": {"malformed": 2}}  # rounds 2 and 3: a NaN scale does not decode


def test_fedavg_applies_a_compressed_update_as_the_weights_it_arrives_at(tmp_path):
    """A compressed reply is a change; FedAvg must average the weights it arrives at (global − change)."""
    finals = {}
    for codec in ("none", "fp16"):
        fed = Federation(tmp_path / codec, three_regions())
        fedavg = Metered(FedAvg(fraction_evaluate=0.0, min_available_nodes=3), fed.meter(),
                         compression=make_codec(codec))
        order = protocol.WorkOrder(lr=0.1, batch_size=16, epochs=0.5).to_config()
        config = ConfigRecord({**dict(fed.config), **order, "state-dir": str(tmp_path / codec / "region-state")})
        result = fedavg.start(fed.grid, fed.initial, num_rounds=3, train_config=config)
        finals[codec] = result.arrays.to_torch_state_dict()
        assert fedavg.history.counters["rejected_updates"] == 0
    initial = fed.initial.to_torch_state_dict()
    for name, exact in finals["none"].items():
        assert not torch.equal(exact, initial[name]), name  # it trained
        assert torch.allclose(finals["fp16"][name], exact, atol=2e-3), name  # within fp16's rounding


@pytest.mark.parametrize("kind", ["nan", "no_metrics"])
@pytest.mark.parametrize("strategy, rounds", [("asgd_ga", ROUNDS["asgd_ga"]), ("fedavg", 5)])
def test_a_region_that_keeps_sending_bad_updates_is_quarantined(tmp_path, strategy, rounds, kind):
    _, s, _ = final_model(tmp_path, strategy, kind, rounds)
    assert s.history.counters["quarantined_regions"] == 1
    assert s.history.rejections["c"] == {"non_finite" if kind == "nan" else "malformed": 3}
    assert s.meter.ledger.accounts["c"].invocations == 4  # one good job, three bad: no more work after the third
    assert s.meter.ledger.accounts["a"].invocations > 4


@pytest.mark.parametrize("strategy", ["ma", "asgd_ga", "fedavg"])
def test_a_region_whose_job_fails_is_lost_with_the_reason_it_gave(tmp_path, strategy, caplog):
    with caplog.at_level("WARNING", logger="cloudless_fl"):
        _, s, _ = final_model(tmp_path, strategy, "error")
    if strategy == "fedavg":  # Flower's rounds go on; each round says who failed, and why
        failed = [(e["round"], e["failed"]) for e in s.history.events if e["event"] == "round_incomplete"]
        assert failed == [(2, {"c": "region gone"}), (3, {"c": "region gone"})]
        assert "round 3: c failed: region gone" in caplog.messages
        return
    lost = [(e["region"], e["reason"]) for e in s.history.events if e["event"] == "region_lost"]
    assert lost and set(lost) == {("c", "region gone")}  # (it rejoins, and fails again)


def test_a_quarantined_region_restarted_under_a_new_node_stays_out(tmp_path):
    fed = Federation(tmp_path, three_regions())
    fed.grid = FaultyGrid(fed.grid._app, 3, bad_node=3, kind="nan")  # node 3 is region "c"
    s = STRATEGIES["asgd_ga"](fed, UpdateLimits(quarantine_after=3))
    s.rejoin_every = 1
    restarted, jobs_of_c = [], []

    def restart_once_quarantined(version, arrays):
        if s.history.counters["quarantined_regions"] and not restarted:
            restarted.append(fed.grid.restart(3))  # a fresh node of region "c", sending good updates now
            jobs_of_c.append(s.meter.ledger.accounts["c"].invocations)
        return None

    s.start(fed.grid, fed.initial, num_rounds=ROUNDS["asgd_ga"], train_config=fed.config,
            evaluate_fn=restart_once_quarantined)
    assert restarted and restarted[0] in s.roster.refused
    assert "c" not in {info.name for info in s.roster.live.values()}
    assert s.history.counters["rejoined_regions"] == 0
    refused = [(e["node"], e["region"], e["reason"]) for e in s.history.events if e["event"] == "node_refused"]
    assert refused == [(restarted[0], "c", "region c is quarantined")]
    assert s.meter.ledger.accounts["c"].invocations == jobs_of_c[0]  # the refused node was given no job


# ---------------------------------------------------------------- fuzzing the decoder and validator
dtypes = st.sampled_from(["float32", "float64", "int64", "int8", "object", "<U3", "bogus", "float16"])
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@st.composite
def arrays(draw):
    """An Array whose header and payload need not agree, and whose payload may not be npy at all."""
    shape, dtype = draw(shapes), draw(dtypes)
    payload = draw(st.one_of(st.binary(max_size=64),
                             st.builds(lambda b: b"\x93NUMPY\x01\x00" + b, st.binary(max_size=64))))
    return Array(dtype=dtype, shape=shape, stype=draw(st.sampled_from(["numpy.ndarray", "torch.Tensor"])),
                 data=payload)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["w", "b", "count", "x"]), arrays(), max_size=4),
       st.sampled_from([protocol.MODE_WEIGHTS, protocol.MODE_DELTA, protocol.MODE_GRADIENT]))
def test_malformed_updates_raise_only_rejected_update(contents, mode):
    validator = UpdateValidator(REFERENCE, UpdateLimits(max_norm=10.0))
    try:
        validator.check("r", ArrayRecord(contents), mode, base=REFERENCE)
    except RejectedUpdate as exc:
        assert exc.reason in {"missing_array", "unexpected_array", "wrong_shape", "wrong_dtype", "malformed",
                              "non_finite", "norm"}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["w", "b"]), arrays(), min_size=1, max_size=2))
def test_decode_tensors_decodes_exactly_what_numpy_reads_or_raises_a_documented_error(contents):
    try:
        tensors = protocol.decode_tensors(ArrayRecord(contents))
    except (TypeError, ValueError):
        return
    for name, array in contents.items():  # accepted: numpy itself reads the same values, dtype and shape
        expected = np.lib.format.read_array(io.BytesIO(array.data), allow_pickle=False)
        assert tensors[name].numpy().dtype == expected.dtype and tensors[name].numpy().shape == expected.shape
        assert np.array_equal(tensors[name].numpy(), expected, equal_nan=True)


def _npy(values: np.ndarray, **header) -> bytes:
    """An npy payload of `values`, with header fields overridden."""
    fields = {"descr": np.lib.format.dtype_to_descr(values.dtype), "fortran_order": False, "shape": values.shape,
              **header}
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, fields)
    return stream.getvalue() + values.tobytes()


GOOD_W = np.ones((3, 2), dtype=np.float32)
MALFORMED = {  # each an Array that declares w's float32 (3, 2) but is not a well-formed npy of it
    "not npy": b"garbage" * 8,
    "header dtype float64, same bytes": _npy(np.ones(3, dtype=np.float64), descr="<f8", shape=(3,)),
    "header shape differs": _npy(GOOD_W, shape=(2, 3)),
    "Fortran order": _npy(GOOD_W, fortran_order=True),
    "trailing bytes": _npy(GOOD_W) + b"\x00" * 4,
    "truncated values": _npy(GOOD_W)[:-4],
    "object dtype header": _npy(GOOD_W, descr="|O"),
    "header not a literal": _npy(GOOD_W).replace(b"'descr'", b"__import__('os')", 1),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_a_malformed_payload_is_rejected_as_malformed(kind):
    validator = UpdateValidator(REFERENCE, UpdateLimits())
    good = record(**REFERENCE)
    validator.check("r", good, protocol.MODE_DELTA)
    bad = ArrayRecord({**dict(good.items()),
                       "w": Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=MALFORMED[kind])})
    with pytest.raises(RejectedUpdate) as info:
        validator.check("r", bad, protocol.MODE_DELTA)
    assert info.value.reason == "malformed" and "'w'" in str(info.value)
