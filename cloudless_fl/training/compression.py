"""WAN compression of model payloads: codecs, and error feedback at the sender.

A codec turns a dict of tensors into the `ArrayRecord` that crosses the WAN and
back. Only floating-point entries are compressed; integer entries (batch-norm
step counters) travel as they are. Encoded arrays are named after the entry
they carry (`<name>` for the values, `<name>@scale`, `<name>@index`) and a
compressed record travels as one array holding them all (`protocol.pack_tensors`:
Flower moves every array as objects of its own, two at a time, a round trip of the
link per pair); `none` leaves the record tensor by tensor, as a stock ClientApp reads it.

- `none`: the tensors as they are.
- `fp16`: half precision.
- `int8`: symmetric 8-bit integers with one float32 scale per chunk of
  `chunk` consecutive values (Dettmers, arXiv 1511.04561; INTELLECT-1's int8
  all-reduce, arXiv 2412.01152); `int4`: the same in 4 bits, two values to a
  byte (Streaming DiLoCo, arXiv 2501.18512).
- `topk`: the `fraction` largest-magnitude entries of each tensor, as flat int32
  indices and float32 values (deep gradient compression, arXiv 1712.01887).

A lossy codec is used with `ErrorFeedback`: what one encoding left out is
added to the next payload, so over many sends nothing is lost (the sum of what
was sent tracks the sum of the true updates: Seide et al. 2014; Karimireddy et
al., arXiv 1901.09847). Downloads need no residual of their own: the server
sends the change from what the region holds (see `strategy/downlink.py`),
which is error feedback by construction.

Decoding is strict: a record that does not match the expected layout, or whose
indices or scales are out of range, raises `ValueError` naming the entry.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord

from ..control.meter import record_bytes
from .protocol import decode_tensors, pack_tensors, unpack_tensors

SCALE, INDEX = "@scale", "@index"
Tensors = Mapping[str, torch.Tensor]


class Codec:
    """Encode a dict of tensors for the WAN and decode it against the layout it must have (`like`)."""

    name = "none"
    lossy = False
    sparse = False  # sends a different subset of entries each time

    def encode(self, tensors: Tensors) -> ArrayRecord:
        """Floating-point entries as the codec encodes them; integer entries as they are."""
        out = OrderedDict()
        for name, value in tensors.items():
            value = value.detach()
            out.update(self._encode_one(name, value) if value.is_floating_point() else {name: value})
        if self.lossy:  # read only by this project's protocol, which unpacks it; `none` stays a stock model
            return pack_tensors(out)
        return ArrayRecord(OrderedDict((k, v.contiguous()) for k, v in out.items()))

    def decode(self, record: ArrayRecord, like: Tensors) -> dict[str, torch.Tensor]:
        arrays = unpack_tensors(record) if self.lossy else decode_tensors(record)
        expected = {k for k in like} | {f"{k}{suffix}" for k, v in like.items() if v.is_floating_point()
                                         for suffix in self._suffixes()}
        if set(arrays) != expected:
            missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
            raise ValueError(f"{self.name} payload does not match the model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        out = {}
        for name, ref in like.items():
            out[name] = self._decode_one(name, arrays, ref) if ref.is_floating_point() else _as_sent(name, arrays, ref)
        return out

    def spec(self) -> str:
        """The codec as one string (`int8:1024`), for a work order and a reply's `info`."""
        return self.name

    def _suffixes(self) -> tuple[str, ...]:
        return ()

    def _encode_one(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: value}

    def _decode_one(self, name: str, arrays: Tensors, ref: torch.Tensor) -> torch.Tensor:
        return _as_sent(name, arrays, ref)


def _as_sent(name: str, arrays: Tensors, ref: torch.Tensor) -> torch.Tensor:
    """An entry that travelled as it is (uncompressed, or an integer entry): it must match `ref` exactly."""
    value = arrays[name]
    if value.dtype != ref.dtype or value.shape != ref.shape:
        raise ValueError(f"{name}: {value.dtype} {tuple(value.shape)}, expected {ref.dtype} {tuple(ref.shape)}")
    return value.clone()


class Fp16(Codec):
    name, lossy = "fp16", True

    def _encode_one(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: value.half()}

    def _decode_one(self, name: str, arrays: Tensors, ref: torch.Tensor) -> torch.Tensor:
        value = arrays[name]
        if value.dtype != torch.float16 or value.shape != ref.shape:
            raise ValueError(f"{name}: {value.dtype} {tuple(value.shape)}, expected float16 {tuple(ref.shape)}")
        return value.to(ref.dtype)


class Int8(Codec):
    """Symmetric integers with one float32 scale per chunk (a chunk's scale is its largest magnitude / `levels`).

    Parameters: chunk — values per scale.
    """

    name, lossy, bits = "int8", True, 8

    def __init__(self, chunk: int = 1024) -> None:
        if int(chunk) < 1:
            raise ValueError(f"{self.name} chunk must be at least 1, got {chunk}")
        self.chunk = int(chunk)
        self.levels = 2 ** (self.bits - 1) - 1  # 127 for int8, 7 for int4: zero stays exact

    def spec(self) -> str:
        return f"{self.name}:{self.chunk}"

    def _suffixes(self) -> tuple[str, ...]:
        return (SCALE,)

    def _encode_one(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = value.reshape(-1).float()
        chunks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % self.chunk)).view(-1, self.chunk)
        scale = chunks.abs().amax(dim=1) / self.levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantised = torch.round(chunks / safe[:, None]).clamp_(-self.levels, self.levels).to(torch.int8)
        return {name: self._pack(quantised.reshape(-1)[:flat.numel()]), name + SCALE: scale}

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def _unpack(self, name: str, values: torch.Tensor, n: int) -> torch.Tensor:
        if values.dtype != torch.int8 or tuple(values.shape) != (n,):
            raise ValueError(f"{name}: {values.dtype} {tuple(values.shape)}, expected int8 ({n},)")
        return values

    def _decode_one(self, name: str, arrays: Tensors, ref: torch.Tensor) -> torch.Tensor:
        n = ref.numel()
        values, scale = self._unpack(name, arrays[name], n), arrays[name + SCALE]
        chunks = math.ceil(n / self.chunk)
        if scale.dtype != torch.float32 or tuple(scale.shape) != (chunks,):
            raise ValueError(f"{name}{SCALE}: {scale.dtype} {tuple(scale.shape)}, expected float32 ({chunks},)")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError(f"{name}{SCALE} holds negative, NaN or Inf scales")
        padded = torch.nn.functional.pad(values.float(), (0, chunks * self.chunk - n)).view(chunks, self.chunk)
        return (padded * scale[:, None]).reshape(-1)[:n].reshape(ref.shape).to(ref.dtype)


class Int4(Int8):
    """As `Int8` with values in -7..7, two to a byte (Streaming DiLoCo's 4-bit outer updates, arXiv 2501.18512)."""

    name, bits = "int4", 4

    def __init__(self, chunk: int = 128) -> None:
        super().__init__(chunk)

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        nibbles = torch.nn.functional.pad((q + 8).to(torch.uint8), (0, q.numel() % 2))  # 1..15; pad with 0
        return nibbles[0::2] | (nibbles[1::2] << 4)

    def _unpack(self, name: str, values: torch.Tensor, n: int) -> torch.Tensor:
        if values.dtype != torch.uint8 or tuple(values.shape) != ((n + 1) // 2,):
            raise ValueError(f"{name}: {values.dtype} {tuple(values.shape)}, expected uint8 ({(n + 1) // 2},)")
        nibbles = torch.stack([values & 0x0F, values >> 4], dim=1).reshape(-1)[:n]
        if bool((nibbles == 0).any()):
            raise ValueError(f"{name} holds a value outside -7..7")
        return nibbles.to(torch.int8) - 8


class TopK(Codec):
    """Parameters: fraction — of each tensor's entries sent (at least one), the largest in magnitude."""

    name, lossy, sparse = "topk", True, True

    def __init__(self, fraction: float = 0.05) -> None:
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def spec(self) -> str:
        return f"{self.name}:{self.fraction:g}"

    def _suffixes(self) -> tuple[str, ...]:
        return (INDEX,)

    def kept(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.fraction * numel)))

    def _encode_one(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = value.reshape(-1).float()
        index = torch.topk(flat.abs(), self.kept(flat.numel()), sorted=False).indices.sort().values
        return {name: flat[index], name + INDEX: index.to(torch.int32)}

    def _decode_one(self, name: str, arrays: Tensors, ref: torch.Tensor) -> torch.Tensor:
        values, index = arrays[name], arrays[name + INDEX]
        n, k = ref.numel(), self.kept(ref.numel())
        if values.dtype != torch.float32 or tuple(values.shape) != (k,):
            raise ValueError(f"{name}: {values.dtype} {tuple(values.shape)}, expected float32 ({k},)")
        if index.dtype != torch.int32 or tuple(index.shape) != (k,):
            raise ValueError(f"{name}{INDEX}: {index.dtype} {tuple(index.shape)}, expected int32 ({k},)")
        index = index.long()
        if k and (int(index[0]) < 0 or int(index[-1]) >= n or bool((index[1:] <= index[:-1]).any())):
            raise ValueError(f"{name}{INDEX}: indices must be increasing and within 0..{n - 1}")
        out = torch.zeros(n, dtype=torch.float32)
        out[index] = values
        return out.reshape(ref.shape).to(ref.dtype)


CODECS = {"none": Codec, "fp16": Fp16, "int8": Int8, "int4": Int4, "topk": TopK}


def make_codec(name: str, **options: Any) -> Codec:
    """The codec `name` with its options (`chunk` for int8 and int4, `fraction` for topk)."""
    if name not in CODECS:
        raise ValueError(f"unknown compression {name!r}; expected one of {', '.join(CODECS)}")
    return CODECS[name](**options)


def codec_from_spec(spec: str) -> Codec:
    """Inverse of `Codec.spec()`: `int8:1024` → `Int8(chunk=1024)`."""
    name, _, arg = str(spec).partition(":")
    option = {"int8": "chunk", "int4": "chunk", "topk": "fraction"}.get(name)
    if option is None:
        return make_codec(name)
    if not arg:
        raise ValueError(f"compression {spec!r} lacks its {option}")
    return make_codec(name, **{option: float(arg) if name == "topk" else int(arg)})


def wire_bytes(codec: Codec, tensors: Tensors) -> int:
    """What one model crosses the WAN as under `codec` (its encoded size): how plans size transfers."""
    return record_bytes(codec.encode(tensors))


class ErrorFeedback:
    """Send `codec(update + residual)` and keep what that left out as the next residual.

    `residual` is explicit state (None: nothing left out yet), so a region can
    keep it between jobs and across restarts (`training/region_link.py`).
    """

    def __init__(self, codec: Codec, residual: Tensors | None = None) -> None:
        self.codec = codec
        self.residual = None if residual is None else dict(residual)

    def encode(self, update: Tensors) -> ArrayRecord:
        corrected = {k: v + self.residual[k] if self.residual is not None and v.is_floating_point() else v
                     for k, v in update.items()}
        record = self.codec.encode(corrected)
        if self.codec.lossy:
            sent = self.codec.decode(record, corrected)
            self.residual = {k: corrected[k] - sent[k] for k, v in corrected.items() if v.is_floating_point()}
        return record
