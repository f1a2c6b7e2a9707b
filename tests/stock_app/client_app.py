"""A ClientApp in the shape of Flower's PyTorch quickstart: load the weights, train `local-epochs`
at the `lr` in the message's config, reply with the new weights and `num-examples`."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from task import load_data, make_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    epochs = int(context.run_config.get("local-epochs", 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]))
    generator = torch.Generator().manual_seed(int(msg.metadata.message_id[:8], 16))
    total = 0.0
    for _ in range(epochs):
        for rows in torch.randperm(len(y), generator=generator).split(32):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            total += loss.item()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(y), "train_loss": total})})
    return Message(content=content, reply_to=msg)
