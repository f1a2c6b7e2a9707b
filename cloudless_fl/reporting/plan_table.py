"""`cloudless-fl plan`: the scheduler's plan for a config, as a table beside the static plan."""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import compose, prepare_data, topology_of, validate
from ..control.scheduler import Objective, Plan, Workload, evaluate_plan, plan, static_plan
from ..control.topology import Topology
from ..server_app import codec_of, make_scheduler, resident_sizes, workload
from ..strategy.registry import strategy_entry
from ..training.compression import wire_bytes
from ..training.models import build_model


def planning_inputs(cfg: DictConfig) -> tuple[Topology, Workload, Objective]:
    """What the scheduler plans with for the config: its topology, the workload of its data, model and
    strategy, and the objective."""
    validate(cfg)
    topology, layout = topology_of(cfg), prepare_data(cfg)
    model = build_model(cfg.model.name, layout.input_shape, layout.num_classes, **cfg.model.options)
    work = workload(cfg, resident_sizes(topology, layout), wire_bytes(codec_of(cfg), model.state_dict()))
    return topology, work, make_scheduler(cfg, topology, work).objective


def plans_for(cfg: DictConfig) -> tuple[Plan, Plan]:
    """(elastic plan, static plan) for the config's topology, data, model and strategy."""
    topology, work, objective = planning_inputs(cfg)
    if strategy_entry(cfg.strategy.name).epoch_based:  # unscheduled FedAvg: minimum workers, one local epoch each
        static = evaluate_plan(topology, work, {r.name: r.workers_min for r in topology.regions},
                               objective.billing, fill=False)
    else:
        static = static_plan(topology, work, objective.billing)
    return plan(topology, work, objective), static


def render(elastic: Plan, static: Plan) -> str:
    """Both plans per region and in total, and what the elastic one saves."""
    lines = [f"{'region':<16} {'workers':>7} {'local steps':>11} {'finish s':>9} {'$/period':>9}   "
             f"{'static: workers':>15} {'steps':>5} {'finish s':>9} {'$/period':>9}"]
    for name, e in elastic.regions.items():
        s = static.regions[name]
        part = "" if e.takes_part else " (sits out)"
        lines.append(f"{name:<16} {e.workers:>7} {e.local_steps:>11} {e.finish_s:>9.3f} {e.usd_per_period:>9.5f}   "
                     f"{s.workers:>15} {s.local_steps:>5} {s.finish_s:>9.3f} {s.usd_per_period:>9.5f}{part}")
    lines.append("")
    for label, p in (("elastic", elastic), ("static", static)):
        lines.append(f"{label:<8} period {p.period_s:7.3f} s, {p.epochs_per_period:.3f} epochs/period: "
                     f"{p.time_per_epoch_s:7.3f} s and ${p.usd_per_epoch:.5f} per epoch; "
                     f"{p.epochs:g} epochs: {p.total_time_s:8.1f} s, ${p.total_usd:.4f} ({p.billing})")
    saving = 1 - elastic.total_usd / static.total_usd
    speedup = static.total_time_s / elastic.total_time_s
    lines.append(f"elastic vs static: {saving:+.1%} cost saved, {speedup:.2f}x the speed")
    return "\n".join(lines)


def plan_command(overrides: list[str]) -> str:
    """`cloudless-fl plan [overrides]`: always the elastic scheduler, whatever `scheduler=` says."""
    if not any(o.startswith("scheduler=") for o in overrides):
        overrides = ["scheduler=elastic", *overrides]
    return render(*plans_for(compose(overrides)))
