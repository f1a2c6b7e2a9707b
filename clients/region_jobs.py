"""What a region does with each message — train, describe itself, evaluate — on its resident data.

Runs in the ClientApp process (`clients/region_app.py`) or, kept warm between
messages, in the region's trainer (`clients/warm_trainer.py`): each handler takes
the message's content and the node's context and returns the reply's content.
Deployment: the SuperNode says who it is,
`flower-supernode ... --node-config "region='ap-chengdu' data-dir='/data/chengdu'"`.
Simulation: the partition id indexes the region list the server sends, and the
data lives in `<data-root>/<region>/` (the split tool's layout).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from cloudless_fl.training import pacing, protocol, worker_agent, workers
from cloudless_fl.training.region_link import RegionLink
from cloudless_fl.training.data import ResidentData, check_labels, load_resident
from cloudless_fl.errors import ConfigError, DataError
from cloudless_fl.training.models import build_model
from cloudless_fl.training.local import evaluate as evaluate_model, make_batches


def train(content: RecordDict, context: Context, data_root: str | Path | None = None,
          data_format: str = "auto") -> RecordDict:
    """Run the work order on the region's data: the update (weights, change or gradient) and what the job took."""
    entered = time.time()
    config = content.config_records[protocol.CONFIG]
    region, data = _resident(context, config, data_root, data_format)
    config = protocol.region_config(config, region)  # a first job, sent before the server knew who is who
    spec = protocol.ModelSpec.from_config(config)
    order = protocol.WorkOrder.from_config(config)
    check_labels(data.train.y, spec.num_classes, f"region {region}")
    model = _model(spec, data.input_shape)
    loaded = time.time()
    position = order.start_position(len(data.train))
    link = RegionLink(order, _state_dir(context, config, region))
    model.load_state_dict(link.received(content[protocol.ARRAYS]))
    batches = make_batches(len(data.train), order.batch_size, seed=order.data_seed, offset=position,
                           samples=order.samples(len(data.train)))
    update, correction = order.mode, None  # a gradient job takes no local steps, so nothing to correct
    group, agents = _group_size(context, order), _agents(context, spec, data.input_shape)
    if order.mode == protocol.MODE_GRADIENT:
        grads, stats = workers.accumulate_gradient(model, data.train, batches, group, agents)
        # every floating-point entry, as the server's validator expects: buffers (BN statistics) get zeros
        arrays = link.reply(OrderedDict((k, grads[k] if k in grads else torch.zeros_like(v))
                                        for k, v in model.state_dict().items() if v.is_floating_point()))
    else:
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sent = content[protocol.CORRECTION] if protocol.CORRECTION in content else None
        correction = link.drift_correction(sent)
        stats = workers.local_sgd(model, data.train, batches, order.lr, group, agents,
                                  correction=correction, track_gradient=order.drift)
        if order.mode == protocol.MODE_DELTA or link.codec.lossy:  # a lossy codec compresses changes
            update = protocol.MODE_DELTA
            arrays = link.reply(OrderedDict((k, start[k] - v) for k, v in model.state_dict().items()),
                                stats.mean_gradient)
        else:
            arrays = ArrayRecord(model.state_dict())
            link.keep(stats.mean_gradient)
    paced = _paced(context, stats.samples, stats.workers, stats.compute_seconds)
    metrics = MetricRecord({
        "num-examples": stats.samples,
        "steps": stats.steps,
        "compute-seconds": paced.seconds,
        "pace-behind-seconds": paced.behind_s,
        "load-seconds": loaded - entered,
        "train-loss": stats.loss,
        "model-version": order.version,
        "workers": stats.workers,
        **_self_description(context, data),  # names the node to a server that sent this job with its roll call
    })
    if order.drift or protocol.CORRECTION in content:
        metrics[protocol.DRIFT_CORRECTED] = int(correction is not None)
    info = ConfigRecord({"region": region, "update": update, "encoding": link.codec.spec()})
    return RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics, protocol.INFO: info})


def describe(content: RecordDict, context: Context, data_root: str | Path | None = None,
             data_format: str = "auto") -> RecordDict:
    """Tell the control plane which region this is, how much data it holds and, if the SuperNode says,
    how many workers it can start for one job."""
    config = content.config_records[protocol.CONFIG]
    region, data = _resident(context, config, data_root, data_format)
    return RecordDict({protocol.METRICS: MetricRecord(_self_description(context, data)),
                       protocol.INFO: ConfigRecord({"region": region})})


def _self_description(context: Context, data: ResidentData) -> dict[str, int]:
    """The resident data size and, if the SuperNode sets one, its worker cap (the scheduler plans within it)."""
    cap = declared_workers(context)
    return {"resident-examples": len(data.train), **({} if cap is None else {protocol.MAX_WORKERS: cap})}


def evaluate(content: RecordDict, context: Context, data_root: str | Path | None = None,
             data_format: str = "auto") -> RecordDict:
    """The model's loss and accuracy on the region's own test data."""
    config = content.config_records[protocol.CONFIG]
    region, data = _resident(context, config, data_root, data_format)
    if data.test is None:
        raise DataError(f"region {region} holds no local test data (x_test/y_test); rely on central evaluation")
    spec = protocol.ModelSpec.from_config(config)
    check_labels(data.test.y, spec.num_classes, f"region {region} test data")
    model = _model(spec, data.input_shape)
    model.load_state_dict(content[protocol.ARRAYS].to_torch_state_dict())
    loss, acc = evaluate_model(model, data.test)
    metrics = MetricRecord({"num-examples": len(data.test), "loss": loss, "accuracy": acc})
    return RecordDict({protocol.METRICS: metrics, protocol.INFO: ConfigRecord({"region": region})})


# message type (Flower's) → the handler that answers it
HANDLERS: dict[str, Callable[..., RecordDict]] = {"train": train, "query": describe, "evaluate": evaluate}


def locate_region(context: Context, config: ConfigRecord, data_root: str | Path | None) -> tuple[str, Path]:
    """Work out which region this SuperNode is and where its resident data lies."""
    regions = [r for r in str(config.get("regions", "")).split(",") if r]
    node = context.node_config
    if "region" in node:
        region = str(node["region"])
        if regions and region not in regions:
            raise ConfigError(
                f"node config names region {region!r}, which is not in the topology ({', '.join(regions)}); "
                "fix --node-config \"region='...'\" on this SuperNode"
            )
        if "data-dir" in node:
            return region, Path(str(node["data-dir"]))
    elif "partition-id" in node:
        pid = int(node["partition-id"])
        if not 0 <= pid < len(regions):
            raise ConfigError(
                f"simulation partition {pid} has no region: the topology has {len(regions)} regions; "
                "run as many SuperNodes as regions"
            )
        region = regions[pid]
    else:
        raise ConfigError("this SuperNode has no region; start it with --node-config \"region='...' data-dir='...'\"")
    if data_root is None:
        data_root = _data_root_from_run_config(context)
    if data_root is None:
        raise DataError(f"region {region} has no data-dir; set --node-config \"data-dir='/path'\" on its SuperNode")
    return region, Path(data_root) / region


def declared_workers(context: Context) -> int | None:
    """The SuperNode's `max-workers`, if its node config sets one (`launch` sets the region's `workers.max`)."""
    cap = context.node_config.get(workers.NODE_KEY)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"node config {workers.NODE_KEY}={cap!r} must be an integer ≥ 1; fix --node-config "
                          f"\"{workers.NODE_KEY}=N\" on this SuperNode")
    return cap


def _group_size(context: Context, order: protocol.WorkOrder) -> int:
    """How many data-parallel workers compute the job: the plan's, up to the SuperNode's `max-workers`
    (default: 1, the ClientApp process alone — or, with a `worker-endpoint`, as many as agents join)."""
    cap = declared_workers(context)
    if cap is None:
        cap = order.workers if worker_agent.NODE_KEY in context.node_config else 1
    return min(order.workers, cap)


def _agents(context: Context, spec: protocol.ModelSpec, input_shape) -> worker_agent.Agents | None:
    """The region's agents on other machines, if the SuperNode names where they wait (`worker-endpoint`)."""
    endpoint = context.node_config.get(worker_agent.NODE_KEY)
    if endpoint is None:
        return None
    return worker_agent.Agents(str(endpoint), {"name": spec.name, "input_shape": list(input_shape),
                                               "num_classes": spec.num_classes, "options": spec.options})


def _paced(context: Context, samples: int, trained_on: int, took_s: float) -> pacing.Paced:
    """The job's compute at the profile's pace on the workers that computed it, if the SuperNode was given
    a pace (`launch` does), else as measured."""
    pace = context.node_config.get(pacing.NODE_KEY)
    if pace is None:
        return pacing.Paced(took_s, 0.0)
    return pacing.wait_out(samples, trained_on, float(pace), took_s)


def _state_dir(context: Context, config: ConfigRecord, region: str) -> Path | None:
    """Where the region keeps what compressed traffic and drift correction need between jobs: the SuperNode's
    `state-dir`, else (one machine) the folder the server names."""
    folder = context.node_config.get("state-dir") or config.get("state-dir")
    return None if folder is None else Path(str(folder)) / region


def _resident(context: Context, config: ConfigRecord, data_root, data_format: str) -> tuple[str, ResidentData]:
    region, data_dir = locate_region(context, config, data_root)
    return region, _load_cached(str(data_dir), data_format)


def _model(spec: protocol.ModelSpec, input_shape: tuple[int, ...]):
    """The architecture is rebuilt only when it changes; weights come with every message."""
    return _cached_model(spec.name, tuple(input_shape), spec.num_classes, json.dumps(spec.options, sort_keys=True))


@lru_cache(maxsize=4)
def _cached_model(name: str, input_shape: tuple[int, ...], num_classes: int, options: str):
    return build_model(name, input_shape, num_classes, **json.loads(options))


@lru_cache(maxsize=8)
def _load_cached(data_dir: str, data_format: str) -> ResidentData:
    return load_resident(data_dir, data_format)


def _data_root_from_run_config(context: Context) -> Path | None:
    """Under `flwr run .` the run-config names the dataset; its split lives in the cache."""
    if not context.run_config:
        return None
    return _data_root_for(tuple(sorted(context.run_config.items())))


@lru_cache(maxsize=4)
def _data_root_for(run_config: tuple) -> Path:
    """Composing the config and checking the split once per run, not once per message."""
    from cloudless_fl.config import config_from_run_config, prepare_data

    return prepare_data(config_from_run_config(dict(run_config))).root

