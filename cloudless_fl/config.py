"""From a Hydra config to what a run needs: topology, data layout, validated options.

Hydra composes the config (`conf/`); this module resolves the parts Hydra cannot:
a topology or dataset given as a file path, the on-disk split of the data, and
the `flwr run .` run-config keys, which map onto the same Hydra config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from .config_schema import check_config
from .control.topology import Topology, load_topology
from .errors import ConfigError, DataError
from .strategy.registry import STRATEGIES
from .training.data import Arrays, load_npz, load_source, read_manifest, split_dataset



def conf_dir() -> Path:
    """The directory holding Hydra's config groups: `conf/`, installed as the package `cloudless_fl.conf`."""
    from importlib.resources import files

    return Path(str(files("cloudless_fl.conf")))


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the Hydra config outside a Hydra app (tests, `flwr run`, `plan`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(f"invalid config override: {exc}") from exc


def config_from_run_config(run_config: dict[str, Any]) -> DictConfig:
    """Map `[tool.flwr.app.config]` keys (or `flwr run --run-config`) onto the Hydra config."""
    overrides = []
    for key in ("strategy", "topology", "dataset", "model"):
        if key in run_config:
            overrides.append(f"{key}={run_config[key]}")
    if "seed" in run_config:
        overrides.append(f"seed={run_config['seed']}")
    if "num-rounds" in run_config:
        overrides.append(f"strategy.num_rounds={run_config['num-rounds']}")
    overrides += shlex.split(str(run_config.get("overrides", "")))
    return compose(overrides)


def topology_of(cfg: DictConfig) -> Topology:
    """The run's topology: `topology_file` when set, else the `topology` group."""
    if cfg.get("topology_file"):
        return load_topology(cfg.topology_file)
    return load_topology(OmegaConf.to_container(cfg.topology, resolve=True))


def topology_spec(cfg: DictConfig) -> dict[str, Any]:
    """The run's topology as written (for results.json); `topology_of` has already validated it."""
    if cfg.get("topology_file"):
        return dict(yaml.safe_load(Path(cfg.topology_file).read_text()))
    return OmegaConf.to_container(cfg.topology, resolve=True)


def dataset_cfg(cfg: DictConfig) -> DictConfig:
    """The run's dataset section: `dataset_file` when set, else the `dataset` group."""
    if cfg.get("dataset_file"):
        path = Path(cfg.dataset_file)
        if not path.is_file():
            raise ConfigError(f"dataset_file {path} does not exist; pass the path of a dataset YAML")
        return OmegaConf.create(yaml.safe_load(path.read_text()))
    return cfg.dataset


def validate(cfg: DictConfig) -> None:
    """Every config key against its allowed values (`config_schema`), before anything starts; a per-region
    setting given as a mapping must name every region of the topology, and only those."""
    schema = STRATEGIES[cfg.strategy.name].schema if cfg.strategy.name in STRATEGIES else {}
    check_config(cfg, {name: entry.schema for name, entry in STRATEGIES.items()})
    _refuse_unknown_keys(cfg)
    regions = set(topology_of(cfg).region_names)
    for key, rule in schema.items():
        value = OmegaConf.select(cfg, key)
        if getattr(rule, "per_region", False) and isinstance(value, DictConfig):
            _every_region(key, value, regions, "or one number for all")
    if cfg.region_nodes is not None:
        _every_region("region_nodes", cfg.region_nodes, regions, "(each its SuperNode's id)")
        for region, node in cfg.region_nodes.items():
            if isinstance(node, bool) or not isinstance(node, int):
                raise ConfigError(f"region_nodes.{region}={node!r} must be a node id (an integer)")


def _every_region(key: str, value: Any, regions: set[str], otherwise: str) -> None:
    """A per-region mapping must name every region of the topology, and only those."""
    if not isinstance(value, (DictConfig, dict)):
        raise ConfigError(f"{key} must map each region of the topology to a value {otherwise}")
    missing, unknown = sorted(regions - set(value)), sorted(set(value) - regions)
    if missing or unknown:
        raise ConfigError(f"{key} must give a value for every region of the topology ("
                          + "; ".join(part for part in (f"missing: {', '.join(missing)}" if missing else "",
                                                         f"unknown: {', '.join(unknown)}" if unknown else "")
                                      if part)
                          + f") {otherwise}")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys → leaf values (an empty mapping is a leaf)."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def under(key: str, prefixes) -> bool:
    """`key` is one of `prefixes` or lies below one of them."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@lru_cache(maxsize=None)
def _known_keys(strategy: str, scheduler: str, compression: str) -> frozenset[str]:
    """The keys of config.yaml, of the experiment files, of every file of the dataset and model groups,
    and of the chosen strategy's, scheduler's and compression's files (the topology section has its own
    strict check)."""
    root, chosen = conf_dir(), {"strategy": strategy, "scheduler": scheduler, "compression": compression}
    known = set()
    for file in [root / "config.yaml", *root.glob("*/*.yaml")]:
        raw = yaml.safe_load(file.read_text()) or {}
        group = file.parent.name if file.parent != root else ""
        if group == "topology" or (group in chosen and raw.get("name") != chosen[group]):
            continue
        raw.pop("defaults", None)
        known |= set(flatten(raw, group if group in ("strategy", "scheduler", "compression", "dataset", "model")
                             else ""))
    return frozenset(known)


def _refuse_unknown_keys(cfg: DictConfig) -> None:
    """A key no conf/ file defines (`+foo=1`, `+strategy.lcoal_steps=3`) is read by nothing: refuse it.
    A per-region mapping may stand where a value is known."""
    known = _known_keys(cfg.strategy.name, cfg.scheduler.name, cfg.compression.name)
    given = flatten({k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("hydra", "topology")})
    for key in sorted(given):
        if not under(key, known):
            raise ConfigError(f"config key {key} is not a setting of cloudless-fl (was it added with +{key}=...?): "
                              "check its spelling against conf/ (the chosen strategy's and scheduler's files, "
                              "config.yaml) or remove it")


@dataclass
class DataLayout:
    """Where each region's resident data lies, and the coordinator's test set."""

    root: Path
    test: Arrays
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.test.x.shape[1:])


def cache_dir() -> Path:
    return Path(os.environ.get("CLOUDLESS_FL_CACHE", Path.home() / ".cache" / "cloudless-fl"))


def data_digest(root: Path) -> str:
    """SHA-256 over every file under `root` (relative path and contents): a resume must see the same data."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def check_presplit(topology: Topology, root: Path) -> None:
    """Refuse a folder that is no per-region split for `topology`: a sub-folder per region and test.npz."""
    missing = [r for r in topology.region_names if not (root / r).exists()]
    if missing:
        raise DataError(f"{root} has no folder for region(s) {', '.join(missing)}; its sub-folders must match the "
                        f"topology's regions ({', '.join(topology.region_names)}): write them with "
                        f"`cloudless-fl data split --topology <this topology> --source <source> --out {root}`")
    if not (root / "test.npz").is_file():
        raise DataError(f"{root} has no test.npz for central evaluation; write one (x, y), or split with "
                        "`cloudless-fl data split`")


def prepare_data(cfg: DictConfig) -> DataLayout:
    """Resolve (and, for a source dataset, write once into the cache) the per-region split."""
    ds = dataset_cfg(cfg)
    topology = topology_of(cfg)
    if ds.source == "presplit":
        if ds.get("root") in (None, "???") or OmegaConf.is_missing(ds, "root"):
            raise ConfigError("dataset=npz needs dataset.root=<folder with one sub-folder per region and test.npz>")
        root = Path(ds.root)
    else:
        if OmegaConf.is_missing(ds, "root"):
            raise ConfigError(f"dataset={ds.name} needs dataset.root=<folder holding the {ds.name} files>")
        split = dict(ds.split)
        key = json.dumps({"source": ds.source, "root": str(Path(ds.root).resolve()) if ds.root else None,
                          "shares": topology.shares(), **split}, sort_keys=True)
        root = cache_dir() / "splits" / f"{ds.source}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        if read_manifest(root) is None:
            split_dataset(load_source(ds.source, ds.root), topology.shares(), root, **split)
    check_presplit(topology, root)
    test, _ = load_npz(root / "test.npz")
    num_classes = int(ds.num_classes) if ds.get("num_classes") else int(np.max(test.y)) + 1
    return DataLayout(root=root, test=test, num_classes=num_classes)
