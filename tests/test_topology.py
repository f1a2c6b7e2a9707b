"""Topology presets load; malformed topologies are refused with the fix in the message."""

import copy

import pytest

from cloudless_fl.config import compose, topology_of
from cloudless_fl.errors import ConfigError
from cloudless_fl.control.topology import load_topology
from conftest import TWO_REGIONS


@pytest.mark.parametrize("preset", ["geo4", "geo4-fluct", "lan"])
def test_presets_load(preset):
    topo = topology_of(compose([f"topology={preset}"]))
    assert sum(topo.shares().values()) == pytest.approx(1.0)


def test_geo4_holds_the_benchmark_numbers():
    topo = topology_of(compose(["topology=geo4"]))
    assert topo.coordinator == "ap-beijing"
    chengdu = topo.region("ap-chengdu")
    assert (chengdu.workers_min, chengdu.workers_max, chengdu.samples_per_s) == (1, 8, 500)
    assert (chengdu.link.up_mbps, chengdu.link.latency_ms, chengdu.data_share) == (20, 60, 0.4)
    assert topology_of(compose(["topology=geo4-fluct"])).fluctuation.dip_probability == 0.1


def _bad(mutate):
    raw = copy.deepcopy(TWO_REGIONS)
    mutate(raw)
    return raw


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t["regions"]["slow"]["link"].update(up_mbps=-5), "'up_mbps' = -5 is out of range"),
    (lambda t: t["regions"]["slow"].update(data_share=0.7), "sum to 1.2"),
    (lambda t: t["regions"]["slow"].pop("samples_per_s"), "missing required key 'samples_per_s'"),
    (lambda t: t["regions"]["slow"].update(workers={"min": 3, "max": 1}), "exceeds max"),
    (lambda t: t.update(coordinator="mars"), "coordinator 'mars' is not one of the regions"),
    (lambda t: t["regions"]["fast"].update(efficiency=1.5), "'efficiency' = 1.5 is out of range"),
    (lambda t: t.update(regions={}), "non-empty mapping"),
    (lambda t: t["regions"]["fast"].update(usd_per_worker_hour="cheap"), "must be a number"),
    (lambda t: t["regions"]["fast"].update(efficency=0.5), r"region 'fast': unknown key\(s\) 'efficency'; allowed:"),
    (lambda t: t["regions"]["slow"].update(worker={"min": 2}), r"unknown key\(s\) 'worker'"),
    (lambda t: t["regions"]["slow"]["workers"].update(maximum=4), r"workers: unknown key\(s\) 'maximum'"),
    (lambda t: t["regions"]["slow"]["link"].update(latency=5), r"link: unknown key\(s\) 'latency'"),
    (lambda t: t.update(fluctuation={"sigma": 0.1, "dips": 0.5}), r"fluctuation: unknown key\(s\) 'dips'"),
    (lambda t: t.update(cordinator="fast"), r"unknown key\(s\) 'cordinator'"),
])
def test_malformed_topology(mutate, message):
    with pytest.raises(ConfigError, match=message):
        load_topology(_bad(mutate))


def test_topology_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_topology(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("regions: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_topology(bad)


def test_unknown_config_group_choice():
    with pytest.raises(ConfigError, match="dataset"):
        compose(["dataset=imagenet"])


def test_a_region_named_twice_is_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: t\ncoordinator: a\nregions:\n  a: {samples_per_s: 10}\n  a: {samples_per_s: 20}\n")
    with pytest.raises(ConfigError, match="key 'a' is given twice"):
        load_topology(twice)
