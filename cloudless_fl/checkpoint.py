"""Checkpoints a killed run resumes from: atomic, checksummed, never unpickled.

File layout: one header line `cloudless-fl-checkpoint 1 <sha256 of the rest>`,
then a `torch.save` payload of plain tensors, numbers and strings (the run's
books travel as one JSON string), read back with `torch.load(weights_only=True)`.
The checksum catches truncation and corruption before anything is parsed; a
fingerprint of the model and config refuses a checkpoint from another run.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .errors import CloudlessError

MAGIC = b"cloudless-fl-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"


class CheckpointError(CloudlessError):
    """A checkpoint that is missing, corrupt, or from a different model or config."""


@dataclass
class Checkpointer:
    """Where and how often a strategy writes its checkpoint.

    Parameters
    ----------
    path : Path
        The checkpoint file (rewritten in place, atomically).
    every : int
        Write after every `every` versions (ASGD-GA) / periods (MA) / rounds (FedAvg); 0: only at the end.
    fingerprint : dict
        What must match for a resume: model layout, strategy, topology, seed...
    """

    path: Path
    every: int = 0
    fingerprint: dict[str, Any] | None = None

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    def save(self, meta: dict[str, Any], tensors: dict[str, Any]) -> None:
        save_checkpoint(self.path, {**meta, "fingerprint": self.fingerprint}, tensors)

    def load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return load_checkpoint(self.path, self.fingerprint)


def model_fingerprint(state: dict[str, torch.Tensor]) -> list[list]:
    """Names, shapes and dtypes of a model's entries: what a checkpoint's model must match."""
    return [[name, list(t.shape), str(t.dtype)] for name, t in state.items()]


def save_checkpoint(path: str | Path, meta: dict[str, Any], tensors: dict[str, Any]) -> int:
    """Write `meta` (JSON-able) and `tensors` (nested dicts of tensors) atomically; returns bytes written."""
    buffer = io.BytesIO()
    torch.save({"meta": json.dumps(meta), "tensors": tensors}, buffer)
    payload = buffer.getvalue()
    header = MAGIC + f" {VERSION} {hashlib.sha256(payload).hexdigest()}\n".encode()
    atomic_write(path, lambda fh: (fh.write(header), fh.write(payload)))
    return len(header) + len(payload)


def load_checkpoint(path: str | Path, fingerprint: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """Read and verify a checkpoint; `CheckpointError` naming the problem otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; resume needs a run folder with a {FILENAME} "
                              "(written when checkpoint.every > 0 or at the end of a run)")
    raw = path.read_bytes()
    header, _, payload = raw.partition(b"\n")
    parts = header.split(b" ")
    if len(parts) != 3 or parts[0] != MAGIC:
        raise CheckpointError(f"{path} is not a cloudless-fl checkpoint")
    if parts[1] != str(VERSION).encode():
        raise CheckpointError(f"{path} has checkpoint format {parts[1].decode(errors='replace')}; "
                              f"this version reads format {VERSION}")
    if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
        raise CheckpointError(f"{path} is corrupt or truncated (checksum mismatch); "
                              "resume from an intact copy or start the run afresh")
    try:
        content = torch.load(io.BytesIO(payload), weights_only=True)
        meta = json.loads(content["meta"])
        tensors = content["tensors"]
    except Exception as exc:  # the checksum matched, so this is a file we did not write
        raise CheckpointError(f"{path} cannot be read as a checkpoint: {exc}") from None
    if fingerprint is not None:
        saved = meta.get("fingerprint") or {}
        for key, value in fingerprint.items():
            if saved.get(key) != value:
                raise CheckpointError(
                    f"{path} is from a different run: its {key} is {_short(saved.get(key))}, this run's is "
                    f"{_short(value)}; resume with the config the checkpoint was written with")
    return meta, tensors


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
