"""Reliability costs: update validation per update, checkpoint size and write/read time.

For the 1.1 M-parameter MLP on digits (the default model), on this machine:

    .venv/bin/python experiments/bench_reliability.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from cloudless_fl.training import protocol
from cloudless_fl.checkpoint import load_checkpoint, save_checkpoint
from cloudless_fl.training.models import build_model
from cloudless_fl.strategy.server_optimizer import ServerOptimizer
from cloudless_fl.strategy.validation import UpdateLimits, UpdateValidator

REPEATS = 200


def per_call_us(fn, repeats: int = REPEATS) -> float:
    fn()  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    torch.set_num_threads(1)
    model = build_model("mlp", (1, 8, 8), 10, seed=0)
    state = model.state_dict()
    params = sum(t.numel() for t in state.values())
    update = ArrayRecord({k: torch.randn_like(v) * 1e-3 for k, v in state.items()})
    validator = UpdateValidator(state, UpdateLimits(max_norm=100.0))
    decode = per_call_us(lambda: protocol.decode_tensors(update))
    check = per_call_us(lambda: validator.check("r", update, protocol.MODE_DELTA))
    print(f"model: mlp, {params:,} parameters, {sum(len(a.data) for a in update.values()) / 1e6:.2f} MB per update")
    print(f"decode only:            {decode:8.0f} µs per update")
    print(f"decode + validate:      {check:8.0f} µs per update (layout, NaN/Inf, norm)")
    print(f"validation overhead:    {check - decode:8.0f} µs per update")

    optimizer = ServerOptimizer(state, lr=0.1, momentum=0.9)
    optimizer.step(protocol.decode_tensors(update))
    sent = {str(v): {k: t.clone() for k, t in optimizer.state.items()} for v in range(3)}  # 3 jobs in flight
    with tempfile.TemporaryDirectory() as tmp:
        for label, tensors in (("MA / FedAvg (model + momentum)", {"optimizer": optimizer.state_dict(), "sent": {}}),
                               ("ASGD-GA (+ 3 models in flight)", {"optimizer": optimizer.state_dict(), "sent": sent})):
            path = Path(tmp) / "checkpoint.pt"
            start = time.perf_counter()
            size = save_checkpoint(path, {"step": 1, "history": {"entries": []}}, tensors)
            write = time.perf_counter() - start
            start = time.perf_counter()
            load_checkpoint(path)
            read = time.perf_counter() - start
            print(f"checkpoint {label}: {size / 1e6:6.1f} MB, write {write * 1e3:6.1f} ms, "
                  f"read + verify {read * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
