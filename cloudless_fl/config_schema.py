"""What every config key may hold, checked once at start-up.

Hydra composes the config but does not know that a learning rate must be
positive; these rules do. Each failure is a `ConfigError` naming the key, the
value, and what is allowed — before any data is loaded or engine started.
The rules of each strategy live with it in the strategy registry; allowed
choices are the constants of the modules that use them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import GrammarParseError, InterpolationResolutionError, OmegaConfBaseException

from .control.scheduler import BILLINGS, OBJECTIVES
from .errors import ConfigError
from .strategy.validation import AUTO, NORM_POLICIES

INF = math.inf


@dataclass(frozen=True)
class Number:
    """A number in a range; `integer` demands a whole number; `per_region` also accepts {region: value}."""

    low: float = -INF
    high: float = INF
    low_open: bool = False  # True: must be > low
    integer: bool = False
    nullable: bool = False
    per_region: bool = False
    words: tuple[str, ...] = ()  # settings allowed besides numbers (e.g. "auto")

    def check(self, key: str, value: Any) -> None:
        if (value is None and self.nullable) or (isinstance(value, str) and value in self.words):
            return
        if self.per_region and isinstance(value, Mapping):
            if not value:
                raise ConfigError(f"{key} is an empty mapping; give a value per region or one number")
            for region, v in value.items():
                self.check(f"{key}.{region}", v)
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.integer and isinstance(value, float) and not value.is_integer()):
            kind = "an integer" if self.integer else "a number"
            raise ConfigError(f"{key}={value!r} must be {kind}{' or null' if self.nullable else ''}; "
                              f"allowed: {self.allowed()}")
        if math.isnan(value) or value > self.high or value < self.low or (self.low_open and value == self.low):
            raise ConfigError(f"{key}={value!r} is out of range; allowed: {self.allowed()}")

    def allowed(self) -> str:
        low = "" if self.low == -INF else f"{'>' if self.low_open else '≥'} {self.low:g}"
        high = "" if self.high == INF else f"≤ {self.high:g}"
        text = " and ".join(p for p in (low, high) if p) or "any number"
        alternatives = [*self.words, *(["null"] if self.nullable else [])]
        return text + (f" (or {' or '.join(alternatives)})" if alternatives else "")


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def check(self, key: str, value: Any) -> None:
        if value not in self.options:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, self.options))}")


Rule = Number | Choice
POSITIVE = Number(0, low_open=True)
COUNT = Number(1, integer=True)
OPTIONAL_SECONDS = Number(0, low_open=True, nullable=True)
FRACTION = Number(0, 1)
BOOL = Choice((True, False))

COMMON = {
    "seed": Number(integer=True), "target_accuracy": Number(0, 1, low_open=True),
    "engine": Choice(("simulation", "inprocess")), "clock": Choice(("virtual", "wall")), "progress": BOOL,
    "flower_log_level": Choice(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    "validation.max_norm": OPTIONAL_SECONDS, "validation.on_norm": Choice(NORM_POLICIES),
    "validation.quarantine_after": Number(0, integer=True),
    "validation.norm_factor": Number(1, low_open=True, nullable=True),
    "validation.min_agreement": Number(-1, 1, nullable=True),
    "validation.clip_factor": Number(0, low_open=True, nullable=True),
    "validation.share_budget": Number(1, low_open=True, nullable=True),
    "validation.min_relatedness": Number(0, nullable=True, words=(AUTO,)),
    "checkpoint.every": Number(0, integer=True), "checkpoint.at_end": BOOL,
}
SCHEDULER = {
    "none": {},
    "elastic": {"scheduler.objective": Choice(OBJECTIVES),
                "scheduler.deadline_s": OPTIONAL_SECONDS, "scheduler.budget_usd": OPTIONAL_SECONDS,
                "scheduler.usd_per_hour": Number(0), "scheduler.billing": Choice(BILLINGS),
                "scheduler.epochs": POSITIVE, "scheduler.max_steps_factor": Number(1),
                "scheduler.replan_every": COUNT, "scheduler.smoothing": Number(0, 1, low_open=True),
                "scheduler.tolerance": Number(0), "scheduler.min_gain": Number(0, 1, nullable=True),
                "scheduler.max_overhead_share": Number(0, 1, low_open=True, nullable=True)},
}


COMPRESSION = {
    "none": {}, "fp16": {}, "int8": {"compression.chunk": COUNT}, "int4": {"compression.chunk": COUNT},
    "topk": {"compression.fraction": Number(0, 1, low_open=True)},
}


def check_config(cfg: DictConfig, strategies: Mapping[str, Mapping[str, Rule]]) -> None:
    """Every rule that applies to the chosen strategy (`strategies`: name → its rules), scheduler and compression;
    the first failure raises."""
    strategy = _get(cfg, "strategy.name")
    Choice(tuple(strategies)).check("strategy", strategy)
    scheduler = _get(cfg, "scheduler.name")
    Choice(tuple(SCHEDULER)).check("scheduler", scheduler)
    compression = _get(cfg, "compression.name")
    Choice(tuple(COMPRESSION)).check("compression", compression)
    rules = {**COMMON, **strategies[strategy], **SCHEDULER[scheduler], **COMPRESSION[compression]}
    for key, rule in rules.items():
        rule.check(key, _get(cfg, key))


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    try:
        for part in key.split("."):
            if not isinstance(node, (DictConfig, Mapping)) or part not in node:
                raise KeyError(part)
            node = node[part]
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    except (GrammarParseError, InterpolationResolutionError) as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"config key {key} holds an interpolation that cannot be resolved ({reason}); "
                          "point it at an existing key, e.g. ${seed}, or escape a literal $ as \\${") from None
    except (KeyError, OmegaConfBaseException):
        raise ConfigError(f"config key {key} is missing or unset; give it a value (conf/ has the defaults)") from None
