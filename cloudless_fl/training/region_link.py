"""A region's end of compressed WAN traffic, and what it keeps between jobs for it and for drift correction.

Three things, each keyed by the job that left them (its start position in the
region's sample stream, which is unique and checkpointed by the server):

- `model`: the model the region rebuilt from that job's download; the next
  download is the change from it (`strategy/downlink.py`);
- `residual`: what the codec left out of that job's upload (error feedback);
- `gradient`: the job's mean raw gradient per local step, when MA corrects
  local steps for drift (`WorkOrder.drift`).

MA's drift correction is SCAFFOLD's (Karimireddy et al., ICML 2020, option II)
with no extra WAN bytes. Each local step uses `g + c − c_i`, where `c_i` is
the region's mean gradient over its last job (kept here) and `c` the regions'
weighted mean of theirs. SCAFFOLD sends `c`; here the region reads it off the
model it is sent: the server's (FedNova-normalised) step from the model `x'`
that job started from to this job's `x` is `scale · c`, with `scale =
outer_lr · lr · τ_eff` of that period (`WorkOrder.drift_scale`), so the
correction is `(x' − x) / scale − c_i`. ASGD-GA's server takes no such step
(it applies one region at a time), so it sends each job its correction
(`strategy/drift.py`), and the region keeps nothing for it.

In deployment every message gets a fresh ClientApp process, so snapshots live
on disk, in the SuperNode's `state-dir` (node config; `launch` sets one per
region) or, on one machine, the folder the server names (`<run>/region-state`).
A resumed run re-sends the jobs it had in flight at the same positions and
finds the same snapshots: resume stays bit-identical. The server says which
snapshots it may still ask for (`WorkOrder.keep_from`: its last checkpoint's),
so older ones are deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from flwr.app import ArrayRecord

from ..atomic import atomic_write
from ..errors import DataError
from .compression import ErrorFeedback, codec_from_spec
from .protocol import WorkOrder, layout_tensors, unpack_tensors

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    model: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor] | None
    gradient: dict[str, torch.Tensor] | None = None


class RegionState:
    """Snapshots of one region in `folder`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _file(self, key: int) -> Path:
        return self.folder / f"job-{int(key):012d}.pt"

    def load(self, key: int) -> Snapshot:
        """The snapshot job `key` left; a `DataError` naming the fix if it is not there."""
        file = self._file(key)
        if not file.exists():
            raise DataError(
                f"this region no longer holds the model of job {key} that the server sent its download as a "
                f"change from (no {file}); give the SuperNode a lasting state-dir (--node-config "
                "\"state-dir='/path'\"), or run with compression=none")
        return self._read(file)

    def find(self, key: int) -> Snapshot | None:
        """The snapshot job `key` left, or None if the region no longer holds it."""
        file = self._file(key)
        return self._read(file) if file.exists() else None

    @staticmethod
    def _read(file: Path) -> Snapshot:
        saved = torch.load(file, weights_only=True)
        return Snapshot(saved["model"], saved["residual"], saved.get("gradient"))

    def save(self, key: int, snapshot: Snapshot, keep_from: int) -> None:
        """Keep `snapshot` as job `key`'s; delete those of jobs before `keep_from`, which nothing needs."""
        try:
            atomic_write(self._file(key), lambda fh: torch.save({"model": snapshot.model, "residual": snapshot.residual,
                                                                  "gradient": snapshot.gradient}, fh))
        except OSError as exc:
            raise DataError(f"this region cannot keep its state in {self.folder} ({exc.strerror or exc}); give "
                            "the SuperNode a writable --node-config \"state-dir='/path'\"") from None
        for old in self.folder.glob("job-*.pt"):
            if int(old.stem.split("-")[1]) < keep_from:
                old.unlink(missing_ok=True)


class RegionLink:
    """Decode one job's download and encode its upload, as its work order says.

    Parameters
    ----------
    order : WorkOrder
        Its `compression`, `base`, `keep_from` and `drift*`; the job's snapshot is named by `order.job_key()`.
    folder : path, optional
        Where the region keeps its snapshots; needed when the codec is lossy (drift correction without one:
        the region trains uncorrected).
    """

    def __init__(self, order: WorkOrder, folder: str | Path | None) -> None:
        self.codec = codec_from_spec(order.compression)
        self.order, self.key = order, order.job_key()
        if self.codec.lossy and folder is None:
            raise DataError("compressed WAN traffic needs a folder where the region keeps its last model; "
                            "start the SuperNode with --node-config \"state-dir='/path'\"")
        if order.drift and folder is None:
            log.warning("drift correction needs a folder where the region keeps its last job's state; without "
                        "one it trains uncorrected: start the SuperNode with --node-config \"state-dir='/path'\"")
        self.state = RegionState(folder) if folder is not None and (self.codec.lossy or order.drift) else None
        self.base: Snapshot | None = None
        self.start: dict[str, torch.Tensor] | None = None

    def received(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The model the job starts from: the download itself, or the held model plus the change it carries."""
        if self.order.base is None and self.order.layout is None:
            self.start = arrays.to_torch_state_dict()
        elif self.order.base is None:  # the whole model, encoded
            self.start = self.codec.decode(arrays, layout_tensors(self.order.layout))
        else:
            self.base = self.state.load(self.order.base)
            change = self.codec.decode(arrays, self.base.model)
            self.start = {k: v + change[k] for k, v in self.base.model.items()}
        return self.start

    def drift_correction(self, sent: ArrayRecord | None = None) -> dict[str, torch.Tensor] | None:
        """What each local step adds to its gradient: the correction `sent` with the job (ASGD-GA's), else
        `(x' − x) / scale − c_i` (MA's, module docstring); None when the order asks for none or the region no
        longer holds the job it names (it then trains uncorrected)."""
        if sent is not None:
            codec = codec_from_spec(self.order.drift_encoding or "none")
            named = set(unpack_tensors(sent) if codec.lossy else sent.keys())
            return codec.decode(sent, {k: v for k, v in self.start.items() if k in named})
        if self.order.drift_from is None or self.state is None:
            return None
        kept = self.state.find(self.order.drift_from)
        if kept is None or kept.gradient is None:
            log.warning("no drift state of job %d here (a fresh state-dir?): this job runs uncorrected",
                        self.order.drift_from)
            return None
        scale = self.order.drift_scale
        return {k: (kept.model[k] - self.start[k]) / scale - g for k, g in kept.gradient.items()}

    def reply(self, update: dict[str, torch.Tensor], gradient: dict[str, torch.Tensor] | None = None) -> ArrayRecord:
        """The update as it crosses the WAN; a lossy codec adds what earlier jobs left out, and the
        region keeps the model it started from, what this upload left out and the job's mean `gradient`."""
        feedback = ErrorFeedback(self.codec, None if self.base is None else self.base.residual)
        record = feedback.encode(update)
        self.keep(gradient, feedback.residual)
        return record

    def keep(self, gradient: dict[str, torch.Tensor] | None, residual: dict[str, torch.Tensor] | None = None) -> None:
        """Keep this job's snapshot (if the region keeps any); forget those the server will not ask for."""
        if self.state is not None:
            keep_from = self.key if self.order.keep_from is None else self.order.keep_from
            self.state.save(self.key, Snapshot(self.start, residual, gradient), keep_from)
