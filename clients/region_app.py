"""The region ClientApp: one per SuperNode, training only on that region's resident data.

Thin on purpose: Flower starts a fresh process for every message, so this
module imports only Flower. Each message is answered by the region's warm
trainer when the SuperNode names one (`trainer` in its node config,
clients/warm_trainer.py), else here, by `clients/region_jobs.py` imported on
first use (the cold path, with PyTorch).
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients import warm_trainer
from cloudless_fl.training.records import INFO, METRICS

COMPUTED_BY = "computed-by"  # info: "trainer" (the region's warm trainer) or "clientapp" (this process)


def make_client_app(data_root: str | Path | None = None, data_format: str = "auto") -> ClientApp:
    """Build the region ClientApp; `data_root` holds `<region>/` folders in simulation."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        entered = time.time()
        content = _answer("train", msg, context, data_root, data_format)
        started = _process_started() if next(_handled) == 0 else entered  # a warm process started nothing
        if started is not None:
            content.metric_records[METRICS]["startup-seconds"] = max(0.0, entered - started)
        return Message(content, reply_to=msg)

    @app.query()
    def describe(msg: Message, context: Context) -> Message:
        """Tell the control plane which region this is and how much data it holds."""
        return Message(_answer("query", msg, context, data_root, data_format), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(_answer("evaluate", msg, context, data_root, data_format), reply_to=msg)

    return app


def _answer(kind: str, msg: Message, context: Context, data_root, data_format: str) -> RecordDict:
    """The reply's content: from the region's trainer if it answers, else computed in this process."""
    socket_path = context.node_config.get(warm_trainer.NODE_KEY)
    content = None
    if socket_path is not None:
        content = warm_trainer.forward(str(socket_path), kind, msg.content, context, data_root, data_format)
    computed_by = "trainer"
    if content is None:
        from clients import region_jobs  # PyTorch: only when this process computes the job

        content, computed_by = region_jobs.HANDLERS[kind](msg.content, context, data_root, data_format), "clientapp"
    content.config_records[INFO][COMPUTED_BY] = computed_by
    return content


_handled = itertools.count()  # train messages this process has handled


def _process_started() -> float | None:
    """When this process started (Unix time, Linux /proc), so a reply can say what its start-up took:
    in deployment every message gets a fresh ClientApp process. None where /proc is not there."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


app = make_client_app()
