"""The message contract between the control plane and a region's ClientApp.

Server → region (ConfigRecord "config"): which model to build, how much local
work, at which stream offset, and in which mode. Region → server: ArrayRecord
"arrays" (weights, or a gradient in `gradient` mode), MetricRecord "metrics"
and ConfigRecord "info" (the region's name: MetricRecords hold numbers only).
A train message may carry a second ArrayRecord, "drift-correction" (ASGD-GA's
drift correction, `strategy/drift.py`); a ClientApp that knows nothing of it
trains plainly, and the server stops sending it.
"""

from __future__ import annotations

import io
import json
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib import format as npy_format
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from ..control.jobs import Reported
from .records import ARRAYS, CONFIG, CORRECTION, INFO, METRICS  # noqa: F401 - the protocol's names

# Local-work modes a train message can ask for.
MODE_WEIGHTS = "weights"  # local SGD; reply with the new weights (FedAvg, MA)
MODE_GRADIENT = "gradient"  # accumulate gradients at the sent weights; reply with them (ASGD-GA)
MODE_DELTA = "delta"  # local SGD; reply with sent - new weights (ASGD-GA delta option)
MODES = (MODE_WEIGHTS, MODE_GRADIENT, MODE_DELTA)
# What a job in each mode can be answered with: new weights and a delta are one another against the model the
# job was sent (a stock ClientApp replies weights; a compressed upload is a delta); a gradient is only a gradient.
ANSWERS = {MODE_WEIGHTS: (MODE_WEIGHTS, MODE_DELTA), MODE_DELTA: (MODE_DELTA, MODE_WEIGHTS),
           MODE_GRADIENT: (MODE_GRADIENT,)}
# A query reply's metric: the most workers the region's SuperNode starts for one job (its `max-workers`).
MAX_WORKERS = "max-workers"
# A train reply's metric under drift correction: 1 if the job's steps were corrected (a region without the
# state its order names trains uncorrected, as does a ClientApp that knows nothing of it: no such metric).
DRIFT_CORRECTED = "drift-corrected"
# A train message sent before the server knows which node is which region (the run's first jobs go out
# with the roll call): a JSON table region → that region's work-order keys, merged by the region it reaches.
PER_REGION = "per-region"
_NUMPY_STYPE = "numpy.ndarray"


@dataclass
class ModelSpec:
    """Enough for a region to rebuild the global model's architecture."""

    name: str
    num_classes: int
    options: dict[str, Any]

    def to_config(self) -> dict[str, Any]:
        return {"model": self.name, "num-classes": self.num_classes, "model-options": json.dumps(self.options)}

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "ModelSpec":
        return cls(str(config["model"]), int(config["num-classes"]), json.loads(str(config.get("model-options", "{}"))))


@dataclass
class WorkOrder:
    """One job's local work. Exactly one of `steps` / `epochs` is set."""

    lr: float
    batch_size: int
    mode: str = MODE_WEIGHTS
    steps: int | None = None
    epochs: float | None = None
    offset: int | None = None  # position in the region's sample stream; None: from the round
    round: int | None = None  # Flower's "server-round", set by synchronous strategies
    data_seed: int = 0
    version: int = 0  # the job's place in the run: the model version it starts from (ASGD-GA), its period (MA)
    workers: int = 1  # workers the region rents for the job (the plan's): its worker group, up to `max-workers`
    compression: str = "none"  # the codec of both directions (`training/compression.py`'s spec)
    base: int | None = None  # the arrays are the change from the model of this earlier job; None: the model
    keep_from: int | None = None  # the region may forget what jobs before this one left (region_link.py)
    layout: str | None = None  # base None and this set: the arrays are the whole model, encoded (`layout_of`)
    drift: bool = False  # keep this job's start model and mean gradient for the next job's drift correction
    drift_from: int | None = None  # correct local steps for drift from what this earlier job kept (region_link.py)
    drift_scale: float | None = None  # the global model's move since that job, per unit of mean gradient
    drift_encoding: str | None = None  # the codec of the `drift-correction` record the job carries, if it does

    def to_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"lr": float(self.lr), "batch-size": int(self.batch_size), "mode": self.mode,
                               "data-seed": int(self.data_seed), "model-version": int(self.version),
                               "workers": int(self.workers), "compression": self.compression}
        if self.offset is not None:
            cfg["sample-offset"] = int(self.offset)
        if self.steps is not None:
            cfg["local-steps"] = int(self.steps)
        if self.epochs is not None:
            cfg["local-epochs"] = float(self.epochs)
        if self.base is not None:
            cfg["base-job"] = int(self.base)
        if self.keep_from is not None:
            cfg["keep-from-job"] = int(self.keep_from)
        if self.layout is not None:
            cfg["model-layout"] = self.layout
        if self.drift:
            cfg["drift-correction"] = True
        if self.drift_from is not None:
            cfg["drift-from-job"], cfg["drift-scale"] = int(self.drift_from), float(self.drift_scale)
        if self.drift_encoding is not None:
            cfg["drift-encoding"] = self.drift_encoding
        return cfg

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "WorkOrder":
        mode = str(config.get("mode", MODE_WEIGHTS))
        if mode not in MODES:
            raise ValueError(f"unknown local-work mode {mode!r}; expected one of {', '.join(MODES)}")
        scale = float(config["drift-scale"]) if "drift-from-job" in config else None
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"drift-scale must be a positive number, got {scale}")
        steps = config.get("local-steps")
        epochs = config.get("local-epochs")
        if steps is None and epochs is None:
            epochs = 1.0
        return cls(lr=float(config["lr"]), batch_size=int(config["batch-size"]), mode=mode,
                   steps=None if steps is None else int(steps), epochs=None if epochs is None else float(epochs),
                   offset=int(config["sample-offset"]) if "sample-offset" in config else None,
                   round=int(config["server-round"]) if "server-round" in config else None,
                   data_seed=int(config.get("data-seed", 0)),
                   version=int(config.get("model-version", 0)), workers=int(config.get("workers", 1)),
                   compression=str(config.get("compression", "none")),
                   base=int(config["base-job"]) if "base-job" in config else None,
                   keep_from=int(config["keep-from-job"]) if "keep-from-job" in config else None,
                   layout=str(config["model-layout"]) if "model-layout" in config else None,
                   drift=bool(config.get("drift-correction", False)),
                   drift_from=int(config["drift-from-job"]) if "drift-from-job" in config else None,
                   drift_scale=scale,
                   drift_encoding=str(config["drift-encoding"]) if "drift-encoding" in config else None)

    def job_key(self) -> int:
        """What names this job among its region's jobs: its stream offset, or the round of a synchronous
        Flower strategy (which sends no offset)."""
        return self.offset if self.offset is not None else int(self.round or 0)

    def samples(self, n_resident: int) -> int:
        """How many stream positions the job consumes on a region holding `n_resident` samples."""
        if self.steps is not None:
            return self.steps * self.batch_size
        return max(1, round(float(self.epochs) * n_resident))

    def start_position(self, n_resident: int) -> int:
        """Where in the stream the job starts. Synchronous Flower strategies send every
        node the same config, so their round r continues where round r-1 stopped."""
        if self.offset is not None:
            return self.offset
        return (max(self.round or 1, 1) - 1) * self.samples(n_resident)


def layout_of(tensors: dict[str, torch.Tensor]) -> str:
    """A model's entries, shapes and dtypes as JSON: enough to decode an encoded model without holding one."""
    return json.dumps([[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in tensors.items()])


def layout_tensors(layout: str) -> dict[str, torch.Tensor]:
    """Shape-only (meta) tensors from `layout_of`'s JSON; ValueError if it is not such a layout."""
    try:
        entries = json.loads(layout)
        out = {}
        for name, shape, dtype in entries:
            kind = getattr(torch, str(dtype), None)
            if not isinstance(kind, torch.dtype):
                raise ValueError(f"{dtype!r} is not a torch dtype")
            out[str(name)] = torch.empty([int(n) for n in shape], dtype=kind, device="meta")
        return out
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model-layout is not a list of [name, shape, dtype]: {exc}") from None


def decode_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Arrays of a record as CPU tensors, read in place from the `.npy` payload.

    Flower's `Array.numpy()` copies the data; on the server's hot path (one
    4.5 MB gradient per ASGD-GA update) that is most of the cost, so the data is
    viewed where it lies. The npy header is parsed (literals only, never
    unpickled) and must agree with the array's declared dtype and shape, in C
    order, with exactly the bytes those need.

    Raises `TypeError` or `ValueError` (naming the array) for anything that is not
    a well-formed npy payload of a numeric dtype matching its declared shape.
    """
    out = {}
    for name, array in record.items():
        if array.stype != _NUMPY_STYPE:
            raise TypeError(f"array {name!r} has serialisation {array.stype!r}; expected numpy.ndarray")
        dtype = np.dtype(array.dtype)  # TypeError for a name numpy does not know
        if dtype.kind not in "biuf":
            raise TypeError(f"array {name!r} has dtype {array.dtype!r}; only numeric arrays are accepted")
        shape = tuple(array.shape)
        offset = _npy_data_offset(name, array.data, dtype, shape)
        values = np.frombuffer(array.data, dtype=dtype, offset=offset).reshape(shape)
        with warnings.catch_warnings():  # read-only view: we never write to it
            warnings.simplefilter("ignore", UserWarning)
            out[name] = torch.from_numpy(values)
    return out


PACKED = "packed"  # the one array a packed record holds


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as a record of ONE uint8 array: a 4-byte length, a JSON table of (name, dtype, shape), the values.

    Why: Flower moves every array of a message (and every 5 MB chunk of one) as an
    object of its own, two requests at a time (`FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS`,
    at most the cores), so each pair costs a round trip of the link: an int4 model of
    six tensors is 12 arrays and ~28 objects, 14 round trips each way, 7 s on a
    250 ms link before its bytes count (docs/compression.md). Packed, it is ~6 objects.
    Only payloads this project's protocol reads are packed (compressed ones): a stock
    ClientApp reads an uncompressed model by its tensors' names.
    """
    arrays = [t.detach().cpu().contiguous().numpy() for t in tensors.values()]
    table = json.dumps([[name, a.dtype.str, list(a.shape)] for name, a in zip(tensors, arrays)]).encode()
    payload = bytearray().join([len(table).to_bytes(4, "little"), table, *(a.tobytes() for a in arrays)])
    return ArrayRecord({PACKED: torch.frombuffer(payload, dtype=torch.uint8)})


def unpack_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of `pack_tensors`, strict: ValueError naming what is wrong with a record that is not one."""
    if list(record.keys()) != [PACKED]:
        raise ValueError(f"payload is not packed: expected the one array {PACKED!r}, got "
                         f"{sorted(record.keys())[:3]} (missing {PACKED!r})")
    data = decode_tensors(record)[PACKED]
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"packed payload: {data.dtype} {tuple(data.shape)}, expected a 1-D uint8 array")
    payload = data.numpy()  # read where it lies; each entry is copied out once
    size = int.from_bytes(payload[:4].tobytes(), "little")
    try:
        table = json.loads(payload[4:4 + size].tobytes()) if 4 + size <= len(payload) else None
    except (ValueError, UnicodeDecodeError):
        table = None
    if not isinstance(table, list):
        raise ValueError("packed payload: its table of entries is missing or not a JSON list")
    out, offset = {}, 4 + size
    for entry in table:
        name, dtype, shape = _packed_entry(entry)
        if name in out:
            raise ValueError(f"packed payload names {name!r} twice")
        count = math.prod(shape)
        end = offset + dtype.itemsize * count
        if end > len(payload):
            raise ValueError(f"packed payload ends inside {name!r}")
        values = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape)
        out[name] = torch.from_numpy(values.astype(dtype.newbyteorder("=")))  # a copy, in this machine's order
        offset = end
    if offset != len(payload):
        raise ValueError(f"packed payload has {len(payload) - offset} bytes past its last entry")
    return out


def _packed_entry(entry: Any) -> tuple[str, np.dtype, tuple[int, ...]]:
    """(name, dtype, shape) of one row of a packed table, checked: numeric dtype, non-negative sizes."""
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], str)
            and isinstance(entry[2], list) and all(isinstance(n, int) and n >= 0 for n in entry[2])):
        raise ValueError(f"packed payload: bad table row {str(entry)[:80]!r}; expected [name, dtype, shape]")
    try:
        dtype = np.dtype(entry[1])
    except TypeError:
        raise ValueError(f"packed payload: {entry[0]!r} has unknown dtype {entry[1]!r}") from None
    if dtype.kind not in "biuf":
        raise ValueError(f"packed payload: {entry[0]!r} has dtype {entry[1]!r}; only numeric arrays are accepted")
    return entry[0], dtype, tuple(entry[2])


def _npy_data_offset(name: str, data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Where the values start in an npy payload whose header says `dtype`, `shape`, C order; else ValueError."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        raise ValueError(f"array {name!r} is not in .npy format (version 1 or 2)")
    header_end = (10 + int.from_bytes(data[8:10], "little") if data[6] == 1
                  else 12 + int.from_bytes(data[8:12], "little"))
    if header_end > len(data):
        raise ValueError(f"array {name!r}: npy header runs past the payload")
    read_header = npy_format.read_array_header_1_0 if data[6] == 1 else npy_format.read_array_header_2_0
    stream = io.BytesIO(data[:header_end])
    stream.seek(8)
    try:
        stored_shape, fortran_order, stored_dtype = read_header(stream)
    except (ValueError, SyntaxError, TypeError) as exc:
        raise ValueError(f"array {name!r}: bad npy header: {exc}") from None
    if stored_dtype != dtype or tuple(stored_shape) != shape or fortran_order:
        raise ValueError(f"array {name!r}: npy header says {stored_dtype} {tuple(stored_shape)}"
                         f"{' Fortran order' if fortran_order else ''}, declared {dtype} {shape}")
    expected = dtype.itemsize * math.prod(shape)
    if len(data) - header_end != expected:
        raise ValueError(f"array {name!r}: {len(data) - header_end} bytes of values, {shape} {dtype} needs {expected}")
    return header_end


def reply_arrays(msg: Message) -> ArrayRecord:
    """A train reply's update: its ArrayRecord named `arrays`, else its only one (Flower prescribes no name);
    an empty one (missing every array) if neither."""
    records = msg.content.array_records
    if ARRAYS in records:
        return records[ARRAYS]
    return next(iter(records.values())) if len(records) == 1 else ArrayRecord()


def reply_update(msg: Message) -> str:
    """What a train reply's arrays are: the `update` its `info` record names, else weights.

    A stock Flower ClientApp replies with its new weights and no `info` record
    (Flower's convention); the region ClientApp (and any app that follows this
    protocol) says `update: gradient` or `update: delta` when it sends those.
    """
    info = msg.content.config_records.get(INFO)
    update = MODE_WEIGHTS if info is None else str(info.get("update", MODE_WEIGHTS))
    if update not in MODES:
        raise ValueError(f"reply says its arrays are {update!r}; expected one of {', '.join(MODES)}")
    return update


def reply_encoding(msg: Message) -> str:
    """The codec a train reply's arrays are encoded with (`training/compression.py`); a stock reply's: none."""
    info = msg.content.config_records.get(INFO)
    return "none" if info is None else str(info.get("encoding", "none"))


def job_report(msg: Message, metrics) -> Reported:
    """What a train reply (with its `metrics`) says about the job; a stock reply says samples only."""
    def seconds(key: str) -> float | None:
        return None if metrics.get(key) is None else float(metrics[key])

    return Reported(samples=int(metrics.get("num-examples", 0)), compute_s=seconds("compute-seconds"),
                    replied_s_ago=max(0.0, time.time() - float(msg.metadata.created_at)),
                    behind_s=seconds("pace-behind-seconds") or 0.0, startup_s=seconds("startup-seconds"),
                    load_s=seconds("load-seconds"),
                    workers=None if metrics.get("workers") is None else int(metrics["workers"]))


def region_config(config: ConfigRecord, region: str) -> ConfigRecord:
    """The job's config as `region` must read it: its row of a `PER_REGION` table merged in (a config
    without the table is returned as it is)."""
    if PER_REGION not in config:
        return config
    rows = json.loads(str(config[PER_REGION]))
    if region not in rows:
        raise ValueError(f"this job has work for regions {', '.join(sorted(rows))}, not for {region!r}: the "
                         "SuperNode's region is not one the server planned for")
    return ConfigRecord({**{k: v for k, v in config.items() if k != PER_REGION}, **rows[region]})


def reply_region(msg: Message) -> str | None:
    """The region a reply came from, if it said."""
    if msg.has_error() or INFO not in msg.content.config_records:
        return None
    region = msg.content.config_records[INFO].get("region")
    return None if region is None else str(region)
