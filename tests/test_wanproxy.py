"""The WAN proxy: byte-exact, and shaped like the link it emulates (a property of the shaping)."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from cloudless_fl.deployment.wanproxy import Shape, WanProxy

pytestmark = pytest.mark.wallclock  # link shaping is judged by real elapsed time


def echo_server() -> tuple[socket.socket, int]:
    """A server that sends back everything it receives, then closes."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def constant(mbps: float, latency_ms: float) -> Shape:
    return Shape(lambda t: mbps, latency_ms / 1000.0)


@pytest.fixture
def proxy_to_echo():
    srv, port = echo_server()
    proxies = []

    def make(up: Shape, down: Shape) -> WanProxy:
        proxy = WanProxy(("127.0.0.1", port), up, down)
        proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
    srv.close()


def roundtrip(port: int, payload: bytes) -> tuple[bytes, float]:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        def send():
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        sender.join()
    return b"".join(chunks), time.perf_counter() - start


def test_bytes_through_equal_bytes_out(proxy_to_echo):
    proxy = proxy_to_echo(constant(1000, 1), constant(1000, 1))
    payload = os.urandom(3_000_001)
    echoed, _ = roundtrip(proxy.port, payload)
    assert echoed == payload
    deadline = time.monotonic() + 5  # the counters are added when the proxy's side of the connection closes
    while (proxy.bytes_up, proxy.bytes_down) != (len(payload), len(payload)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.bytes_up == proxy.bytes_down == len(payload)


def test_a_megabyte_over_10_mbits_and_50_ms_takes_about_0_85_s(proxy_to_echo):
    proxy = proxy_to_echo(constant(10, 50), constant(10_000, 0))  # shaped one way, the echo back is free
    payload = os.urandom(1_000_000)
    echoed, seconds = roundtrip(proxy.port, payload)
    assert echoed == payload
    assert 0.7 < seconds < 1.3  # 0.8 s on the wire + 50 ms latency


def test_latency_delays_each_direction(proxy_to_echo):
    """A kilobyte over fast links: the round trip is the two one-way latencies (control: none)."""
    slow = proxy_to_echo(constant(10_000, 150), constant(10_000, 100))
    free = proxy_to_echo(constant(10_000, 0), constant(10_000, 0))
    _, with_latency = roundtrip(slow.port, os.urandom(1000))
    _, without = roundtrip(free.port, os.urandom(1000))
    assert 0.25 <= with_latency < 0.25 + 0.15
    assert without < 0.1


def test_time_scale_speeds_the_link_up(proxy_to_echo):
    """1 MB over 10 Mbit/s + 50 ms, ten times faster: ~0.085 s (unscaled: ~0.85 s, the test above)."""
    fast = Shape(lambda t: 10, 0.05, time_scale=10.0)
    proxy = proxy_to_echo(fast, constant(10_000, 0))
    _, seconds = roundtrip(proxy.port, os.urandom(1_000_000))
    assert 0.07 < seconds < 0.4
