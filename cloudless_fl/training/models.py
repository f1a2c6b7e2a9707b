"""A small model registry: every model is built from the data's input shape and classes.

`build_model("mlp", input_shape=(1, 8, 8), num_classes=10)` — so any `.npz` data
works with the MLP, and the same name on server and regions yields the same
architecture (and, with the same seed, the same initial weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Add a builder `(input_shape, num_classes, **options) -> nn.Module` to the registry."""

    def add(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = builder
        return builder

    return add


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, seed: int | None = None,
                **options) -> nn.Module:
    """Build a registered model; `seed` fixes its initial weights."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(available_models())}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be ≥ 2, got {num_classes}")
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return _REGISTRY[name](tuple(input_shape), num_classes, **options)
    return _REGISTRY[name](tuple(input_shape), num_classes, **options)


@register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (1024, 1024)) -> nn.Module:
    """The benchmark MLP (64-1024-1024-10 on digits: 1.1 M parameters)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int, channels: int = 32) -> nn.Module:
    """A small two-block CNN for 28x28 / 32x32 images (works down to 8x8)."""
    if len(input_shape) != 3:
        raise ConfigError(f"model 'cnn' needs image data (C, H, W); got input shape {input_shape}; use model=mlp")
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(2 * channels * 16, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


@register("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision's ResNet-18, random init, stem adapted to small images (CIFAR-style)."""
    from torchvision.models import resnet18 as tv_resnet18

    if len(input_shape) != 3:
        raise ConfigError(f"model 'resnet18' needs image data (C, H, W); got input shape {input_shape}")
    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
