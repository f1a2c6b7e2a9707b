"""Config validation: fuzzed values for every key raise our ConfigError or pass, nothing else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from cloudless_fl.config import compose, validate
from cloudless_fl.config_schema import COMMON, SCHEDULER, STRATEGY, STRATEGY_COMMON
from cloudless_fl.errors import ConfigError

BASES = {(strategy, scheduler): compose([f"strategy={strategy}", f"scheduler={scheduler}"])
         for strategy in STRATEGY for scheduler in SCHEDULER}
KEYS = sorted({*COMMON, *STRATEGY_COMMON, *(k for rules in STRATEGY.values() for k in rules),
               *(k for rules in SCHEDULER.values() for k in rules)})
values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.floats(), st.text(max_size=3)),
                                   max_size=3))


def test_the_defaults_pass():
    for cfg in BASES.values():
        validate(cfg)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(BASES)), st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=3))
def test_random_values_raise_only_config_errors(base, changes):
    raw = OmegaConf.to_container(BASES[base])
    for key, value in changes:
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    cfg = OmegaConf.create(raw)
    try:
        validate(cfg)
    except ConfigError as exc:
        assert any(key in str(exc) for key, _ in changes) or "strategy" in str(exc) or "scheduler" in str(exc)
