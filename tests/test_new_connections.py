"""
What a new connection costs the proxy beyond its request: the listen
queue it waits in, and what it leaves behind in the reactor once closed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from rproxy_tw.listener import DEFAULT_BACKLOG, with_backlog
from rproxy_tw.transport import ITimedHandshake

from rproxy_tw.config import parse_config
from rproxy_tw.service import ProxyRuntime

from .conftest import proxy_config, request, response
from .test_http_server import Harness, one_response, take
from .test_tls_transport import cert_files  # noqa: F401 - a fixture


@pytest.mark.parametrize("given, started", [
    ("tcp:8080", "tcp:8080:backlog=511"),
    ("tcp:8080:interface=127.0.0.1", "tcp:8080:interface=127.0.0.1:backlog=511"),
    ("tcp6:8080:interface=\\:\\:1", "tcp6:8080:interface=\\:\\:1:backlog=511"),
    ("unix:/run/rproxy.sock", "unix:/run/rproxy.sock:backlog=511"),
    ("tcp:8080:backlog=64", "tcp:8080:backlog=64"),
    ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ("haproxy:tcp:8080", "haproxy:tcp:8080"),
])
def test_listeners_get_nginx_s_backlog_unless_they_set_one(given: str, started: str) -> None:
    assert with_backlog(given) == started


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2), which .ci/run installs")
@pytest_twisted.inlineCallbacks
def test_a_listener_listens_with_the_larger_backlog(net: Any) -> None:
    """What the kernel says of the listening socket: C{ss} shows a listener's backlog as its Send-Q."""
    proxy = yield net.proxy(proxy_config("tcp:127.0.0.1:1"))
    shown = subprocess.run(["ss", "-ltnH", f"sport = :{proxy.port}"], capture_output=True, text=True,
                           check=True).stdout.split()
    # The kernel caps a backlog at net.core.somaxconn (4096 since Linux 5.4, 128 before).
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(shown[2]) == min(DEFAULT_BACKLOG, somaxconn)


def test_a_closed_connection_leaves_no_timer_behind() -> None:
    """A connection per request must not leave a call in the reactor for each one, for idle_timeout."""
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(headers=[(b"Connection", b"close")]))
    up, _origin = h.accept_origin()
    up.dataReceived(response(200, b"hello"))
    assert one_response(take(client)).body == b"hello"
    assert client.disconnecting
    proto.connectionLost(None)
    left = [c for c in h.reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is proto]
    assert left == []


def test_startup_objects_are_frozen_out_of_the_collector_s_sight() -> None:
    import gc

    from rproxy_tw.tap import freeze_startup_objects

    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_served_proxy_collects_its_youngest_generation_less_often() -> None:
    import gc

    from rproxy_tw.tap import YOUNG_COLLECTION_THRESHOLD, tune_garbage_collector

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_garbage_collector()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, 10, 10)
        gc.set_threshold(0, 10, 10)  # a collector switched off (as gc.disable's threshold) stays off
        tune_garbage_collector()
        assert gc.get_threshold()[0] == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


_HEAP_PROBE = """
import ctypes, json, sys
from rproxy_tw.tap import tune_allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Mallinfo2
tuned = tune_allocator() if sys.argv[1] == "tuned" else None
mapped = mallinfo2().hblkhd
block = b"x" * (1 << 20)  # a 1 MiB buffer, as a read from an origin and the body parsed out of it
mapped_for_one = mallinfo2().hblkhd - mapped
del block
blocks = [b"x" * (1 << 20) for _ in range(20)]
del blocks
print(json.dumps({"tuned": tuned, "mapped_for_one": mapped_for_one, "heap_after_free": mallinfo2().arena}))
"""


def _heap_probe(mode: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    import json
    import os
    import sys

    child_env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    child_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], env=child_env, capture_output=True, check=True,
                         timeout=60)
    return json.loads(out.stdout)


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_the_served_proxy_keeps_large_buffers_on_its_heap() -> None:
    """
    Served by twistd, a 1 MiB buffer comes from the heap, and freed ones stay
    there for the next (no fresh pages to fault in per response); a process
    left alone maps each one and gives it back.
    """
    from rproxy_tw.tap import MALLOC_TRIM_THRESHOLD

    alone = _heap_probe("alone")
    assert alone["mapped_for_one"] >= 1 << 20
    tuned = _heap_probe("tuned")
    assert tuned["tuned"] is True
    assert tuned["mapped_for_one"] == 0
    assert 20 << 20 <= tuned["heap_after_free"] <= 20 * (1 << 20) + MALLOC_TRIM_THRESHOLD
    # The operator's own malloc settings stand.
    assert _heap_probe("tuned", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"})["tuned"] is False
    assert _heap_probe("tuned", {"MALLOC_TRIM_THRESHOLD_": "131072"})["tuned"] is False


def test_a_closed_connection_is_freed_by_reference_counting() -> None:
    """No reference cycle outlives a connection: the collector need not run for each one."""
    import gc
    import weakref

    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(headers=[(b"Connection", b"close")]))
    up, _origin = h.accept_origin()
    up.dataReceived(response(200, b"hello"))
    assert one_response(take(client)).body == b"hello"
    gc.collect()
    gc.disable()
    try:
        proto.connectionLost(None)
        freed = weakref.ref(proto)
        del proto, client
        assert freed() is None
    finally:
        gc.enable()


class _Abortable(StringTransport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def test_a_closing_connection_s_backstop_is_its_one_timer() -> None:
    """
    The close's backstop reads a timestamp on the connection's timer: no
    second call per connection.  Its first deadline (header_timeout) comes
    before the backstop, so it is still the listener's to watch: no call of
    its own at all until then.
    """
    h = Harness(limits={"header_timeout": 5.0, "idle_timeout": 20.0})
    proto = h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000))
    client = _Abortable(peerAddress=IPv4Address("TCP", "192.0.2.1", 40000), lenient=True)
    proto.makeConnection(client)
    proto.dataReceived(request(headers=[(b"Connection", b"close")]))
    up, _origin = h.accept_origin()
    up.dataReceived(response(200, b"hello"))
    assert one_response(take(client)).body == b"hello"
    assert client.disconnecting
    mine = [c for c in h.reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is proto]
    assert mine == [] and h.factory.first_deadlines.deadline(proto) == 5.0
    h.reactor.advance(5.0)
    mine = [c for c in h.reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is proto]
    assert len(mine) == 1 and h.factory.first_deadlines.deadline(proto) is None
    h.reactor.advance(14.5)
    # The client never reads: its close never ends, and is cut idle_timeout after it began.
    assert not client.aborted
    h.reactor.advance(0.5)
    assert client.aborted


def _silent(h: Harness, port: int) -> tuple[Any, _Abortable]:
    """A client that connects and sends nothing (closed without an answer at header_timeout, as nginx does)."""
    addr = IPv4Address("TCP", "192.0.2.1", port)
    proto = h.factory.buildProtocol(addr)
    client = _Abortable(peerAddress=addr, lenient=True)
    proto.makeConnection(client)
    return proto, client


def test_new_connections_share_one_timer_for_their_first_deadline() -> None:
    """
    Connections that start one after another have no call of their own in
    the reactor until their first deadline: one call serves them all, and
    each is still cut at its own header_timeout.
    """
    h = Harness(limits={"header_timeout": 5.0, "idle_timeout": 20.0})
    first, first_client = _silent(h, 40001)
    h.reactor.advance(1.0)
    second, second_client = _silent(h, 40002)
    third, _third_client = _silent(h, 40003)
    third.connectionLost(None)  # gone before its deadline: it leaves the watch
    assert len(h.reactor.getDelayedCalls()) == 1
    assert h.factory.first_deadlines.deadline(third) is None
    h.reactor.advance(4.0)
    assert first_client.disconnecting and not second_client.disconnecting
    h.reactor.advance(0.9)
    assert not second_client.disconnecting
    h.reactor.advance(0.1)
    assert second_client.disconnecting


def test_a_shorter_first_deadline_after_a_reload_gets_a_timer_of_its_own() -> None:
    """A reload that shortens header_timeout: the new connection is cut at its own deadline, the old one at its."""
    h = Harness(limits={"header_timeout": 5.0, "idle_timeout": 20.0})
    old, old_client = _silent(h, 40001)
    h.factory.set_runtime(ProxyRuntime(parse_config(proxy_config(
        "tcp:10.0.0.1:8000", limits={"header_timeout": 2.0, "idle_timeout": 20.0}), source="t.toml"), h.reactor))
    new, new_client = _silent(h, 40002)
    assert h.factory.first_deadlines.deadline(new) is None
    h.reactor.advance(2.0)
    assert new_client.disconnecting and not old_client.disconnecting
    h.reactor.advance(3.0)
    assert old_client.disconnecting


def test_the_first_deadlines_fire_in_order_and_forget_what_left() -> None:
    from twisted.internet.task import Clock

    from rproxy_tw.transport.deadlines import FirstDeadlines

    clock = Clock()
    due: list[str] = []
    deadlines = FirstDeadlines(clock, due.append)
    assert deadlines.watch("a", 10.0, 10.0) and deadlines.watch("b", 10.0, 10.0)
    clock.advance(3.0)
    assert deadlines.watch("c", 13.0, 10.0) and deadlines.watch("d", 13.0, 10.0)
    assert not deadlines.watch("early", 12.0, 9.0), "due before one already watched"
    deadlines.discard("b")
    deadlines.discard("d")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(7.0)
    assert due == ["a"]
    clock.advance(3.0)
    assert due == ["a", "c"] and clock.getDelayedCalls() == []
    # Everything watched is gone: a shorter span moves the one call sooner.
    assert deadlines.watch("e", 30.0, 17.0)
    deadlines.discard("e")
    assert deadlines.watch("f", 20.0, 7.0)
    clock.advance(7.0)
    assert due == ["a", "c", "f"]


def test_the_alpn_switch_times_the_handshake_unless_its_transport_does() -> None:
    """Twisted's TLS (mutual-TLS listeners) has no handshake deadline: the ALPN switch keeps its own."""
    from rproxy_tw.http.h2 import ALPNSwitch

    h = Harness(limits={"header_timeout": 5.0})
    switch = ALPNSwitch(h.factory, None)
    transport = _Abortable(lenient=True)
    switch.makeConnection(transport)
    h.reactor.advance(5.0)
    assert transport.aborted, "no handshake within header_timeout"

    @implementer(ITimedHandshake)
    class TimedTLS(_Abortable):
        times_handshake = True

    switch = ALPNSwitch(h.factory, None)
    switch.makeConnection(TimedTLS(lenient=True))
    mine = [c for c in h.reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is switch]
    assert mine == [], "the ssl transport's own timer cuts a slow handshake"


@pytest_twisted.inlineCallbacks
def test_a_tls_connection_stalled_mid_handshake_is_closed_at_its_deadline(net: Any, cert_files: Any) -> None:
    import time

    config = proxy_config("tcp:127.0.0.1:1", limits={"header_timeout": 0.5})
    config["listen"][0]["tls"] = "t"
    config["tls"] = {"t": {"certificates": [{"cert": cert_files[0], "key": cert_files[1]}]}}
    proxy = yield net.proxy(config)
    client = yield net.client(proxy.port)
    began = time.monotonic()
    client.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's first bytes, then nothing
    yield client.until_closed()
    assert time.monotonic() - began >= 0.45, "not before its deadline"
    assert bytes(client.buf) == b"", "nothing answered to half a hello"


@pytest_twisted.inlineCallbacks
def test_a_tls_request_that_closes_does_not_wait_for_the_client_s_close(net: Any, cert_files: Any) -> None:
    """
    A request read whole, with C{Connection: close}: the answer, close_notify,
    and the socket closes, while the client (like many) never sends its own
    close_notify nor closes.  Waiting for it (the linger) was a reactor turn,
    two C{epoll_ctl} and a read per connection.
    """
    import socket
    import ssl
    import threading

    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    from twisted.internet.threads import deferToThread

    from rproxy_tw.tls_transport import LINGER

    origin = yield net.origin()
    config = proxy_config(f"tcp:127.0.0.1:{origin.port}")
    config["listen"][0]["tls"] = "t"
    config["tls"] = {"t": {"certificates": [{"cert": cert_files[0], "key": cert_files[1]}]}}
    proxy = yield net.proxy(config)
    answered, release = threading.Event(), threading.Event()

    def fetch() -> bytes:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        tls = ctx.wrap_socket(raw)
        tls.sendall(request(headers=[(b"Connection", b"close")]))
        data = b""
        while chunk := tls.recv(65536):  # b"": the server's close_notify
            data += chunk
        answered.set()
        release.wait(10)  # hold the socket open, sending nothing
        raw.close()
        return data

    fetched = deferToThread(fetch)
    while not answered.is_set() and not fetched.called:
        yield deferLater(reactor, 0.01, lambda: None)
    waited = 0.0
    while proxy.factory.connections and waited < LINGER / 2:  # a linger would hold it for LINGER
        yield deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
    closed = not proxy.factory.connections
    release.set()
    data = yield fetched
    assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in data
    assert closed, "the server closed its socket without waiting for the client's close"


def _forwarded_by(h: Harness, ip: str) -> tuple[Any, bytes]:
    """One request with C{Connection: close} from C{ip}: the connection and the head the origin got."""
    proto, client = h.client(ip)
    proto.dataReceived(request(headers=[(b"Connection", b"close")]))
    if h.pending_connects():
        h.origin = h.accept_origin()
    up, origin = h.origin
    head = take(origin)
    up.dataReceived(response(200, b"hello"))
    assert one_response(take(client)).body == b"hello"
    proto.connectionLost(None)
    return proto, head


def _forwarding_lines(head: bytes) -> list[bytes]:
    names = (b"x-forwarded-", b"forwarded:", b"via:")
    return [line for line in head.split(b"\r\n") if line.lower().startswith(names)]


def test_connections_from_one_address_share_their_forwarding_headers() -> None:
    """
    A client that connects for every request gets the forwarding headers
    made for its address once, not per connection; another address gets its
    own, and a reload's trusted proxies apply to the next connection.
    """
    from rproxy_tw.http.server import FORWARDING_CACHE

    h = Harness()
    first, head1 = _forwarded_by(h, "192.0.2.7")
    second, head2 = _forwarded_by(h, "192.0.2.7")
    assert second.info is first.info
    assert _forwarding_lines(head1) == _forwarding_lines(head2)
    assert b"X-Forwarded-For: 192.0.2.7" in head1 and b"for=192.0.2.7;" in head1
    other, head3 = _forwarded_by(h, "198.51.100.9")
    assert other.info is not first.info and b"X-Forwarded-For: 198.51.100.9" in head3
    assert not first.info.trusted

    h.factory.set_runtime(ProxyRuntime(parse_config(proxy_config(
        "tcp:10.0.0.1:8000", server={"trusted_proxies": ["192.0.2.0/24"]}), source="t.toml"), h.reactor))
    reloaded, _head = _forwarded_by(h, "192.0.2.7")
    assert reloaded.info.trusted and reloaded.info is not first.info

    for n in range(FORWARDING_CACHE + 1):
        h.factory.forwarding_for(f"10.1.{n // 256}.{n % 256}")
    assert len(h.factory._forwarding) <= FORWARDING_CACHE
