"""A user's own model and data, written without cloudless-fl: 4-class synthetic tabular data, a small MLP."""

import numpy as np
import torch
from sklearn.datasets import make_classification
from torch import nn

FEATURES, CLASSES = 20, 4


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, CLASSES))


def load_data(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This node's rows: class-skewed (each partition holds mostly two classes), as regions' data would be."""
    x, y = make_classification(n_samples=3000, n_features=FEATURES, n_informative=10, n_classes=CLASSES,
                               n_clusters_per_class=1, class_sep=1.5, random_state=7)
    train = np.arange(2400)
    rng = np.random.default_rng(partition_id)
    keep = (y[train] % num_partitions == partition_id) | (rng.random(len(train)) < 0.25)
    rows = train[keep]
    return torch.tensor(x[rows], dtype=torch.float32), torch.tensor(y[rows])


def load_test() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_classification(n_samples=3000, n_features=FEATURES, n_informative=10, n_classes=CLASSES,
                               n_clusters_per_class=1, class_sep=1.5, random_state=7)
    return torch.tensor(x[2400:], dtype=torch.float32), torch.tensor(y[2400:])


def accuracy(model: nn.Module) -> float:
    x, y = load_test()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()
