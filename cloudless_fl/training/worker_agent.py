"""A region's workers on other machines: long-lived agents that join the SuperNode's jobs.

`workers.py` forks a job's worker group on the SuperNode's machine. A region
spread over several machines runs one agent on each other machine
(`cloudless-fl worker --endpoint <supernode-host>:<port> --data-dir <the region's data>`)
and tells its SuperNode the endpoint
(`--node-config "worker-endpoint='<host>:<port>'"`). For a job on `n > 1`
workers, the ClientApp opens the endpoint as a c10d `TCPStore` (the key-value
store torch.distributed's rendezvous runs on), posts the job (model, sample
indices, mode) and waits up to `JOIN_WINDOW_S` for `n − 1` agents; it and the
agents that joined form one gloo group, the ClientApp as rank 0 computing its
share too, and the job runs as on forked workers (`workers.as_rank`: DDP over
`local.Shard`s). Agents poll the endpoint between jobs, so membership is per
job: an agent started or stopped takes part from the next job on. An agent
that dies mid-job breaks the group (gloo sees the connection drop); the
ClientApp redoes the job alone, and the region stays in the run.

Trust: the endpoint must be on the region's own network — anything that can
reach it can join the group and add to its gradients. Agents read the job with
`torch.load(weights_only=True)`: nothing is unpickled.
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import socket
import time
import uuid
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .data import load_resident
from .local import Shard
from .models import build_model
from .workers import GROUP_TIMEOUT, GroupJob, Result, as_rank

log = logging.getLogger(__name__)

NODE_KEY = "worker-endpoint"  # node config: host:port where the region's agents look for jobs
JOIN_WINDOW_S = 2.0  # how long a job waits for agents to join (they poll every POLL_S)
POLL_S = 0.2


class GroupFailed(RuntimeError):
    """The job's group broke (an agent died, or the network failed): the caller redoes the job alone."""


@dataclass(frozen=True)
class Agents:
    """Where a SuperNode's agents wait, and how they rebuild the job's model."""

    endpoint: str  # host:port
    model: dict  # build_model's arguments: name, input_shape, num_classes, options

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"worker endpoint {self.endpoint!r} is not host:port; fix --node-config "
                              f"\"{NODE_KEY}='host:port'\" on the SuperNode (or --endpoint of the agent)")
        return host, int(port)


def lead(job: GroupJob, workers: int, agents: Agents) -> Result:
    """Run `job` with up to `workers − 1` agents (alone if none joins in time); raise GroupFailed if it broke."""
    host, port = agents.address
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT)
    try:
        store.set("job", _payload(job, agents.model))
        store.set("id", uuid.uuid4().hex)  # last: an agent that reads it finds the job there
        deadline = time.monotonic() + JOIN_WINDOW_S
        while store.add("joined", 0) < workers - 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        world = 1 + min(store.add("joined", 0), workers - 1)
        store.set("world", str(world))  # agents that joined later sit this job out
        if world == 1:
            log.warning("no agent joined at %s within %.0f s; the job runs on the SuperNode alone",
                        agents.endpoint, JOIN_WINDOW_S)
            return job.compute(job.model, Shard())
        mine = replace(job, model=copy.deepcopy(job.model))  # DDP's hooks stay off the caller's
        try:
            # the group gets a store of its own: what DDP keeps of the group lives until garbage collection, and
            # must not hold the endpoint, which the next job opens again
            group_store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT)
            store.set("group-port", str(group_store.port))
            dist.init_process_group("gloo", store=group_store, rank=0, world_size=world, timeout=GROUP_TIMEOUT)
            result, stats = as_rank(mine, 0, world)
        except RuntimeError as exc:  # DistError included
            raise GroupFailed(f"a group of {world} at {agents.endpoint}: {exc}") from exc
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return {k: v.detach().clone() for k, v in result.items()}, stats
    finally:
        store.set("done", "1")
        del store


def serve(endpoint: str, data_dir: str, data_format: str = "auto", jobs: int | None = None) -> None:
    """An agent: join the SuperNode's jobs at `endpoint` over `data_dir` (the region's data), `jobs` of them
    (None: until stopped)."""
    host, port = Agents(endpoint, {}).address
    last, served = None, 0
    log.info("agent waiting for jobs at %s (data: %s)", endpoint, data_dir)
    while jobs is None or served < jobs:
        if not _listening(host, port):  # no job open (a plain probe: torch logs every failed store connect)
            time.sleep(POLL_S)
            continue
        try:
            store = dist.TCPStore(host, port, is_master=False, timeout=GROUP_TIMEOUT)
        except dist.DistError:  # the job closed in between
            continue
        joined = False
        try:
            job_id = store.get("id").decode()
            if job_id == last:  # the job this agent just served, not yet closed
                store.wait(["done"])
                continue
            last, job = job_id, _job_from(store.get("job"), data_dir, data_format)
            rank = store.add("joined", 1)
            if rank >= int(store.get("world")):
                continue  # joined too late or not wanted: the next job
            joined = True
            group_store = dist.TCPStore(host, int(store.get("group-port")), is_master=False, timeout=GROUP_TIMEOUT)
            dist.init_process_group("gloo", store=group_store, rank=rank, world_size=int(store.get("world")),
                                    timeout=GROUP_TIMEOUT)
            log.info("joined job %s as rank %d of %d", job_id, rank, dist.get_world_size())
            try:
                as_rank(job, rank, dist.get_world_size())
            finally:
                dist.destroy_process_group()
            served += 1
        except RuntimeError as exc:  # the SuperNode's ClientApp ended or the group broke (DistError included)
            if joined:  # else the job closed while looked at (often the one just served): nothing was lost
                log.warning("job at %s ended without this agent: %s", endpoint, exc)
        finally:
            del store


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=POLL_S).close()
        return True
    except OSError:
        return False


def _payload(job: GroupJob, model: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model, "state": job.model.state_dict(),
                "batches": [torch.from_numpy(b) for b in job.batches], "lr": job.lr,
                "correction": job.correction}, buffer)
    return buffer.getvalue()


def _job_from(raw: bytes, data_dir: str, data_format: str) -> GroupJob:
    posted = torch.load(io.BytesIO(raw), weights_only=True)
    spec = posted["model"]
    model = build_model(spec["name"], tuple(spec["input_shape"]), spec["num_classes"], **spec["options"])
    model.load_state_dict(posted["state"])
    return GroupJob(model, _resident(data_dir, data_format).train, [b.numpy() for b in posted["batches"]],
                    posted["lr"], posted["correction"])


@lru_cache(maxsize=2)
def _resident(data_dir: str, data_format: str):
    return load_resident(data_dir, data_format)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cloudless-fl worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True, help="host:port of the region's SuperNode (its worker-endpoint)")
    parser.add_argument("--data-dir", required=True, help="the region's resident data, as the SuperNode has it")
    parser.add_argument("--data-format", default="auto")
    parser.add_argument("--jobs", type=int, default=None, help="serve this many jobs, then exit (default: forever)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(args.endpoint, args.data_dir, args.data_format, args.jobs)


if __name__ == "__main__":
    main()
