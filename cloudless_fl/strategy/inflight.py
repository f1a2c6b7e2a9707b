"""Jobs on their way: what `configure_train` built, pushed to the Grid, awaited, timed out.

Flower's contract: `configure_train` returns the messages, the loop in
`start()` talks to the Grid. `InFlightJobs` is that loop's one piece of
state for asynchronous and period strategies alike: it pushes the messages
`configure_train` returned (each with the job it stands for), pulls replies,
and hands back the jobs whose nodes did not answer within the reply timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from ..control.jobs import Job
from ..training import protocol

POLL_S = 0.005  # between pulls while waiting for replies


@dataclass
class InFlight:
    """A train message on its way: to whom, from which model version, how it is metered."""

    node_id: int
    region: str
    version: int
    job: Job
    order: protocol.WorkOrder
    arrays: ArrayRecord  # the model it was sent: a checkpoint re-sends it on resume
    payload: ArrayRecord | None = None  # what crossed the WAN for it, if not `arrays` (a compressed change)
    sent_at: float = field(default_factory=time.monotonic)  # real time, for reply timeouts

    def __post_init__(self) -> None:
        if self.payload is None:
            self.payload = self.arrays

    def state_dict(self) -> dict[str, Any]:
        return {"region": self.region, "version": self.version, "order": dict(self.order.to_config()),
                "job": asdict(self.job)}


class InFlightJobs:
    """The jobs a strategy has out, keyed by message id.

    Parameters
    ----------
    reply_timeout : float
        Real seconds after which a job without a reply counts as lost.
    """

    def __init__(self, reply_timeout: float) -> None:
        self.reply_timeout = reply_timeout
        self.jobs: dict[str, InFlight] = {}
        self._staged: dict[int, InFlight] = {}  # id(message) → its job, until pushed

    def stage(self, message: Message, flight: InFlight) -> Message:
        """Remember which job `message` carries; returns it (for `configure_train` to return)."""
        self._staged[id(message)] = flight
        return message

    def staged(self, message: Message) -> InFlight:
        """The job a staged (not yet pushed) message carries."""
        return self._staged[id(message)]

    def push(self, grid: Grid, messages: Iterable[Message]) -> None:
        """Push what `configure_train` returned; each staged job is in flight from now."""
        messages = list(messages)
        if not messages:
            return
        for message, key in zip(messages, grid.push_messages(messages)):
            flight = self._staged.pop(id(message))
            flight.sent_at = time.monotonic()
            self.jobs[key] = flight
        self._staged.clear()

    def pull(self, grid: Grid, skip: Iterable[str] = ()) -> list[Message]:
        """Replies that have arrived for jobs in flight (other than `skip`); never waits."""
        skip = set(skip)
        waiting = [k for k in self.jobs if k not in skip]
        return list(grid.pull_messages(waiting)) if waiting else []

    def expired(self, answered: Iterable[str] = ()) -> list[str]:
        """Jobs with no reply (other than `answered`) for longer than the reply timeout."""
        answered = set(answered)
        now = time.monotonic()
        return [k for k, f in self.jobs.items() if k not in answered and now - f.sent_at > self.reply_timeout]

    def nodes(self) -> set[int]:
        return {f.node_id for f in self.jobs.values()}

    def keys_of(self, node_id: int) -> list[str]:
        return [k for k, f in self.jobs.items() if f.node_id == node_id]

    def pop(self, key: str) -> InFlight:
        return self.jobs.pop(key)

    def __contains__(self, key: object) -> bool:
        return key in self.jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.jobs)

    def items(self):
        return self.jobs.items()

    def values(self):
        return self.jobs.values()
