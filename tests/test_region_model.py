"""One region model: the cost model, the scheduler and the WAN proxy time a region the same way."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from cloudless_fl.control import region_model
from cloudless_fl.control.costmodel import CostModel
from cloudless_fl.control.scheduler import Workload, evaluate_plan
from cloudless_fl.control.topology import load_topology
from cloudless_fl.deployment.wanproxy import link_shapes
from conftest import TWO_REGIONS

MODEL_BYTES = 4_000_000


def two_regions(job_start_s: float = 0.0, sigma: float = 0.0):
    raw = copy.deepcopy(TWO_REGIONS)
    raw["regions"]["slow"]["job_start_s"] = job_start_s
    raw["fluctuation"] = {"window_s": 10, "sigma": sigma}
    return load_topology(raw)


def test_the_cost_model_charges_the_region_models_compute_time():
    topo = two_regions(job_start_s=1.5)
    slow = topo.region("slow")
    cm = CostModel(topo, seed=0, compute_jitter=0)
    assert cm.compute_seconds("slow", 640, 2, job_id=0) == region_model.compute_seconds(slow, 640, 2)
    assert region_model.compute_seconds(slow, 640, 2) == pytest.approx(1.5 + 640 / (100 * 2 * 1.0))


def test_a_measured_scaling_sets_the_throughput_of_a_group():
    """`Region.scaling` (a run's measured group efficiency) is what a group is timed with: interpolated
    between measured counts, grown past them by the last measured gain per worker, never by a loss."""
    slow = two_regions().region("slow")  # 100 samples/s per worker, efficiency 1
    assert [region_model.throughput(slow, n) for n in (1, 2, 3)] == pytest.approx([100, 200, 300])  # profile
    measured = replace(slow, scaling=((1, 1.0), (2, 0.8), (4, 0.6)))
    assert [region_model.throughput(measured, n) for n in range(1, 7)] == pytest.approx([100, 160, 200, 240,
                                                                                          280, 320])
    losing = replace(slow, scaling=((1, 1.0), (2, 0.46)))  # bench_workers on this 2-core machine
    assert [region_model.throughput(losing, n) for n in (1, 2, 4)] == pytest.approx([100, 92, 92])
    assert region_model.compute_seconds(losing, 92, 3) == pytest.approx(1.0)
    assert region_model.speed_per_worker(losing, 92, 1.0, 2) == pytest.approx(100)


def test_a_plan_includes_each_jobs_fixed_start_up():
    work = Workload({"fast": 500, "slow": 500}, MODEL_BYTES, base_steps=10, batch_size=16)
    workers = {"fast": 1, "slow": 1}
    without = evaluate_plan(two_regions(0.0), work, workers, fill=False).regions["slow"]
    with_start = evaluate_plan(two_regions(2.0), work, workers, fill=False).regions["slow"]
    assert with_start.compute_s == pytest.approx(without.compute_s + 2.0)
    assert with_start.local_steps == without.local_steps


def test_the_scheduler_plans_the_transfer_the_cost_model_charges():
    topo = two_regions()
    cm = CostModel(topo, seed=0, compute_jitter=0)
    plan = evaluate_plan(topo, Workload({"fast": 500, "slow": 500}, MODEL_BYTES), {"fast": 1, "slow": 1})
    for name in ("fast", "slow"):
        charged = cm.transfer_seconds(name, 0.0, MODEL_BYTES, region_model.DOWN) + \
            cm.transfer_seconds(name, 0.0, MODEL_BYTES, region_model.UP)
        assert plan.regions[name].comm_s == pytest.approx(charged)
    assert plan.regions["slow"].comm_s == pytest.approx(2 * (0.010 + 8 * MODEL_BYTES / 80e6))


def test_the_wan_proxy_shapes_a_link_at_the_bandwidth_the_cost_model_charges():
    topo = two_regions(sigma=0.5)  # fluctuating: a different bandwidth in every 10 s window
    cm = CostModel(topo, seed=3, compute_jitter=0)
    up, down = link_shapes(topo, "slow", seed=3)
    nbytes = 10_000  # small enough to stay inside one window
    for t in (0.0, 12.0, 25.0, 47.0):
        charged = cm.transfer_seconds("slow", t, nbytes, region_model.UP) - 0.010
        assert up.transmit_seconds(nbytes, t) == pytest.approx(charged)
        charged = cm.transfer_seconds("slow", t, nbytes, region_model.DOWN) - 0.010
        assert down.transmit_seconds(nbytes, t) == pytest.approx(charged)
    assert up.latency_s == down.latency_s == 0.010
    assert len({round(up.mbps(t), 6) for t in (0.0, 12.0, 25.0, 47.0)}) > 1  # it does fluctuate


def test_a_measured_transfer_is_read_back_into_the_links_bandwidth():
    """`link_mbps_from`: bits over the transfer's time less one latency per transfer; nothing to read from an
    empty transfer or one no longer than its latencies."""
    slow = two_regions().region("slow")  # 10 ms latency
    assert region_model.link_mbps_from(slow, 1_000_000, 0.12) == pytest.approx(80.0, rel=1e-12)  # 0.1 s wire
    assert region_model.link_mbps_from(slow, 1_000_000, 0.11, transfers=1) == pytest.approx(80.0)
    assert region_model.link_mbps_from(slow, 1, 0.5) == pytest.approx(8 / 0.48 / 1e6)
    assert region_model.link_mbps_from(slow, 0, 0.12) is None
    assert region_model.link_mbps_from(slow, 1_000_000, 0.02) is None  # the latencies alone


def test_egress_is_paid_by_the_region_the_bytes_leave():
    """Uploads leave the region (its price), downloads leave the coordinator (its price)."""
    raw = copy.deepcopy(TWO_REGIONS)
    raw["regions"]["slow"]["egress_usd_per_gb"] = 0.25  # the coordinator `fast` charges 0.1
    topo = load_topology(raw)
    assert region_model.egress_usd(topo, "slow", 2 * 10**9, region_model.UP) == pytest.approx(0.5)
    assert region_model.egress_usd(topo, "slow", 2 * 10**9, region_model.DOWN) == pytest.approx(0.2)
    assert region_model.egress_usd(topo, "fast", 2 * 10**9, region_model.UP) == 0.0  # inside the coordinator
