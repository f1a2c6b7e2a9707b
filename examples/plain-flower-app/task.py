"""The user's own model and data: nothing here knows about cloudless-fl."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def make_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def load_partition(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    rows = np.arange(len(y))[partition_id::num_partitions]
    return x[rows], y[rows]
