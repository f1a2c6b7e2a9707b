"""Local work on resident data."""

import numpy as np
import torch

from cloudless_fl.training.data import load_source
from cloudless_fl.training.models import build_model
from cloudless_fl.training.local import accumulate_gradient, evaluate, local_sgd, make_batches, sample_stream


def test_stream_covers_each_epoch_once():
    idx = sample_stream(10, seed=1, offset=0, count=30)
    for epoch in range(3):
        assert sorted(idx[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(10))
    # a job starting mid-stream sees the same positions
    assert np.array_equal(sample_stream(10, 1, 7, 9), idx[7:16])


def test_local_steps_lower_the_loss():
    data = load_source("digits")
    model = build_model("mlp", (1, 8, 8), 10, seed=0, hidden=[64])
    before, _ = evaluate(model, data)
    local_sgd(model, data, make_batches(len(data), 32, seed=0, offset=0, samples=3200), lr=0.3)
    after, _ = evaluate(model, data)
    assert after < before * 0.5


def test_accumulated_gradient_equals_concatenated_batch_gradient():
    data = load_source("digits")
    model = build_model("mlp", (1, 8, 8), 10, seed=0, hidden=[32])
    batches = make_batches(len(data), 16, seed=0, offset=0, samples=64)
    grads, stats = accumulate_gradient(model, data, batches)
    assert stats.steps == 4 and stats.samples == 64
    model.zero_grad()
    rows = np.concatenate(batches)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(data.x[rows])), torch.from_numpy(data.y[rows]))
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)
