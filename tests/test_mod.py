"""The Flower Mod: a plain PyTorch ClientApp gets gradient mode, planned local steps and reports with one line."""

from __future__ import annotations

from uuid import uuid4

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from cloudless_fl.errors import ConfigError
from cloudless_fl.training import protocol
from cloudless_fl.training.mod import cloudless_mod, region_query

torch.manual_seed(0)
X, Y = torch.randn(96, 5), torch.randint(0, 3, (96,))
BATCH = 16


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def plain_app(optimizer=torch.optim.SGD, epochs: int = 3, load: bool = True) -> ClientApp:
    """A ClientApp written without cloudless-fl: `epochs` passes over X in fixed batches, its own optimizer."""
    app = ClientApp(mods=[cloudless_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = make_model()
        if load:
            model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = optimizer(model.parameters(), lr=float(msg.content["config"]["lr"]))
        for _ in range(epochs):
            for rows in torch.arange(len(Y)).split(BATCH):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(X[rows]), Y[rows]).backward()
                opt.step()
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": epochs * len(Y)})}), reply_to=msg)

    return app


def call(app: ClientApp, config: dict, arrays: ArrayRecord | None = None, node_config: dict | None = None,
         message_type: str = MessageType.TRAIN) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # as the engines do
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = arrays
    msg = Message(content, 1, message_type)
    msg.metadata.__dict__["_message_id"] = str(uuid4())
    return app(msg, Context(run_id=1, node_id=1, node_config=node_config or {}, state=RecordDict(), run_config={}))


def sent_model() -> tuple[torch.nn.Module, ArrayRecord]:
    torch.manual_seed(1)
    model = make_model()
    return model, ArrayRecord(model.state_dict())


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_gradient_mode_is_the_mean_gradient_at_the_sent_weights_whatever_the_optimizer(optimizer):
    model, arrays = sent_model()
    reply = call(plain_app(optimizer), {"lr": 0.5, "mode": "gradient", "local-steps": 4, "batch-size": BATCH},
                 arrays)
    expected = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for rows in torch.arange(len(Y)).split(BATCH)[:4]:  # the first four batches, all at the sent weights
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(X[rows]), Y[rows]).backward()
        for k, p in model.named_parameters():
            expected[k] += p.grad / 4
    got = reply.content["arrays"].to_torch_state_dict()
    assert protocol.reply_update(reply) == "gradient"
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
    assert reply.content["metrics"]["steps"] == 4
    assert reply.content["metrics"]["num-examples"] == 4 * BATCH


def test_planned_local_steps_end_the_apps_loop_with_the_weights_after_those_steps():
    model, arrays = sent_model()
    reply = call(plain_app(torch.optim.SGD, epochs=3), {"lr": 0.1, "mode": "delta", "local-steps": 5,
                                                         "batch-size": BATCH}, arrays)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for rows in torch.arange(len(Y)).split(BATCH)[:5]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[rows]), Y[rows]).backward()
        opt.step()
    got = reply.content["arrays"].to_torch_state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v)
    assert protocol.reply_update(reply) == "weights"  # the server takes the delta against what it sent
    assert reply.content["metrics"]["steps"] == 5
    assert reply.content["metrics"]["compute-seconds"] > 0


def test_without_planned_steps_the_apps_own_reply_passes_with_its_step_count():
    _, arrays = sent_model()
    reply = call(plain_app(epochs=2), {"lr": 0.1, "mode": "weights", "batch-size": BATCH}, arrays)
    assert reply.content["metrics"]["num-examples"] == 2 * len(Y)  # the app's own figure
    assert reply.content["metrics"]["steps"] == 2 * len(Y) // BATCH


def test_the_optimizer_is_left_alone_after_the_message():
    _, arrays = sent_model()
    call(plain_app(), {"lr": 0.1, "mode": "gradient", "local-steps": 2, "batch-size": BATCH}, arrays)
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(X), Y).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_an_app_that_trains_other_weights_than_it_was_sent_gets_a_clear_error():
    _, arrays = sent_model()
    with pytest.raises(ConfigError, match="must load the sent weights"):
        call(plain_app(load=False), {"lr": 0.1, "mode": "gradient", "local-steps": 2}, arrays)


def test_gradient_mode_without_any_optimizer_step_is_refused():
    app = ClientApp(mods=[cloudless_mod])
    app.train()(lambda msg, context: Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg))
    with pytest.raises(ConfigError, match="torch.optim optimizer"):
        call(app, {"lr": 0.1, "mode": "gradient"}, sent_model()[1])


def test_the_region_comes_from_the_node_config():
    _, arrays = sent_model()
    reply = call(plain_app(epochs=1), {"lr": 0.1, "mode": "weights"}, arrays, node_config={"region": "eu-west"})
    assert protocol.reply_region(reply) == "eu-west"
    anonymous = call(plain_app(epochs=1), {"lr": 0.1, "mode": "weights"}, arrays)
    assert protocol.reply_region(anonymous) is None


def test_region_query_answers_name_and_resident_examples():
    app = ClientApp()
    app.query()(region_query)
    reply = call(app, {}, node_config={"region": "ap-x", "resident-examples": 420}, message_type=MessageType.QUERY)
    assert protocol.reply_region(reply) == "ap-x"
    assert reply.content["metrics"]["resident-examples"] == 420
