"""Someone else's Flower app on real Flower processes: the stock quickstart-shaped ClientApp (tests/stock_app,
unchanged) with Flower's FedAvg, MA and ASGD-GA delta, wall clock to a target accuracy.

A real SuperLink and one SuperNode per region of `--topology` (default world5: five regions on four continents,
10-150 Mbps, 5-250 ms), each behind its WAN-emulating proxy; node `i` gets `partition-id=i` as a stock app
expects. Nothing of cloudless-fl runs beside the app: no warm trainer, no compute pacing (every region
computes at this machine's speed), no region query, no topology in the strategies (wall clock, no cost
figures) — only the strategy line differs between runs. The ServerApp is the stock one with its evaluations
timed (experiments/stock_app_timed/server_app.py); each run ends at its first evaluation at the target.
Every strategy holds one instance per region for the whole run, so its instance bill is proportional to its
time and the FedAvg / run ratio is also its cost ratio (the stock model is 3 KB: egress is negligible).

    .venv/bin/python experiments/bench_stock_deployment.py [--topology world5] [--target 0.96] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tomllib
from pathlib import Path

from cloudless_fl.atomic import atomic_write_text
from cloudless_fl.config import compose, topology_of
from cloudless_fl.deployment.launch import Federation, sigterm_as_interrupt, submit

ROOT = Path(__file__).resolve().parents[1]
STOCK = ROOT / "tests" / "stock_app"
TIMED_SERVER = ROOT / "experiments" / "stock_app_timed" / "server_app.py"
# run name → the stock ServerApp's rounds / periods / versions at most (each ends at the target first)
BUDGET = {"fedavg": 30, "ma": 30, "asgd_ga_delta": 30}  # ASGD-GA delta's is multiplied by the regions


def timed_app(folder: Path) -> Path:
    """The stock app with the timed ServerApp, its pyproject declaring the run config the bench passes."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(STOCK, folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(TIMED_SERVER, folder / "server_app.py")
    pyproject = (folder / "pyproject.toml").read_text()
    assert "[tool.flwr.app.config]" in pyproject and tomllib.loads(pyproject)
    (folder / "pyproject.toml").write_text(pyproject + 'num-nodes = 3\ntarget = 0.9\nresults-file = ""\n')
    return folder


def deployed_run(topology_name: str, app: Path, strategy: str, target: float, run_dir: Path, seed: int) -> dict:
    """One run of the stock app on a fresh local federation; its timeline."""
    topology = topology_of(compose([f"topology={topology_name}"]))
    regions = topology.region_names
    results = run_dir / "timeline.json"
    if results.is_file():  # an earlier invocation's
        return json.loads(results.read_text())
    rounds = BUDGET[strategy] * (len(regions) if strategy == "asgd_ga_delta" else 1)
    with sigterm_as_interrupt(), Federation(topology, run_dir, seed=seed, pace=False,
                                            security="insecure") as federation:
        federation.start_superlink()
        for i, region in enumerate(regions):
            federation.start_region(region, run_dir / "no-data", app_config=f"partition-id={i} "
                                                                              f"num-partitions={len(regions)}")
        with open(run_dir / "flwr-run.log", "w") as log:
            code = submit(federation, app, {"strategy": strategy, "num-server-rounds": rounds,
                                            "num-nodes": len(regions), "target": target,
                                            "results-file": str(results)}, stream_to=log)
    if code != 0 or not results.is_file():
        raise SystemExit(f"the {strategy} run failed (exit code {code}); see {run_dir}/flwr-run.log and {run_dir}/logs")
    return json.loads(results.read_text())


def time_to_target(timeline: dict) -> float | None:
    return next((e["time_s"] for e in timeline["timeline"] if e["round"] > 0 and e["accuracy"] >= timeline["target"]),
                None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="world5", help="a topology of conf/topology (default world5)")
    parser.add_argument("--target", type=float, default=0.96, help="accuracy to reach (default 0.96)")
    parser.add_argument("--runs", nargs="+", default=list(BUDGET), choices=list(BUDGET))
    parser.add_argument("--repeats", type=int, default=1, help="invocations of each run, interleaved (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="the links' fluctuation seed")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/bench-stock-deployment/<topology>")
    args = parser.parse_args()
    out = (args.out or Path(f"outputs/bench-stock-deployment/{args.topology}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    app = timed_app(out / "app")
    times: dict[str, list[float | None]] = {name: [] for name in args.runs}
    for repeat in range(1, args.repeats + 1):
        for name in args.runs:
            timeline = deployed_run(args.topology, app, name, args.target, out / f"{name}-{repeat}", args.seed)
            times[name].append(time_to_target(timeline))
            last = timeline["timeline"][-1]
            print(f"{name} #{repeat}: {times[name][-1] or float('nan'):.1f} s to {args.target:.0%} "
                  f"(round/version {last['round']}, accuracy {last['accuracy']:.3f})", file=sys.stderr, flush=True)
    reference = [t for t in times.get("fedavg", []) if t]
    base = sum(reference) / len(reference) if reference else None
    print(f"\nThe stock ClientApp on {args.topology} (real SuperLink + SuperNodes, links shaped, compute unpaced), "
          f"wall clock to {args.target:.0%}, {args.repeats} invocation(s) per run")
    print("| run | time to target (each invocation) | mean | FedAvg / run (time and instance cost) |")
    print("|---|---|---|---|")
    summary = {}
    for name, values in times.items():
        reached = [t for t in values if t]
        mean = sum(reached) / len(reached) if len(reached) == len(values) else None
        cells = ", ".join("not reached" if t is None else f"{t:.1f} s" for t in values)
        ratio = f"{base / mean:.2f}x" if base and mean else "—"
        print(f"| {name} | {cells} | {'—' if mean is None else f'{mean:.1f} s'} | {ratio} |")
        summary[name] = {"time_to_target_s": values, "mean_s": mean}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"\n{out / 'summary.json'}")


if __name__ == "__main__":
    main()
