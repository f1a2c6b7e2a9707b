"""A plain Flower ServerApp. The only cloudless-fl line is the strategy import:
swap `FedAvg(...)` for `AsyncGradAccum(...)` or `ModelAveraging(...)`.

Without a topology the strategies use the wall clock and report no cost figures.
"""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from cloudless_fl.strategy import AsyncGradAccum, ModelAveraging  # was: from flwr.serverapp.strategy import FedAvg
from task import load_test, make_model

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    x, y = load_test()  # held out: no node trains on it
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    return MetricRecord({"accuracy": accuracy})


@app.main()
def main(grid: Grid, context: Context) -> None:
    name = context.run_config.get("strategy", "asgd_ga")
    # strategy = FedAvg(fraction_evaluate=0.0)
    if name == "ma":
        strategy = ModelAveraging(lr=0.3, local_steps=10, eval_every=1)
        rounds = 10
    else:
        strategy = AsyncGradAccum(lr=0.3, accumulation_steps=4, eval_every=20)
        rounds = 200
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()), num_rounds=rounds,
                            train_config=ConfigRecord({"batch-size": 32}), evaluate_fn=central_evaluate)
    print(f"final accuracy {result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]}")
