"""Region profiles: who trains where, how fast, at what price, over which link.

A `Topology` is plain validated data loaded from `conf/topology/*.yaml` (or any
YAML path). The cost model and the scheduler read it; nothing here computes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

_SHARE_TOLERANCE = 1e-6
TOPOLOGY_KEYS = ("name", "coordinator", "regions", "fluctuation", "free_communication")
REGION_KEYS = ("workers", "samples_per_s", "efficiency", "usd_per_worker_hour", "egress_usd_per_gb", "link",
               "data_share", "cold_start_usd", "job_start_s")
LINK_KEYS = ("up_mbps", "down_mbps", "latency_ms", "trace")
WORKER_KEYS = ("min", "max")
FLUCTUATION_KEYS = ("window_s", "sigma", "dip_probability", "dip_factor")


def _known_keys(raw: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """A typo in an optional key must not fall back to its default silently."""
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class Fluctuation:
    """Seeded bandwidth fluctuation shared by every link of a topology.

    Each `window_s` window draws a lognormal factor (median 1, `sigma`); with
    probability `dip_probability` the window instead drops to `dip_factor` of the
    nominal bandwidth.
    """

    window_s: float = 30.0
    sigma: float = 0.0
    dip_probability: float = 0.0
    dip_factor: float = 0.1


@dataclass(frozen=True)
class Link:
    """The WAN link between a region and the coordinator."""

    up_mbps: float
    down_mbps: float
    latency_ms: float
    trace: Path | None = None  # CSV `t_seconds,mbps`; replaces the fluctuation model


@dataclass(frozen=True)
class Region:
    """One cloud region's resources, prices and resident-data share."""

    name: str
    workers_min: int
    workers_max: int
    samples_per_s: float  # per worker, for the model in use
    efficiency: float  # intra-region scaling efficiency eta
    usd_per_worker_hour: float
    egress_usd_per_gb: float
    link: Link
    data_share: float
    cold_start_usd: float = 0.0  # serverless billing: charge per invocation
    job_start_s: float = 0.0  # fixed seconds per job before it computes (process start, imports, data loading)
    # measured, never in a profile: (workers, group efficiency relative to the smallest count measured), ascending
    scaling: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Topology:
    """A validated set of regions plus the coordinator's location."""

    name: str
    coordinator: str
    regions: tuple[Region, ...]
    fluctuation: Fluctuation = field(default_factory=Fluctuation)
    free_communication: bool = False  # the Ideal reference: instant, free transfers

    @property
    def region_names(self) -> list[str]:
        return [r.name for r in self.regions]

    def region(self, name: str) -> Region:
        by_name = self.__dict__.get("_by_name")
        if by_name is None:  # frozen dataclass: cache the index without __setattr__
            by_name = {r.name: r for r in self.regions}
            object.__setattr__(self, "_by_name", by_name)
        if name in by_name:
            return by_name[name]
        raise ConfigError(
            f"unknown region {name!r} in topology {self.name!r}; "
            f"known regions: {', '.join(self.region_names)}"
        )

    def shares(self) -> dict[str, float]:
        return {r.name: r.data_share for r in self.regions}


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice (two regions of one name would silently become one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice; each key "
                                                        "(each region's name) must be unique", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_topology(source: str | Path | Mapping[str, Any]) -> Topology:
    """Load and validate a topology from a YAML path or an already-parsed mapping."""
    if isinstance(source, Mapping):
        raw, origin = dict(source), "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(
                f"topology file {path} does not exist; pass a preset name "
                "(geo4, geo4-fluct, lan) or the path of a topology YAML file"
            )
        try:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"topology file {path} is not valid YAML: {exc}") from exc
        origin = str(path)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"topology file {path} must hold a mapping at top level")
        raw = dict(raw)
    return _parse_topology(raw, origin)


def _parse_topology(raw: dict[str, Any], origin: str) -> Topology:
    where = f"topology ({origin})"
    _known_keys(raw, TOPOLOGY_KEYS, where)
    name = str(raw.get("name", "unnamed"))
    regions_raw = raw.get("regions")
    if not isinstance(regions_raw, Mapping) or not regions_raw:
        raise ConfigError(f"{where}: 'regions' must be a non-empty mapping of region name to profile")
    regions = tuple(_parse_region(str(rn), dict(rr or {}), where) for rn, rr in regions_raw.items())
    coordinator = str(raw.get("coordinator", regions[0].name))
    if coordinator not in {r.name for r in regions}:
        raise ConfigError(
            f"{where}: coordinator {coordinator!r} is not one of the regions "
            f"({', '.join(r.name for r in regions)}); set 'coordinator' to a region name"
        )
    total = sum(r.data_share for r in regions)
    if abs(total - 1.0) > _SHARE_TOLERANCE:
        raise ConfigError(
            f"{where}: data_share values sum to {total:.6g}, they must sum to 1; "
            "fix the shares so they add up to 1"
        )
    fluct = _parse_fluctuation(dict(raw.get("fluctuation") or {}), where)
    return Topology(
        name=name,
        coordinator=coordinator,
        regions=regions,
        fluctuation=fluct,
        free_communication=bool(raw.get("free_communication", False)),
    )


def _number(raw: Mapping[str, Any], key: str, where: str, *, low: float, high: float = math.inf,
            low_inclusive: bool = True, default: float | None = None) -> float:
    if key not in raw:
        if default is not None:
            return default
        raise ConfigError(f"{where}: missing required key '{key}'")
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    value = float(value)
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high or math.isnan(value):
        bound = "≥" if low_inclusive else ">"
        upper = "" if math.isinf(high) else f" and ≤ {high:g}"
        raise ConfigError(f"{where}: '{key}' = {value:g} is out of range; it must be {bound} {low:g}{upper}")
    return value


def _parse_region(name: str, raw: dict[str, Any], where: str) -> Region:
    here = f"{where}, region {name!r}"
    _known_keys(raw, REGION_KEYS, here)
    workers = raw.get("workers", {"min": 1, "max": 1})
    if not isinstance(workers, Mapping):
        raise ConfigError(f"{here}: 'workers' must be a mapping with 'min' and 'max'")
    _known_keys(workers, WORKER_KEYS, here + " workers")
    wmin = int(_number(workers, "min", here + " workers", low=1))
    wmax = int(_number(workers, "max", here + " workers", low=1))
    if wmin > wmax:
        raise ConfigError(f"{here}: workers min ({wmin}) exceeds max ({wmax}); make min ≤ max")
    link_raw = raw.get("link")
    if not isinstance(link_raw, Mapping):
        raise ConfigError(f"{here}: missing 'link' mapping (up_mbps, down_mbps, latency_ms)")
    _known_keys(link_raw, LINK_KEYS, here + " link")
    trace = link_raw.get("trace")
    link = Link(
        up_mbps=_number(link_raw, "up_mbps", here + " link", low=0, low_inclusive=False),
        down_mbps=_number(link_raw, "down_mbps", here + " link", low=0, low_inclusive=False),
        latency_ms=_number(link_raw, "latency_ms", here + " link", low=0),
        trace=Path(trace) if trace else None,
    )
    return Region(
        name=name,
        workers_min=wmin,
        workers_max=wmax,
        samples_per_s=_number(raw, "samples_per_s", here, low=0, low_inclusive=False),
        efficiency=_number(raw, "efficiency", here, low=0, high=1, low_inclusive=False, default=1.0),
        usd_per_worker_hour=_number(raw, "usd_per_worker_hour", here, low=0),
        egress_usd_per_gb=_number(raw, "egress_usd_per_gb", here, low=0),
        link=link,
        data_share=_number(raw, "data_share", here, low=0, high=1),
        cold_start_usd=_number(raw, "cold_start_usd", here, low=0, default=0.0),
        job_start_s=_number(raw, "job_start_s", here, low=0, default=0.0),
    )


def _parse_fluctuation(raw: dict[str, Any], where: str) -> Fluctuation:
    here = f"{where}, fluctuation"
    _known_keys(raw, FLUCTUATION_KEYS, here)
    return Fluctuation(
        window_s=_number(raw, "window_s", here, low=0, low_inclusive=False, default=30.0),
        sigma=_number(raw, "sigma", here, low=0, default=0.0),
        dip_probability=_number(raw, "dip_probability", here, low=0, high=1, default=0.0),
        dip_factor=_number(raw, "dip_factor", here, low=0, high=1, low_inclusive=False, default=0.1),
    )
