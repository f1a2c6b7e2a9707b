"""Micro-benchmark: cost of the clock + cost model + ledger per job event.

Runs N dispatch/complete pairs on geo4-fluct (fluctuating links, so transfers
integrate across bandwidth windows) and prints microseconds per event.

    .venv/bin/python experiments/bench_meter.py [N]
"""

import sys
import time

from cloudless_fl.config import compose, topology_of
from cloudless_fl.control.meter import Meter
from cloudless_fl.control.jobs import Reported

MODEL_BYTES = 4_505_640  # the benchmark MLP in float32


def main(n: int = 100_000) -> None:
    topology = topology_of(compose(["topology=geo4-fluct"]))
    meter = Meter.simulated(topology, seed=1)
    regions = topology.region_names
    pending = {r: meter.dispatch(r, bytes_down=MODEL_BYTES, samples=320) for r in regions}
    start = time.perf_counter()
    for _ in range(n):
        region = meter.clock.pick(pending, regions)
        meter.complete(pending[region], bytes_up=MODEL_BYTES, reported=Reported(320))
        pending[region] = meter.dispatch(region, bytes_down=MODEL_BYTES, samples=320)
    elapsed = time.perf_counter() - start
    figures = meter.figures()
    print(f"{n} events in {elapsed:.2f} s: {elapsed / n * 1e6:.1f} µs/event "
          f"(virtual time {figures['time_s']:.0f} s, ${figures['cost_usd']['instance']:.2f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
