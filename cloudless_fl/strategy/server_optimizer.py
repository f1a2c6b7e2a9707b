"""The server's optimizer over the global model: `torch.optim.SGD` on plain tensors.

ASGD-GA feeds it each region's (scaled) gradient; MA feeds it the averaged
pseudo-gradient `w_start - w_avg` (DiLoCo's outer step). One model and one
momentum buffer are held, whatever the number of updates.

The model served (evaluated, returned at the end) may be an exponential moving
average of the versions instead of the last one (Polyak averaging, as
`torch.optim.swa_utils` does for modules): asynchronous updates from regions
with different data make consecutive versions swing, and the average is the
point they swing around. Training always continues from the last version.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch._dynamo  # noqa: F401 - torch.optim imports it on first use (1-2 s): here, not in a job or a run
from flwr.app import ArrayRecord


class ServerOptimizer:
    """SGD (optionally momentum / Nesterov) over a state dict.

    Parameters
    ----------
    state : Mapping[str, torch.Tensor]
        The initial global model; copied.
    lr, momentum, nesterov :
        As in `torch.optim.SGD`.
    average_decay : float, optional
        Serve `average = decay * average + (1 - decay) * model` after every step, starting from the
        initial model (about the last `1 / (1 - decay)` versions); None: serve the last version.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], lr: float, momentum: float = 0.0,
                 nesterov: bool = False, average_decay: float | None = None) -> None:
        if average_decay is not None and not 0.0 <= average_decay < 1.0:
            raise ValueError(f"average_decay must be in [0, 1), got {average_decay}")
        self.state = OrderedDict((k, v.detach().clone()) for k, v in state.items())
        floats = [v for v in self.state.values() if v.is_floating_point()]
        self.optimizer = torch.optim.SGD(floats, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
        self.average_decay = average_decay
        self.average = None if average_decay is None else OrderedDict((k, v.clone()) for k, v in self.state.items())

    @classmethod
    def from_arrays(cls, arrays: ArrayRecord, **kwargs) -> "ServerOptimizer":
        return cls(arrays.to_torch_state_dict(), **kwargs)

    @torch.no_grad()
    def step(self, gradient: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
        """Apply `scale * gradient`; entries absent from `gradient` are left unchanged."""
        for name, param in self.state.items():
            g = gradient.get(name)
            if g is None or not param.is_floating_point():
                param.grad = None
                continue
            if param.grad is None:  # one gradient buffer per parameter, reused for every update
                param.grad = torch.empty_like(param)
            torch.mul(g, scale, out=param.grad)
        self.optimizer.step()
        if self.average is not None:
            for name, value in self.state.items():
                if value.is_floating_point():
                    self.average[name].lerp_(value, 1.0 - self.average_decay)
                else:
                    self.average[name].copy_(value)

    def state_dict(self) -> dict:
        """Model, momentum and the served average, for a checkpoint (plain tensors)."""
        return {"model": dict(self.state), "optimizer": self.optimizer.state_dict(),
                **({} if self.average is None else {"average": dict(self.average)})}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["model"].items():
                self.state[name].copy_(value)
            if self.average is not None:
                if "average" not in state:
                    raise ValueError("the checkpoint holds no averaged model; resume with the first run's "
                                     "strategy.average_decay")
                for name, value in state["average"].items():
                    self.average[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])

    def arrays(self) -> ArrayRecord:
        """The last version: what regions train from."""
        return ArrayRecord(self.state)

    def served(self, last: ArrayRecord) -> ArrayRecord:
        """The model to evaluate and return: the average if kept, else `last` (the last version's arrays)."""
        return last if self.average is None else ArrayRecord(self.average)
