"""Local work on a region's resident data: SGD steps, gradient accumulation, evaluation.

Which samples a job uses is a pure function of `(seed, offset, count)`: the data
is read as an endless stream of seeded epoch permutations, and the server tells
each job where in the stream it starts. Jobs are thus deterministic and stateless
on the region side, and successive jobs cover the data epoch by epoch.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
import torch._dynamo  # noqa: F401 - torch.optim imports it on first use (1-2 s): here, not in a job or a run

from .data import Arrays


@dataclass
class WorkStats:
    """What a job did, reported back to the server."""

    samples: int
    steps: int
    loss: float
    compute_seconds: float
    workers: int = 1  # data-parallel workers that computed it (training/workers.py)
    mean_gradient: dict[str, torch.Tensor] | None = None  # local SGD's raw gradient per step, averaged (if asked)


@dataclass(frozen=True)
class Shard:
    """The part of every mini-batch one worker of a region's data-parallel group computes: rows `rank::world`.

    Its loss is scaled so that the group's averaged gradient (DistributedDataParallel divides the all-reduced
    sum by `world`) is exactly the gradient of the whole batch's mean loss, even when shards differ in size.
    A group of one computes the batch as before. `loss` of a job's stats is this worker's share of the mean:
    summed over the group it is the mean.
    """

    rank: int = 0
    world: int = 1

    def rows(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.world == 1 else rows[self.rank :: self.world]


def sample_stream(n: int, seed: int, offset: int, count: int) -> np.ndarray:
    """Indices `offset .. offset+count` of the stream perm(seed, 0) ++ perm(seed, 1) ++ ..."""
    out = np.empty(count, dtype=np.int64)
    filled, pos = 0, offset
    while filled < count:
        epoch, start = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[start : start + count - filled]
        out[filled : filled + len(take)] = take
        filled += len(take)
        pos += len(take)
    return out


def make_batches(n: int, batch_size: int, *, seed: int, offset: int, samples: int) -> list[np.ndarray]:
    """Cut `samples` stream positions from `offset` into mini-batches (last one may be short)."""
    idx = sample_stream(n, seed, offset, samples)
    return [idx[i : i + batch_size] for i in range(0, samples, batch_size)]


def _tensors(data: Arrays, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(data.x[rows]), torch.from_numpy(data.y[rows])


def local_sgd(model: nn.Module, data: Arrays, batches: list[np.ndarray], lr: float, momentum: float = 0.0,
              shard: Shard = Shard(), correction: dict[str, torch.Tensor] | None = None,
              track_gradient: bool = False) -> WorkStats:
    """Run one SGD step per batch on `model` in place (on a worker group: `shard`'s rows, `model` wrapped in DDP).

    `correction` (per parameter name) is added to every step's gradient: SCAFFOLD's drift correction
    (`training/region_link.py`). With `track_gradient` the stats carry the mean raw gradient of the steps taken,
    before any correction — the region's control variate for its next job."""
    params = dict(getattr(model, "module", model).named_parameters())
    opt = torch.optim.SGD(params.values(), lr=lr, momentum=momentum)
    model.train()
    start, total, seen = time.perf_counter(), 0.0, 0
    grad_sum = {name: torch.zeros_like(p) for name, p in params.items()} if track_gradient else None
    for rows in batches:
        x, y = _tensors(data, shard.rows(rows))
        opt.zero_grad(set_to_none=True)
        if shard.world == 1:
            loss = nn.functional.cross_entropy(model(x), y)
            total += loss.item() * len(rows)
        else:
            summed = nn.functional.cross_entropy(model(x), y, reduction="sum")
            loss = summed * shard.world / len(rows)
            total += summed.item()
        loss.backward()
        with torch.no_grad():
            for name, p in params.items():
                if p.grad is None:
                    continue
                if grad_sum is not None:
                    grad_sum[name] += p.grad
                if correction is not None:
                    p.grad += correction[name]
        opt.step()
        seen += len(rows)
    mean = None if grad_sum is None else {k: v / max(len(batches), 1) for k, v in grad_sum.items()}
    return WorkStats(seen, len(batches), total / max(seen, 1), time.perf_counter() - start, shard.world, mean)


def accumulate_gradient(model: nn.Module, data: Arrays, batches: list[np.ndarray],
                        shard: Shard = Shard()) -> tuple[dict[str, torch.Tensor], WorkStats]:
    """Gradient of the mean loss over all samples of all batches, at the model's weights.

    Equal to the gradient on the concatenated batch: each batch contributes its
    summed loss, and the total is divided by the number of samples once. On a
    worker group (`model` wrapped in DDP) gradients are all-reduced once, with the last batch.
    """
    model.train()
    model.zero_grad(set_to_none=True)
    start, total = time.perf_counter(), 0.0
    seen = sum(len(b) for b in batches)
    for i, rows in enumerate(batches):
        x, y = _tensors(data, shard.rows(rows))
        deferred = hasattr(model, "no_sync") and i < len(batches) - 1
        with model.no_sync() if deferred else nullcontext():
            summed = nn.functional.cross_entropy(model(x), y, reduction="sum")
            loss = summed * shard.world / seen
            loss.backward()
        total += loss.item() / shard.world
    grads = {
        name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for name, p in getattr(model, "module", model).named_parameters()
    }
    return grads, WorkStats(seen, len(batches), total, time.perf_counter() - start, shard.world)


@torch.no_grad()
def evaluate(model: nn.Module, data: Arrays, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of `model` on `data`."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[i : i + batch_size])
        y = torch.from_numpy(data.y[i : i + batch_size])
        out = model(x)
        loss += float(loss_fn(out, y))
        correct += int((out.argmax(1) == y).sum())
    return loss / len(data), correct / len(data)
