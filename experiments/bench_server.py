"""Micro-benchmark: ASGD-GA server updates per second for the 1.1 M-parameter MLP, one core.

Times what the server does per arrival: decode the reply's gradient arrays
(`protocol.decode_tensors`, as `AsyncGradAccum.aggregate_train` does) and apply them through the server optimizer (SGD with momentum). Also reports the
tensors the server holds (model, momentum, one gradient buffer): fixed in size.

    .venv/bin/python experiments/bench_server.py [N]
"""

import sys
import time
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord

from cloudless_fl.training.models import build_model
from cloudless_fl.training.protocol import decode_tensors
from cloudless_fl.strategy.server_optimizer import ServerOptimizer


def main(n: int = 1000) -> None:
    torch.set_num_threads(1)
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    params = sum(p.numel() for p in model.parameters())
    optimizer = ServerOptimizer(model.state_dict(), lr=0.1, momentum=0.9)
    gradient = ArrayRecord(OrderedDict((k, torch.randn_like(v)) for k, v in model.state_dict().items()))
    optimizer.step(decode_tensors(gradient))  # warm-up, momentum allocated
    start = time.perf_counter()
    for _ in range(n):
        optimizer.step(decode_tensors(gradient), scale=0.5)
    elapsed = time.perf_counter() - start
    state = sum(t.numel() * t.element_size() for t in optimizer.state.values())
    momentum = sum(s["momentum_buffer"].numel() * 4 for s in optimizer.optimizer.state.values())
    print(f"{params} parameters: {n / elapsed:.0f} updates/s on one core ({elapsed / n * 1e3:.2f} ms/update)")
    grads = sum(t.grad.numel() * 4 for t in optimizer.state.values() if t.grad is not None)
    print(f"server state after {n + 1} updates: model {state / 1e6:.1f} MB + momentum {momentum / 1e6:.1f} MB "
          f"+ gradient buffer {grads / 1e6:.1f} MB (fixed: no copy per update)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
