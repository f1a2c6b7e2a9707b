"""Jobs on their way: what `configure_train` built, pushed to the Grid, awaited, timed out.

Flower's contract: `configure_train` returns the messages, the loop in
`start()` talks to the Grid. `InFlightJobs` is that loop's one piece of
state for asynchronous and period strategies alike: it pushes the messages
`configure_train` returned (each with the job it stands for), pulls replies,
and hands back the jobs whose nodes did not answer within the reply timeout.

Over a SuperLink (Flower's `HttpGrid`), each job's reply is awaited on its
own thread (`ReplyWatch`): Flower pulls a reply's arrays in a blocking retry
loop, and for a reply whose region died mid-upload that loop lasts until the
SuperLink expires the upload (its push-session TTL, 180 s in Flower 1.42).
Pulled on the strategy's thread, such a reply froze the whole run for those
minutes (measured: a SuperNode killed while sending); watched apart, it holds
up only its own job, which the reply timeout then loses like any other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid

from ..control.jobs import Job, JobTiming
from ..training import protocol

POLL_S = 0.005  # between pulls while waiting for replies
WATCH_POLL_S = 0.05  # a watched job's first pulls over HTTP (one request per job, not per poll of all) ...
WATCH_LAG = 0.05  # ... then every this fraction of the job's age: a reply waits at most 5 % of it to be pulled
WATCH_POLL_MAX_S = 1.0  # ... and at least once a second


def watch_interval(age_s: float) -> float:
    """Seconds between a watched job's pulls, `age_s` after its watch began.

    Grows with the age, so a job's pulls number about log(age) rather than age / 0.05 s: measured with a stock
    ClientApp on world5 (five jobs of ~20 s), pulling every 0.05 s cost the SuperLink 17 s more CPU per run
    than Flower's FedAvg, on 2 cores shared with the ClientApps, and made MA 12 % slower than FedAvg.
    """
    return min(WATCH_POLL_MAX_S, max(WATCH_POLL_S, WATCH_LAG * age_s))


class ReplyWatch:
    """Pulls one job's reply on a daemon thread until it arrives or the watch is dropped.

    A daemon thread, so a pull stuck on a dead region's half-sent reply never
    keeps the ServerApp process from exiting.
    """

    def __init__(self, grid: Grid, key: str) -> None:
        self.key = key
        self.reply: Message | None = None
        self.error: BaseException | None = None  # a failed pull, re-raised on the strategy's thread
        self._dropped = threading.Event()
        self._began = time.monotonic()
        self._thread = threading.Thread(target=self._watch, args=(grid,), name=f"reply-{key[:8]}", daemon=True)
        self._thread.start()

    def _watch(self, grid: Grid) -> None:
        try:
            while not self._dropped.is_set():
                replies = list(grid.pull_messages([self.key]))
                if replies:
                    self.reply = replies[0]
                    return
                self._dropped.wait(watch_interval(time.monotonic() - self._began))
        except BaseException as exc:  # noqa: BLE001 - handed to the strategy's thread
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def drop(self) -> None:
        """No longer wanted (answered, lost or the run ended): stop pulling once the current pull returns."""
        self._dropped.set()


class ReplyPuller:
    """Replies to given messages, never waiting: pulled on the caller's thread from in-memory grids,
    awaited one `ReplyWatch` per message over a SuperLink.

    Parameters
    ----------
    watch : bool, optional
        Await each reply on its own thread. Default: on Flower's `HttpGrid`
        (replies pulled from a SuperLink), off for in-memory grids, whose pulls
        never block and keep their order.
    """

    def __init__(self, watch: bool | None = None) -> None:
        self.watch = watch
        self._watches: dict[str, ReplyWatch] = {}

    def pull(self, grid: Grid, keys: Iterable[str]) -> list[Message]:
        """The replies to `keys` that have arrived (each returned once)."""
        keys = list(keys)
        if not keys:
            return []
        if not (isinstance(grid, HttpGrid) if self.watch is None else self.watch):
            return list(grid.pull_messages(keys))
        replies = []
        for key in keys:
            watch = self._watches.get(key)
            if watch is None:
                self._watches[key] = ReplyWatch(grid, key)
            elif watch.done():
                del self._watches[key]
                if watch.error is not None:
                    raise watch.error
                replies.append(watch.reply)
        return replies

    def forget(self, key: str) -> None:
        """No longer awaited (answered elsewhere, lost)."""
        if (watch := self._watches.pop(key, None)) is not None:
            watch.drop()

    def stop(self) -> None:
        """Await nothing more (the run is over)."""
        for watch in self._watches.values():
            watch.drop()
        self._watches.clear()


class PromptReplies:
    """A Grid whose `send_and_receive` pulls every `WATCH_POLL_S` instead of Flower's `HttpGrid`'s 3 s.

    Flower's round loop (`Strategy.start`, run by `Metered` for FedAvg) waits for a round's replies with
    `grid.send_and_receive`, which over a SuperLink sleeps 3 s between pulls: on average 1.5 s added to every
    round after its last reply came, more than any other strategy here pays (their watches pull at most 5 %
    of a job's age, and 1 s, apart: `watch_interval`). The baseline keeps Flower's algorithm and loop; only
    its waiting is prompt (one pull of all its replies every `WATCH_POLL_S`). Everything else is the grid's
    own.
    """

    def __init__(self, grid: Grid) -> None:
        self.inner = grid

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push `messages`, then pull until each has its reply or `timeout` seconds passed (None: no limit)."""
        return list(await_replies(self.inner, self.inner.push_messages(messages), timeout).values())


def await_replies(grid: Grid, keys: Iterable[str], timeout: float | None) -> dict[str, Message]:
    """The replies to the pushed messages `keys`, by key: pulled every `WATCH_POLL_S` until each has come or
    `timeout` seconds passed (None: no limit), on the caller's thread."""
    waiting = list(keys)
    end = None if timeout is None else time.monotonic() + timeout
    replies: dict[str, Message] = {}
    while waiting:
        for reply in grid.pull_messages(waiting):
            replies[reply.metadata.reply_to_message_id] = reply
        waiting = [key for key in waiting if key not in replies]
        if not waiting or (end is not None and time.monotonic() >= end):
            break
        time.sleep(WATCH_POLL_S)
    return replies


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
    correction: ArrayRecord | None = None  # the drift correction it was sent, encoded (ASGD-GA's)
    sent_at: float = field(default_factory=time.monotonic)  # real time, for reply timeouts

    def __post_init__(self) -> None:
        if self.payload is None:
            self.payload = self.arrays

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of it, as JSON (the models it carries are kept as tensors apart)."""
        return {"region": self.region, "version": self.version, "order": dict(self.order.to_config()),
                "job": asdict(self.job)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], node_id: int, arrays: ArrayRecord,
                        payload: ArrayRecord | None = None, correction: ArrayRecord | None = None) -> InFlight:
        """The job a checkpoint kept, to be re-sent to `node_id` (its region's node now)."""
        job = dict(state["job"])
        timing = job.pop("timing")
        return cls(node_id, state["region"], int(state["version"]),
                   Job(**job, timing=None if timing is None else JobTiming(**timing)),
                   protocol.WorkOrder.from_config(ConfigRecord(state["order"])), arrays, payload, correction=correction)


class InFlightJobs:
    """The jobs a strategy has out, keyed by message id.

    Parameters
    ----------
    reply_timeout : float
        Real seconds after which a job without a reply counts as lost.
    watch : bool, optional
        Await each job's reply on its own thread (`ReplyPuller`; default: over a SuperLink).
    """

    def __init__(self, reply_timeout: float, watch: bool | None = None) -> None:
        self.reply_timeout = reply_timeout
        self.replies = ReplyPuller(watch)
        self.jobs: dict[str, InFlight] = {}
        self._staged: dict[int, InFlight] = {}  # id(message) → its job, until pushed
        self._answered: dict[str, Message] = {}  # replies taken before their jobs were adopted, not yet pulled

    def stage(self, message: Message, flight: InFlight) -> Message:
        """Remember which job `message` carries; returns it (for `configure_train` to return)."""
        self._staged[id(message)] = flight
        return message

    def staged(self, message: Message) -> InFlight:
        """The job a staged (not yet pushed) message carries."""
        return self._staged[id(message)]

    def unstage(self, messages: Iterable[Message]) -> list[InFlight]:
        """The jobs of staged messages that will not be pushed as they are (their work goes out otherwise)."""
        return [self._staged.pop(id(message)) for message in messages]

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

    def adopt(self, key: str, flight: InFlight, reply: Message) -> None:
        """A job that went out before it was known whom it was for (the first jobs, with the roll call):
        message `key`, already answered by `reply`, which `pull` returns (so it never times out)."""
        self.jobs[key] = flight
        self._answered[key] = reply

    def pull(self, grid: Grid, skip: Iterable[str] = ()) -> list[Message]:
        """Replies that have arrived for jobs in flight (other than `skip`); never waits."""
        skip = set(skip)
        taken = {k: self._answered.pop(k) for k in list(self._answered) if k not in skip}
        waiting = [k for k in self.jobs if k not in skip and k not in taken and k not in self._answered]
        return [*taken.values(), *self.replies.pull(grid, waiting)]

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
        self.replies.forget(key)
        self._answered.pop(key, None)
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
