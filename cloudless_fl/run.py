"""`cloudless-fl run` / `python -m cloudless_fl.run`: one Hydra-configured experiment.

Composes the config, checks every input before anything starts (topology, data,
labels, names), runs the ServerApp and one ClientApp per region on the Flower
Simulation Engine (or in-process), and prints the run's summary.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .atomic import ensure_writable
from .config import DataLayout, conf_dir, dataset_cfg, prepare_data, topology_of, validate
from .training.data import check_labels, load_resident
from .errors import CloudlessError, DataError
from .deployment.grid import InProcessGrid
from .training.models import build_model
from .server_app import run_experiment
from .control.topology import Topology

def preflight(cfg: DictConfig) -> tuple[Topology, DataLayout]:
    """Fail fast, with the fix in the message, before any engine starts; returns what the run needs."""
    validate(cfg)
    topology = topology_of(cfg)
    layout = prepare_data(cfg)
    build_model(cfg.model.name, layout.input_shape, layout.num_classes, **cfg.model.options)
    check_labels(layout.test.y, layout.num_classes, "test.npz")
    fmt = dataset_cfg(cfg).get("format", "auto")
    for region in topology.region_names:
        data = load_resident(layout.root / region, fmt)
        if tuple(data.input_shape) != layout.input_shape:
            raise DataError(f"region {region}: inputs have shape {data.input_shape}, the test set "
                            f"{layout.input_shape}; all regions must hold the same kind of data")
        check_labels(data.train.y, layout.num_classes, f"region {region}")
    return topology, layout


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one experiment; return the results payload also written to `<run_dir>/results.json`."""
    from clients.region_app import make_client_app

    topology, layout = preflight(cfg)
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(str(cfg.flower_log_level).upper())
    flwr_log.propagate = False  # Flower has its own console handler; Hydra's would print twice
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state DB migrations chatter
    client_app = make_client_app(layout.root, dataset_cfg(cfg).get("format", "auto"))
    run_dir = ensure_writable(run_dir, "resume folder" if cfg.resume else "run folder")
    if cfg.engine == "inprocess":
        grid = InProcessGrid(client_app, len(topology.regions))
        return run_experiment(grid, cfg, run_dir, topology, layout)
    return _run_on_simulation_engine(cfg, run_dir, client_app, topology, layout)


def _run_on_simulation_engine(cfg: DictConfig, run_dir: Path, client_app, topology: Topology,
                              layout: DataLayout) -> dict[str, Any]:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    payload: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        payload.update(run_experiment(grid, cfg, run_dir, topology, layout))

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                             "logging_level": logging.ERROR, "log_to_driver": True}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(topology.regions),
                   backend_config=backend)
    if not payload:  # Flower logs the ServerApp's exception and returns
        raise RuntimeError("the simulation ended without results; see the Flower log above for the error")
    return payload


def print_summary(payload: dict[str, Any]) -> None:
    s = payload["summary"]
    pct = f"{s['target_accuracy'] * 100:g} %"

    def usd(v):
        return "not reached" if v is None else f"${v['instance']:.4f} instance / ${v['serverless']:.4f} serverless"

    tt = s["time_to_target_s"]
    print(f"== {payload['strategy']} (seed {payload['seed']}): final accuracy {s['final_accuracy']:.4f}")
    reached = f"{tt:.1f} s" if tt is not None else f"not reached (run ended: {s['ended_by']})"
    print(f"time-to-{pct}: {reached}")
    print(f"cost-to-{pct}: {usd(s['cost_to_target_usd'])}")
    print(f"total: {s['total_time_s']:.1f} s, {usd(s['total_cost_usd'])}")
    print(f"WAN GB: {s['wan_bytes'] / 1e9:.4f}")
    if s["utilization"]:
        print("utilisation: " + ", ".join(f"{r} {u:.1%}" for r, u in s["utilization"].items()))
    if s.get("ideal") and s["ideal"]["time_to_target_s"] is not None:
        print(f"ideal (lan, same samples) time-to-{pct}: {s['ideal']['time_to_target_s']:.1f} s")


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
def hydra_main(cfg: DictConfig) -> None:
    # a resumed run goes on in its own folder; Hydra's new folder keeps only this invocation's log
    run_dir = Path(cfg.resume) if cfg.resume else Path(HydraConfig.get().runtime.output_dir)
    try:
        payload = run(cfg, run_dir)
    except CloudlessError as exc:
        raise SystemExit(f"error: {exc}") from None
    print_summary(payload)
    print(f"results: {run_dir / 'results.json'}")


if __name__ == "__main__":
    hydra_main()
