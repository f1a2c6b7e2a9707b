"""`InProcessGrid`: a Flower `Grid` that runs the real ClientApp in this process.

The same ServerApp, strategies and ClientApp as on the Simulation Engine, minus
Ray's start-up (~15 s here) and parallelism: jobs run one after another when
their replies are pulled. For tests and sweeps of many short runs
(`engine=inprocess`); the Simulation Engine stays the default.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.app import Error as MessageError
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """Deliver each message to the ClientApp of its node; one `Context` per node.

    Parameters
    ----------
    client_app : ClientApp
        The ClientApp every node runs.
    num_nodes : int
        Nodes get ids 1..num_nodes and `partition-id` 0..num_nodes-1, as in simulation.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self._app = client_app
        # Flower stamps messages with the running task's identity; the engines set it.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self._contexts = {
            i + 1: Context(run_id=1, node_id=i + 1,
                           node_config={"partition-id": i, "num-partitions": num_nodes},
                           state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self._inbox: dict[str, Message] = {}
        self._offline: set[int] = set()

    def set_offline(self, node_id: int, offline: bool = True) -> None:
        """Make a node vanish (its messages get no reply) or come back; for fault tests."""
        (self._offline.add if offline else self._offline.discard)(node_id)

    def restart(self, node_id: int) -> int:
        """The node's process restarts: it vanishes and its partition comes back under a new node id,
        as a restarted SuperNode does. Returns the new id; for fault tests."""
        self._offline.add(node_id)
        old = self._contexts[node_id]
        new = max(self._contexts) + 1
        self._contexts[new] = Context(run_id=1, node_id=new, node_config=dict(old.node_config), state=RecordDict(),
                                      run_config={})
        return new

    def set_run(self, run) -> None:  # the run is implicit in-process
        pass

    @property
    def run(self):
        raise NotImplementedError("InProcessGrid has no Run object")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._contexts if n not in self._offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self._inbox[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in list(message_ids):
            msg = self._inbox.get(mid)
            if msg is None or msg.metadata.dst_node_id in self._offline:
                continue
            del self._inbox[mid]
            replies.append(self._deliver(msg))
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))  # offline nodes simply do not answer

    def _deliver(self, msg: Message) -> Message:
        # Copy the content as a wire would, so the region cannot alias server arrays.
        wire = Message(copy.deepcopy(msg.content), msg.metadata.dst_node_id, msg.metadata.message_type)
        wire.metadata.__dict__["_message_id"] = msg.metadata.message_id
        try:
            reply = self._app(wire, self._contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # the engines turn a ClientApp exception into an error reply
            reply = Message(MessageError(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=wire)
        return reply
