"""Compressed downloads: each region is sent the change from the model it already holds.

A region that answered a job holds the model it rebuilt from that job's
download (`training/region_link.py` keeps it). Its next download is
`codec(current model - held model)`, and the server rebuilds exactly what the
region will rebuild, so the next change is again taken from the region's real
copy: nothing a lossy codec leaves out is ever lost, it is sent later (error
feedback by construction, as in DoubleSqueeze, arXiv 1905.05957). A region the
server knows nothing of (first job, rejoined, restarted) gets the whole model:
quantised (fp16, int8, int4) with its layout, so the region can rebuild it, or
as it is under `topk` (a sparse slice of the weights would be no model at all).
Memory: one model per region.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord

from ..training import protocol
from ..training.compression import Codec
from ..training.protocol import decode_tensors


@dataclass
class Download:
    """One job's download: `payload` crosses the WAN; it is the change from the region's model of job `base`,
    or (base None) the whole model — encoded if `layout` (protocol.layout_of) says how to rebuild it."""

    payload: ArrayRecord
    base: int | None = None
    layout: str | None = None


class Downlink:
    """What each region holds of the model, and the downloads that follow from it.

    Parameters
    ----------
    codec : Codec
        Lossless (`none`): every download is the whole model, as without this class.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.held: dict[str, tuple[int, ArrayRecord]] = {}  # region → (job key, the model it rebuilt then)
        self.pending: dict[str, tuple[int, ArrayRecord]] = {}  # region → its job in flight, what it will rebuild
        self.pinned: dict[str, int] = {}  # region → oldest job key the last checkpoint may ask it for

    def download(self, region: str, key: int, model: ArrayRecord) -> Download:
        """What to send `region` for its job `key` from `model`."""
        if not self.codec.lossy:
            return Download(model)
        held = self.held.get(region)
        current = decode_tensors(model)
        if held is None:
            if self.codec.sparse:
                self.pending[region] = (key, model)
                return Download(model)
            payload = self.codec.encode(current)
            self.pending[region] = (key, ArrayRecord(self.codec.decode(payload, current)))
            return Download(payload, layout=protocol.layout_of(current))
        base_key, base_record = held
        base = decode_tensors(base_record)
        payload = self.codec.encode({k: current[k] - base[k] for k in current})
        change = self.codec.decode(payload, current)
        self.pending[region] = (key, ArrayRecord({k: base[k] + change[k] for k in current}))
        return Download(payload, base=base_key)

    def keep_from(self, region: str, base: int | None, key: int) -> int:
        """The oldest snapshot the region must keep: its base, or what the last checkpoint may re-send."""
        oldest = key if base is None else base
        return min(oldest, self.pinned.get(region, oldest))

    def delivered(self, region: str, key: int) -> None:
        """A reply to job `key` came: the region holds the model it rebuilt for it."""
        pending = self.pending.get(region)
        if pending is not None and pending[0] == key:
            self.held[region] = self.pending.pop(region)

    def forget(self, region: str) -> None:
        """The region (re)joined or was lost: assume it holds nothing."""
        self.held.pop(region, None)
        self.pending.pop(region, None)

    def pin(self, in_flight: Iterable[tuple[str, int]] = ()) -> None:
        """A checkpoint was written: a resume from it may ask each region again for what it holds now and
        for the jobs in flight (`(region, job key)`: their keys and bases), so nothing older is needed."""
        self.pinned = {region: key for region, (key, _) in self.held.items()}
        for region, key in in_flight:
            self.pinned[region] = min(key, self.pinned.get(region, key))

    def state_dict(self) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """(JSON-able keys, tensors) for the checkpoint."""
        models = {f"{kind}/{region}": record.to_torch_state_dict()
                  for kind, books in (("held", self.held), ("pending", self.pending))
                  for region, (_, record) in books.items()}
        keys = {kind: {r: k for r, (k, _) in books.items()}
                for kind, books in (("held", self.held), ("pending", self.pending))}
        return {**keys, "pinned": self.pinned}, models

    def load_state_dict(self, meta: dict[str, Any], models: dict[str, dict[str, torch.Tensor]]) -> None:
        self.held, self.pending = ({r: (int(k), ArrayRecord(models[f"{kind}/{r}"])) for r, k in meta[kind].items()}
                                   for kind in ("held", "pending"))
        self.pinned = {r: int(k) for r, k in meta["pinned"].items()}
