"""The server's optimizer over the global model: `torch.optim.SGD` on plain tensors.

ASGD-GA feeds it each region's (scaled) gradient; MA feeds it the averaged
pseudo-gradient `w_start - w_avg` (DiLoCo's outer step). One model and one
momentum buffer are held, whatever the number of updates.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord


class ServerOptimizer:
    """SGD (optionally momentum / Nesterov) over a state dict.

    Parameters
    ----------
    state : Mapping[str, torch.Tensor]
        The initial global model; copied.
    lr, momentum, nesterov :
        As in `torch.optim.SGD`.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], lr: float, momentum: float = 0.0,
                 nesterov: bool = False) -> None:
        self.state = OrderedDict((k, v.detach().clone()) for k, v in state.items())
        floats = [v for v in self.state.values() if v.is_floating_point()]
        self.optimizer = torch.optim.SGD(floats, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)

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

    def state_dict(self) -> dict:
        """Model and momentum, for a checkpoint (plain tensors)."""
        return {"model": dict(self.state), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state["model"].items():
                self.state[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])

    def arrays(self) -> ArrayRecord:
        return ArrayRecord(self.state)
