"""The model registry."""

import pytest
import torch

from cloudless_fl.errors import ConfigError
from cloudless_fl.training.models import available_models, build_model


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("mlp", (20,)), ("cnn", (1, 28, 28)),
                                         ("cnn", (3, 32, 32)), ("resnet18", (3, 32, 32))])
def test_models_take_shape_and_classes_from_data(name, shape):
    model = build_model(name, shape, 7)
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_benchmark_mlp_size():
    model = build_model("mlp", (1, 8, 8), 10)
    assert sum(p.numel() for p in model.parameters()) == 64 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10


def test_seed_fixes_initial_weights():
    a, b = build_model("mlp", (4,), 3, seed=5), build_model("mlp", (4,), 3, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_model():
    with pytest.raises(ConfigError, match="unknown model 'vgg'.*mlp"):
        build_model("vgg", (4,), 3)
    assert {"mlp", "cnn", "resnet18"} <= set(available_models())


def test_cnn_refuses_flat_data():
    with pytest.raises(ConfigError, match="needs image data"):
        build_model("cnn", (64,), 10)
