"""WAN codecs: round-trip error bounds, error feedback, strict decoding, encoded sizes."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudless_fl.control.meter import record_bytes
from cloudless_fl.training.compression import ErrorFeedback, Fp16, Int4, Int8, TopK, codec_from_spec, make_codec
from cloudless_fl.training.protocol import PACKED, pack_tensors, unpack_tensors

shapes = st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64])


def _tensors(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(shape, generator=g, dtype=dtype) * scale,
            "steps": torch.tensor(seed, dtype=torch.int64)}


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 10_000), scale=st.sampled_from([1e-4, 1.0, 1e3]),
       chunk=st.sampled_from([1, 7, 256, 1024]), kind=st.sampled_from([(Int8, 127), (Int4, 7)]))
def test_integer_codes_err_by_at_most_half_a_step_of_their_chunk_scale(shape, dtype, seed, scale, chunk, kind):
    x = _tensors(shape, dtype, seed, scale)
    codec, levels = kind[0](chunk), kind[1]
    y = codec.decode(codec.encode(x), x)
    assert y["w"].dtype == dtype and y["w"].shape == x["w"].shape
    assert torch.equal(y["steps"], x["steps"])  # integer entries travel as they are
    flat = x["w"].reshape(-1).double()
    step = torch.nn.functional.pad(flat.abs(), (0, (-flat.numel()) % chunk)).view(-1, chunk).amax(1) / levels
    bound = step.repeat_interleave(chunk)[:flat.numel()] * 0.5 * (1 + 1e-5) + 1e-30
    assert bool(((y["w"].reshape(-1).double() - flat).abs() <= bound).all())


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_fp16_error_is_within_half_precision(shape, dtype, seed, scale):
    x = _tensors(shape, dtype, seed, scale)
    codec = Fp16()
    y = codec.decode(codec.encode(x), x)
    assert y["w"].dtype == dtype
    torch.testing.assert_close(y["w"], x["w"], rtol=2 ** -11, atol=6e-8)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000), fraction=st.sampled_from([0.001, 0.1, 0.5, 1.0]))
def test_topk_keeps_exactly_the_largest_entries(shape, seed, fraction):
    x = _tensors(shape, torch.float32, seed)
    codec = TopK(fraction)
    y = codec.decode(codec.encode(x), x)["w"].reshape(-1)
    flat = x["w"].reshape(-1)
    kept = y != 0
    assert int(kept.sum()) == min(flat.numel(), max(1, math.ceil(fraction * flat.numel())))
    assert torch.equal(y[kept], flat[kept])  # kept values are exact
    if (~kept).any():
        assert float(flat[~kept].abs().max()) <= float(flat[kept].abs().min())


def test_error_feedback_delivers_the_sum_of_the_true_updates():
    """Whatever topk leaves out is sent later: sent-so-far + residual equals the true sum at every step,
    and the residual stays bounded, so the average sent update converges to the average true one."""
    g = torch.Generator().manual_seed(0)
    like = {"w": torch.zeros(500)}
    ef, codec = ErrorFeedback(TopK(0.02)), TopK(0.02)
    true_sum, sent_sum, residual_norms = torch.zeros(500), torch.zeros(500), []
    for _ in range(400):
        update = {"w": torch.randn(500, generator=g) + 0.5}
        true_sum += update["w"]
        sent_sum += codec.decode(ef.encode(update), like)["w"]
        torch.testing.assert_close(sent_sum + ef.residual["w"], true_sum, rtol=1e-4, atol=1e-3)
        residual_norms.append(float(ef.residual["w"].norm()))
    assert max(residual_norms[200:]) < 2 * max(residual_norms[:200])  # bounded, not growing
    assert float((sent_sum - true_sum).norm() / true_sum.norm()) < 0.2
    without_feedback = sum(codec.decode(codec.encode({"w": torch.ones(500)}), like)["w"].sum() for _ in range(3))
    assert float(without_feedback) < 0.1 * 1500  # the control: without feedback most of the mass is lost


def test_lossless_codec_keeps_no_residual():
    ef = ErrorFeedback(make_codec("none"))
    x = {"w": torch.randn(10)}
    assert torch.equal(make_codec("none").decode(ef.encode(x), x)["w"], x["w"]) and ef.residual is None


@pytest.mark.parametrize("codec, ratio", [(make_codec("none"), 1.0), (Fp16(), 0.5), (Int8(1024), 0.25),
                                          (Int4(128), 1 / 8 + 1 / 128), (TopK(0.01), 0.02)])
def test_encoded_size_is_what_the_codec_promises(codec, ratio):
    x = {"w": torch.randn(1000, 1000)}
    raw, encoded = record_bytes(codec.encode({"w": x["w"]})), 4 * 1_000_000
    assert raw == pytest.approx(ratio * encoded, rel=0.01)


@pytest.mark.parametrize("spec", ["none", "fp16", "int8:64", "int4:32", "topk:0.05"])
def test_spec_round_trips(spec):
    assert codec_from_spec(spec).spec() == spec


def test_bad_payloads_are_refused_with_the_entry_named():
    like = {"w": torch.randn(10)}
    good = Int8(4).encode(like)
    codec = Int8(4)
    bad_scale = unpack_tensors(good)
    bad_scale["w@scale"] = torch.full((3,), float("nan"))
    with pytest.raises(ValueError, match="w@scale"):
        codec.decode(pack_tensors(bad_scale), like)
    with pytest.raises(ValueError, match="missing"):
        codec.decode(make_codec("none").encode(like), like)
    topk = TopK(0.3)
    entries = unpack_tensors(topk.encode(like))
    entries["w@index"] = torch.tensor([0, 5, 10], dtype=torch.int32)  # 10 is past the end
    with pytest.raises(ValueError, match="w@index"):
        topk.decode(pack_tensors(entries), like)
    entries["w@index"] = torch.tensor([3, 3, 4], dtype=torch.int32)  # repeated
    with pytest.raises(ValueError, match="increasing"):
        topk.decode(pack_tensors(entries), like)
    packed = unpack_tensors(Int4(4).encode(like))
    packed["w"] = packed["w"] & 0xF0  # a zero nibble: no value of -7..7 packs to it
    with pytest.raises(ValueError, match="outside"):
        Int4(4).decode(pack_tensors(packed), like)
    with pytest.raises(ValueError, match="unknown compression"):
        make_codec("zip")


@pytest.mark.parametrize("codec", [Fp16(), Int8(16), Int4(16), TopK(0.2)])
def test_a_compressed_payload_travels_as_one_array(codec):
    """Flower moves each array as objects of its own, a round trip per pair on a slow link: one array, not 2 per tensor."""
    like = {"a.weight": torch.randn(20, 8), "a.bias": torch.randn(20), "b.weight": torch.randn(3, 20),
            "steps": torch.tensor(7)}
    record = codec.encode(like)
    assert list(record.keys()) == [PACKED]
    decoded = codec.decode(record, like)
    assert set(decoded) == set(like) and torch.equal(decoded["steps"], like["steps"])


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4", "topk"])
def test_a_compressed_job_is_as_few_flower_objects_as_a_one_tensor_model(codec):
    """What a slow link pays per pair of objects (docs/compression.md): counted on Flower's own object tree."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_object_tree, iterate_object_tree

    def objects(record) -> int:
        return sum(1 for _ in iterate_object_tree(get_object_tree(RecordDict({"arrays": record,
                                                                              "config": ConfigRecord({"lr": 0.1})}))))

    six_tensors = {f"layer{i}.{kind}": torch.randn(8, 4) if kind == "weight" else torch.randn(8)
                   for i in range(3) for kind in ("weight", "bias")}
    assert objects(make_codec(codec).encode(six_tensors)) == objects(make_codec("none").encode({"w": torch.ones(3)}))


def test_an_uncompressed_payload_stays_tensor_by_tensor_for_a_stock_clientapp():
    like = {"a.weight": torch.randn(4, 2), "a.bias": torch.randn(4)}
    assert list(make_codec("none").encode(like).keys()) == ["a.weight", "a.bias"]


def test_packing_round_trips_every_numeric_dtype_and_shape():
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "u8": torch.arange(9, dtype=torch.uint8),
               "i8": torch.tensor([-7, 7], dtype=torch.int8), "i32": torch.tensor([1, 2], dtype=torch.int32),
               "scalar": torch.tensor(3), "empty": torch.zeros(0, 2)}
    back = unpack_tensors(pack_tensors(tensors))
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t)


def _packed(table, values: bytes):
    """A packed record as a region could send it: `table` (JSON-able, or raw bytes) then `values`."""
    from flwr.app import ArrayRecord

    head = table if isinstance(table, bytes) else json.dumps(table).encode()
    payload = len(head).to_bytes(4, "little") + head + values
    return ArrayRecord({PACKED: torch.frombuffer(bytearray(payload), dtype=torch.uint8)})


THREE = torch.ones(3).numpy().tobytes()


@pytest.mark.parametrize("table, values, message", [
    ([["w", "<f4", [3]]], THREE[:-1], "packed payload ends inside 'w'"),
    ([["w", "<f4", [3]]], THREE + b"\0", "packed payload has 1 bytes past its last entry"),
    (b"{not json", THREE, "its table of entries is missing or not a JSON list"),
    ({"w": 1}, THREE, "its table of entries is missing or not a JSON list"),
    ([["w", "|O8", [3]]], THREE, "'w' has dtype '|O8'; only numeric arrays are accepted"),
    ([["w", "no-such-dtype", [3]]], THREE, "'w' has unknown dtype 'no-such-dtype'"),
    ([["w", "<f4", [-3]]], THREE, "bad table row \"['w', '<f4', [-3]]\"; expected [name, dtype, shape]"),
    ([["w", "<f4"]], THREE, "bad table row \"['w', '<f4']\""),
    ([["w", "<f4", [1]], ["w", "<f4", [2]]], THREE, "packed payload names 'w' twice"),
    ([["w", "<f4", [10**12]]], THREE, "packed payload ends inside 'w'"),  # refused before anything that size is made
])
def test_a_damaged_packed_payload_is_refused_saying_what_is_wrong(table, values, message):
    assert unpack_tensors(_packed([["w", "<f4", [3]]], THREE))["w"].tolist() == [1.0, 1.0, 1.0]  # the good one
    with pytest.raises(ValueError, match=re.escape(message)):
        unpack_tensors(_packed(table, values))


def test_a_packed_record_of_nothing_is_nothing_and_a_packed_array_must_be_flat_bytes():
    from flwr.app import ArrayRecord

    assert unpack_tensors(pack_tensors({})) == {}  # the table ends exactly where the payload does
    for wrong in (torch.ones(8), torch.zeros(2, 4, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=re.escape(f"packed payload: {wrong.dtype} {tuple(wrong.shape)}, "
                                                       "expected a 1-D uint8 array")):
            unpack_tensors(ArrayRecord({PACKED: wrong}))


def test_a_packed_entry_in_the_other_byte_order_reads_as_its_values():
    big_endian = torch.arange(3, dtype=torch.float32).numpy().astype(">f4").tobytes()
    assert unpack_tensors(_packed([["w", ">f4", [3]]], big_endian))["w"].tolist() == [0.0, 1.0, 2.0]


def test_a_record_of_several_arrays_is_not_a_packed_one():
    with pytest.raises(ValueError, match="not packed"):
        unpack_tensors(make_codec("none").encode({"w": torch.ones(2), "b": torch.ones(1)}))
