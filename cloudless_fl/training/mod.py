"""A Flower Mod that gives any PyTorch ClientApp the cloudless-fl protocol in one line.

    app = ClientApp(mods=[cloudless_mod])

A stock ClientApp already works with MA and ASGD-GA's delta mode (the server
reads its new weights); the Mod adds what only the client side can do, without
touching the app's code: it watches every `torch.optim` step while the app
trains (PyTorch's global optimizer step hooks), so it can

- run **gradient mode**: capture each step's gradients at the sent weights and
  skip the step, so the accumulated gradient is true gradient accumulation
  whatever optimizer the app uses;
- honour **`local-steps`**: leave the app's training loop after the planned steps;
- report `steps`, `compute-seconds` and, when the SuperNode's node config names
  it, the `region` — what FedNova normalisation and the scheduler read;
- take part in **compressed WAN traffic** (`compression=...`): rebuild the model
  from a compressed download before the app sees it, and send the app's change
  compressed, with error feedback (region_link.py; the node's `state-dir`).

The app must load the weights it is sent into the model it trains (every
quickstart does): the Mod finds each optimizer parameter's name by matching it to
the sent arrays. While a train message is handled every optimizer in the process
is watched, so an app that trains two models at once is not supported. The app's
own batch size and data order stay its own (`batch-size` and `sample-offset` are
not enforced).

Flower routes a `query` message to a registered query function before any Mod
runs, so a decorator-style ClientApp answers the region query with one more line,
`app.query()(region_query)`; a `client_fn`-style app gets it from the Mod.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..errors import ConfigError
from . import protocol
from .region_link import RegionLink


class _PlannedStepsDone(Exception):
    """Raised from an optimizer step to leave the app's loop once the planned steps are done."""


class OptimizerTap:
    """Watches every torch optimizer step during one train message.

    Parameters
    ----------
    sent : dict of name → tensor
        The arrays the server sent; each optimizer parameter is named by matching it to them.
    gradient : bool
        Capture the gradients and skip the update (gradient accumulation at the sent weights).
    limit : int, optional
        Leave the training loop after this many steps.
    """

    def __init__(self, sent: dict[str, torch.Tensor], gradient: bool, limit: int | None) -> None:
        self.sent, self.gradient, self.limit = sent, gradient, limit
        self.steps = 0
        self.params: dict[str, torch.Tensor] = {}  # name → the live parameter the app trains
        self.grad_sum: dict[str, torch.Tensor] = {}
        self._names: dict[int, str] = {}

    def __enter__(self) -> "OptimizerTap":
        self._handles = [register_optimizer_step_pre_hook(self._before_step),
                         register_optimizer_step_post_hook(self._after_step)]
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        return exc[0] is _PlannedStepsDone  # the planned steps ended the loop: not an error

    def _name(self, param: torch.Tensor) -> str:
        """The sent array this parameter was loaded from (equal values, the first unused one in order)."""
        if id(param) not in self._names:
            taken = set(self._names.values())
            value = param.detach()
            name = next((k for k, v in self.sent.items() if k not in taken and torch.equal(v, value.to(v.dtype))),
                        None)
            if name is None:
                raise ConfigError(
                    f"cloudless_mod: an optimizer parameter of shape {tuple(value.shape)} matches none of the "
                    "arrays the server sent; the ClientApp must load the sent weights into the model it trains "
                    "(model.load_state_dict(msg.content['arrays'].to_torch_state_dict())) before training")
            self._names[id(param)] = name
            self.params[name] = param
        return self._names[id(param)]

    def _before_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = self._name(param)  # before the first update, while it still holds the sent values
                if self.gradient and param.grad is not None:
                    grad = param.grad.detach()
                    self.grad_sum[name] = self.grad_sum[name] + grad if name in self.grad_sum else grad.clone()
                    param.grad = None  # the optimizer skips parameters without gradients: weights stay put

    def _after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.limit is not None and self.steps >= self.limit:
            raise _PlannedStepsDone

    def gradient_arrays(self) -> ArrayRecord:
        """The mean gradient per step for every floating-point sent entry (zeros for buffers)."""
        return ArrayRecord(OrderedDict((k, self.grad_sum[k] / self.steps if k in self.grad_sum
                                        else torch.zeros_like(v)) for k, v in self.sent.items()
                                       if v.is_floating_point()))

    def weight_arrays(self) -> ArrayRecord:
        """The sent arrays with every trained parameter's current value."""
        return ArrayRecord(OrderedDict((k, self.params[k].detach().clone() if k in self.params else v)
                                       for k, v in self.sent.items()))


def cloudless_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower Mod: serve cloudless-fl's work orders (`mode`, `local-steps`) with the app's own training."""
    if msg.metadata.message_type == MessageType.QUERY:
        return region_query(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or protocol.CONFIG not in msg.content.config_records:
        return call_next(msg, context)
    config = msg.content.config_records[protocol.CONFIG]
    mode = str(config.get("mode", protocol.MODE_WEIGHTS))
    limit = int(config["local-steps"]) if "local-steps" in config else None
    link = _link(config, context)
    if link is None:
        sent = msg.content[protocol.ARRAYS].to_torch_state_dict()
    else:  # the app sees the model, never the compressed change
        sent = link.received(msg.content[protocol.ARRAYS])
        msg.content[protocol.ARRAYS] = ArrayRecord(sent)
    reply = None
    start = time.perf_counter()
    with OptimizerTap(sent, gradient=mode == protocol.MODE_GRADIENT, limit=limit) as tap:
        reply = call_next(msg, context)
    compute_s = time.perf_counter() - start
    if reply is not None and reply.has_error():
        return reply
    if mode == protocol.MODE_GRADIENT and tap.steps == 0:
        raise ConfigError("cloudless_mod: gradient mode needs the ClientApp to train with a torch.optim optimizer; "
                          "none stepped while it handled the message")
    if mode == protocol.MODE_GRADIENT:
        arrays, update = tap.gradient_arrays(), protocol.MODE_GRADIENT
    elif reply is None:  # stopped after the planned steps: the weights are the live parameters
        arrays, update = tap.weight_arrays(), protocol.MODE_WEIGHTS
    else:  # the app's own reply; the server takes the delta itself
        arrays, update = reply.content[protocol.ARRAYS], protocol.reply_update(reply)
    if link is not None:  # a change crosses the WAN, compressed
        tensors = arrays.to_torch_state_dict()
        if update == protocol.MODE_WEIGHTS:
            tensors, update = {k: sent[k] - v for k, v in tensors.items()}, protocol.MODE_DELTA
        arrays = link.reply(tensors)
    metrics = dict(reply.content[protocol.METRICS]) if reply is not None and protocol.METRICS in reply.content \
        else {"num-examples": tap.steps * int(config.get("batch-size", 1))}
    metrics.update({"steps": tap.steps, "compute-seconds": compute_s})
    content = RecordDict({} if reply is None else dict(reply.content))
    content[protocol.ARRAYS] = arrays
    content[protocol.METRICS] = MetricRecord(metrics)
    content[protocol.INFO] = ConfigRecord({"update": update, "encoding": "none" if link is None else link.codec.spec(),
                                           **_region(context)})
    return Message(content, reply_to=msg)


def _link(config: ConfigRecord, context: Context) -> RegionLink | None:
    """This job's end of a compressed WAN link (None: uncompressed); its snapshots go to the node's (or the
    server-named) state folder."""
    if str(config.get("compression", "none")) == "none":
        return None
    order = protocol.WorkOrder.from_config(config)
    folder = context.node_config.get("state-dir") or config.get("state-dir")
    name = _region(context).get("region", f"node-{context.node_id}")
    return RegionLink(order, None if folder is None else Path(str(folder)) / name)


def region_query(msg: Message, context: Context) -> Message:
    """Answer the region query from the node config (`region`, optional `resident-examples`).

    Register it on a decorator-style ClientApp with `app.query()(region_query)`.
    """
    metrics = {}
    if "resident-examples" in context.node_config:
        metrics["resident-examples"] = int(context.node_config["resident-examples"])
    return Message(RecordDict({protocol.METRICS: MetricRecord(metrics), protocol.INFO: ConfigRecord(_region(context))}),
                   reply_to=msg)


def _region(context: Context) -> dict[str, str]:
    return {"region": str(context.node_config["region"])} if "region" in context.node_config else {}
