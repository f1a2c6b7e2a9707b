"""The stock app's ServerApp (tests/stock_app/server_app.py) as a user would time it: the same strategies,
waiting for `num-nodes` nodes; every central evaluation stamped with the seconds since the strategy started;
the run ended at the first evaluation at `target` (Flower's FedAvg has no stop rule, so every strategy is ended
the same way); the timeline written to `results-file`. The ClientApp and task beside it are the stock app's,
copied unchanged by experiments/bench_stock_deployment.py."""

import json
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from cloudless_fl.strategy import AsyncGradAccum, ModelAveraging
from task import accuracy, make_model

app = ServerApp()


class TargetReached(Exception):
    """The evaluation that reached the target ends the run."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    name, rounds, nodes = config["strategy"], int(config["num-server-rounds"]), int(config["num-nodes"])
    strategy = {"fedavg": lambda: FedAvg(fraction_evaluate=0.0, min_available_nodes=nodes),
                "ma": lambda: ModelAveraging(lr=0.1, min_available_nodes=nodes),
                "asgd_ga_delta": lambda: AsyncGradAccum(update="delta", local_lr=0.1, eval_every=nodes,
                                                        min_available_nodes=nodes)}[name]()
    model, target, timeline = make_model(), float(config["target"]), []
    start = time.monotonic()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        timeline.append({"time_s": time.monotonic() - start, "round": server_round, "accuracy": accuracy(model)})
        if server_round > 0 and timeline[-1]["accuracy"] >= target:
            raise TargetReached
        return MetricRecord({"accuracy": timeline[-1]["accuracy"]})

    torch.manual_seed(0)
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()), num_rounds=rounds,
                       train_config=ConfigRecord({"lr": 0.1}), evaluate_fn=evaluate)
    except TargetReached:
        pass
    out = Path(config["results-file"])
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps({"strategy": name, "target": target, "timeline": timeline}, indent=1) + "\n")
    os.replace(partial, out)
