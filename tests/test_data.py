"""Resident-data loading and the split tool."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from cloudless_fl.training.data import (
    check_labels, detect_format, load_npz, load_resident, load_source, read_manifest, split_dataset,
)
from cloudless_fl.errors import DataError
from cloudless_fl.strategy import ModelAveraging
from strategy_helpers import Federation, topology

SHARES = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}


def test_split_sizes_follow_shares_and_partition_the_train_set(tmp_path):
    digits = load_source("digits")
    sizes = split_dataset(digits, SHARES, tmp_path, alpha=0.5, seed=0, test_fraction=0.2, test_seed=0)
    test_x, _ = load_npz(tmp_path / "test.npz")
    n_train = len(digits) - len(test_x.y)
    assert len(test_x.y) == pytest.approx(0.2 * len(digits), abs=1)
    assert sum(sizes.values()) == n_train
    for region, share in SHARES.items():
        assert abs(sizes[region] - share * n_train) <= 1
    # union of shards + test == the whole dataset, no sample twice (rows are unique images here)
    rows = [load_resident(tmp_path / r).train.x.reshape(sizes[r], -1) for r in SHARES]
    rows.append(test_x.x.reshape(len(test_x.y), -1))
    stacked = np.concatenate(rows)
    whole = digits.x.reshape(len(digits), -1)
    key = lambda a: {r.tobytes() for r in a}  # noqa: E731
    assert len(stacked) == len(whole)
    assert key(stacked) == key(whole)
    assert read_manifest(tmp_path)["regions"] == sizes


def test_split_is_label_skewed_and_seeded(tmp_path):
    digits = load_source("digits")
    split_dataset(digits, SHARES, tmp_path / "one", alpha=0.1, seed=3)
    split_dataset(digits, SHARES, tmp_path / "two", alpha=0.1, seed=3)
    a = load_resident(tmp_path / "one" / "d").train.y
    b = load_resident(tmp_path / "two" / "d").train.y
    assert np.array_equal(a, b)
    counts = np.bincount(a, minlength=10) / len(a)
    assert counts.max() > 0.2  # alpha 0.1: far from uniform (0.1 per class)


def test_npz_region_with_local_test(tmp_path):
    x = np.random.default_rng(0).random((20, 5)).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(20) % 3, x_test=x[:4], y_test=np.arange(4) % 3)
    data = load_resident(tmp_path)
    assert data.train.x.shape == (20, 5) and data.train.y.dtype == np.int64
    assert data.test is not None and len(data.test) == 4


def test_npz_uint8_images_are_scaled_and_channel_first(tmp_path):
    x = np.full((3, 6, 6, 3), 255, dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=np.array([0, 1, 2]))
    data = load_resident(tmp_path)
    assert data.train.x.shape == (3, 3, 6, 6)
    assert data.train.x.max() == pytest.approx(1.0)


def _write_idx(path, array: np.ndarray, magic_type: int) -> None:
    header = struct.pack(">HBB", 0, magic_type, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


@pytest.mark.parametrize("fmt, folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_torchvision_mnist_roots(tmp_path, fmt, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8), 8)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8), 8)
    for gz in raw.glob("*.gz"):  # torchvision reads the unpacked files
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    assert detect_format(tmp_path) == fmt
    data = load_resident(tmp_path)
    assert data.train.x.shape == (12, 1, 28, 28)
    assert list(data.train.y[:3]) == [0, 1, 2]
    assert data.test is not None and len(data.test) == 5


def test_cifar10_root(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # our generated files, not the real ones: skip only the md5 checks
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    data = load_resident(tmp_path, "cifar10")
    assert data.train.x.shape == (10, 3, 32, 32)
    assert data.test is not None and data.test.x.shape == (3, 3, 32, 32)


def test_imagefolder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "train" / cls / f"{i}.png")
    data = load_resident(tmp_path)
    assert data.train.x.shape == (6, 3, 8, 8)
    assert sorted(set(data.train.y.tolist())) == [0, 1]


def test_digits_source():
    digits = load_source("digits")
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.max() <= 1.0
    assert set(digits.y.tolist()) == set(range(10))


def test_tabular_source_is_generated_the_same_every_time():
    first, again = load_source("tabular"), load_source("tabular")
    assert first.x.shape == (8000, 40) and first.x.dtype == np.float32
    assert set(first.y.tolist()) == set(range(10))
    assert np.abs(first.x.mean(axis=0)).max() < 1e-4 and np.allclose(first.x.std(axis=0), 1, atol=1e-3)
    assert np.array_equal(first.x, again.x) and np.array_equal(first.y, again.y)


# ---------------------------------------------------------------- bad input


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_resident(tmp_path / "nope")


def test_empty_data_dir(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        load_resident(tmp_path)


def test_npz_without_x_y(tmp_path):
    np.savez(tmp_path / "train.npz", features=np.zeros((2, 2)))
    with pytest.raises(DataError, match="needs 'x' and 'y'"):
        load_resident(tmp_path)


def test_npz_with_objects_is_refused_not_unpickled(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(DataError, match="unpickling"):
        load_resident(tmp_path)


def test_labels_outside_classes():
    with pytest.raises(DataError, match="outside the model's 10 classes"):
        check_labels(np.array([0, 3, 12]), 10, "region x")


def test_unknown_source():
    with pytest.raises(DataError, match="unknown dataset source"):
        load_source("imagenet", "/tmp")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("row", [0, 7])
def test_nan_or_inf_samples_are_refused_naming_the_row(tmp_path, bad, row):
    x = np.ones((10, 4), dtype=np.float32)
    x[row, 2] = bad
    np.savez(tmp_path / "train.npz", x=x, y=np.zeros(10, dtype=np.int64))
    with pytest.raises(DataError, match=rf"1 sample\(s\) hold NaN or Inf values \(first: row {row}\)"):
        load_resident(tmp_path)


def test_a_region_with_nan_data_is_refused_before_training_and_the_others_train(tmp_path):
    fed = Federation(tmp_path, topology())
    shard = np.load(tmp_path / "slow" / "train.npz")
    x = shard["x"].copy()
    x[3, 0, 0, 0] = np.nan
    np.savez(tmp_path / "slow" / "train.npz", x=x, y=shard["y"])
    ma = ModelAveraging(lr=0.1, local_steps=2, meter=fed.meter())
    ma.start(fed.grid, fed.initial, num_rounds=2, train_config=fed.config, evaluate_fn=fed.evaluator())
    failed = [e for e in ma.history.events if e["event"] == "region_failed"]
    assert len(failed) == 1 and "NaN or Inf" in failed[0]["reason"]
    assert ma.roster.live_names() == {"fast"} and ma.history.counters["rejected_updates"] == 0
