"""A region's worker group: one job computed by data-parallel workers on PyTorch's own distributed stack.

The elastic scheduler rents a region 1–8 workers and says how many in each work
order (`WorkOrder.workers`). A job on `n > 1` workers runs on a group of `n`
processes started by PyTorch's elastic launcher (torchrun's engine: a c10d
rendezvous on loopback, gloo on CPU). Each worker computes rows `rank::n` of
every mini-batch (`local.Shard`) of the model wrapped in
`DistributedDataParallel`, which all-reduces the gradients inside the region;
rank 0's result is the region's one update, so the WAN carries one model each
way whatever `n` is.

The group is formed per job, so a re-plan that changes `n` takes effect at the
next job without restarting anything. A worker that dies fails the group
(elastic's `ChildFailedError`); the job is then redone by one worker fewer,
down to the calling process alone: the region loses a worker, not the job.

Workers are forked from the ClientApp process, which has imported torch and
loaded the data: a forked group starts in ~0.2 s here, a spawned one in ~5 s.
Each worker runs one thread, as GNU OpenMP cannot start a thread team in a
forked child. Forking copies every lock as it is at that instant: rank 0 hosts
the group's store (not the launcher's store thread in this process, which
resolves each worker's address as it connects — a rank forked while that
thread held glibc's resolver lock waited on it forever, as gdb showed), and a
rank that waits on another longer than `GROUP_TIMEOUT` fails the group, which
bounds what any other inherited lock can cost: one redo. A region spread over
several machines gets its other workers from agents there instead
(worker_agent.py). CPU only: the project trains on
CPU tensors, so the group runs gloo, never NCCL.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel

from . import local
from .data import Arrays

if TYPE_CHECKING:
    from .worker_agent import Agents

log = logging.getLogger(__name__)

NODE_KEY = "max-workers"  # node config: the most worker processes a SuperNode may start for one job
GROUP_TIMEOUT = timedelta(seconds=120)  # a rank that waits longer than this on another fails the group

Result = tuple[dict[str, torch.Tensor], local.WorkStats]  # new weights (local SGD) or the gradient, and its stats


@dataclass
class GroupJob:
    """One job as every worker of the group sees it: inherited at fork (nothing pickled on the way in), or
    rebuilt by an agent on another machine from what the SuperNode posts (worker_agent.py)."""

    model: nn.Module
    data: Arrays
    batches: list[np.ndarray]
    lr: float | None  # None: accumulate the gradient; else local SGD at this learning rate
    correction: dict[str, torch.Tensor] | None = None  # local SGD's drift correction (local.local_sgd)
    track_gradient: bool = False  # local SGD: report the mean raw gradient

    def compute(self, model: nn.Module, shard: local.Shard) -> Result:
        """This worker's part: `model` is the job's model, wrapped in DDP on a group."""
        if self.lr is None:
            return local.accumulate_gradient(model, self.data, self.batches, shard)
        stats = local.local_sgd(model, self.data, self.batches, self.lr, shard=shard, correction=self.correction,
                                track_gradient=self.track_gradient)
        return self.model.state_dict(), stats


def local_sgd(model: nn.Module, data: Arrays, batches: list[np.ndarray], lr: float, workers: int = 1,
              agents: Agents | None = None, correction: dict[str, torch.Tensor] | None = None,
              track_gradient: bool = False) -> local.WorkStats:
    """`local.local_sgd` on `workers` data-parallel workers; `model` ends with the group's weights."""
    state, stats = _run(GroupJob(model, data, batches, lr, correction, track_gradient), workers, agents)
    model.load_state_dict(state)
    return stats


def accumulate_gradient(model: nn.Module, data: Arrays, batches: list[np.ndarray], workers: int = 1,
                        agents: Agents | None = None) -> Result:
    """`local.accumulate_gradient` on `workers` data-parallel workers."""
    return _run(GroupJob(model, data, batches, None), workers, agents)


def _run(job: GroupJob, workers: int, agents: Agents | None) -> Result:
    """The job on a group of `workers` — forked here, or with `agents` the region's agents on other machines —
    redone by fewer while a worker fails; its compute time is the region's: from the first group's start to
    the result, failed attempts included."""
    if workers < 1:
        raise ValueError(f"a job needs at least one worker, got {workers}")
    started = time.perf_counter()
    if workers > 1 and agents is not None:
        from .worker_agent import GroupFailed, lead

        try:
            arrays, stats = lead(job, workers, agents)
            return arrays, replace(stats, compute_seconds=time.perf_counter() - started)
        except GroupFailed as failure:
            log.warning("the region's worker group failed (%s); the job is redone by the SuperNode alone", failure)
            workers = 1
    while workers > 1:
        try:
            arrays, stats = _launch(job, workers)
            return arrays, replace(stats, compute_seconds=time.perf_counter() - started)
        except ChildFailedError as failure:
            log.warning("a worker of a group of %d failed (%s); the job is redone by %d",
                        workers, failure.get_first_failure()[1].message, workers - 1)
            workers -= 1
    arrays, stats = job.compute(job.model, local.Shard())
    return arrays, replace(stats, compute_seconds=time.perf_counter() - started)


def _launch(job: GroupJob, workers: int) -> Result:
    import torch._dynamo  # noqa: F401 -- DDP's constructor imports it: once here (~2 s), not in every forked worker
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", local_addr="127.0.0.1",
                          max_restarts=0, monitor_interval=0.05, start_method="fork")
    # torch elastic's documented opt-out of sharing its rendezvous store with the workers, for this launch only:
    # rank 0 hosts the group's store, so no thread of this process serves the ranks while it forks them
    with mock.patch.dict(os.environ, {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}):
        arrays, stats = elastic_launch(config, _worker)(job)[0]
    if stats.mean_gradient is not None:
        stats = replace(stats, mean_gradient={k: torch.from_numpy(a) for k, a in stats.mean_gradient.items()})
    return {name: torch.from_numpy(a) for name, a in arrays.items()}, stats


def _worker(job: GroupJob) -> tuple[dict[str, np.ndarray], local.WorkStats] | None:
    """One forked rank of the group; rank 0 returns the group's result (as numpy: plainly pickled back)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    try:
        result, stats = as_rank(job, dist.get_rank(), dist.get_world_size())
        if dist.get_rank():
            return None
        if stats.mean_gradient is not None:
            stats = replace(stats, mean_gradient={k: t.numpy() for k, t in stats.mean_gradient.items()})
        return {name: t.detach().numpy() for name, t in result.items()}, stats
    finally:
        dist.destroy_process_group()


def as_rank(job: GroupJob, rank: int, world: int) -> Result:
    """This process's part of the job in the (initialised) process group; every rank returns the group's loss."""
    result, stats = job.compute(DistributedDataParallel(job.model), local.Shard(rank, world))
    loss = torch.tensor([stats.loss], dtype=torch.float64)
    dist.all_reduce(loss)  # each worker's loss is its share of the mean
    return result, replace(stats, loss=loss.item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
