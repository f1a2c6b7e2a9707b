"""Cost and time formulas against hand-computed cases."""

import copy
import json

import numpy as np
import pytest

from cloudless_fl.control.bandwidth import FluctuatingBandwidth, TraceBandwidth
from cloudless_fl.control.bandwidth import integrate_transfer as transfer_seconds
from cloudless_fl.control.clock import VirtualClock, WallClock
from cloudless_fl.config import compose, topology_of
from cloudless_fl.control.costmodel import DOWN, UP, CostModel, Ledger
from cloudless_fl.errors import ConfigError
from cloudless_fl.control.jobs import Job, Reported
from cloudless_fl.control.meter import Meter
from cloudless_fl.control.topology import Fluctuation, load_topology
from conftest import TWO_REGIONS, SetClock


def _topology(**changes):
    raw = copy.deepcopy(TWO_REGIONS)
    for region, fields in changes.items():
        raw["regions"][region].update(fields)
    return load_topology(raw)


def test_transfer_across_a_bandwidth_change():
    trace = TraceBandwidth([0.0, 1.0], [10.0, 20.0])  # 10 Mbps for 1 s, then 20 Mbps
    # 20 Mbit: 10 Mbit in the first second, the other 10 Mbit at 20 Mbps = 0.5 s
    assert transfer_seconds(trace, 0.0, 2_500_000, latency_s=0.0) == pytest.approx(1.5)
    # latency 0.1 s first: 9 Mbit by t=1, 11 Mbit at 20 Mbps = 0.55 s
    assert transfer_seconds(trace, 0.0, 2_500_000, latency_s=0.1) == pytest.approx(1.55)
    # a transfer starting after the change runs at the new rate only
    assert transfer_seconds(trace, 2.0, 2_500_000, latency_s=0.0) == pytest.approx(1.0)


def test_trace_file(tmp_path):
    csv = tmp_path / "link.csv"
    csv.write_text("t_seconds,mbps\n0,10\n1,20\n")
    assert transfer_seconds(TraceBandwidth.from_csv(csv), 0.0, 2_500_000, 0.0) == pytest.approx(1.5)
    csv.write_text("t_seconds,mbps\n0,10\n1,-3\n")
    with pytest.raises(ConfigError, match="> 0 Mbps"):
        TraceBandwidth.from_csv(csv)


def test_job_time_is_download_compute_upload():
    topo = _topology(slow={"link": {"up_mbps": 80, "down_mbps": 40, "latency_ms": 10}})
    cm = CostModel(topo, seed=0, compute_jitter=0.0)
    timing = cm.job("slow", 0.0, bytes_down=1_000_000, samples=300, bytes_up=1_000_000, workers=2, job_id=0)
    assert timing.download_s == pytest.approx(0.01 + 8e6 / 40e6)
    assert timing.compute_s == pytest.approx(300 / (100 * 2 * 1.0))
    assert timing.upload_s == pytest.approx(0.01 + 8e6 / 80e6)
    assert timing.end == pytest.approx(0.21 + 1.5 + 0.11)


def test_the_upload_starts_when_download_and_compute_are_done(tmp_path):
    """On a link whose bandwidth changes, when the upload starts decides how long it takes."""
    trace = tmp_path / "link.csv"
    trace.write_text("t_seconds,mbps\n0,10\n2,80\n")  # 10 Mbps for 2 s, then 80 (both directions)
    topo = _topology(slow={"link": {"up_mbps": 80, "down_mbps": 80, "latency_ms": 0, "trace": str(trace)}})
    timing = CostModel(topo, seed=0, compute_jitter=0.0).job("slow", 0.0, bytes_down=1_250_000, samples=50,
                                                             bytes_up=1_250_000, workers=1, job_id=0)
    assert (timing.download_s, timing.compute_s) == pytest.approx((1.0, 0.5))  # 10 Mbit at 10 Mbps; 50 / 100
    assert timing.upload_s == pytest.approx(0.5 + 5 / 80)  # from 1.5 s: 5 Mbit at 10 Mbps, 5 Mbit at 80


def test_every_job_adds_to_its_regions_account():
    """Two jobs on two workers: each figure is the sum of the two; slow's uploads pay slow's egress price, its
    downloads the coordinator's."""
    ledger = Ledger(CostModel(_topology(slow={"egress_usd_per_gb": 0.2, "cold_start_usd": 0.01}), seed=0))
    ledger.set_workers("slow", 2, at=0.0)
    ledger.record_job("slow", compute_s=3.0, transfer_s=1.0, bytes_down=10**9, bytes_up=2 * 10**9)
    ledger.record_job("slow", compute_s=2.0, transfer_s=0.5, bytes_down=10**9, bytes_up=10**9)
    ledger.hold_until(10.0)
    acc = ledger.accounts["slow"]
    assert (acc.busy_s, acc.transfer_s, acc.busy_worker_s, acc.invocations) == pytest.approx((5.0, 1.5, 10.0, 2))
    assert acc.idle_s == pytest.approx(20.0 / 2 - 5.0 - 1.5)
    assert acc.serverless_usd == pytest.approx(10.0 * 1.8 / 3600 + 2 * 0.01)
    assert (acc.wan_bytes, acc.bytes_down, acc.bytes_up) == (5 * 10**9, 2 * 10**9, 3 * 10**9)
    assert acc.egress_usd == pytest.approx(3 * 0.2 + 2 * 0.1)


def test_a_fixed_job_start_adds_to_every_jobs_compute():
    cm = CostModel(_topology(slow={"job_start_s": 2.5}), seed=0, compute_jitter=0.0)
    timing = cm.job("slow", 0.0, bytes_down=0, samples=300, bytes_up=0, workers=2, job_id=0)
    assert timing.compute_s == pytest.approx(2.5 + 300 / (100 * 2 * 1.0))
    with pytest.raises(ConfigError, match="job_start_s"):
        _topology(slow={"job_start_s": -1})


def test_compute_jitter_is_seeded():
    cm = CostModel(_topology(), seed=4)
    a = [cm.compute_seconds("slow", 100, 1, j) for j in range(5)]
    assert a == [CostModel(_topology(), seed=4).compute_seconds("slow", 100, 1, j) for j in range(5)]
    assert a != [CostModel(_topology(), seed=5).compute_seconds("slow", 100, 1, j) for j in range(5)]
    assert np.mean(a) == pytest.approx(1.0, rel=0.1)


def test_instance_and_serverless_bills_of_the_same_schedule():
    topo = _topology(slow={"usd_per_worker_hour": 3.6, "cold_start_usd": 0.01})  # $0.001 per worker-second
    ledger = Ledger(CostModel(topo, seed=0))
    ledger.set_workers("slow", 2, at=0.0)
    ledger.record_job("slow", compute_s=10.0, transfer_s=0.0, bytes_down=0, bytes_up=0)
    ledger.hold_until(30.0)  # held 30 s, busy 10 s
    acc = ledger.accounts["slow"]
    assert acc.instance_usd == pytest.approx(30 * 2 * 0.001)
    assert acc.serverless_usd == pytest.approx(10 * 2 * 0.001 + 0.01)
    assert acc.utilization == pytest.approx(10 / 30)
    assert acc.idle_s == pytest.approx(20.0)


def test_egress_free_inside_the_coordinator_region():
    ledger = Ledger(CostModel(_topology(), seed=0))
    ledger.record_job("fast", 0.0, 0.0, bytes_down=10**9, bytes_up=10**9)  # "fast" hosts the coordinator
    assert ledger.accounts["fast"].egress_usd == 0 and ledger.wan_bytes == 0
    ledger.record_job("slow", 0.0, 0.0, bytes_down=10**9, bytes_up=2 * 10**9)
    # upload leaves "slow" (0.1 $/GB), download leaves the coordinator's region (0.1 $/GB)
    assert ledger.accounts["slow"].egress_usd == pytest.approx(0.1 * 2 + 0.1 * 1)
    assert ledger.wan_bytes == 3 * 10**9


def test_free_communication_for_lan():
    topo = topology_of(compose(["topology=lan"]))
    cm = CostModel(topo, seed=0)
    assert cm.transfer_seconds("lan", 0.0, 10**9, UP) == 0.0
    assert cm.egress_usd("lan", 10**9, DOWN) == 0.0


def test_same_seed_same_bandwidth_trace():
    fluct = Fluctuation(window_s=30, sigma=0.5, dip_probability=0.1, dip_factor=0.1)
    times = np.arange(0, 3000, 7.0)
    a = [FluctuatingBandwidth(20, fluct, 1, "x/up").segment(t)[0] for t in times]
    b = [FluctuatingBandwidth(20, fluct, 1, "x/up").segment(t)[0] for t in times]
    c = [FluctuatingBandwidth(20, fluct, 2, "x/up").segment(t)[0] for t in times]
    assert a == b and a != c
    assert min(a) == pytest.approx(2.0)  # some window dipped to 10 % of 20 Mbps
    assert len(set(a)) > 50


def test_stable_links_have_constant_bandwidth():
    bw = FluctuatingBandwidth(20, Fluctuation(sigma=0.0), 1, "x")
    assert bw.segment(1e6) == (20, float("inf"))


def test_sync_round_fast_region_idles_for_the_slow_ones_extra_time():
    meter = Meter(VirtualClock(), CostModel(_topology(), seed=0, compute_jitter=0.0))
    size = 4_000_000
    jobs = [meter.dispatch(r, bytes_down=size, at=0.0) for r in ("fast", "slow")]
    for job, samples in zip(jobs, (500, 500)):
        meter.complete(job, bytes_up=size, reported=Reported(samples))
    fast, slow = (meter.ledger.accounts[r] for r in ("fast", "slow"))
    t_fast, t_slow = jobs[0].timing.end, jobs[1].timing.end
    assert meter.clock.now() == pytest.approx(t_slow)  # the round ends with its slowest region
    assert fast.idle_s == pytest.approx(t_slow - t_fast)
    assert slow.idle_s == pytest.approx(0.0, abs=1e-9)


def test_virtual_clock_orders_by_modelled_end_not_arrival():
    clock = VirtualClock()
    pending = {"a": Job("a", 0, 0.0, 0), "b": Job("b", 0, 0.0, 0)}
    from cloudless_fl.control.jobs import JobTiming

    pending["a"].timing = JobTiming(0.0, 1.0, 5.0, 1.0)
    pending["b"].timing = JobTiming(0.0, 1.0, 1.0, 1.0)
    assert clock.pick(pending, ["a"]) is None  # b ends first: wait for it
    assert clock.pick(pending, ["a", "b"]) == "b"
    assert clock.finish(pending["b"]) == 3.0 and clock.now() == 3.0
    assert WallClock().pick(pending, ["a", "b"]) == "a"  # wall clock: arrival order


def test_the_wall_clock_meter_measures_a_jobs_overhead_apart_from_compute_and_download():
    clock = SetClock()
    meter = Meter(clock, CostModel(_topology(), seed=0, compute_jitter=0.0))
    job = meter.dispatch("slow", bytes_down=1_000_000, samples=100)
    download = job.timing.download_s  # 0.11 s over slow's 80 Mbps link, modelled
    clock.t = 10.0
    work, transfer, overhead = meter.complete(job, bytes_up=1_000_000,
                                              reported=Reported(100, compute_s=1.5, replied_s_ago=2.0))
    # dispatch → the reply's creation took 8 s: 1.5 s compute, the download, the rest was overhead
    assert (work, transfer) == (1.5, pytest.approx(download + job.timing.upload_s))
    assert overhead == pytest.approx(8.0 - 1.5 - download)
    assert meter.ledger.accounts["slow"].busy_s == pytest.approx(1.5 + overhead)  # the overhead runs on the region
    assert meter.job_figures()["job_overhead_s"] == {"slow": pytest.approx(overhead)}
    # made 2 s before it arrived here: beyond the modelled upload, the reply was being relayed
    relay = 2.0 - job.timing.upload_s
    assert meter.job_figures()["reply_relay_s"] == {"slow": pytest.approx(relay)}
    second = meter.dispatch("slow", bytes_down=1_000_000, samples=100)
    clock.t = 12.0
    meter.complete(second, bytes_up=1_000_000,
                   reported=Reported(100, compute_s=1.5, behind_s=0.2, startup_s=4.0, load_s=0.5))
    assert meter.overhead_s["slow"] == pytest.approx(0.7 * overhead + 0.3 * (2.0 - 1.5 - download))  # smoothed
    assert meter.relay_s["slow"] == pytest.approx(0.7 * relay)  # arrived as it was made: no relay
    assert meter.job_figures()["behind_pace"] == {"slow": 1}
    assert meter.job_figures()["job_overhead_parts"] == {"slow": {"process_start_s": 4.0, "data_load_s": 0.5}}


def test_a_reply_without_its_compute_has_no_overhead_to_measure():
    """A stock ClientApp reports no compute-seconds: its compute must not be learned as a fixed overhead
    (the scheduler would then raise local work against it), yet its region was busy all along."""
    clock = SetClock()
    meter = Meter(clock, CostModel(_topology(), seed=0, compute_jitter=0.0))
    job = meter.dispatch("slow", bytes_down=1_000_000, samples=100)
    clock.t = 10.0
    work, _, overhead = meter.complete(job, bytes_up=1_000_000, reported=Reported(100, replied_s_ago=2.0))
    assert (work, overhead) == (0.0, None) and meter.overhead_s == {}
    assert meter.ledger.accounts["slow"].busy_s == pytest.approx(8.0 - job.timing.download_s)


def test_the_virtual_clock_meter_reports_the_modelled_overhead():
    meter = Meter(VirtualClock(), CostModel(_topology(slow={"job_start_s": 3.0}), seed=0, compute_jitter=0.0))
    job = meter.dispatch("slow", bytes_down=1000, samples=100)
    work, _, overhead = meter.complete(job, bytes_up=1000, reported=Reported(100))
    assert (work, overhead) == (pytest.approx(1.0), 3.0)  # 100 samples at 100/s, then the 3 s start-up


def test_the_roll_call_takes_one_message_trip_on_the_modelled_clock():
    """Asking every node who it is: the slowest region's per-job overhead and its latency both ways, no
    compute. Measured, the time it took has passed already."""
    meter = Meter(VirtualClock(), CostModel(_topology(slow={"job_start_s": 3.0}), seed=0))
    meter.roll_call(["fast", "slow"])
    assert meter.clock.now() == pytest.approx(3.0 + 2 * 0.010)
    meter.roll_call(["fast"])  # no start-up, no latency
    assert meter.clock.now() == pytest.approx(3.02)
    measured = Meter(SetClock(), CostModel(_topology(slow={"job_start_s": 3.0}), seed=0))
    measured.roll_call(["fast", "slow"])
    assert measured.clock.now() == 0.0


def test_the_workers_that_computed_a_regions_jobs_are_recorded_when_measured():
    """summary.workers: region → the most data-parallel workers that computed one of its jobs (deployment);
    in simulation workers are modelled, and a reply's count says nothing about them."""
    clock = SetClock()
    meter = Meter(clock, CostModel(_topology(), seed=0, compute_jitter=0.0))
    for count in (3, 2):  # a group of 3, then (a worker lost, or a re-plan) one of 2
        job = meter.dispatch("slow", bytes_down=1000, samples=100)
        clock.t += 5.0
        meter.complete(job, bytes_up=1000, reported=Reported(100, compute_s=1.0, workers=count))
    assert meter.job_figures()["workers"] == {"slow": 3}
    assert meter.job_figures()["speed_per_worker"] == {"slow": {"3": pytest.approx(100 / 3), "2": 50.0}}
    restored = Meter(SetClock(), CostModel(_topology(), seed=0))
    restored.load_state_dict(meter.state_dict())
    assert restored.job_figures()["workers"] == {"slow": 3}
    simulated = Meter(VirtualClock(), CostModel(_topology(), seed=0))
    simulated.complete(simulated.dispatch("slow", bytes_down=1000, samples=100), bytes_up=1000,
                       reported=Reported(100, workers=1))
    assert simulated.job_figures()["workers"] == {}


def test_a_regions_scaling_efficiency_is_measured_from_its_jobs_at_two_worker_counts():
    """summary.scaling_efficiency: a group's per-worker speed over a lone worker's, measured from the
    compute its jobs report; nothing until a region computed on two counts, nothing in simulation."""
    clock = SetClock()
    meter = Meter(clock, CostModel(_topology(), seed=0, compute_jitter=0.0))

    def job(workers: int, compute_s: float) -> None:
        started = meter.dispatch("slow", bytes_down=1000, samples=100)
        clock.t += 5.0
        meter.complete(started, bytes_up=1000, reported=Reported(100, compute_s=compute_s, workers=workers))

    job(1, 1.0)
    assert meter.scaling("slow") == () and meter.job_figures()["scaling_efficiency"] == {}
    job(2, 0.8)  # 100 samples on 2 workers in 0.8 s: 62.5 samples/s per worker, against 100 alone
    assert dict(meter.scaling("slow")) == pytest.approx({1: 1.0, 2: 0.625})
    assert meter.job_figures()["scaling_efficiency"] == {"slow": pytest.approx({"1": 1.0, "2": 0.625})}
    restored = Meter(SetClock(), CostModel(_topology(), seed=0))
    restored.load_state_dict(json.loads(json.dumps(meter.state_dict())))  # as a checkpoint keeps it
    assert restored.scaling("slow") == meter.scaling("slow")
    simulated = Meter(VirtualClock(), CostModel(_topology(), seed=0))
    for workers in (1, 2):
        simulated.ledger.set_workers("slow", workers, at=0.0)
        simulated.complete(simulated.dispatch("slow", bytes_down=1000, samples=100), bytes_up=1000,
                           reported=Reported(100, workers=workers))
    assert simulated.job_figures()["scaling_efficiency"] == {}


def test_a_measured_job_is_read_back_at_the_workers_that_computed_it():
    """A group that lost a worker computed with fewer than the plan rents: its measured time must not be
    read as the plan's workers being slow. Modelled jobs, and replies that do not say, keep the count
    rented when they were dispatched — a plan adopted while they ran (3 workers from now) changes later
    jobs only: read at 3, a lone worker's job looks a third as fast per worker (world5/geo4 ASGD-GA
    under the scheduler re-planned on that, 2026-12-03)."""
    measured = Meter(SetClock(), CostModel(_topology(), seed=0))
    job = measured.dispatch("slow", bytes_down=1000, samples=100)
    measured.ledger.set_workers("slow", 3, at=0.0)
    assert measured.computed_by(job, Reported(100, workers=2)) == 2
    assert measured.computed_by(job, Reported(100)) == 1  # a stock reply does not say
    assert measured.computed_by(measured.dispatch("slow", bytes_down=1000), Reported(100)) == 3
    simulated = Meter(VirtualClock(), CostModel(_topology(), seed=0, compute_jitter=0.0))
    alone = simulated.dispatch("slow", bytes_down=1000, samples=100)
    untimed = simulated.dispatch("slow", bytes_down=1000)  # its samples are known when it is done (FedAvg)
    simulated.ledger.set_workers("slow", 3, at=0.0)
    grouped = simulated.dispatch("slow", bytes_down=1000, samples=100)
    assert simulated.computed_by(alone, Reported(100, workers=3)) == 1
    assert simulated.computed_by(grouped, Reported(100, workers=1)) == 3
    simulated.complete(untimed, bytes_up=1000, reported=Reported(100))
    assert untimed.timing.compute_s == pytest.approx(alone.timing.compute_s)  # timed at its one worker
    assert grouped.timing.compute_s < alone.timing.compute_s


def test_the_ledgers_breakdown_splits_the_cost_by_kind():
    """results.json `costs`: compute under each billing and egress, each summed over the regions."""
    ledger = Ledger(CostModel(_topology(slow={"cold_start_usd": 0.01}), seed=0))
    ledger.record_job("slow", compute_s=3600.0, transfer_s=1.0, bytes_down=10**9, bytes_up=2 * 10**9)
    ledger.record_job("fast", compute_s=1800.0, transfer_s=0.0, bytes_down=10**9, bytes_up=10**9)
    ledger.hold_until(3600.0)
    assert ledger.breakdown() == pytest.approx({
        "compute_instance": 3.6 + 1.8,  # every region's minimum worker held for an hour
        "compute_serverless": 1.8 + 0.01 + 3.6 / 2,  # the jobs' compute, slow's cold start
        "egress": 0.1 * 3})  # slow's 1 GB down leaves fast, its 2 GB up leave slow; fast's own are free
    assert ledger.cost_usd() == pytest.approx({"instance": 5.4 + 0.3, "serverless": 3.61 + 0.3})  # compute + egress
