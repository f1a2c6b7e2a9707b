"""The strategy registry: every config choice has one entry, and its schema covers every key it reads."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cloudless_fl.config import conf_dir
from cloudless_fl.errors import ConfigError
from cloudless_fl.strategy.registry import STRATEGIES, strategy_entry


def _leaf_keys(node, prefix: str) -> set[str]:
    keys = set()
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict) and not key.endswith("steps"):  # per-region mappings are values
            keys |= _leaf_keys(value, path)
        else:
            keys.add(path)
    return keys


def test_every_strategy_file_has_an_entry_and_every_entry_a_file():
    files = {p.stem for p in (conf_dir() / "strategy").glob("*.yaml")}
    assert files == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_an_entrys_schema_checks_every_key_of_its_config_file(name):
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir() / "strategy" / f"{name}.yaml"))
    assert raw["name"] == name
    keys = _leaf_keys(raw, "strategy") - {"strategy.name"}
    assert keys == set(strategy_entry(name).schema)


def test_an_unknown_strategy_names_the_choices():
    with pytest.raises(ConfigError, match="fedavg, ma, asgd_ga, asgd_ga_delta"):
        strategy_entry("fedprox")


def test_units_and_local_work():
    assert {n: e.unit for n, e in STRATEGIES.items()} == {
        "fedavg": "round", "ma": "period", "asgd_ga": "version", "asgd_ga_delta": "version"}
    assert [n for n, e in STRATEGIES.items() if e.epoch_based] == ["fedavg"]
    assert [n for n, e in STRATEGIES.items() if e.fills_idle_time] == ["ma"]
