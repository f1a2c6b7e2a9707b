"""Resident data: what one region can read from its own disk, and the split tool.

A region only ever loads its own folder (`load_resident`). Formats, auto-detected
or named: `.npz` (`x`, `y`, optional `x_test`, `y_test`), a torchvision root
(MNIST, FashionMNIST, CIFAR-10; never downloaded) and ImageFolder. The split tool
(`split_dataset`) writes the one layout demos and tests use:
`<out>/<region>/train.npz` per region and `<out>/test.npz` for the coordinator.
Arrays are float32 `(N, C, H, W)` images or `(N, D)` features, int64 labels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, atomic_write_text
from ..errors import DataError

FORMATS = ("auto", "npz", "mnist", "fashionmnist", "cifar10", "imagefolder")
SOURCES = ("digits", "tabular", "npz", "mnist", "fashionmnist", "cifar10", "imagefolder")
MANIFEST = "split.json"


@dataclass
class Arrays:
    """A labelled sample set."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class ResidentData:
    """One region's data: its training set and, if it has one, a local test set."""

    train: Arrays
    test: Arrays | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


# --------------------------------------------------------------------------- loading


def load_resident(data_dir: str | Path, fmt: str = "auto") -> ResidentData:
    """Load one region's resident data from `data_dir` (never unpickles, never downloads)."""
    path = Path(data_dir)
    if not path.exists():
        raise DataError(f"data-dir {path} does not exist; point the region's data-dir at its resident data")
    if path.is_dir() and not any(path.iterdir()):
        raise DataError(f"data-dir {path} is empty; write the region's shard there (cloudless-fl data split ...)")
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "npz":
        return _load_npz_region(path)
    if fmt == "imagefolder":
        train_dir = path / "train" if (path / "train").is_dir() else path
        test_dir = path / "test" if (path / "test").is_dir() else None
        return ResidentData(_load_imagefolder(train_dir), _load_imagefolder(test_dir) if test_dir else None)
    return ResidentData(_load_torchvision(fmt, path, train=True), _try_torchvision_test(fmt, path))


def detect_format(path: Path) -> str:
    """Guess a region folder's format from what is on disk."""
    if path.is_file() and path.suffix == ".npz":
        return "npz"
    if (path / "train.npz").is_file() or list(path.glob("*.npz")):
        return "npz"
    if (path / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if (path / "FashionMNIST" / "raw").is_dir():
        return "fashionmnist"
    if (path / "MNIST" / "raw").is_dir():
        return "mnist"
    if any(p.is_dir() for p in path.iterdir()):
        return "imagefolder"
    raise DataError(
        f"cannot tell the data format of {path}: expected train.npz, a torchvision root "
        "(MNIST/, FashionMNIST/, cifar-10-batches-py/) or ImageFolder class folders; "
        "set the format explicitly or write shards with `cloudless-fl data split`"
    )


def load_npz(file: str | Path) -> tuple[Arrays, Arrays | None]:
    """Read `x`, `y` (and optional `x_test`, `y_test`) from an `.npz` without unpickling."""
    file = Path(file)
    try:
        with np.load(file, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"x", "y"} <= keys:
                raise DataError(
                    f"{file} has arrays {sorted(keys)} but needs 'x' and 'y'; "
                    "save it with np.savez(file, x=features, y=labels)"
                )
            train = _as_arrays(z["x"], z["y"], file)
            test = _as_arrays(z["x_test"], z["y_test"], file) if {"x_test", "y_test"} <= keys else None
    except DataError:
        raise
    except ValueError as exc:  # object arrays need pickle: refused on purpose
        raise DataError(f"{file} cannot be read without unpickling ({exc}); store plain numeric arrays") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"{file} is not a readable .npz file ({exc})") from exc
    return train, test


def _load_npz_region(path: Path) -> ResidentData:
    if path.is_file():
        file = path
    elif (path / "train.npz").is_file():
        file = path / "train.npz"
    else:
        candidates = sorted(path.glob("*.npz"))
        if len(candidates) != 1:
            raise DataError(f"{path} holds {len(candidates)} .npz files; name the training one train.npz")
        file = candidates[0]
    train, test = load_npz(file)
    if test is None and file.name == "train.npz" and (file.parent / "test.npz").is_file():
        test, _ = load_npz(file.parent / "test.npz")
    return ResidentData(train, test)


def _as_arrays(x: np.ndarray, y: np.ndarray, origin: Path | str) -> Arrays:
    if len(x) != len(y):
        raise DataError(f"{origin}: x has {len(x)} rows but y has {len(y)}; they must match")
    if len(y) == 0:
        raise DataError(f"{origin}: holds no samples")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{origin}: labels y must be integers, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{origin}: labels must be ≥ 0, found {int(y.min())}")
    return Arrays(_to_float_images(x, origin), y.astype(np.int64).reshape(-1))


def _to_float_images(x: np.ndarray, origin: Path | str) -> np.ndarray:
    """Normalise to float32 `(N, D)` or `(N, C, H, W)`; integer pixels are scaled to [0, 1]."""
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{origin}: x must be numeric, got dtype {x.dtype}")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float32) / scale
    if x.ndim == 3:  # (N, H, W) grey images
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # NHWC
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif x.ndim not in (2, 4):
        raise DataError(f"{origin}: x must be (N, D), (N, H, W) or (N, C, H, W); got shape {x.shape}")
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():  # one NaN row would make every update of this region NaN: refuse it before training
        raise DataError(f"{origin}: {int(bad.sum())} sample(s) hold NaN or Inf values (first: row "
                        f"{int(np.argmax(bad))}); drop or repair those rows")
    return x


_TV_CLASSES = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10"}


def _load_torchvision(fmt: str, root: Path, train: bool) -> Arrays:
    import torchvision.datasets as tvd

    try:
        ds = getattr(tvd, _TV_CLASSES[fmt])(root=str(root), train=train, download=False)
    except RuntimeError as exc:  # torchvision says "Dataset not found"
        raise DataError(
            f"{root} is not a {_TV_CLASSES[fmt]} root ({exc}); place the dataset files there "
            "(downloads are disabled)"
        ) from exc
    data = ds.data.numpy() if hasattr(ds.data, "numpy") else np.asarray(ds.data)
    return _as_arrays(data, np.asarray(ds.targets), root)


def _try_torchvision_test(fmt: str, root: Path) -> Arrays | None:
    try:
        return _load_torchvision(fmt, root, train=False)
    except DataError:
        return None


def _load_imagefolder(root: Path) -> Arrays:
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{root} is not an ImageFolder (one sub-folder of images per class): {exc}") from exc
    images = [np.asarray(ds.loader(p).convert("RGB")) for p, _ in ds.samples]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"{root}: images have different sizes {sorted(shapes)[:3]}...; resize them to one size")
    return _as_arrays(np.stack(images).astype(np.uint8), np.array([t for _, t in ds.samples]), root)


def load_source(source: str, root: str | Path | None = None) -> Arrays:
    """Load a whole dataset that the split tool will divide among regions."""
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
        return Arrays(x, digits.target.astype(np.int64))
    if source == "tabular":
        return _generated_tabular()
    if source not in SOURCES:
        raise DataError(f"unknown dataset source {source!r}; use one of {', '.join(SOURCES)}")
    if root is None:
        raise DataError(f"dataset source {source!r} needs a root folder; set dataset.root=<path>")
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist; set dataset.root to the folder holding the data")
    if source == "npz":
        train, test = load_npz(root if root.is_file() else root / "data.npz")
        return train if test is None else Arrays(np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y]))
    if source == "imagefolder":
        return _load_imagefolder(root)
    train = _load_torchvision(source, root, train=True)
    test = _try_torchvision_test(source, root)
    return train if test is None else Arrays(np.concatenate([train.x, test.x]), np.concatenate([train.y, test.y]))


def _generated_tabular() -> Arrays:
    """A fixed tabular task, generated (never downloaded): 8,000 rows, 40 features, 10 classes.

    scikit-learn's `make_classification` (Guyon's Madelon design): each class is two
    Gaussian clusters on the vertices of a 12-dimensional hypercube, 12 redundant
    (linear mixes) and 16 noise features, 2 % of labels flipped; features
    standardised. A workload away from images: no spatial structure to exploit.
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=8000, n_features=40, n_informative=12, n_redundant=12, n_classes=10,
        n_clusters_per_class=2, class_sep=2.0, flip_y=0.02, random_state=0,
    )
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return Arrays(x.astype(np.float32), y.astype(np.int64))


# --------------------------------------------------------------------------- splitting


def split_dataset(
    data: Arrays,
    shares: Mapping[str, float],
    out: str | Path,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    test_seed: int = 0,
) -> dict[str, int]:
    """Write per-region shards with Dirichlet(alpha) label skew; return region sizes.

    The held-out test split (stratified, `test_seed`) goes to `<out>/test.npz`;
    the rest is divided so each region's size follows its share. Every file is
    written atomically and the manifest last, so a crash leaves no half split.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if alpha <= 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    out = Path(out)
    idx = np.arange(len(data))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=test_seed, stratify=data.y)
    assignment = dirichlet_assignment(data.y[train_idx], shares, alpha=alpha, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_savez(out / "test.npz", x=data.x[test_idx], y=data.y[test_idx])
    sizes = {}
    for region, rows in assignment.items():
        chosen = train_idx[rows]
        (out / region).mkdir(exist_ok=True)
        _atomic_savez(out / region / "train.npz", x=data.x[chosen], y=data.y[chosen])
        sizes[region] = int(len(chosen))
    manifest = {"regions": sizes, "test": int(len(test_idx)), "alpha": alpha, "seed": seed,
                "test_fraction": test_fraction, "test_seed": test_seed}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return sizes


def dirichlet_assignment(
    labels: np.ndarray, shares: Mapping[str, float], *, alpha: float, seed: int
) -> dict[str, np.ndarray]:
    """Partition row indices of `labels` into regions sized by `shares`, label-skewed.

    Each region draws class proportions from Dirichlet(alpha) and fills its quota
    from the remaining pool by those proportions (falling back to what is left).
    Regions draw in the order `shares` lists them (the topology's): the same
    topology with its regions listed in another order is another split.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    names = list(shares)
    exact = np.array([shares[r] for r in names]) * n
    quotas = np.floor(exact).astype(int)
    for i in np.argsort(quotas - exact)[: n - quotas.sum()]:  # largest remainders get the leftovers
        quotas[i] += 1
    classes = np.unique(labels)
    pool = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    result: dict[str, np.ndarray] = {}
    for region, quota in zip(names, quotas, strict=True):
        prefs = rng.dirichlet(np.full(len(classes), alpha))
        taken: list[int] = []
        need = int(quota)
        while need > 0:
            avail = np.array([len(pool[c]) for c in classes], dtype=float)
            probs = prefs * (avail > 0)
            probs = probs / probs.sum() if probs.sum() > 0 else avail / avail.sum()
            draw = rng.multinomial(need, probs)
            for c, k in zip(classes, np.minimum(draw, avail.astype(int)), strict=True):
                taken.extend(pool[c][:k])
                del pool[c][:k]
                need -= int(k)
        result[region] = np.sort(np.array(taken, dtype=np.int64))
    return result


def read_manifest(root: str | Path) -> dict | None:
    """The split manifest of a shard folder, or None if the folder holds no complete split."""
    file = Path(root) / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        return None


def check_labels(y: np.ndarray, num_classes: int, origin: str) -> None:
    """Refuse labels the model cannot represent, before any training starts."""
    if len(y) and int(y.max()) >= num_classes:
        raise DataError(
            f"{origin}: label {int(y.max())} is outside the model's {num_classes} classes "
            f"(0..{num_classes - 1}); set dataset.num_classes or fix the labels"
        )


def _atomic_savez(file: Path, **arrays: np.ndarray) -> None:
    atomic_write(file, lambda fh: np.savez(fh, **arrays))
