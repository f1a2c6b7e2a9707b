"""The elastic scheduler: plan properties, exactness against brute force, errors, re-planning, faults."""

from __future__ import annotations

import itertools
from dataclasses import replace
import json

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from cloudless_fl.config import compose
from cloudless_fl.control.costmodel import CostModel
from cloudless_fl.control.jobs import Reported
from cloudless_fl.control.meter import Meter
from cloudless_fl.errors import ConfigError
from cloudless_fl.training.protocol import WorkOrder
from cloudless_fl.run import run
from cloudless_fl.control.scheduler import (Objective, Plan, RegionPlan, Scheduler, Workload, evaluate_plan, plan,
                                           static_plan)
from cloudless_fl.strategy import AsyncGradAccum, Metered, ModelAveraging, SelectiveFedAvg
from cloudless_fl.strategy.planning import PlanFollower
from cloudless_fl.strategy.validation import UpdateLimits
from cloudless_fl.strategy.runbook import RunBook
from cloudless_fl.control.topology import load_topology
from conftest import SetClock, small_run_overrides
from strategy_helpers import Federation

MODEL_BYTES = 4_000_000


def region(speed, price, mbps, share, wmax=4, latency=20, efficiency=0.9):
    return {"workers": {"min": 1, "max": wmax}, "samples_per_s": speed, "efficiency": efficiency,
            "usd_per_worker_hour": price, "egress_usd_per_gb": 0.1,
            "link": {"up_mbps": mbps, "down_mbps": mbps, "latency_ms": latency}, "data_share": share}


def hand_built(**regions):
    return load_topology({"name": "hand", "coordinator": next(iter(regions)), "regions": regions})


HAND_BUILT = [
    hand_built(hq=region(3000, 3.0, 10000, 0.2), mid=region(1500, 1.5, 200, 0.3), far=region(400, 0.5, 50, 0.5, 6)),
    hand_built(a=region(1000, 1.0, 1000, 0.25), b=region(800, 2.0, 100, 0.25), c=region(600, 0.8, 100, 0.5, 5)),
    hand_built(x=region(2000, 2.5, 10000, 0.5, 3), y=region(300, 0.4, 30, 0.5, 8)),
]


def workload(topo, epochs=10.0, factor=1000.0, steps=20):
    sizes = {r.name: round(3000 * r.data_share) for r in topo.regions}
    return Workload(sizes, MODEL_BYTES, base_steps=steps, batch_size=32, epochs=epochs, max_steps_factor=factor)


def all_worker_plans(topo, work, billing="instance"):
    ranges = [range(r.workers_min, r.workers_max + 1) for r in topo.regions]
    for combo in itertools.product(*ranges):
        yield evaluate_plan(topo, work, dict(zip(topo.region_names, combo)), billing)


@pytest.mark.parametrize("topo", HAND_BUILT)
@pytest.mark.parametrize("objective", [Objective(), Objective("min_time"), Objective("weighted", usd_per_hour=5.0)])
def test_plan_equalises_finish_times_within_workers(topo, objective):
    p = plan(topo, workload(topo), objective)
    finishes = [r.finish_s for r in p.regions.values() if r.takes_part]
    assert max(finishes) <= p.period_s * (1 + 1e-9)
    assert min(finishes) >= 0.95 * p.period_s
    for r in topo.regions:
        assert r.workers_min <= p.regions[r.name].workers <= r.workers_max


@pytest.mark.parametrize("topo", HAND_BUILT)
def test_every_region_covers_at_least_its_data_share(topo):
    work = workload(topo)
    p = plan(topo, work)
    for name, r in p.regions.items():
        assert r.local_steps * work.batch_size >= p.epochs_per_period * work.data_sizes[name] - 1e-6


@pytest.mark.parametrize("topo", HAND_BUILT)
@pytest.mark.parametrize("billing", ["instance", "serverless"])
def test_cost_minimising_plan_is_no_dearer_than_brute_force(topo, billing):
    work = workload(topo)
    best = plan(topo, work, Objective(billing=billing))
    every = list(all_worker_plans(topo, work, billing))
    assert best.total_usd <= min(p.total_usd for p in every) * (1 + 1e-12)
    fastest = plan(topo, work, Objective("min_time", billing=billing))
    assert fastest.total_time_s <= min(p.total_time_s for p in every) * (1 + 1e-12)


def test_a_plan_needs_a_region_with_data():
    topo = HAND_BUILT[0]
    with pytest.raises(ConfigError, match="no region with resident data can take part; nothing to plan"):
        plan(topo, Workload({"hq": 0, "mid": 0, "far": 0}, MODEL_BYTES))
    one_sample = plan(topo, Workload({"hq": 1, "mid": 0, "far": 0}, MODEL_BYTES))
    assert list(one_sample.local_steps()) == ["hq"]  # one resident sample is data


@pytest.mark.parametrize("topo", HAND_BUILT)
@pytest.mark.parametrize("usd_per_hour", [0.5, 5.0, 500.0])
def test_the_weighted_plan_is_brute_forces_cheapest_with_time_priced_in(topo, usd_per_hour):
    """`weighted`: dollars plus hours × `usd_per_hour`, the brute-force minimum whatever the price of time."""
    work = workload(topo)
    best = plan(topo, work, Objective("weighted", usd_per_hour=usd_per_hour))
    weighted = [p.total_usd + usd_per_hour * p.total_time_s / 3600.0 for p in all_worker_plans(topo, work)]
    assert Objective("weighted", usd_per_hour=usd_per_hour).score(best) == pytest.approx(min(weighted), rel=1e-12)


@pytest.mark.parametrize("topo", HAND_BUILT)
def test_constrained_plans_match_brute_force_and_respect_the_bound(topo):
    work = workload(topo)
    every = list(all_worker_plans(topo, work))
    times = sorted(p.total_time_s for p in every)
    deadline = times[len(times) // 3]  # feasible, but binding for the cheapest plans
    p = plan(topo, work, Objective(deadline_s=deadline))
    assert p.total_time_s <= deadline * (1 + 1e-9)
    assert p.total_usd == pytest.approx(min(q.total_usd for q in every if q.total_time_s <= deadline))
    costs = sorted(q.total_usd for q in every)
    budget = costs[len(costs) // 3]
    p = plan(topo, work, Objective("min_time", budget_usd=budget))
    assert p.total_usd <= budget * (1 + 1e-9)
    assert p.total_time_s == pytest.approx(min(q.total_time_s for q in every if q.total_usd <= budget))
    # a budget that binds, set at exactly the cost of the fastest plan within it: that plan and no dearer one
    fastest = min(every, key=lambda q: (q.total_time_s, q.total_usd))
    within = min((q for q in every if q.total_usd < fastest.total_usd * (1 - 1e-6)), key=lambda q: q.total_time_s)
    p = plan(topo, work, Objective("min_time", budget_usd=within.total_usd))
    assert p.total_time_s == pytest.approx(within.total_time_s) and p.total_usd <= within.total_usd * (1 + 1e-9)


def test_infeasible_deadline_names_the_fastest_plan():
    topo = HAND_BUILT[0]
    work = workload(topo)
    fastest = min(p.total_time_s for p in all_worker_plans(topo, work))
    with pytest.raises(ConfigError, match=rf"deadline 1 s infeasible; the fastest plan needs {fastest:.3g} s"):
        plan(topo, work, Objective(deadline_s=1.0))


def test_infeasible_budget_names_the_cheapest_plan():
    topo = HAND_BUILT[1]
    work = workload(topo)
    cheapest = min(p.total_usd for p in all_worker_plans(topo, work))
    with pytest.raises(ConfigError, match=rf"budget \$1e-05 infeasible; the cheapest plan costs \${cheapest:.3g}"):
        plan(topo, work, Objective("min_time", budget_usd=1e-5))


def test_bad_objective_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="min_cost, min_time, weighted"):
        Objective("cheapest")
    with pytest.raises(ConfigError, match="deadline_s=-3"):
        Objective(deadline_s=-3)
    with pytest.raises(ConfigError, match="deadline_s=0"):
        Objective(deadline_s=0)
    with pytest.raises(ConfigError, match="billing 'hourly' is unknown; use one of instance, serverless"):
        Objective(billing="hourly")
    with pytest.raises(ConfigError, match=r"usd_per_hour=-1 must be ≥ 0"):
        Objective("weighted", usd_per_hour=-1)


def test_a_scheduler_plans_without_the_regions_it_excluded_from_the_start():
    """Regions without a SuperNode at start-up are excluded before the first plan; the workload is the one
    the run found (resident data, model size)."""
    topo = HAND_BUILT[0]
    s = Scheduler(topo, Workload({}, 0))
    s.set_workload(data_sizes={"hq": 600, "mid": 3000, "far": 1500}, model_bytes=MODEL_BYTES)
    assert (s.work.data_sizes, s.work.model_bytes) == ({"hq": 600, "mid": 3000, "far": 1500}, MODEL_BYTES)
    s.exclude("mid")
    first = s.start(at=2.5)
    assert not first.regions["mid"].takes_part and first.regions["far"].takes_part
    assert first == plan(topo, replace(s.work, data_sizes={"hq": 600, "far": 1500}))  # as if mid held nothing
    assert s.changes == [{"time_s": 2.5, "reason": "initial plan", "plan": {
        name: {"takes_part": r.takes_part, "workers": r.workers, "local_steps": r.local_steps}
        for name, r in first.regions.items()}}]


def test_elastic_plan_beats_the_static_one_on_geo4():
    topo = load_topology({**compose(["topology=geo4"]).topology})
    sizes = {"ap-beijing": 144, "ap-shanghai": 287, "ap-guangzhou": 431, "ap-chengdu": 575}
    work = Workload(sizes, 4_505_640, base_steps=20, epochs=20, max_steps_factor=4)
    elastic, static = plan(topo, work), static_plan(topo, work)
    assert elastic.total_usd < static.total_usd
    assert static.regions["ap-chengdu"].workers == 1 and elastic.regions["ap-chengdu"].workers > 1


def dip_topology():
    """`b` computes fast over a medium link; `c` is the slow one that sets the period."""
    return hand_built(a=region(3000, 3.0, 10000, 0.2, wmax=1), b=region(3000, 1.0, 100, 0.3, wmax=1),
                      c=region(200, 0.5, 100, 0.5, wmax=1))


def test_replan_after_a_bandwidth_dip_cuts_that_regions_local_work():
    topo = dip_topology()
    scheduler = Scheduler(topo, workload(topo), Objective())
    before = scheduler.start().regions["b"].local_steps
    comm_b = scheduler.current.regions["b"].comm_s
    assert scheduler.replan(at=5.0) is None  # nothing measured: nothing changes
    scheduler.observe("b", samples=640, work_s=640 / 2700, workers=1, nbytes=2 * MODEL_BYTES,
                      transfer_s=6 * comm_b)  # the link now moves a sixth of what it did
    after = scheduler.replan(at=10.0)
    assert after is not None and after.regions["b"].local_steps < before
    assert after.regions["c"].local_steps == scheduler.changes[0]["plan"]["c"]["local_steps"]
    assert scheduler.changes[-1]["time_s"] == 10.0 and "b local steps" in scheduler.changes[-1]["reason"]


def test_a_dip_in_a_trace_changes_the_plan_during_a_run(tmp_path):
    """MA on a run: the trace drops b's link from 1 to 0.05 Mbit/s at t=5 s; the recorded plans follow."""
    trace = tmp_path / "b.csv"
    trace.write_text("t_seconds,mbps\n0,1\n5,0.05\n")
    raw = {"name": "dip", "coordinator": "a", "regions": {
        "a": region(3000, 3.0, 10000, 0.2, wmax=1), "b": region(3000, 1.0, 100, 0.3, wmax=1),
        "c": region(200, 0.5, 100, 0.5, wmax=1)}}
    raw["regions"]["b"]["link"]["trace"] = str(trace)
    topo_file = tmp_path / "dip.yaml"
    topo_file.write_text(yaml.safe_dump(raw))
    overrides = small_run_overrides(topo_file) + ["strategy=ma", "scheduler=elastic", "scheduler.replan_every=1",
                                                  "strategy.num_rounds=12", "strategy.local_steps=5",
                                                  "compression=none"]  # the dip is sized for the whole model
    payload = run(compose(overrides), tmp_path / "run")
    schedule = payload["schedule"]
    assert schedule[0]["reason"] == "initial plan"
    steps_b = [c["plan"]["b"]["local_steps"] for c in schedule]
    assert any(c["time_s"] >= 5 and "b local steps" in c["reason"] for c in schedule[1:])
    assert min(steps_b) < steps_b[0]
    assert [e for e in payload["events"] if e["event"] == "plan"]  # also in the event log
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["schedule"] == schedule


def test_a_failed_region_is_excluded_and_restored_on_return(tmp_path):
    topo = hand_built(fast=region(1000, 3.6, 1000, 0.3, wmax=2, latency=0),
                      slow=region(100, 1.8, 80, 0.7, wmax=2, latency=10))
    fed = Federation(tmp_path, topo)
    sizes = {r: len(fed.resident(r).y) for r in topo.region_names}
    scheduler = Scheduler(topo, Workload(sizes, 0, base_steps=4, batch_size=16))

    def outage(period, arrays):
        if period == 2:
            fed.grid.set_offline(2)  # node 2 is "slow"
        if period == 4:
            fed.grid.set_offline(2, False)
        return MetricRecord({"accuracy": 0.0, "loss": 0.0})

    ma = ModelAveraging(lr=0.1, batch_size=16, meter=fed.meter(), reply_timeout=0.3, scheduler=scheduler,
                        replan_every=1, rejoin_every=1)
    ma.start(fed.grid, fed.initial, num_rounds=8, train_config=fed.config, evaluate_fn=outage)
    shares = dict(ma.roster.shares)
    reasons = [c["reason"] for c in scheduler.changes]
    assert reasons[0] == "initial plan"
    assert any("slow leaves" in r for r in reasons) and any("slow rejoins" in r for r in reasons)
    left = next(c for c in scheduler.changes if "slow leaves" in c["reason"])
    assert left["plan"]["slow"]["takes_part"] is False and left["plan"]["slow"]["workers"] == 0
    assert scheduler.changes[-1]["plan"]["slow"] == scheduler.changes[0]["plan"]["slow"]
    assert ma.history.counters["lost_regions"] == 1 and ma.history.counters["rejoined_regions"] == 1
    assert shares["slow"] == pytest.approx(sizes["slow"] / sum(sizes.values()))  # its data weight is back
    assert ma.weight_by == "shares"
    assert ma.meter.ledger.accounts["slow"].workers == scheduler.current.regions["slow"].workers


@pytest.mark.parametrize("leaves", ["vanishes", "is_quarantined"])
def test_asgd_ga_plans_without_a_region_that_left(tmp_path, leaves):
    from test_validation import FaultyGrid

    topo = hand_built(fast=region(1000, 3.6, 1000, 0.5, wmax=2, latency=0),
                      slow=region(100, 1.8, 80, 0.5, wmax=2, latency=10))
    fed = Federation(tmp_path, topo)
    sizes = {r: len(fed.resident(r).y) for r in topo.region_names}
    scheduler = Scheduler(topo, Workload(sizes, 0, base_steps=4, batch_size=16))
    if leaves == "is_quarantined":  # node 2 ("slow") sends NaN from its second job on
        fed.grid = FaultyGrid(fed.grid._app, 2, bad_node=2, kind="nan")

    def outage(version, arrays):
        if version == 10 and leaves == "vanishes":
            fed.grid.set_offline(2)
        return MetricRecord({"accuracy": 0.0, "loss": 0.0})

    strategy = AsyncGradAccum(lr=1.0, batch_size=16, update="delta", meter=fed.meter(), scheduler=scheduler,
                              limits=UpdateLimits(quarantine_after=2))
    strategy.start(fed.grid, fed.initial, num_rounds=30, timeout=0.3, train_config=fed.config, evaluate_fn=outage)
    assert strategy.history.counters["lost_regions" if leaves == "vanishes" else "quarantined_regions"] == 1
    left = [c for c in scheduler.changes if "slow leaves" in c["reason"]]
    assert len(left) == 1 and left[0]["plan"]["slow"]["takes_part"] is False
    assert scheduler.excluded == {"slow"}


def test_asgd_ga_takes_its_accumulation_steps_from_the_plan(tmp_path):
    topo = hand_built(fast=region(1000, 3.6, 1000, 0.5, wmax=2, latency=0),
                      slow=region(100, 1.8, 80, 0.5, wmax=3, latency=10))
    fed = Federation(tmp_path, topo)
    sizes = {r: len(fed.resident(r).y) for r in topo.region_names}
    scheduler = Scheduler(topo, Workload(sizes, 0, base_steps=3, batch_size=16))
    seen = []
    strategy = AsyncGradAccum(lr=0.1, batch_size=16, update="delta", meter=fed.meter(), scheduler=scheduler)
    original = strategy._train_message

    def spy(node_id, arrays, config, order, correction=None):
        seen.append((strategy.roster.live[node_id].name, order.steps))
        return original(node_id, arrays, config, order, correction)

    strategy._train_message = spy
    strategy.start(fed.grid, fed.initial, num_rounds=6, train_config=fed.config)
    planned = scheduler.changes[0]["plan"]
    assert {(r, s) for r, s in seen[:2]} == {(r, planned[r]["local_steps"]) for r in ("fast", "slow")}
    assert strategy.meter.ledger.accounts["slow"].workers == planned["slow"]["workers"]


@pytest.mark.parametrize("strategy", ["ma", "asgd_ga"])
def test_a_scheduled_run_sends_its_first_jobs_with_the_roll_call_and_plans_after_them(tmp_path, strategy):
    """`roll_call="first_jobs"` under the scheduler: no query goes out, the first step's jobs are the
    strategy's own on the regions' minimum workers, so up to that step's end the run is the unscheduled
    run bit for bit (model, time, books); the first plan is adopted then, at that step's time, and the jobs
    after it follow its local work and workers. It is the profiles' plan: slow computed at half its
    profile's speed, which waits for the first re-plan (one job's pace on a fluctuating link is noise)."""
    topo = hand_built(fast=region(1000, 3.6, 1000, 0.5, wmax=2, latency=0),
                      slow=region(100, 1.8, 80, 0.5, wmax=3, latency=10))
    profiled = hand_built(fast=region(1000, 3.6, 1000, 0.5, wmax=2, latency=0),
                          slow=region(200, 1.8, 80, 0.5, wmax=3, latency=10))
    runs = {}
    for scheduled in (False, True):
        fed = Federation(tmp_path / str(scheduled), topo)
        sizes = {r: len(fed.resident(r).y) for r in topo.region_names}
        scheduler = Scheduler(profiled, Workload(sizes, 0, base_steps=3, batch_size=16)) if scheduled else None
        common = dict(batch_size=16, meter=fed.meter(), roll_call="first_jobs", scheduler=scheduler,
                      replan_every=100)  # the first plan is the only one
        s = (ModelAveraging(lr=0.1, local_steps=3, weight_by="shares", **common) if strategy == "ma"
             else AsyncGradAccum(lr=0.1, accumulation_steps=3, update="delta", **common))
        orders, pushed, at_step_1 = [], [], {}
        original_message, original_push, evaluate = s._train_message, fed.grid.push_messages, fed.evaluator()

        def spy(node_id, arrays, config, order, correction=None, s=s, orders=orders, original=original_message):
            orders.append((s.step, order.steps, order.workers))
            return original(node_id, arrays, config, order, correction)

        def recording_push(messages, pushed=pushed, push=original_push):
            messages = list(messages)
            pushed.extend(m.metadata.message_type for m in messages)
            return push(messages)

        def evaluate_fn(version, arrays, s=s, at_step_1=at_step_1, evaluate=evaluate):
            if version == 1:  # the run as it stands when its first step ends
                at_step_1.update(model=arrays.to_torch_state_dict(), time=s.meter.clock.now(), books={
                    r: (a.busy_s, a.bytes_down, a.bytes_up) for r, a in s.meter.ledger.accounts.items()})
            return evaluate(version, arrays)

        s._train_message, fed.grid.push_messages = spy, recording_push
        s.start(fed.grid, fed.initial, num_rounds=3 if strategy == "ma" else 8, train_config=fed.config,
                evaluate_fn=evaluate_fn)
        runs[scheduled] = (s, at_step_1, orders, pushed)
    (plain, plain_1, _, _), (planned, planned_1, orders, pushed) = runs[False], runs[True]
    assert "query" not in pushed
    for key in plain_1["model"]:
        assert torch.equal(planned_1["model"][key], plain_1["model"][key])
    assert (planned_1["time"], planned_1["books"]) == (plain_1["time"], plain_1["books"])
    assert planned.history.entries[:2] == plain.history.entries[:2]
    first_plan = next(e for e in planned.history.events if e["event"] == "plan")
    assert first_plan["reason"] == "initial plan" and first_plan["time_s"] == planned_1["time"] > 0
    scheduler = planned.plan.scheduler
    assert scheduler.current == plan(scheduler.topology, scheduler.work, scheduler.objective)
    assert scheduler.current != plan(scheduler.measured_topology(), scheduler.work, scheduler.objective)
    first = scheduler.changes[0]["plan"]
    assert first["slow"]["workers"] > 1 and planned.meter.ledger.accounts["slow"].workers == first["slow"]["workers"]
    before = [(steps, workers) for step, steps, workers in orders if step == 0]
    after = {(steps, workers) for step, steps, workers in orders if step >= 1}
    assert before == [(3, 1), (3, 1)]  # the strategy's own work, on minimum workers
    assert after and after <= {(p["local_steps"], p["workers"]) for p in first.values()}


def test_a_supernode_that_starts_fewer_workers_caps_its_regions_plan(tmp_path):
    """A SuperNode's `max-workers` (launch sets it) comes back in its region's answer to the roll call, and
    the plan never rents that region more: workers it would be charged for and modelled on, but that never
    compute. A region whose SuperNode says nothing keeps the topology's bounds."""
    topo = hand_built(fast=region(1000, 3.6, 1000, 0.5, wmax=2, latency=0),
                      slow=region(100, 1.8, 80, 0.5, wmax=3, latency=10))

    def planned(cap: int | None) -> tuple[dict, int]:
        fed = Federation(tmp_path / f"cap{cap}", topo)
        if cap is not None:  # the node of partition 1 is slow's
            [slow_node] = [c for c in fed.grid._contexts.values() if c.node_config["partition-id"] == 1]
            slow_node.node_config["max-workers"] = cap
        sizes = {r: len(fed.resident(r).y) for r in topo.region_names}
        scheduler = Scheduler(topo, Workload(sizes, 0, base_steps=3, batch_size=16))
        strategy = AsyncGradAccum(lr=0.1, batch_size=16, update="delta", meter=fed.meter(), scheduler=scheduler)
        strategy.start(fed.grid, fed.initial, num_rounds=2, train_config=fed.config)
        first = scheduler.changes[0]["plan"]
        return {r: first[r]["workers"] for r in first}, strategy.meter.ledger.accounts["slow"].workers

    free, _ = planned(None)
    capped, rented = planned(1)
    assert free["slow"] == 3  # without the cap the plan rents slow's profile maximum ...
    assert capped["slow"] == rented == 1  # ... with it, no more than its SuperNode starts
    assert capped["fast"] == free["fast"]


def test_a_schedulers_worker_caps_bound_every_plan_and_survive_a_checkpoint():
    """Caps bound the first plan and every re-plan (geo4: ap-chengdu's cheap workers are what the elastic
    plan rents first), and come back with the scheduler's state."""
    topo = load_topology({**compose(["topology=geo4"]).topology})
    sizes = {"ap-beijing": 144, "ap-shanghai": 287, "ap-guangzhou": 431, "ap-chengdu": 575}
    work = Workload({}, 0, base_steps=20, epochs=20, max_steps_factor=4)
    capped = Scheduler(topo, work)
    capped.set_workload(data_sizes=sizes, model_bytes=4_505_640, worker_caps={"ap-chengdu": 1, "ap-guangzhou": 2})
    first = capped.start()
    assert plan(topo, replace(work, data_sizes=sizes, model_bytes=4_505_640)).regions["ap-chengdu"].workers > 1
    assert first.regions["ap-chengdu"].workers == 1 and first.regions["ap-guangzhou"].workers <= 2
    capped.observe("ap-chengdu", samples=3200, work_s=40.0, workers=1, nbytes=8_000_000, transfer_s=2.0)
    restored = Scheduler(topo, work)
    restored.load_state_dict(json.loads(json.dumps(capped.state_dict())))
    again, replanned = restored.replan(50.0), capped.replan(50.0)
    assert again == replanned and (again or capped.current).regions["ap-chengdu"].workers == 1
    assert restored.topology.region("ap-chengdu").workers_max == 1
    # a cap below the profile's minimum is the minimum too: the node cannot start what the profile demands
    far_needs_two = replace(HAND_BUILT[0], regions=tuple(replace(r, workers_min=2) if r.name == "far" else r
                                                         for r in HAND_BUILT[0].regions))
    tight = Scheduler(far_needs_two, Workload({}, 0))
    tight.set_workload(data_sizes=workload(far_needs_two).data_sizes, model_bytes=MODEL_BYTES, worker_caps={"far": 1})
    assert tight.start().regions["far"].workers == 1


class RecordingSelectiveFedAvg(SelectiveFedAvg):
    """Keeps, per round, each joining region's weight as FedAvg saw it."""

    rounds: list[dict[str, int]]

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)  # scales the weights in place
        self.rounds.append({self.roster.region_of(r.metadata.src_node_id): r.content["metrics"]["num-examples"]
                            for r in replies})
        return result


def test_selective_fedavg_lets_slow_regions_sit_out_with_their_weight_kept(tmp_path):
    fed = Federation(tmp_path, hand_built(fast=region(1000, 3.6, 1000, 0.5, latency=0),
                                          slow=region(100, 1.8, 80, 0.5, latency=10)))
    selective = RecordingSelectiveFedAvg(round_times={"fast": 1.0, "slow": 2.5}, deadline_s=1.0,
                                         fraction_evaluate=0.0, min_available_nodes=2)
    selective.rounds = []
    assert selective.every == {"fast": 1, "slow": 3}
    config = ConfigRecord({**dict(fed.config), **WorkOrder(lr=0.1, batch_size=16, epochs=1.0).to_config()})
    Metered(selective, fed.meter()).start(fed.grid, fed.initial, num_rounds=6, train_config=config)
    assert [sorted(r) for r in selective.rounds] == [["fast", "slow"], ["fast"], ["fast"]] * 2
    slow_samples = len(fed.resident("slow").y)
    assert [r["slow"] for r in selective.rounds if "slow" in r] == [3 * slow_samples] * 2
    assert all(r["fast"] == len(fed.resident("fast").y) for r in selective.rounds)


def test_selective_fedavg_joins_every_m_th_round_by_round_time_over_deadline_and_scales_only_those_weights(monkeypatch):
    """m_r = ceil(t_r / deadline), an exact multiple not rounded up; a region without a round time joins every
    round with its weight as sent; a region of m = 2 counts twice (mutation gaps of selective.py)."""
    selective = SelectiveFedAvg(round_times={"a": 2.0, "b": 3.0, "c": 6.0}, deadline_s=2.0)
    assert selective.every == {"a": 1, "b": 2, "c": 3}
    assert [selective.joins("b", r) for r in (1, 2, 3)] == [True, False, True]
    assert all(selective.joins("unplanned", r) for r in (1, 2, 3))
    with pytest.raises(ValueError, match="deadline_s must be > 0, got 0"):
        SelectiveFedAvg(round_times={"a": 1.0}, deadline_s=0)
    for node, name in {1: "a", 2: "b", 3: "unplanned"}.items():
        selective.roster.learn(node, name)
    for name, value in {"_task_id": 1, "_run_id": 1, "_node_id": SUPERLINK_NODE_ID}.items():  # as the engines do
        monkeypatch.setattr(TaskIdentity, name, value)
    replies = []
    for node in (1, 2, 3):
        job = Message(RecordDict(), dst_node_id=node, message_type="train")
        replies.append(Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.full(1, float(node)))}),
                                           "metrics": MetricRecord({"num-examples": 10})}), reply_to=job))
    failed = Message(Error(code=0, reason="lost"), reply_to=Message(RecordDict(), dst_node_id=2, message_type="train"))
    arrays, _ = selective.aggregate_train(1, [*replies, failed])  # a failed reply of b is left alone
    assert [r.content["metrics"]["num-examples"] for r in replies] == [10, 20, 10]
    assert float(arrays["w"].numpy()[0]) == pytest.approx((1 * 10 + 2 * 20 + 3 * 10) / 40)


def test_scheduler_config_runs_end_to_end(two_region_topology, tmp_path):
    overrides = small_run_overrides(two_region_topology) + ["strategy=ma", "scheduler=elastic"]
    payload = run(compose(overrides), tmp_path / "run")
    assert len(payload["schedule"]) == 1  # 3 periods: no re-plan is due (replan_every=5)
    plan = payload["schedule"][0]["plan"]
    for name, decision in plan.items():
        assert payload["regions"][name]["workers"] == decision["workers"]  # the ledger rented what was planned
    # the regions trained the planned local steps: 3 periods of sum_r H_r mini-batches of 32
    assert payload["summary"]["samples"] == 3 * 32 * sum(d["local_steps"] for d in plan.values())
    none = run(compose(small_run_overrides(two_region_topology) + ["strategy=ma"]), tmp_path / "none")
    assert none["schedule"] is None


def _with_start(topo, **job_start_s):
    from dataclasses import replace

    return replace(topo, regions=tuple(replace(r, job_start_s=job_start_s.get(r.name, 0.0)) for r in topo.regions))


@pytest.mark.parametrize("topo", HAND_BUILT)
def test_local_work_grows_until_the_overhead_is_a_small_share_of_the_period(topo):
    """A 2 s overhead per job in one region: with max_overhead_share 0.2 the period lasts at least 10 s,
    and no more than rounding the steps up needs; every region's work grows by the same factor."""
    from dataclasses import replace

    slowed = _with_start(topo, **{topo.region_names[-1]: 2.0})
    workers = {r.name: r.workers_min for r in topo.regions}
    free = evaluate_plan(slowed, workload(topo, factor=1.0), workers)
    amortised = evaluate_plan(slowed, replace(workload(topo, factor=1.0), max_overhead_share=0.2,
                                             max_overhead_growth=100.0), workers)
    assert free.period_s < 10.0 <= amortised.period_s * (1 + 1e-9) < 10.0 * 1.1
    growth = {n: amortised.regions[n].local_steps / free.regions[n].local_steps for n in topo.region_names}
    assert max(growth.values()) < 1.1 * min(growth.values())  # one factor, up to rounding
    assert amortised.epochs_per_period / free.epochs_per_period == pytest.approx(min(growth.values()), rel=0.1)
    huge = evaluate_plan(_with_start(topo, **{topo.region_names[-1]: 500.0}),
                         replace(workload(topo, factor=1.0), max_overhead_share=0.2, max_overhead_growth=3.0), workers)
    assert huge.epochs_per_period / free.epochs_per_period == pytest.approx(3.0)  # the drift bound holds
    no_overhead = evaluate_plan(topo, replace(workload(topo, factor=1.0), max_overhead_share=0.2), workers)
    assert no_overhead.regions == evaluate_plan(topo, workload(topo, factor=1.0), workers).regions


def test_a_delay_in_one_region_is_learned_and_the_plan_gives_it_more_work(tmp_path):
    """Deployment's per-job overhead, injected in-process (0.3 s before every job of region `slow`) under
    the wall clock on paced regions: the meter measures it within a few jobs, and the re-plan raises
    local work."""
    import time as _time

    from cloudless_fl.control.meter import Meter

    topo = hand_built(fast=region(1000, 3.6, 1000, 0.5, wmax=1, latency=0),
                      slow=region(400, 1.8, 80, 0.5, wmax=1, latency=10))
    fed = Federation(tmp_path, topo)
    app = fed.grid._app

    def delayed(message, context):
        if context.node_config["partition-id"] == 1:  # region `slow`
            _time.sleep(0.3)
        return app(message, context)

    fed.grid._app = delayed
    for node, profile in zip((1, 2), topo.regions):  # paced as launch does: compute at the profile's speed
        fed.grid._contexts[node].node_config["pace-samples-per-s"] = profile.samples_per_s * profile.efficiency
    sizes = {r: len(fed.resident(r).y) for r in topo.region_names}
    scheduler = Scheduler(topo, Workload(sizes, 0, base_steps=3, batch_size=16, max_overhead_share=0.5))
    strategy = AsyncGradAccum(lr=0.1, batch_size=16, update="delta", meter=Meter.measured(topo), scheduler=scheduler,
                              replan_every=3)
    strategy.start(fed.grid, fed.initial, num_rounds=10, train_config=fed.config)
    assert 0.25 < strategy.meter.overhead_s["slow"] < 0.45 and strategy.meter.overhead_s["fast"] < 0.1
    first, last = scheduler.changes[0]["plan"], scheduler.current.local_steps()
    assert last["slow"] > first["slow"]["local_steps"] and last["fast"] > first["fast"]["local_steps"]
    # at the plan's own speeds the 0.3 s overhead is at most half the period
    assert scheduler.current.period_s >= 0.3 / 0.5 * (1 - 1e-9)


@pytest.mark.parametrize("two_worker_efficiency, planned", [(0.46, 1), (1.0, 4)])
def test_a_regions_measured_scaling_feeds_its_next_plan(two_worker_efficiency, planned):
    """Deployment measures how a region's group scales (`Meter.scaling`) and the re-plan times its groups
    with it: `far`, planned 4 workers on its profile, is planned alone once its jobs showed a second worker
    adding nothing (efficiency 0.46, as bench_workers measured on this 2-core machine); measured to scale
    as its profile says, it keeps its 4."""
    topo, work = HAND_BUILT[0], workload(HAND_BUILT[0])
    far = topo.region("far")
    clock = SetClock()
    meter = Meter(clock, CostModel(topo, seed=0, compute_jitter=0.0))
    follower = PlanFollower(Scheduler(topo, work), meter, RunBook(meter), replan_every=1)
    follower.start(dict(work.data_sizes), MODEL_BYTES)
    assert follower.scheduler.current.workers()["far"] == 4
    for workers, efficiency in ((1, 1.0), (2, two_worker_efficiency)):
        speed = far.samples_per_s * far.efficiency * workers * efficiency
        reported = Reported(3200, compute_s=3200 / speed, workers=workers)
        job = meter.dispatch("far", bytes_down=0, samples=3200)
        clock.t += reported.compute_s
        work_s, transfer_s, overhead_s = meter.complete(job, bytes_up=0, reported=reported)
        follower.observe(job, reported, work_s=work_s, transfer_s=transfer_s, overhead_s=overhead_s, nbytes=0)
    follower.maybe_replan(1)
    assert follower.scheduler.current.workers()["far"] == planned


def test_the_static_plan_is_the_unscheduled_setup():
    """`static_plan` (the baseline `cloudless-fl plan` compares with): each region with data at its minimum
    workers doing `base_steps`, none filling idle time; a region without data sits out; a period covers
    the share of an epoch that the region with the most data covers."""
    topo = HAND_BUILT[1]  # b (slower, on a 100 Mbps link) finishes last: a would have room to fill
    p = static_plan(topo, Workload({"a": 640, "b": 320}, MODEL_BYTES, base_steps=20, batch_size=32,
                                   max_steps_factor=4.0))
    assert p.local_steps() == {"a": 20, "b": 20}
    assert p.workers() == {"a": 1, "b": 1, "c": 0} and not p.regions["c"].takes_part
    assert p.regions["b"].finish_s == pytest.approx(p.period_s) and p.regions["a"].finish_s < p.period_s
    assert p.epochs_per_period == pytest.approx(20 * 32 / 640)


def test_a_plan_round_trips_through_its_dict_with_the_figures_results_show():
    """`Plan.to_dict` is what results.json and checkpoints keep: `from_dict` gives the plan back, and the
    derived figures (per epoch, totals, each region's finish) are the plan's own."""
    p = plan(HAND_BUILT[0], workload(HAND_BUILT[0]))
    kept = json.loads(json.dumps(p.to_dict()))
    assert Plan.from_dict(kept) == p
    assert {k: kept[k] for k in ("time_per_epoch_s", "usd_per_epoch", "total_time_s", "total_usd")} == {
        "time_per_epoch_s": p.time_per_epoch_s, "usd_per_epoch": p.usd_per_epoch, "total_time_s": p.total_time_s,
        "total_usd": p.total_usd}
    assert {name: r["finish_s"] for name, r in kept["regions"].items()} == {
        name: r.finish_s for name, r in p.regions.items()}


def test_a_scheduler_restored_from_its_state_dict_is_the_scheduler_it_was():
    """A checkpoint keeps the scheduler: the workload, exclusions, plan changes, current plan and
    measurements (speeds, link, overhead, scaling) come back, so the restored one re-plans alike."""
    topo, work = HAND_BUILT[0], workload(HAND_BUILT[0])
    original = Scheduler(topo, Workload({}, 0))
    original.set_workload(data_sizes=work.data_sizes, model_bytes=work.model_bytes)
    original.start()
    original.observe("far", samples=3200, work_s=20.0, workers=2, nbytes=8_000_000, transfer_s=2.0, overhead_s=3.0,
                     scaling=((1, 1.0), (2, 0.5)))
    original.exclude("mid")
    original.replan(10.0)
    restored = Scheduler(topo, Workload({}, 0))
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.work == original.work and restored.excluded == {"mid"}
    assert restored.current == original.current and restored.changes == original.changes
    assert restored.measured_topology() == original.measured_topology() != topo
    original.observe("hq", samples=3200, work_s=4.0, workers=1, nbytes=8_000_000, transfer_s=0.1)
    restored.observe("hq", samples=3200, work_s=4.0, workers=1, nbytes=8_000_000, transfer_s=0.1)
    assert restored.replan(20.0) == original.replan(20.0)


def test_the_scheduler_averages_what_jobs_measured_and_skips_what_they_did_not():
    """Per region, moving averages (smoothing 0.5) of the per-worker speed — a group's read back through its
    measured scaling — and of the per-job overhead; a job without samples or compute time says nothing
    about speed."""
    topo = HAND_BUILT[0]
    far = topo.region("far")  # 400 samples/s per worker, efficiency 0.9
    s = Scheduler(topo, workload(topo))
    s.observe("far", samples=0, work_s=1.0, workers=1, nbytes=0, transfer_s=0.0)
    s.observe("far", samples=360, work_s=0.0, workers=1, nbytes=0, transfer_s=0.0)
    assert s.measured_topology().region("far").samples_per_s == far.samples_per_s  # nothing measured yet
    halved = ((1, 1.0), (2, 0.5))  # a second worker adds nothing
    s.observe("far", samples=180, work_s=0.5, workers=2, nbytes=0, transfer_s=0.0, overhead_s=2.0, scaling=halved)
    measured = s.measured_topology().region("far")
    assert measured.samples_per_s == pytest.approx(400) and measured.scaling == halved  # the profile's speed
    s.observe("far", samples=90, work_s=0.5, workers=1, nbytes=0, transfer_s=0.0, overhead_s=4.0, scaling=halved)
    measured = s.measured_topology().region("far")
    assert measured.samples_per_s == pytest.approx(300) and measured.job_start_s == pytest.approx(3.0)
    s.observe("far", samples=0, work_s=0.0, workers=1, nbytes=1_000_000, transfer_s=2 * 0.02 + 0.1)  # 80 Mbps
    s.observe("far", samples=0, work_s=0.0, workers=1, nbytes=1_000_000, transfer_s=2 * 0.02 + 0.2)  # 40 Mbps
    s.observe("hq", samples=0, work_s=0.0, workers=1, nbytes=1_000_000, transfer_s=2 * 0.02 + 0.2)
    links = {r.name: r.link for r in s.measured_topology().regions}
    assert (links["far"].up_mbps, links["far"].down_mbps) == (pytest.approx(60), pytest.approx(60))
    assert links["hq"] == topo.region("hq").link  # the coordinator's own traffic crosses no WAN: not a link
    assert Scheduler(topo, workload(topo)).state_dict()["current"] is None  # before its first plan


def test_an_asynchronous_strategys_plan_keeps_its_steps_in_every_region():
    """ASGD-GA under the scheduler (`equal_steps`): every region taking part does the strategy's own steps
    per job, whatever its data (data-share steps made geo4's ASGD-GA delta slower than unscheduled); MA's
    and FedAvg's plans keep steps in proportion to the data."""
    from cloudless_fl.server_app import workload as configured_workload

    topo = HAND_BUILT[0]
    work = replace(workload(topo, factor=1.0), equal_steps=True)
    p = plan(topo, work)
    assert {r.local_steps for r in p.regions.values() if r.takes_part} == {work.base_steps}
    assert p.epochs_per_period == pytest.approx(work.base_steps * work.batch_size / max(work.data_sizes.values()))
    shared = plan(topo, replace(work, equal_steps=False))
    assert len({r.local_steps for r in shared.regions.values() if r.takes_part}) == 3
    sizes = dict(work.data_sizes)
    assert [configured_workload(compose([f"strategy={name}", "scheduler=elastic"]), sizes, MODEL_BYTES).equal_steps
            for name in ("fedavg", "ma", "asgd_ga", "asgd_ga_delta")] == [False, False, True, True]


def test_a_replan_is_adopted_for_changes_beyond_the_tolerance_and_says_which():
    """Local work moving by at most `tolerance` (10 %) is jitter; more, a region's workers or participation
    changing, is a new plan whose reason names every change."""
    s = Scheduler(HAND_BUILT[0], workload(HAND_BUILT[0]))
    base = s.start()

    def variant(**changes) -> Plan:
        return replace(base, regions={name: replace(r, **changes.get(name, {})) for name, r in base.regions.items()})

    old = variant(hq={"local_steps": 20})
    assert s._difference(old, variant(hq={"local_steps": 22})) is None
    assert s._difference(old, variant(hq={"local_steps": 23})) == "hq local steps 20→23"
    assert s._difference(variant(hq={"local_steps": 0}), variant(hq={"local_steps": 1})) == "hq local steps 0→1"
    assert (s._difference(old, variant(hq={"local_steps": 20}, mid={"takes_part": False}, far={"workers": 3}))
            == "mid leaves; far workers 4→3")


def test_under_min_gain_a_replan_is_adopted_only_when_it_is_worth_it():
    """Hysteresis (`min_gain`): `far` measured 10 % slower moves its plan from 4 to 5 workers for an estimate
    0.03 % cheaper — adopted without `min_gain`, not under 1 %; 40 % slower (6 workers, 1.6 % cheaper) is
    adopted under 1 %, and held back as well after a region left; a region leaving, or current workers that now
    miss the deadline, always are."""
    topo = HAND_BUILT[0]

    def far_slowed(speed: float, min_gain: float | None, gone: str | None = None, **objective) -> Scheduler:
        s = Scheduler(topo, workload(topo), Objective(**objective), min_gain=min_gain)
        start = s.start()
        assert start.workers()["far"] == 4
        if gone:  # a region left before `far` slowed; the plan without it has `far` on 3 workers
            s.exclude(gone)
            assert s.replan(at=1.0).workers() == {"hq": 1, gone: 0, "far": 3}
        s.observe("far", samples=6400, work_s=6400 / (400 * 0.9 * speed), workers=1, nbytes=2 * MODEL_BYTES,
                  transfer_s=start.regions["far"].comm_s)
        return s

    assert far_slowed(0.9, None).replan(at=5.0).workers()["far"] == 5
    held = far_slowed(0.9, 0.01)
    assert held.replan(at=5.0) is None and held.current.workers()["far"] == 4 and len(held.changes) == 1
    assert far_slowed(0.6, 0.01).replan(at=5.0).workers()["far"] == 6
    assert far_slowed(0.6, 0.02).replan(at=5.0) is None
    left = far_slowed(0.9, 0.99)
    left.exclude("mid")
    assert not left.replan(at=5.0).regions["mid"].takes_part and left.changes[-1]["reason"] == "mid leaves"
    assert far_slowed(0.9, None, gone="mid").replan(at=5.0).workers()["far"] == 4
    assert far_slowed(0.9, 0.01, gone="mid").replan(at=5.0) is None  # the current workers valued without `mid`
    late = far_slowed(0.9, 0.99, deadline_s=31.5)  # planned 31.0 s; at 4 workers now 32.2 s, at 5 29.9 s
    assert late.replan(at=5.0).workers()["far"] == 5
    from cloudless_fl.server_app import make_scheduler

    assert make_scheduler(compose(["scheduler=elastic", "scheduler.min_gain=0.05"]), topo, workload(topo)).min_gain == 0.05


@pytest.mark.parametrize("billing", ["instance", "serverless"])
def test_a_plans_times_steps_and_prices_by_hand(billing):
    """`evaluate_plan` against hand-computed figures: transfers over nominal links, each job's start-up, idle
    time filled net of start-up, compute held per period (instance) or billed per job with its cold start
    (serverless), egress paid where bytes leave; a region without data rents nothing."""
    hq = {**region(1000, 3.6, 1000, 0.5, latency=0), "job_start_s": 0.3}
    far = {**region(500, 1.8, 100, 0.5, latency=20), "job_start_s": 0.5, "cold_start_usd": 0.01,
           "link": {"up_mbps": 50, "down_mbps": 100, "latency_ms": 20}}
    topo = hand_built(hq=hq, mid=region(500, 1.8, 100, 0.0), far=far)
    work = Workload({"hq": 3200, "far": 3200}, 1_000_000, base_steps=10, batch_size=32, max_steps_factor=4.0)
    p = evaluate_plan(topo, work, {"hq": 1, "far": 1, "mid": 1}, billing)
    far_plan, hq_plan = p.regions["far"], p.regions["hq"]
    assert far_plan.comm_s == pytest.approx(0.02 + 8e6 / 100e6 + 0.02 + 8e6 / 50e6)  # 1 MB down, 1 MB up
    assert far_plan.compute_s == pytest.approx(0.5 + 320 / (500 * 0.9))  # 10 batches of 32 after the start-up
    assert p.period_s == pytest.approx(0.28 + 0.5 + 320 / 450) and p.epochs_per_period == pytest.approx(0.1)
    assert hq_plan.comm_s == pytest.approx(2 * 8e6 / 1000e6)
    assert hq_plan.local_steps == 33  # ⌊(period − comm − 0.3 s start-up) × 900/s ÷ 32⌋ = ⌊33.1⌋
    assert hq_plan.compute_s == pytest.approx(0.3 + 33 * 32 / 900)
    held = {"instance": (p.period_s, p.period_s), "serverless": (hq_plan.compute_s, far_plan.compute_s)}[billing]
    assert hq_plan.usd_per_period == pytest.approx(3.6 * held[0] / 3600)  # the coordinator's traffic is free
    assert far_plan.usd_per_period == pytest.approx(1.8 * held[1] / 3600 + 2 * 1e-3 * 0.1
                                                    + (0.01 if billing == "serverless" else 0.0))
    assert p.regions["mid"] == RegionPlan("mid", False, 0, 0, 32, 0.0, 0.0, 0.0) and p.billing == billing


def test_a_plan_follower_plans_for_the_regions_that_joined_and_records_every_plan():
    """`PlanFollower`: the first plan leaves out regions that sent no node, each adopted plan rents its
    workers and is a `plan` event at the clock's time, a lost region is planned without until it is
    back, and a checkpoint brings the follower back as it was."""
    topo = HAND_BUILT[0]
    clock = SetClock()
    clock.t = 4.0
    meter = Meter(clock, CostModel(topo, seed=0))
    book = RunBook(meter)
    follower = PlanFollower(Scheduler(topo, Workload({}, 0)), meter, book, replan_every=2)
    with pytest.raises(ConfigError, match=r"the scheduler's topology has no region\(s\) atlantis, nowhere; name each "
                                          r"SuperNode's region \(node-config region='...'\) after the topology"):
        follower.start({"hq": 600, "nowhere": 10, "atlantis": 5}, MODEL_BYTES)
    follower.start({"hq": 600, "far": 1500}, MODEL_BYTES)
    first = follower.scheduler.current
    assert follower.scheduler.excluded == {"mid"} and follower.steps == first.local_steps() == {
        "hq": first.regions["hq"].local_steps, "far": first.regions["far"].local_steps}
    assert {r: a.workers for r, a in meter.ledger.accounts.items()} == {"hq": 1, "mid": 0, "far": first.workers()["far"]}
    assert book.history.events[-1] == {"event": "plan", "time_s": 4.0, "reason": "initial plan",
                                       "plan": follower.scheduler.changes[0]["plan"]}
    clock.t = 9.0
    follower.region_left("far", live=["hq", "far"])  # another node of far is still there
    assert len(book.history.events) == 1
    follower.region_left("far", live=["hq"])
    assert "far leaves" in book.history.events[-1]["reason"] and book.history.events[-1]["time_s"] == 9.0
    assert follower.steps == {"hq": follower.scheduler.current.regions["hq"].local_steps}
    kept = json.loads(json.dumps(follower.state_dict()))
    clock.t = 12.0
    follower.region_back("far")
    assert "far rejoins" in book.history.events[-1]["reason"] and "far" in follower.steps
    assert [change["time_s"] for change in follower.scheduler.changes] == [4.0, 9.0, 12.0]  # kept with each plan
    restored = PlanFollower(Scheduler(topo, Workload({}, 0)), meter, book)
    restored.load_state_dict(kept)
    assert restored.steps == {"hq": follower.scheduler.changes[1]["plan"]["hq"]["local_steps"]}
    assert restored.scheduler.excluded == {"mid", "far"} and len(restored.scheduler.changes) == 2
