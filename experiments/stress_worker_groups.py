"""Form in-region worker groups back to back on a busy machine, and count the ones that did not come back whole.

A group's ranks are forked from a process that has other threads; a rank forked while one of them held a lock
it needs waits forever (docs/testing.md: one CI run lost 30 minutes that way). This script forms `--groups`
groups of `--workers` ranks while `--hogs` processes keep the cores busy (a loaded machine widens the window),
and prints how many groups came back with fewer ranks than asked (a rank failed or hung and the job was redone)
and the slowest group's time. A group that does not return within `--give-up` seconds stops the script.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/stress_worker_groups.py --workers 6 --groups 300
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time

import numpy as np
import torch

from cloudless_fl.training import local, workers
from cloudless_fl.training.data import Arrays
from cloudless_fl.training.models import build_model


def _burn() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=6, help="ranks per group")
    parser.add_argument("--groups", type=int, default=300, help="groups to form, one after another")
    parser.add_argument("--hogs", type=int, default=2, help="busy-looping processes beside the groups")
    parser.add_argument("--give-up", type=float, default=600, help="seconds one group may take before the script stops")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a forked rank cannot use an OpenMP team its parent started

    rng = np.random.default_rng(0)
    data = Arrays(rng.standard_normal((500, 20)).astype(np.float32), rng.integers(0, 5, 500).astype(np.int64))
    batches = local.make_batches(len(data), 16, seed=2, offset=7, samples=300)
    hogs = [multiprocessing.get_context("spawn").Process(target=_burn, daemon=True) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()

    current = {"started": time.monotonic(), "index": 0}

    def give_up() -> None:
        while True:
            time.sleep(1)
            waited = time.monotonic() - current["started"]
            if waited > args.give_up:
                print(f"group {current['index']} has not returned after {waited:.0f} s: a rank hung", flush=True)
                os.killpg(0, 9)  # the hogs and the group's ranks with this process

    threading.Thread(target=give_up, daemon=True).start()
    short, slowest, began = 0, 0.0, time.monotonic()
    for index in range(args.groups):
        current.update(started=time.monotonic(), index=index)
        model = build_model("mlp", (20,), 5, seed=0, hidden=[32])
        stats = workers.local_sgd(model, data, batches, lr=0.1, workers=args.workers)
        slowest = max(slowest, time.monotonic() - current["started"])
        short += stats.workers < args.workers
        if index % 25 == 0:
            print(f"{index + 1} groups, {short} short, slowest {slowest:.1f} s", file=sys.stderr, flush=True)
    print(f"{args.groups} groups of {args.workers} ranks beside {args.hogs} busy processes in "
          f"{time.monotonic() - began:.0f} s: {short} came back short, the slowest took {slowest:.1f} s")
    for hog in hogs:
        hog.kill()


if __name__ == "__main__":
    os.setpgrp()  # give_up stops this process group: the script, its hogs and any ranks left
    main()
