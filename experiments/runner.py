"""Run many experiments on a process pool (shared by benchmark.py and reproduce.py).

Runs use the in-process engine (same ServerApp/ClientApp/strategies as the
Simulation Engine, identical figures under the virtual clock, no Ray start-up
per run), one torch thread per process, and are resumable: a run folder that
already holds a results.json is not run again.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

Job = tuple[list[str], str]  # (Hydra overrides, run folder)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # runs share the cores


def _run(job: Job) -> tuple[str, dict | None, float]:
    overrides, run_dir = job
    from cloudless_fl.config import compose
    from cloudless_fl.run import run

    start = time.perf_counter()
    results = Path(run_dir) / "results.json"
    if results.is_file():
        return run_dir, json.loads(results.read_text())["summary"], 0.0
    payload = run(compose([*overrides, "engine=inprocess", "progress=false"]), run_dir)
    return run_dir, payload["summary"], time.perf_counter() - start


def last_evaluations(run_dir: str, count: int = 5) -> float:
    """Mean accuracy of a run's last `count` evaluations (results.json's history): less of a coin toss than the last."""
    history = json.loads((Path(run_dir) / "results.json").read_text())["history"]
    return statistics.mean([e["accuracy"] for e in history if e["accuracy"] is not None][-count:])


def share_budget(k: float, length_bound: bool = False) -> list[str]:
    """Overrides for ASGD-GA's share budget `k` in place of the clip, and unless `length_bound` of the length
    bound too (norm_factor 1e9 leaves only the model bound)."""
    return [f"validation.share_budget={k:g}", "validation.clip_factor=null",
            *([] if length_bound else ["validation.norm_factor=1e9"])]


def pool(workers: int):
    return mp.get_context("fork").Pool(workers, initializer=_init_worker)


def execute(workers_pool, jobs: list[Job], run=_run) -> dict[str, dict]:
    """Run `jobs` (each with `run`), printing one line per finished run; returns run folder → summary."""
    done = {}
    for run_dir, summary, seconds in workers_pool.imap_unordered(run, jobs):
        done[run_dir] = summary
        t95 = summary["time_to_target_s"]
        print(f"  {run_dir}: t95={'—' if t95 is None else f'{t95:.1f}s'} "
              f"final={summary['final_accuracy']:.4f} ({seconds:.0f} s)", flush=True)
    return done
