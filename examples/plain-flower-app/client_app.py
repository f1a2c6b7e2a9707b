"""A plain Flower ClientApp. To serve ASGD-GA's gradient mode it honours one extra
config key: `mode == "gradient"` means "accumulate gradients over `local-steps`
batches and send them back" instead of training, and says so in its reply
(`info` record, `update: gradient`). Everything else is standard Flower: MA and
ASGD-GA's delta mode need nothing extra.
"""

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from task import load_partition, make_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    x, y = load_partition(context.node_config["partition-id"], context.node_config["num-partitions"])
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    steps, batch = int(config.get("local-steps", 10)), int(config.get("batch-size", 32))
    generator = torch.Generator().manual_seed(int(config.get("sample-offset", 0)))
    batches = [torch.randint(0, len(y), (batch,), generator=generator) for _ in range(steps)]
    loss_fn = torch.nn.CrossEntropyLoss()
    if config.get("mode") == "gradient":  # ASGD-GA: accumulate, do not step
        for rows in batches:
            (loss_fn(model(x[rows]), y[rows]) / steps).backward()
        arrays = ArrayRecord(OrderedDict((k, p.grad) for k, p in model.named_parameters()))
        info = ConfigRecord({"update": "gradient"})  # the arrays are gradients, not weights
    else:  # FedAvg / MA: local SGD, send weights
        opt = torch.optim.SGD(model.parameters(), lr=float(config.get("lr", 0.1)))
        for rows in batches:
            opt.zero_grad()
            loss_fn(model(x[rows]), y[rows]).backward()
            opt.step()
        arrays = ArrayRecord(model.state_dict())
        info = ConfigRecord({"update": "weights"})
    metrics = MetricRecord({"num-examples": steps * batch, "steps": steps})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "info": info}), reply_to=msg)
