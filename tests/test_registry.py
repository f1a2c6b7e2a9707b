"""The strategy registry: every config choice has one entry, and its schema covers every key it reads."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from cloudless_fl.config import conf_dir
from cloudless_fl.errors import ConfigError
from cloudless_fl.strategy.registry import STRATEGIES, strategy_entry
from cloudless_fl.strategy.runbook import StopRules


def _leaf_keys(node, prefix: str) -> set[str]:
    keys = set()
    for key, value in node.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict) and not key.endswith("steps"):  # per-region mappings are values
            keys |= _leaf_keys(value, path)
        else:
            keys.add(path)
    return keys


GEO4_SIZES = {"ap-beijing": 144, "ap-shanghai": 287, "ap-guangzhou": 431, "ap-chengdu": 575}  # geo4's digits


def _geo4_work():
    from cloudless_fl.control.scheduler import Workload

    return Workload(GEO4_SIZES, model_bytes=4_500_000, base_steps=20, batch_size=32)


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


@pytest.mark.parametrize("strategy, inner", [("fedavg", "FedMedian"), ("ma", None)])
def test_the_aggregation_setting_reaches_the_strategy(strategy, inner):
    from cloudless_fl.config import compose, topology_of
    from cloudless_fl.control.meter import Meter
    from cloudless_fl.server_app import build_strategy

    cfg = compose([f"strategy={strategy}", "strategy.aggregation=median"]
                  + (["strategy.heterogeneity_aware=false"] if strategy == "ma" else []))  # no region model here
    built = build_strategy(cfg, Meter.simulated(topology_of(cfg), 1), num_regions=4)
    if inner:
        assert type(built.inner).__name__ == inner
    else:
        assert built.aggregation == "median"


def test_round_deadlines_refuse_a_robust_rule():
    from cloudless_fl.config import compose, topology_of
    from cloudless_fl.control.meter import Meter
    from cloudless_fl.server_app import build_strategy

    cfg = compose(["strategy=fedavg", "strategy.aggregation=median", "strategy.round_deadline_s=2"])
    with pytest.raises(ConfigError) as refused:
        build_strategy(cfg, Meter.simulated(topology_of(cfg), 1), num_regions=4)
    assert str(refused.value) == "strategy.round_deadline_s works with strategy.aggregation=mean only"


def test_heterogeneity_aware_ma_takes_its_steps_from_the_region_model():
    """geo4, unscheduled, by default: data-share steps (mean 20) for the period-setting region, the others
    filled towards the period (at most 4x their share), weighted by data share; off, or given per region,
    every region does the H it is given; under the scheduler they are the first jobs' work."""
    from cloudless_fl.config import compose, topology_of
    from cloudless_fl.control.meter import Meter
    from cloudless_fl.control.scheduler import Scheduler, Workload
    from cloudless_fl.server_app import build_strategy

    sizes = GEO4_SIZES
    work = Workload(sizes, model_bytes=4_500_000, base_steps=20, batch_size=32, max_steps_factor=1.0)

    def built(*overrides, scheduled=False):
        cfg = compose(["strategy=ma", *overrides])
        scheduler = Scheduler(topology_of(cfg), work) if scheduled else None
        return build_strategy(cfg, Meter.simulated(topology_of(cfg), 1), num_regions=4, work=work,
                              scheduler=scheduler)

    fixed = built("strategy.heterogeneity_aware=false")
    assert fixed.local_steps == 20 and fixed.weight_by == "samples"
    given = {"ap-beijing": 5, "ap-shanghai": 6, "ap-guangzhou": 7, "ap-chengdu": 8}
    as_given = built("+strategy.local_steps={" + ",".join(f"{r}:{h}" for r, h in given.items()) + "}")
    assert as_given.local_steps == given and as_given.weight_by == "samples"
    fitted = built()  # the default
    steps = fitted.local_steps
    assert fitted.weight_by == "shares"
    share = {r: math.ceil(20 * 4 * n / sum(sizes.values())) for r, n in sizes.items()}  # 20 x 4 x data share
    assert steps["ap-chengdu"] == share["ap-chengdu"]  # the slowest (20 Mbps) sets the period with its share
    for region in ("ap-beijing", "ap-shanghai", "ap-guangzhou"):  # the rest fill it, at most 4x
        assert share[region] < steps[region] <= 4 * share[region]
    assert steps["ap-beijing"] == 4 * share["ap-beijing"]  # 4,000 samples/s at 10 Gbps: capped
    scheduled = built(scheduled=True)  # the same work for the first jobs, until its first plan
    assert scheduled.plan is not None and scheduled.local_steps == steps and scheduled.weight_by == "shares"
    cfg = compose(["strategy=ma", "strategy.heterogeneity_aware=true"])
    for meter, given in ((Meter.measured(), work), (Meter.simulated(topology_of(cfg), 1), None)):  # either missing
        with pytest.raises(ConfigError) as refused:
            build_strategy(cfg, meter, num_regions=4, work=given)
        assert str(refused.value) == ("strategy.heterogeneity_aware needs the region model (a topology with its "
                                      "regions' speeds and links); set strategy.heterogeneity_aware=false or give "
                                      "the run a topology")


def _built(*overrides, **kwargs):
    from cloudless_fl.config import compose, topology_of
    from cloudless_fl.control.meter import Meter
    from cloudless_fl.server_app import build_strategy

    cfg = compose(list(overrides))
    return build_strategy(cfg, Meter.simulated(topology_of(cfg), 1), num_regions=4, **kwargs), cfg


# every strategy.* key of an own-loop strategy, set away from its constructor's default (what a dropped key would
# give), and where the built strategy keeps it
_COMMON = {"eval_every": (3, lambda s: s.book.eval_every), "reply_timeout_s": (77, lambda s: s.jobs.reply_timeout),
           "rejoin_every": (4, lambda s: s.rejoin_every), "roll_call": ("first_jobs", lambda s: s.roll_call),
           "average_decay": (0.9, lambda s: s.average_decay), "batch_size": (9, lambda s: s.batch_size),
           "aggregation": ("trimmed_mean", lambda s: s.aggregation), "trim_fraction": (0.34, lambda s: s.trim_fraction)}
_OWN = {
    "asgd_ga": {"lr": (0.5, lambda s: s.lr), "momentum": (0.5, lambda s: s.momentum),
                "nesterov": (True, lambda s: s.nesterov), "accumulation_steps": (7, lambda s: s.accumulation_steps),
                "tau_max": (6, lambda s: s.tau_max), "staleness": ("none", lambda s: s.staleness.__name__),
                "update": ("delta", lambda s: s.update), "local_lr": (0.05, lambda s: s.local_lr),
                "balance": (False, lambda s: s.balance), "max_weight": (2.5, lambda s: s.max_weight),
                "buffer_regions": (5, lambda s: s.buffer_regions)},
    "ma": {"lr": (0.05, lambda s: s.lr), "local_steps": (7, lambda s: s.local_steps),
           "normalize": (False, lambda s: s.normalize), "outer_lr": (0.7, lambda s: s.outer_lr),
           "outer_momentum": (0.5, lambda s: s.outer_momentum), "nesterov": (False, lambda s: s.nesterov),
           "deadline_s": (42.0, lambda s: s.deadline_s),
           "heterogeneity_aware": (False, lambda s: s.weight_by == "shares")},
}


@pytest.mark.parametrize("name", sorted(_OWN))
def test_every_setting_reaches_the_strategy_it_configures(name):
    """A builder that drops or swaps a key builds a strategy with a default nobody asked for; set every key
    away from its default (and its stop rules, the validation limits and the codec) and read each back."""
    settings = {**_COMMON, **_OWN[name]}
    overrides = [f"strategy={name}", "target_accuracy=0.77", "compression=int8", "validation.max_norm=55",
                 "strategy.stop.max_time_s=123", "strategy.stop.max_cost_usd=4.5", "strategy.stop.at_target=true",
                 *(f"strategy.{key}={str(value).lower() if isinstance(value, bool) else value}"
                   for key, (value, _) in settings.items())]
    strategy, cfg = _built(*overrides)
    for key, value in OmegaConf.to_container(cfg.strategy).items():  # the overrides took
        assert key not in settings or value == settings[key][0], key
    got = {key: read(strategy) for key, (_, read) in settings.items()}
    expected = {key: "no_scaling" if key == "staleness" else value for key, (value, _) in settings.items()}
    assert got == expected
    assert strategy.book.stop == StopRules(max_time_s=123, max_cost_usd=4.5, target_accuracy=0.77)
    assert strategy.limits.max_norm == 55 and strategy.downlink.codec.spec().startswith("int8")
    assert strategy.plan is None and not strategy.book.resume


def test_fedavgs_settings_reach_flowers_strategy_and_its_wrapper():
    metered, _ = _built("strategy=fedavg", "target_accuracy=0.77", "compression=int8", "validation.max_norm=55",
                        "strategy.eval_every=3", "strategy.reply_timeout_s=77", "strategy.aggregation=trimmed_mean",
                        "strategy.trim_fraction=0.3", "strategy.stop.max_time_s=123", "strategy.stop.max_cost_usd=4.5",
                        "strategy.stop.at_target=true")
    inner = metered.inner
    assert type(inner).__name__ == "FedTrimmedAvg" and inner.beta == 0.3
    assert (inner.fraction_train, inner.fraction_evaluate, inner.min_train_nodes, inner.min_available_nodes) == \
        (1.0, 0.0, 4, 4)  # every region every round; evaluation is central
    assert (metered.book.eval_every, metered.reply_timeout) == (3, 77)
    assert metered.book.stop == StopRules(max_time_s=123, max_cost_usd=4.5, target_accuracy=0.77)
    assert metered.limits.max_norm == 55 and metered.downlink.codec.spec().startswith("int8")
    work = _geo4_work()
    tight, _ = _built("strategy=fedavg", "strategy.round_deadline_s=2", work=work)
    loose, _ = _built("strategy=fedavg", "strategy.round_deadline_s=100000", work=work)
    assert type(tight.inner).__name__ == "SelectiveFedAvg"
    assert (tight.inner.fraction_train, tight.inner.fraction_evaluate, tight.inner.min_train_nodes,
            tight.inner.min_available_nodes) == (1.0, 0.0, 4, 4)
    # the regions' own round times, unfilled (FedAvg's regions do their epochs, not a period's worth): 0.09,
    # 0.65, 2.001 and 6.07 s; filled towards the slowest, ap-guangzhou's 4.1 s would make it every 3rd
    assert tight.inner.every == {"ap-beijing": 1, "ap-shanghai": 1, "ap-guangzhou": 2, "ap-chengdu": 4}
    assert set(loose.inner.every.values()) == {1} and set(loose.inner.every) == set(work.data_sizes)


def test_fedavg_rents_the_schedulers_initial_workers_from_the_start():
    from cloudless_fl.config import compose, topology_of
    from cloudless_fl.control.scheduler import Scheduler

    work = _geo4_work()
    topology = topology_of(compose(["strategy=fedavg"]))
    scheduler = Scheduler(topology, work)
    metered, _ = _built("strategy=fedavg", "strategy.round_deadline_s=2", work=work, scheduler=scheduler)
    planned = scheduler.current.workers()
    assert planned != {r.name: r.workers_min for r in topology.regions}  # the plan rents more somewhere
    accounts = metered.meter.ledger.accounts
    assert {name: a.workers for name, a in accounts.items()} == planned
    assert all(a.held_worker_s == 0 and a.held_until == 0 for a in accounts.values())  # from t = 0 on
    # the deadline's round times are the plan's: its extra workers make ap-chengdu's round shorter
    times = {name: r.finish_s for name, r in scheduler.current.regions.items() if r.takes_part}
    assert metered.inner.every == {name: math.ceil(t / 2 - 1e-9) for name, t in times.items()}


@pytest.mark.parametrize("meter, with_work", [("measured", True), ("simulated", False)])
def test_round_deadlines_need_the_region_model_and_the_workload(meter, with_work):
    from cloudless_fl.config import compose, topology_of
    from cloudless_fl.control.meter import Meter
    from cloudless_fl.server_app import build_strategy

    cfg = compose(["strategy=fedavg", "strategy.round_deadline_s=2"])
    work = _geo4_work() if with_work else None
    built_meter = Meter.measured() if meter == "measured" else Meter.simulated(topology_of(cfg), 1)
    with pytest.raises(ConfigError) as refused:
        build_strategy(cfg, built_meter, num_regions=4, work=work)
    assert str(refused.value) == "strategy.round_deadline_s needs a topology to estimate round times"
