"""Shared fixtures: an isolated cache, a tiny 2-region topology, split digits data."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cloudless_fl.control.clock import WallClock

# Tests fork (in-region worker groups, tests/test_workers.py) from this process after others ran PyTorch, and a
# forked child cannot use an OpenMP thread team its parent started. One intra-op thread in the test process starts
# no team; the models here are too small to gain from more. (One rank hang blamed on this was a timed kill in
# test_workers.py instead: docs/testing.md.)
torch.set_num_threads(1)

TWO_REGIONS = {
    "name": "two",
    "coordinator": "fast",
    "fluctuation": {"window_s": 30, "sigma": 0.0},
    "regions": {
        "fast": {"workers": {"min": 1, "max": 2}, "samples_per_s": 1000, "efficiency": 1.0,
                 "usd_per_worker_hour": 3.6, "egress_usd_per_gb": 0.1,
                 "link": {"up_mbps": 1000, "down_mbps": 1000, "latency_ms": 0}, "data_share": 0.5},
        "slow": {"workers": {"min": 1, "max": 2}, "samples_per_s": 100, "efficiency": 1.0,
                 "usd_per_worker_hour": 1.8, "egress_usd_per_gb": 0.1,
                 "link": {"up_mbps": 80, "down_mbps": 80, "latency_ms": 10}, "data_share": 0.5},
    },
}


class SetClock(WallClock):
    """A measured clock the test moves by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.t = 0.0

    def now(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Splits written by runs go to a per-session temp cache, never ~/.cache."""
    monkeypatch.setenv("CLOUDLESS_FL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def two_region_topology(tmp_path) -> Path:
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(TWO_REGIONS))
    return path


def small_run_overrides(topology: Path, run_dir: Path | None = None, **extra) -> list[str]:
    """A fast in-process run on two regions (small MLP, few rounds)."""
    overrides = [f"topology_file={topology}", "engine=inprocess", "progress=false",
                 "model.options.hidden=[64]", "strategy.num_rounds=3"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return overrides


@contextlib.contextmanager
def app_modules(folder: Path, *names: str):
    """Import a Flower app's own modules (`client_app`, `task`, ...) from its folder, then forget them."""
    sys.path.insert(0, str(folder))
    try:
        yield tuple(importlib.import_module(name) for name in names)
    finally:
        sys.path.remove(str(folder))
        for name in (*names, "task"):
            sys.modules.pop(name, None)


def modelled_baseline_s(cfg) -> float:
    """What `strategy.stop.max_time_s: auto` is under the virtual clock for `cfg`'s topology, data and model."""
    from cloudless_fl.config import prepare_data, topology_of
    from cloudless_fl.control.budget import baseline_time_s
    from cloudless_fl.server_app import resident_sizes
    from cloudless_fl.training.compression import make_codec, wire_bytes
    from cloudless_fl.training.models import build_model

    topology, layout = topology_of(cfg), prepare_data(cfg)
    model = build_model(cfg.model.name, layout.input_shape, layout.num_classes, **cfg.model.options)
    return baseline_time_s(topology, resident_sizes(topology, layout), wire_bytes(make_codec("none"),
                                                                                  model.state_dict()))
