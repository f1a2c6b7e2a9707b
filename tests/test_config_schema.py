"""Config validation: fuzzed values for every key raise our ConfigError exactly when a rule forbids them."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from cloudless_fl.config import compose, validate
from cloudless_fl.config_schema import COMMON, SCHEDULER
from cloudless_fl.errors import ConfigError
from cloudless_fl.strategy.registry import STRATEGIES

BASES = {(strategy, scheduler): compose([f"strategy={strategy}", f"scheduler={scheduler}"])
         for strategy in STRATEGIES for scheduler in SCHEDULER}
KEYS = sorted({*COMMON, *(k for entry in STRATEGIES.values() for k in entry.schema),
               *(k for rules in SCHEDULER.values() for k in rules)})
values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.one_of(st.integers(), st.floats(), st.text(max_size=3)),
                                   max_size=3))


def test_the_defaults_pass():
    for cfg in BASES.values():
        validate(cfg)


ABSENT = object()
GEO4 = {"ap-beijing", "ap-shanghai", "ap-guangzhou", "ap-chengdu"}  # the bases' topology


@settings(max_examples=500, deadline=None)
@example(base=("asgd_ga", "elastic"), changes=[("checkpoint.at_end", "${")])  # drawn once: a literal `${`
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
        node[leaf] = _literal(value)
    cfg = OmegaConf.create(raw)
    strategy, scheduler = base
    rules = {**COMMON, **STRATEGIES[strategy].schema, **SCHEDULER[scheduler]}
    final = dict(changes)
    forbidden = [key for key, rule in rules.items() if key in final and not _allows(rule, key, final[key])]
    foreign = sorted(key for key in final if OmegaConf.select(BASES[base], key, default=ABSENT) is ABSENT)
    if forbidden:  # the first rule that forbids its value names its key
        with pytest.raises(ConfigError, match=re.escape(forbidden[0])):
            validate(cfg)
    elif foreign:  # another strategy's or scheduler's key: nothing in this run reads it
        named = r"(?s)" + re.escape(f"config key {foreign[0]}") + r"(\..*)? is not a setting"  # (?s): keys may hold \n
        with pytest.raises(ConfigError, match=named):
            validate(cfg)
    elif partial := [key for key, rule in STRATEGIES[strategy].schema.items() if key in final
                     and getattr(rule, "per_region", False) and isinstance(final[key], dict)
                     and set(final[key]) != GEO4]:  # a per-region mapping must name exactly the regions
        with pytest.raises(ConfigError, match=re.escape(partial[0]) + " must give a value for every region"):
            validate(cfg)
    else:
        validate(cfg)


def _literal(value):
    """`value` as OmegaConf holds it verbatim: a `${` in drawn text is escaped (`\\${`), its backslashes doubled."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", value)
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    return value


def _allows(rule, key, value) -> bool:
    try:
        rule.check(key, value)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("key, value", [("strategy.lr", 0), ("strategy.lr", -0.1), ("strategy.batch_size", 2.5),
                                        ("seed", "one"), ("validation.on_norm", "ignore"),
                                        ("strategy.local_steps", {"ap-beijing": 0}), ("target_accuracy", 0.0),
                                        ("strategy.stop.at_target", "yes"), ("checkpoint.every", -1)])
def test_each_kind_of_bad_value_is_refused_naming_its_key(key, value):
    cfg = compose(["strategy=ma"])
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(cfg)


@pytest.mark.parametrize("key", ["strategy.lr", "checkpoint.at_end"])
def test_an_interpolation_that_cannot_resolve_is_refused_naming_its_key(key):
    with pytest.raises(ConfigError, match=re.escape(f"config key {key} holds an interpolation that cannot be resolved "
                                                    "(Interpolation key 'nowhere' not found)")):
        validate(compose(["strategy=ma", f"{key}=${{nowhere}}"]))


@pytest.mark.parametrize("override, key", [("+foo=1", "foo"), ("+strategy.lcoal_steps=3", "strategy.lcoal_steps"),
                                           ("+strategy.tau_max=3", "strategy.tau_max"),  # ASGD-GA's, not MA's
                                           ("+validation.max_nrom=5", "validation.max_nrom")])
def test_a_key_nothing_reads_is_refused_by_name(override, key):
    with pytest.raises(ConfigError, match=rf"config key {key} is not a setting of cloudless-fl"):
        validate(compose(["strategy=ma", override]))


@pytest.mark.parametrize("overrides", [["+experiment=cost_utilisation"], ["strategy=asgd_ga_delta", "scheduler=elastic"],
                                       ["strategy=ma", "strategy.local_steps={ap-beijing:10,ap-chengdu:10,"
                                                       "ap-guangzhou:10,ap-shanghai:10}"]])
def test_every_key_conf_defines_is_accepted(overrides):
    validate(compose(overrides))
