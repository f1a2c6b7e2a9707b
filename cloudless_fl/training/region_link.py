"""A region's end of compressed WAN traffic, and what it keeps between jobs for it.

Two things, both keyed by the job that left them (its start position in the
region's sample stream, which is unique and checkpointed by the server):

- `model`: the model the region rebuilt from that job's download; the next
  download is the change from it (`strategy/downlink.py`);
- `residual`: what the codec left out of that job's upload (error feedback).

In deployment every message gets a fresh ClientApp process, so snapshots live
on disk, in the SuperNode's `state-dir` (node config; `launch` sets one per
region) or, on one machine, the folder the server names (`<run>/region-state`).
A resumed run re-sends the jobs it had in flight at the same positions and
finds the same snapshots: resume stays bit-identical. The server says which
snapshots it may still ask for (`WorkOrder.keep_from`: its last checkpoint's),
so older ones are deleted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flwr.app import ArrayRecord

from ..atomic import atomic_write
from ..errors import DataError
from .compression import ErrorFeedback, codec_from_spec
from .protocol import WorkOrder, layout_tensors


@dataclass
class Snapshot:
    model: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor] | None


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
        saved = torch.load(file, weights_only=True)
        return Snapshot(saved["model"], saved["residual"])

    def save(self, key: int, snapshot: Snapshot, keep_from: int) -> None:
        """Keep `snapshot` as job `key`'s; delete those of jobs before `keep_from`, which nothing needs."""
        try:
            atomic_write(self._file(key), lambda fh: torch.save({"model": snapshot.model,
                                                                  "residual": snapshot.residual}, fh))
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
        Its `compression`, `base` and `keep_from`; the job's snapshot is named by `order.job_key()`.
    folder : path, optional
        Where the region keeps its snapshots; needed only when the codec is lossy.
    """

    def __init__(self, order: WorkOrder, folder: str | Path | None) -> None:
        self.codec = codec_from_spec(order.compression)
        self.order, self.key = order, order.job_key()
        if self.codec.lossy and folder is None:
            raise DataError("compressed WAN traffic needs a folder where the region keeps its last model; "
                            "start the SuperNode with --node-config \"state-dir='/path'\"")
        self.state = RegionState(folder) if self.codec.lossy else None
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

    def reply(self, update: dict[str, torch.Tensor]) -> ArrayRecord:
        """The update as it crosses the WAN; a lossy codec adds what earlier jobs left out, and the
        region keeps the model it started from and what this upload left out."""
        feedback = ErrorFeedback(self.codec, None if self.base is None else self.base.residual)
        record = feedback.encode(update)
        if self.state is not None:
            keep_from = self.key if self.order.keep_from is None else self.order.keep_from
            self.state.save(self.key, Snapshot(self.start, feedback.residual), keep_from)
        return record
