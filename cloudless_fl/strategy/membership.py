"""Which SuperNode is which region, and who takes part: the one node → region map of a run.

Simulation nodes learn their region from their partition id, deployment nodes
from their node config; only they know. A `query` message asks them, at
start-up (`Roster.discover`, waits) and for nodes that join later
(`Roster.poll`, never waits). A ClientApp that does not answer queries (a
plain Flower one) is named `node-<id>` and assumed equal in data; Flower's
FedAvg, which never asks, learns names from the replies (`Roster.learn`).

Membership decisions live here too: a region not in the run at its start, or
quarantined, is refused; a new node of a region still in the run replaces the
old one (a restarted SuperNode gets a new node id). Under SuperNode
authentication each region's key has a known node id (`bind`): a node that
claims a region whose key is not its own is refused, at start-up, on joining,
and (Flower's FedAvg, which never asks) when its reply names the region.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..training import protocol
from .inflight import ReplyPuller, await_replies
from .runbook import RunBook
from .validation import UpdateValidator, is_whole

log = logging.getLogger("cloudless_fl")


@dataclass(frozen=True)
class RegionInfo:
    """A node's self-description."""

    node_id: int
    name: str
    examples: int | None  # resident training samples, if the region said
    workers_max: int | None = None  # the most workers its SuperNode starts for one job, if it said


def query_messages(node_ids: Iterable[int], config: ConfigRecord) -> list[Message]:
    """One `query` ("who are you?") per node."""
    return [Message(RecordDict({protocol.CONFIG: ConfigRecord(dict(config))}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in node_ids]


def read_query_reply(reply: Message) -> RegionInfo | str:
    """The node's `RegionInfo`, or the reason it cannot take part (the reply's error). A first job's reply
    (sent with the roll call) describes its node the same way."""
    node = reply.metadata.src_node_id
    if reply.has_error() and "No query function registered" not in reply.error.reason:
        return reply.error.reason  # a cloudless-fl region that cannot serve (bad data, gone, ...)
    region = protocol.reply_region(reply)
    if region is None:  # a plain Flower ClientApp: name it by its node
        return RegionInfo(node, f"node-{node}", None)
    metrics = reply.content.metric_records.get(protocol.METRICS, {})
    examples, cap = metrics.get("resident-examples"), metrics.get(protocol.MAX_WORKERS)
    for key, value in (("resident-examples", examples), (protocol.MAX_WORKERS, cap)):
        if value is not None and not is_whole(value, 1):  # they weigh regions and size plans: a bad one misleads all
            return f"region {region} says its {key} is {value!r}; a whole number >= 1 is expected"
    return RegionInfo(node, region, None if examples is None else int(examples), None if cap is None else int(cap))


def data_sizes(regions: Iterable[RegionInfo]) -> dict[str, int]:
    """Each region's resident examples, as said. If one did not say (a Mod app without `resident-examples`),
    every region counts as holding the mean of the sizes said (1 if none was): equal, rather than a guess
    that would weigh and plan that region as holding almost nothing."""
    sizes = {r.name: r.examples for r in regions}
    if None in sizes.values():
        said = [n for n in sizes.values() if n is not None]
        return dict.fromkeys(sizes, round(sum(said) / len(said)) if said else 1)
    return sizes


def data_shares(regions: Iterable[RegionInfo]) -> dict[str, float]:
    """Each region's share of all resident data (`data_sizes`: equal where a size is unknown)."""
    sizes = data_sizes(regions)
    total = sum(sizes.values())
    return {name: n / total for name, n in sizes.items()}


class Roster:
    """The run's regions: live nodes, data shares, quarantine, refusals, nodes being asked.

    Parameters
    ----------
    book : RunBook, optional
        Where membership events (lost, back, quarantined, failed) are recorded;
        the strategy that owns the run attaches its own.
    """

    def __init__(self, book: RunBook | None = None) -> None:
        self.book = book
        self.live: dict[int, RegionInfo] = {}  # node → region, for the nodes taking part now
        self.shares: dict[str, float] = {}  # data share of every region of the run (fixed at start)
        self.quarantined: set[str] = set()  # regions that get no more work
        self._quarantined_nodes: set[int] = set()
        self.refused: set[int] = set()  # nodes that cannot take part: never asked again
        self.named: dict[int, str] = {}  # node → region of every node ever named (live or not)
        self._asking: dict[str, int] = {}  # query message id → node not (yet) in the run
        self.replies = ReplyPuller()  # their answers: a node dying mid-answer must not stall the run
        self._looked_at = -1  # the step of the last look for new nodes
        self.bound: dict[str, int] | None = None  # region → node id of its registered key; None: not checked

    def bind(self, region_nodes: Mapping[str, int]) -> None:
        """Each region may be spoken for only by the node its registered key belongs to."""
        self.bound = {str(region): int(node) for region, node in region_nodes.items()}

    def impostor(self, node: int, region: str) -> str | None:
        """Why `node` may not speak for `region` under `bind`, or None."""
        if self.bound is None or self.bound.get(region) == node:
            return None
        if region not in self.bound:
            return f"claims region {region}, which has no registered key"
        return f"claims region {region}, whose registered key is node {self.bound[region]}'s"

    # ------------------------------------------------------------------ names
    def region_of(self, node: int) -> str:
        """The region a node was named for (every live node is), else `node-<id>`."""
        return self.named.get(node, f"node-{node}")

    def live_names(self) -> set[str]:
        return {info.name for info in self.live.values()}

    def learn(self, node: int, region: str) -> None:
        """Name a node from its reply (strategies that never ask, like Flower's FedAvg)."""
        self.named[node] = region

    def remaining(self) -> set[str]:
        """Regions still taking part: the live ones (strategies that keep a run's membership), else every
        region a reply has named that is not quarantined (Flower's FedAvg, which only learns from replies)."""
        known = self.live_names() if self.shares else set(self.named.values())
        return known - self.quarantined

    def is_quarantined(self, region: str) -> bool:
        return region in self.quarantined

    def nodes_of(self, region: str) -> list[int]:
        return [node for node, info in self.live.items() if info.name == region]

    # ------------------------------------------------------------------ start-up
    def discover(self, grid: Grid, node_ids: Iterable[int], config: ConfigRecord, timeout: float) -> None:
        """Ask every node who it is and wait; those that answer are the run's regions."""
        self.settle(*ask(grid, node_ids, config, timeout))

    def settle(self, found: dict[int, RegionInfo], failed: dict[int, str]) -> None:
        """The run's regions from the nodes' answers at start-up (to the roll call or to their first jobs).

        Raises if none can take part; each failure (impostors among them) is logged and recorded.
        """
        self._unmask(found, failed)
        self.refused.update(failed)
        for node, reason in failed.items():
            log.warning("node %s cannot take part: %s", node, reason)
            self.book.event("region_failed", counter="lost_regions", node=node, reason=reason)
        if not found:
            raise RuntimeError("no region could take part; see the warnings above")
        self.live = found
        self.named.update({node: info.name for node, info in found.items()})
        self.shares = data_shares(found.values())

    def take_unasked(self, node_ids: Iterable[int]) -> None:
        """The run's regions without asking: each node is `node-<id>`, all with equal data shares."""
        found = {n: RegionInfo(n, f"node-{n}", None) for n in node_ids}
        if not found:
            raise RuntimeError("no node is connected; start the SuperNodes first")
        self.live = found
        self.named.update({node: info.name for node, info in found.items()})
        self.shares = data_shares(found.values())

    def names(self, grid: Grid, node_ids: Iterable[int], config: ConfigRecord, timeout: float) -> dict[int, str]:
        """Region names of `node_ids`, asked once for the nodes not named yet (no admission)."""
        node_ids = list(node_ids)
        unnamed = [n for n in node_ids if n not in self.named and n not in self.refused]
        if unnamed:
            found, failed = self._ask(grid, unnamed, config, timeout)
            for node, reason in failed.items():
                log.warning("node %s cannot take part: %s", node, reason)
            self.named.update({node: info.name for node, info in found.items()})
            self.refused.update(failed)
        return {n: self.named.get(n, "") for n in node_ids}

    def _ask(self, grid: Grid, node_ids: Iterable[int], config: ConfigRecord,
              timeout: float) -> tuple[dict[int, RegionInfo], dict[int, str]]:
        """`ask`, with impostors (under `bind`) among the failed."""
        found, failed = ask(grid, node_ids, config, timeout)
        self._unmask(found, failed)
        return found, failed

    def _unmask(self, found: dict[int, RegionInfo], failed: dict[int, str]) -> None:
        """Move impostors (under `bind`) from `found` to `failed`."""
        for node, info in list(found.items()):
            if (why := self.impostor(node, info.name)) is not None:
                failed[node] = why
                del found[node]

    # ------------------------------------------------------------------ leaving
    def drop(self, node: int) -> None:
        self.live.pop(node, None)

    def lose(self, node: int, region: str, reason: str) -> None:
        """A node that errs or times out leaves the run; the run goes on."""
        log.warning("region %s (node %s) lost: %s", region, node, reason)
        self.book.event("region_lost", counter="lost_regions", region=region, reason=reason)
        self.drop(node)

    def reject(self, node: int, region: str, validator: UpdateValidator) -> bool:
        """Count an update `validator` rejected; quarantine its region once it has sent too many (True then)."""
        self.book.count("rejected_updates")
        if not validator.quarantined(region):
            return False
        log.warning("region %s quarantined after %d bad updates; it gets no more work", region,
                    sum(validator.rejections[region].values()))
        self.quarantined.add(region)
        self._quarantined_nodes.add(node)
        self.book.event("region_quarantined", counter="quarantined_regions", region=region)
        self.drop(node)
        return True

    # ------------------------------------------------------------------ (re)joining
    def poll(self, grid: Grid, config: ConfigRecord, ask_now: bool) -> list[RegionInfo]:
        """Answers from nodes the run did not know; with `ask_now`, first ask the ones not asked yet.

        Never waits: unanswered queries are read on a later call. Returns the
        answers of nodes that may take part (`admit` decides).
        """
        if ask_now:
            asked = set(self._asking.values())
            unknown = [n for n in grid.get_node_ids()
                       if n not in self.live and n not in self._quarantined_nodes and n not in self.refused
                       and n not in asked]
            if unknown:
                self._asking.update(zip(grid.push_messages(query_messages(unknown, config)), unknown))
        if not self._asking:
            return []
        answers = []
        for reply in self.replies.pull(grid, self._asking):
            node = self._asking.pop(reply.metadata.reply_to_message_id)
            answer = read_query_reply(reply)
            if isinstance(answer, RegionInfo):
                answers.append(answer)
            else:
                self.refused.add(node)
        return answers

    def due(self, step: int, every: int) -> bool:
        """Whether to look for new nodes at `step` (every `every` steps, once per step)."""
        if step % every == 0 and step != self._looked_at:
            self._looked_at = step
            return True
        return False

    def refusal(self, info: RegionInfo) -> str | None:
        """Why a (re)joining node may not take part, or None."""
        if (why := self.impostor(info.node_id, info.name)) is not None:
            return why
        if info.name not in self.shares:
            return f"region {info.name} was not in this run at its start"
        if self.is_quarantined(info.name):
            return f"region {info.name} is quarantined"
        return None

    def admit(self, info: RegionInfo) -> None:
        """Take `info`'s node into the run (its region's old node, if any, must be retired first)."""
        self.live[info.node_id] = info
        self.named[info.node_id] = info.name
        log.info("region %s (node %s) joins the run", info.name, info.node_id)
        self.book.event("region_back", counter="rejoined_regions", region=info.name, node=info.node_id)

    def refuse(self, info: RegionInfo, why: str) -> None:
        """The node gets no work, and is never asked again."""
        log.warning("node %s not admitted: %s", info.node_id, why)
        self.book.event("node_refused", node=info.node_id, region=info.name, reason=why)
        self.refused.add(info.node_id)

    # ------------------------------------------------------------------ checkpoints
    def restore_quarantine(self, regions: Iterable[str]) -> None:
        """Quarantine again, after a resume, the regions a checkpoint names."""
        for region in regions:
            self.quarantined.add(region)
            for node in self.nodes_of(region):
                self._quarantined_nodes.add(node)
                self.drop(node)


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """SuperNodes register asynchronously: the connected nodes once `count` are there, or when `timeout` ends."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < count and time.monotonic() < deadline:
        time.sleep(0.5)
    return nodes


def ask(grid: Grid, node_ids: Iterable[int], config: ConfigRecord,
        timeout: float) -> tuple[dict[int, RegionInfo], dict[int, str]]:
    """Ask every node who it is and wait: `RegionInfo` per node that answered, the error of each that failed."""
    node_ids = list(node_ids)
    # by message: an error the SuperLink writes for a vanished node comes from the SuperLink, not the node
    asked = dict(zip(grid.push_messages(query_messages(node_ids, config)), node_ids))
    return read_answers(asked, await_replies(grid, asked, timeout))


def read_answers(asked: Mapping[str, int], replies: Mapping[str, Message]) -> tuple[dict[int, RegionInfo],
                                                                                   dict[int, str]]:
    """`RegionInfo` per node whose reply (to message key → node `asked`) describes it, the error of each
    that failed; a node that did not answer is in neither."""
    found: dict[int, RegionInfo] = {}
    failed: dict[int, str] = {}
    for key, reply in replies.items():
        answer = read_query_reply(reply)
        if isinstance(answer, RegionInfo):
            found[asked[key]] = answer
        else:
            failed[asked[key]] = answer
    return found, failed
