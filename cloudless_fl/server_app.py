"""The control plane's ServerApp: strategy from config, central evaluation, results.json.

`run_experiment(grid, cfg, run_dir)` is the whole server side of a run; the
Flower Simulation Engine, `InProcessGrid` and the Deployment Engine all call it
through the ServerApp's main. `app` is what `flwr run .` loads.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, OmegaConf

from .atomic import ensure_writable
from .checkpoint import FILENAME as CHECKPOINT_FILE
from .checkpoint import Checkpointer, model_fingerprint
from .config import (DataLayout, config_from_run_config, data_digest, dataset_cfg, flatten, prepare_data,
                     topology_of, topology_spec, under, validate)
from .control.budget import baseline_time_s, measured_baseline_time_s, resolve_time_budget
from .control.meter import Meter
from .control.scheduler import Objective, Scheduler, Workload, epoch_steps
from .control.topology import Topology
from .errors import CloudlessError, ConfigError
from .reporting.progress import Progress
from .reporting.results import History, summarize, write_results
from .strategy.membership import wait_for_nodes
from .strategy.planning import REPLAN_EVERY
from .strategy.registry import Build, strategy_entry
from .strategy.validation import UpdateLimits
from .training.compression import Codec, make_codec, wire_bytes
from .training.data import read_manifest
from .training.local import evaluate
from .training.models import build_model
from .training.protocol import ModelSpec, WorkOrder

log = logging.getLogger("cloudless_fl")
NODE_WAIT_S = 120.0


def require_nodes(grid: Grid, count: int, timeout: float = NODE_WAIT_S) -> list[int]:
    """Wait for one SuperNode per region of the topology; a `ConfigError` saying how to start them if not."""
    nodes = wait_for_nodes(grid, count, timeout)
    if len(nodes) < count:
        raise ConfigError(
            f"only {len(nodes)} of {count} regions' SuperNodes connected within {timeout:.0f} s; "
            "start one SuperNode per region of the topology (under `flwr run .` in simulation: "
            f"--federation-config \"num-supernodes={count}\")"
        )
    return nodes


def central_evaluator(cfg: DictConfig, layout: DataLayout):
    """`evaluate_fn` for Flower's start(): accuracy/loss of the global model on the coordinator's test set."""
    model = build_model(cfg.model.name, layout.input_shape, layout.num_classes, **cfg.model.options)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, layout.test)
        return MetricRecord({"accuracy": acc, "loss": loss})

    return evaluate_fn


def make_meter(cfg: DictConfig, topology: Topology) -> Meter:
    if cfg.clock == "virtual":
        return Meter.simulated(topology, cfg.seed)
    if cfg.clock == "wall":
        return Meter.measured(topology, cfg.seed)
    raise ConfigError(f"clock={cfg.clock!r} is unknown; use virtual (simulation) or wall (deployment)")


def workload(cfg: DictConfig, data_sizes: dict[str, int], model_bytes: int) -> Workload:
    """What the scheduler plans for: the resident data, the model's size and the strategy's local work.

    Only a strategy with a barrier to wait at (MA) fills idle time with extra steps. FedAvg's local
    epoch keeps data-share work; ASGD-GA's jobs (no barrier: an early finisher just starts its next job)
    keep the strategy's own steps everywhere."""
    sc = cfg.scheduler
    entry = strategy_entry(cfg.strategy.name)
    return Workload(data_sizes, model_bytes, base_steps=base_steps(cfg, data_sizes),
                    batch_size=int(cfg.strategy.batch_size), epochs=float(sc.get("epochs", 1.0)),
                    max_steps_factor=float(sc.get("max_steps_factor", 1.0)) if entry.fills_idle_time else 1.0,
                    max_overhead_share=sc.get("max_overhead_share"),
                    max_overhead_growth=float(sc.get("max_steps_factor", 1.0)), equal_steps=entry.equal_steps)


def base_steps(cfg: DictConfig, data_sizes: dict[str, int]) -> int:
    """The strategy's configured local work per synchronisation, in mini-batches (mean over regions)."""
    s = cfg.strategy
    entry = strategy_entry(s.name)
    if entry.epoch_based:  # local epochs of the mean region
        return epoch_steps(data_sizes, float(s.local_epochs), int(s.batch_size))
    steps = OmegaConf.to_container(s, resolve=True)[entry.local_work]
    return round(sum(steps.values()) / len(steps)) if isinstance(steps, dict) else steps


def make_scheduler(cfg: DictConfig, topology: Topology, work: Workload) -> Scheduler | None:
    """`scheduler=elastic`: a `Scheduler` for the run; None for `scheduler=none`."""
    sc = cfg.scheduler
    if sc.name == "none":
        return None
    objective = Objective(kind=str(sc.objective), deadline_s=sc.deadline_s, budget_usd=sc.budget_usd,
                          usd_per_hour=float(sc.usd_per_hour), billing=str(sc.billing))
    return Scheduler(topology, work, objective, smoothing=float(sc.smoothing), tolerance=float(sc.tolerance),
                     min_gain=sc.min_gain)


# May change on resume: how the run is shown and driven, where it goes on, and how far (num_rounds and the stop
# budgets: a finished run can be extended). Everything else in the resolved config is in the checkpoint's fingerprint.
RESUMABLE_KEYS = ("hydra", "resume", "progress", "flower_log_level", "label", "engine", "checkpoint",
                  "strategy.num_rounds", "strategy.stop", "topology", "topology_file", "dataset", "dataset_file",
                  "region_nodes")


def training_settings(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as dotted keys, minus `RESUMABLE_KEYS` (topology and dataset: by content instead)."""
    return {k: v for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items() if not under(k, RESUMABLE_KEYS)}


def make_checkpointer(cfg: DictConfig, run_dir: Path, model_state: dict, layout: DataLayout) -> Checkpointer | None:
    """The run's checkpointer (None when `checkpoint.every=0 checkpoint.at_end=false` and not resuming).

    Its fingerprint — the model's layout, every training setting, the topology as
    written and the data's contents — must match for a resume; the first key that
    differs is named.
    """
    every, at_end = int(cfg.checkpoint.every), bool(cfg.checkpoint.at_end)  # ranges checked by validate()
    if every == 0 and not at_end and not cfg.resume:
        return None
    fingerprint = {"model": model_fingerprint(model_state), "strategy": cfg.strategy.name, "seed": int(cfg.seed),
                   "topology": topology_spec(cfg), "dataset": OmegaConf.to_container(dataset_cfg(cfg), resolve=True),
                   "data": data_digest(layout.root), **training_settings(cfg)}
    return Checkpointer(Path(run_dir) / CHECKPOINT_FILE, every=every, fingerprint=fingerprint)


def codec_of(cfg: DictConfig) -> Codec:
    """The run's WAN codec (`compression=<name>` and its options)."""
    return make_codec(**OmegaConf.to_container(cfg.compression))


def build_strategy(cfg: DictConfig, meter: Meter, num_regions: int, work: Workload | None = None,
                   scheduler: Scheduler | None = None, checkpointer: Checkpointer | None = None,
                   baseline_s: Callable[[], float] | None = None,
                   measured_baseline_s: Callable[[], float | None] | None = None,
                   parameter_names: tuple[str, ...] | None = None) -> Strategy:
    """The configured strategy (a name `config.validate` accepted, built by its registry entry), charged by `meter`.

    `strategy.stop.max_time_s: auto` stands for `baseline_s()`, the modelled time of FedAvg's default run,
    under the virtual clock, and for `measured_baseline_s()`, the same with the per-job overhead the run
    measures (None until it has), under the wall clock (`control/budget.py`); without them, for no budget."""
    v = cfg.validation
    limits = UpdateLimits(max_norm=v.max_norm, on_norm=v.on_norm, quarantine_after=v.quarantine_after,
                          norm_factor=v.norm_factor, min_agreement=v.min_agreement, clip_factor=v.clip_factor,
                          share_budget=v.share_budget,
                          min_relatedness=v.min_relatedness)
    settings = OmegaConf.to_container(cfg.strategy, resolve=True)
    settings["stop"]["max_time_s"], time_budget_later = resolve_time_budget(
        settings["stop"]["max_time_s"], cfg.clock, baseline_s, measured_baseline_s)
    context = Build(meter=meter, num_regions=num_regions, limits=limits, target_accuracy=cfg.target_accuracy,
                    work=work, scheduler=scheduler, replan_every=cfg.scheduler.get("replan_every", REPLAN_EVERY),
                    checkpointer=checkpointer, resume=bool(cfg.resume), compression=codec_of(cfg),
                    time_budget_later=time_budget_later, parameter_names=parameter_names)
    return strategy_entry(cfg.strategy.name).build(settings, context)


def run_experiment(grid: Grid, cfg: DictConfig, run_dir: str | Path, topology: Topology | None = None,
                   layout: DataLayout | None = None) -> dict[str, Any]:
    """Run the configured strategy on `grid` and write `<run_dir>/results.json`.

    `topology` and `layout` are resolved from `cfg` unless the caller already did (`cloudless-fl run`).
    """
    ensure_writable(run_dir, "resume folder" if cfg.resume else "run folder")  # before any training
    if topology is None or layout is None:
        validate(cfg)
        topology, layout = topology_of(cfg), prepare_data(cfg)
    model = build_model(cfg.model.name, layout.input_shape, layout.num_classes, seed=int(cfg.seed),
                        **cfg.model.options)
    spec = ModelSpec(cfg.model.name, layout.num_classes, OmegaConf.to_container(cfg.model.options))
    train_config = ConfigRecord({**spec.to_config(), "regions": ",".join(topology.region_names),
                                 "data-seed": int(cfg.seed)})
    if cfg.compression.name != "none" or cfg.strategy.get("drift_correction"):  # where regions on this machine
        # keep what compressed traffic and drift correction need between jobs
        train_config["state-dir"] = str(Path(run_dir).resolve() / "region-state")
    entry = strategy_entry(cfg.strategy.name)
    if entry.epoch_based:  # Flower's FedAvg sends this one work order to every region
        order = WorkOrder(lr=float(cfg.strategy.lr), batch_size=int(cfg.strategy.batch_size),
                          epochs=float(cfg.strategy.local_epochs), data_seed=int(cfg.seed))
        train_config = ConfigRecord({**dict(train_config), **order.to_config()})
    require_nodes(grid, len(topology.regions))
    meter = make_meter(cfg, topology)
    initial_arrays = ArrayRecord(model.state_dict())  # serialised once, sent by the strategy
    sizes = resident_sizes(topology, layout)
    work = workload(cfg, sizes, wire_bytes(codec_of(cfg), model.state_dict()))
    scheduler = make_scheduler(cfg, topology, work)
    checkpointer = make_checkpointer(cfg, Path(run_dir), model.state_dict(), layout)
    plain_bytes = wire_bytes(make_codec("none"), model.state_dict())  # the baseline's model goes uncompressed
    strategy = build_strategy(
        cfg, meter, len(topology.regions), work, scheduler, checkpointer,
        baseline_s=lambda: baseline_time_s(topology, sizes, plain_bytes),
        measured_baseline_s=lambda: measured_baseline_time_s(topology, sizes, plain_bytes, meter.per_job_s()),
        parameter_names=tuple(name for name, _ in model.named_parameters()))
    if cfg.region_nodes is not None:
        strategy.roster.bind(OmegaConf.to_container(cfg.region_nodes))
    progress = Progress(cfg.strategy.name, int(cfg.strategy.num_rounds), entry.unit,
                        lambda: strategy.book.stop.max_time_s) if cfg.progress else None
    if progress is not None:
        strategy.history.listeners.append(progress)
    try:
        strategy.start(grid=grid, initial_arrays=initial_arrays,  # the history holds the results
                       num_rounds=int(cfg.strategy.num_rounds), train_config=train_config,
                       evaluate_fn=central_evaluator(cfg, layout))
    finally:
        if progress is not None:
            progress.close()
    ended_by = strategy.stop_reason or f"strategy.num_rounds ({int(cfg.strategy.num_rounds)} {entry.unit}s) done"
    payload = results_payload(cfg, strategy.history, meter, ended_by)
    payload["schedule"] = scheduler.changes if scheduler is not None else None
    where = save_results(Path(run_dir) / "results.json", payload)
    if not strategy.roster.remaining():
        raise CloudlessError(f"no region was left at the end of the run (every one lost or quarantined: see "
                             f"'events' in {where}); fix the regions and start again")
    return payload


def save_results(path: Path, payload: dict[str, Any]) -> Path:
    """Write results.json; if that fails (disk full, read-only), keep them in the temp folder and say where."""
    try:
        return write_results(path, payload)
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"cloudless-fl-results-{time.strftime('%Y%m%d-%H%M%S')}.json"
        write_results(fallback, payload)
        raise CloudlessError(f"results.json could not be written to {path} ({exc.strerror or exc}); "
                             f"the results are kept in {fallback}") from None


def resident_sizes(topology: Topology, layout: DataLayout) -> dict[str, int]:
    """Samples per region from the split's manifest (the data shares of 1000 if there is none).

    MA and ASGD-GA ask the regions themselves at start-up; this is FedAvg's estimate."""
    manifest = read_manifest(layout.root)
    if manifest and set(manifest.get("regions", {})) >= set(topology.region_names):
        return {name: int(manifest["regions"][name]) for name in topology.region_names}
    return {name: max(1, round(1000 * share)) for name, share in topology.shares().items()}


def results_payload(cfg: DictConfig, history: History, meter: Meter, ended_by: str) -> dict[str, Any]:
    """results.json's content; `ended_by` says why the run ended (a stop rule, or its num_rounds done)."""
    cm = meter.cost_model
    ideal = sum(cm.throughput(r.name, meter.workers(r.name)) for r in cm.topology.regions) if cm else None
    summary = {**summarize(history, float(cfg.target_accuracy), meter.utilization(), ideal, final=meter.figures()),
               **meter.job_figures(), "ended_by": ended_by}
    return {
        "strategy": cfg.strategy.name,
        "seed": int(cfg.seed),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "clock": cfg.clock,
        "topology": topology_spec(cfg),  # as resolved: the group, or the topology_file's content
        "history": history.entries,
        "summary": summary,
        "costs": meter.ledger.breakdown() if meter.ledger else None,
        "regions": _region_report(meter),
        "events": history.events,
    }


def _region_report(meter: Meter) -> dict[str, Any] | None:
    if not meter.ledger:
        return None
    return {
        name: {"workers": a.workers, "busy_s": a.busy_s, "transfer_s": a.transfer_s, "idle_s": a.idle_s,
               "utilization": a.utilization,
               "bytes_up": a.bytes_up, "bytes_down": a.bytes_down, "egress_usd": a.egress_usd,
               "instance_usd": a.instance_usd, "serverless_usd": a.serverless_usd, "jobs": a.invocations}
        for name, a in meter.ledger.accounts.items()
    }


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .`: compose the Hydra config from the run-config and run it."""
    cfg = config_from_run_config(dict(context.run_config))
    run_dir = (Path(cfg.resume) if cfg.resume  # a resumed run goes on in its own folder
               else Path(str(context.run_config.get("output-dir", "outputs/flwr"))) / time.strftime("%Y%m%d-%H%M%S"))
    payload = run_experiment(grid, cfg, run_dir)
    log.info("results written to %s/results.json (final accuracy %s)", run_dir,
             payload["summary"]["final_accuracy"])
