"""The user's own model and data: nothing here knows about cloudless-fl."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def make_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


TRAIN_ROWS = 1437  # the first 80 % train (split over the nodes); the rest is the server's held-out test set


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    return torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)


def load_partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    rows = np.arange(TRAIN_ROWS)[partition_id::num_partitions]
    return x[rows], y[rows]


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    return x[TRAIN_ROWS:], y[TRAIN_ROWS:]
