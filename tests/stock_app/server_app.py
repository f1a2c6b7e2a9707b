"""A stock Flower ServerApp; the strategy line is the only one that knows cloudless-fl."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from cloudless_fl.strategy import AsyncGradAccum, ModelAveraging
from task import accuracy, make_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    name, rounds = context.run_config["strategy"], int(context.run_config["num-server-rounds"])
    strategy = {"fedavg": lambda: FedAvg(fraction_evaluate=0.0, min_available_nodes=3),
                "ma": lambda: ModelAveraging(lr=0.1, min_available_nodes=3),
                "asgd_ga_delta": lambda: AsyncGradAccum(update="delta", local_lr=0.1, eval_every=3,
                                                        min_available_nodes=3),
                # needs the ClientApp's cooperation: ClientApp(mods=[cloudless_mod])
                "asgd_ga_gradient": lambda: AsyncGradAccum(update="gradient", lr=0.5, eval_every=6,
                                                           min_available_nodes=3)}[name]()
    model = make_model()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": accuracy(model)})

    torch.manual_seed(0)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()), num_rounds=rounds,
                            train_config=ConfigRecord({"lr": 0.1}), evaluate_fn=evaluate)
    evaluations = result.evaluate_metrics_serverapp
    best = max(m["accuracy"] for m in evaluations.values())
    print(f"best accuracy {best:.4f}, final accuracy {evaluations[max(evaluations)]['accuracy']:.4f}")
