"""One attacking node of three in a stock quickstart-shaped ClientApp (tests/stock_app: its own model and data, replies
of new weights, no `steps`): MA and ASGD-GA delta, screen on and off. Single runs; the app seeds its batches from
message ids, so repeated runs differ by about 0.01.

    .venv/bin/python experiments/bench_attacks_stock_app.py
"""
import sys
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "stock_app"))
from cloudless_fl.deployment.grid import InProcessGrid
from cloudless_fl.strategy import AsyncGradAccum, ModelAveraging
from cloudless_fl.strategy.validation import UpdateLimits
import client_app  # noqa: E402
import task  # noqa: E402

OFF = UpdateLimits(norm_factor=None, min_agreement=None, clip_factor=None, min_relatedness=None)

NOISE = torch.Generator().manual_seed(0)

def attacking(kind):
    def app(msg, ctx):
        reply = client_app.app(msg, ctx)
        if kind == "clean" or ctx.node_id != 1 or msg.metadata.message_type != "train": return reply
        sent = msg.content["arrays"].to_torch_state_dict(); new = reply.content["arrays"].to_torch_state_dict()
        f = {"x-10": lambda c: -10 * c, "x1e4": lambda c: 1e4 * c, "noise": lambda c: torch.randn(c.shape, generator=NOISE) * c.norm() / c.numel() ** 0.5}[kind]
        reply.content["arrays"] = ArrayRecord({k: sent[k] + f(v - sent[k]) for k, v in new.items()})
        return reply
    return app

def run(make, kind, rounds, absent=False):
    grid = InProcessGrid(attacking(kind), 3)
    if absent: grid.set_offline(1)
    torch.manual_seed(0); model = task.make_model()
    def ev(r, a):
        model.load_state_dict(a.to_torch_state_dict()); return MetricRecord({"accuracy": task.accuracy(model)})
    s = make()
    res = s.start(grid=grid, initial_arrays=ArrayRecord(task.make_model().state_dict()), num_rounds=rounds, train_config=ConfigRecord({"lr": 0.1}), evaluate_fn=ev)
    acc = res.evaluate_metrics_serverapp[max(res.evaluate_metrics_serverapp)]["accuracy"]
    return acc, s.history.counters.get("screened_updates", 0)

for name, rounds, make in (("ma", 5, lambda l=None: ModelAveraging(lr=0.1, limits=l)),
                           ("asgd_ga_delta", 15, lambda l=None: AsyncGradAccum(update="delta", local_lr=0.1, eval_every=3, limits=l))):
    row = {"clean": run(make, "clean", rounds), "absent": run(make, "clean", rounds, absent=True)}
    for kind in ("x-10", "x1e4", "noise"):
        row[kind + " screen"] = run(make, kind, rounds)
        row[kind + " none"] = run(lambda: make(OFF), kind, rounds)
    print(name, {k: (round(a, 3), n) for k, (a, n) in row.items()}, flush=True)
