"""Samples/s of one region's job on 1, 2 and 4 data-parallel workers, and the scaling efficiency they imply.

A job is computed as a region computes it in deployment (training/workers.py: a
group forked per job, DDP over gloo, the group's start-up included); the model
and batch size are geo4's (the benchmark MLP on digits, batch 32). Efficiency
is samples/s on n workers over n x samples/s on one. A deployed run measures
the same from its jobs (results.json `summary.scaling_efficiency`) and the
scheduler plans each region's workers with it (`Region.scaling`); the last lines
show what that does to geo4's plan for MA, against its profile's assumed 0.9.
On a 2-core machine more than 2 workers cannot add speed; the figures say what
this machine does, nothing more.

    .venv/bin/python experiments/bench_workers.py
    .venv/bin/python experiments/bench_workers.py --samples 20000 --workers 1 2 --mode local_sgd
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch

from cloudless_fl.config import compose
from cloudless_fl.control.scheduler import plan
from cloudless_fl.reporting.plan_table import planning_inputs
from cloudless_fl.training import local, workers
from cloudless_fl.training.data import load_source
from cloudless_fl.training.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--samples", type=int, default=12_800, help="samples per job (default 12800: 400 batches)")
    parser.add_argument("--mode", choices=("gradient", "local_sgd"), default="gradient")
    parser.add_argument("--repeats", type=int, default=3, help="jobs per worker count; the median is reported")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one thread per worker, as in a group: the one-worker row is comparable
    cfg = compose([])
    data = load_source("digits")
    batches = local.make_batches(len(data), int(cfg.strategy.batch_size), seed=0, offset=0, samples=args.samples)
    model = build_model(cfg.model.name, data.x.shape[1:], 10, seed=0, **cfg.model.options)
    print(f"{args.mode}, {args.samples} samples per job, {cfg.model.name} {dict(cfg.model.options)}, "
          f"batch {cfg.strategy.batch_size}; {os.cpu_count()} cores")
    if max(args.workers) > 1:  # a ClientApp process's first group imports what DDP needs (~2 s), once
        workers.accumulate_gradient(model, data, batches[:1], workers=2)
    print(f"{'workers':>7} {'job s (median)':>14} {'samples/s':>10} {'efficiency':>10}")
    base, scaling = None, []
    for n in args.workers:
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            if args.mode == "gradient":
                workers.accumulate_gradient(model, data, batches, workers=n)
            else:
                workers.local_sgd(build_model(cfg.model.name, data.x.shape[1:], 10, seed=0, **cfg.model.options),
                                  data, batches, lr=0.1, workers=n)
            seconds.append(time.perf_counter() - start)
        rate = args.samples / statistics.median(seconds)
        base = base or (rate if n == 1 else None)
        efficiency = "—" if base is None else f"{rate / (n * base):.2f}"
        print(f"{n:>7} {statistics.median(seconds):>14.2f} {rate:>10.0f} {efficiency:>10}", flush=True)
        if base is not None:
            scaling.append((n, rate / (n * base)))
    if len(scaling) > 1:
        print_plans(tuple(scaling))


def print_plans(scaling: tuple[tuple[int, float], ...]) -> None:
    """geo4's elastic plan for MA on its profiles, then with every region scaling as this machine did."""
    topology, work, objective = planning_inputs(compose(["scheduler=elastic", "strategy=ma", "topology=geo4"]))
    measured = replace(topology, regions=tuple(replace(r, scaling=scaling) for r in topology.regions))
    print("\ngeo4, strategy=ma, scheduler=elastic: workers per region (period s)")
    for label, topo in (("profile (efficiency 0.9 per worker)", topology), ("this machine's scaling", measured)):
        p = plan(topo, work, objective)
        rented = ", ".join(f"{name} {r.workers}" for name, r in p.regions.items())
        print(f"  {label:<38} {rented} ({p.period_s:.2f} s)")


if __name__ == "__main__":
    main()
