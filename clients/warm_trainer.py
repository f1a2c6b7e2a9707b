"""A region's trainer kept warm between messages: one long-lived process per SuperNode.

Flower 1.42 starts a fresh `flwr-clientapp` process for every message; one that
imports PyTorch and builds the model spends about 2 CPU-seconds on it before any
training (more than half of the process's start-up, and on a small machine
shared by several regions, most of a short job). The region's trainer pays
that once: `cloudless-fl trainer --socket <path>` imports PyTorch, keeps the
region's data and model built, and answers jobs on a Unix socket. The SuperNode
names it (`--node-config "trainer='<path>'"`); the region ClientApp, which then
imports nothing heavier than Flower, hands each message's content and the
node's context to the trainer and returns what it answers
(`clients/region_jobs.py` computes it, the same code as in the ClientApp).

The ClientApp never depends on it: when the trainer is not there, not ready,
dies mid-job or answers with another protocol version, the ClientApp computes
the job itself (the cold path) and says so in the reply's `computed-by`. A job
the trainer fails on (bad data, a bad work order) fails the same way it would
in the ClientApp. `cloudless-fl launch` starts one trainer per region and
restarts one that exits (deployment/launch.py).

Trust: the key file beside the socket is readable by the user alone (0600;
a folder the trainer creates is 0700), and both sides prove they hold it (HMAC
challenge of `multiprocessing.connection`) before anything is unpickled;
whoever can read the key can already run code as this user.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path

from flwr.app import Context, RecordDict

NODE_KEY = "trainer"  # node config: the Unix socket of the region's trainer
PROTOCOL = 1  # a request of another version is refused (the ClientApp then computes the job itself)
MAX_SOCKET_PATH = 100  # a Unix socket's path must fit in sun_path (108 bytes on Linux)

log = logging.getLogger(__name__)


def key_file(socket_path: str | Path) -> Path:
    return Path(f"{socket_path}.key")


def forward(socket_path: str | Path, kind: str, content: RecordDict, context: Context, data_root, data_format: str
            ) -> RecordDict | None:
    """The trainer's reply to one message; None when no trainer answered (the caller computes the job).

    An error the job raised in the trainer is raised here, as if the job had run in this process."""
    try:
        with Client(str(socket_path), family="AF_UNIX", authkey=key_file(socket_path).read_bytes()) as conn:
            conn.send((PROTOCOL, kind, content, context,
                       None if data_root is None else str(data_root), data_format))
            status, value = conn.recv()
    except (OSError, EOFError, AuthenticationError) as exc:
        log.warning("trainer at %s did not answer (%s: %s); this job runs in the ClientApp process",
                    socket_path, type(exc).__name__, exc)
        return None
    if status == "refused":
        log.warning("trainer at %s refused the job: %s; this job runs in the ClientApp process", socket_path, value)
        return None
    if status == "error":
        raise value
    return value


def serve(socket_path: str | Path, jobs: int | None = None) -> None:
    """Answer jobs on `socket_path`, one at a time (a SuperNode sends one message at a time), `jobs` of them
    (None: until stopped)."""
    from clients import region_jobs  # PyTorch and the region's code, imported once for every job

    path = Path(socket_path)
    if len(str(path)) > MAX_SOCKET_PATH:
        raise SystemExit(f"error: socket path {path} is {len(str(path))} characters; a Unix socket's path must be "
                         f"at most {MAX_SOCKET_PATH}: choose a shorter --socket (e.g. under /tmp)")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing folder is left as it is
    key = os.urandom(32)
    fd = os.open(key_file(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    path.unlink(missing_ok=True)  # left by a trainer that crashed
    served = 0
    with Listener(str(path), family="AF_UNIX", authkey=key) as listener:
        log.info("trainer listening at %s", path)
        while jobs is None or served < jobs:
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError) as exc:
                log.warning("refused a connection: %s", exc)
                continue
            with conn:
                try:
                    request = conn.recv()
                except (EOFError, OSError):
                    continue
                except Exception as exc:  # noqa: BLE001 - pickled by other code (another version's FAB)
                    request = exc
                try:
                    conn.send(_answer(region_jobs.HANDLERS, request))
                except (OSError, EOFError):  # the ClientApp went away (its job was given up)
                    log.warning("the ClientApp left before its reply was sent")
            served += 1


def _answer(handlers, request) -> tuple[str, object]:
    if isinstance(request, Exception) or not (isinstance(request, tuple) and len(request) == 6):
        return "refused", f"unreadable request ({request!r:.200}); this trainer speaks protocol {PROTOCOL}"
    version, kind, content, context, data_root, data_format = request
    if version != PROTOCOL or kind not in handlers:
        return "refused", f"protocol {version!r}, message {kind!r} (this trainer speaks protocol {PROTOCOL})"
    log.info("answering a %s message", kind)
    try:
        return "ok", handlers[kind](content, context, data_root, data_format)
    except Exception as exc:  # noqa: BLE001 - handed back to the ClientApp, which raises it
        try:
            pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - an exception that cannot travel goes as its text
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        return "error", exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cloudless-fl trainer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True,
                        help="Unix socket to answer on (the SuperNode's --node-config \"trainer='<path>'\")")
    parser.add_argument("--jobs", type=int, default=None, help="answer this many jobs, then exit (default: forever)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    serve(args.socket, args.jobs)


if __name__ == "__main__":
    main()
