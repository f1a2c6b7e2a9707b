"""Which SuperNode is which region: asked with a `query` message, at start-up and when a node joins.

Simulation nodes learn their region from their partition id, deployment nodes
from their node config; only they know. A ClientApp that does not answer
queries (a plain Flower one) is named `node-<id>` and assumed equal in data.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..training import protocol


@dataclass(frozen=True)
class RegionInfo:
    """A node's self-description."""

    node_id: int
    name: str
    examples: int | None  # resident training samples, if the region said


def query_messages(node_ids: Iterable[int], config: ConfigRecord) -> list[Message]:
    """One `query` ("who are you?") per node."""
    return [Message(RecordDict({protocol.CONFIG: ConfigRecord(dict(config))}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in node_ids]


def read_query_reply(reply: Message) -> RegionInfo | str:
    """The node's `RegionInfo`, or the reason it cannot take part (the reply's error)."""
    node = reply.metadata.src_node_id
    if reply.has_error() and "No query function registered" not in reply.error.reason:
        return reply.error.reason  # a cloudless-fl region that cannot serve (bad data, gone, ...)
    region = protocol.reply_region(reply)
    if region is None:  # a plain Flower ClientApp: name it by its node
        return RegionInfo(node, f"node-{node}", None)
    metrics = reply.content.metric_records.get(protocol.METRICS, {})
    examples = metrics.get("resident-examples")
    return RegionInfo(node, region, None if examples is None else int(examples))


def discover_regions(grid: Grid, node_ids: Iterable[int], config: ConfigRecord,
                     timeout: float = 120.0) -> tuple[dict[int, RegionInfo], dict[int, str]]:
    """Ask every node who it is and wait: `RegionInfo` per node that answered, the error of each that failed."""
    node_ids = list(node_ids)
    # by message: an error the SuperLink writes for a vanished node comes from the SuperLink, not the node
    asked = dict(zip(grid.push_messages(query_messages(node_ids, config)), node_ids))
    deadline = time.monotonic() + timeout
    found: dict[int, RegionInfo] = {}
    failed: dict[int, str] = {}
    while asked and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(asked)):
            node = asked.pop(reply.metadata.reply_to_message_id)
            answer = read_query_reply(reply)
            if isinstance(answer, RegionInfo):
                found[node] = answer
            else:
                failed[node] = answer
        if asked:
            time.sleep(0.05)
    return found, failed


def data_shares(regions: Iterable[RegionInfo]) -> dict[str, float]:
    """Each region's share of all resident data (equal shares where sizes are unknown)."""
    regions = list(regions)
    if any(r.examples is None for r in regions):
        return {r.name: 1.0 / len(regions) for r in regions}
    total = sum(r.examples for r in regions)
    return {r.name: r.examples / total for r in regions}
