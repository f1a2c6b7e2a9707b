"""A WAN-emulating TCP proxy: each region's traffic crosses a link shaped like its topology link.

Bytes are never altered, dropped or reordered. Each direction of a connection
is a serial link: a chunk of `n` bytes occupies the link for `8n / bandwidth(t)`
seconds after the previous chunk left it, then arrives `latency` later. The
bandwidth follows the topology's seeded fluctuation model (or trace), the same
one the simulator uses; `time_scale` > 1 speeds the whole link up (bandwidth x
scale, latency / scale) so a run fits in minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..control import region_model
from ..control.topology import Topology

CHUNK = 16 * 1024


@dataclass
class Shape:
    """How one direction of a link behaves: bandwidth over time (Mbit/s) and one-way latency."""

    mbps: Callable[[float], float]
    latency_s: float
    time_scale: float = 1.0

    def transmit_seconds(self, nbytes: int, t: float) -> float:
        return 8.0 * nbytes / (self.mbps(t * self.time_scale) * 1e6 * self.time_scale)

    @property
    def delay_s(self) -> float:
        return self.latency_s / self.time_scale


async def _read(reader: asyncio.StreamReader) -> bytes:
    """The next chunk, or b"" when the peer closed (or reset) the connection."""
    try:
        return await reader.read(CHUNK)
    except (ConnectionError, OSError):
        return b""


class _Pipe:
    """One direction: read, shape, deliver in order."""

    def __init__(self, shape: Shape, t0: float) -> None:
        self.shape, self.t0 = shape, t0
        self.link_free_at = 0.0
        self.bytes = 0

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._deliver(queue, writer))
        try:
            while data := await _read(reader):
                now = time.monotonic()
                start = max(now, self.link_free_at)
                self.link_free_at = start + self.shape.transmit_seconds(len(data), start - self.t0)
                await queue.put((self.link_free_at + self.shape.delay_s, data))
                if self.link_free_at - now > 0.05:  # back-pressure: do not read far ahead of the link
                    await asyncio.sleep(self.link_free_at - now - 0.05)
        except BaseException:  # cancelled (the proxy stops) or the connection broke: nothing more to deliver
            sender.cancel()
            raise
        await queue.put(None)  # the sender delivers what is queued, then half-closes
        await sender

    async def _deliver(self, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                self.bytes += len(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # half-close: the other direction may still be talking
        except (ConnectionError, OSError):
            pass


class WanProxy:
    """Listen on `127.0.0.1:<port>` and forward every connection to `target`, shaped.

    Parameters
    ----------
    target : (host, port)
        Where connections go (the SuperLink).
    up, down : Shape
        client → target (region to coordinator) and target → client.
    """

    def __init__(self, target: tuple[str, int], up: Shape, down: Shape, port: int = 0) -> None:
        self.target, self.up, self.down, self.port = target, up, down, port
        self.bytes_up = self.bytes_down = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    async def _handle(self, client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        up, down = _Pipe(self.up, self._t0), _Pipe(self.down, self._t0)
        await asyncio.gather(up.run(client_reader, server_writer), down.run(server_reader, client_writer),
                             return_exceptions=True)
        for writer in (server_writer, client_writer):
            with contextlib.suppress(Exception):
                writer.close()
        self.bytes_up += up.bytes
        self.bytes_down += down.bytes

    def start(self) -> int:
        """Serve in a background thread; returns the port listened on."""
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True, name=f"wanproxy-{self.target[1]}")
        self._thread.start()
        ready.wait(10)
        return self.port

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            self._server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None


def link_shapes(topology: Topology, region: str, seed: int, time_scale: float = 1.0) -> tuple[Shape, Shape]:
    """(up, down) shapes of `region`'s link: the region model's bandwidth over time and latency, each way."""
    latency = region_model.latency_s(topology.region(region))
    shapes = []
    for direction in (region_model.UP, region_model.DOWN):
        bandwidth = region_model.link_bandwidth(topology, region, direction, seed)
        shapes.append(Shape(lambda t, b=bandwidth: b.segment(t)[0], latency, time_scale))
    return shapes[0], shapes[1]
