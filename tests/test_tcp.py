"""
Raw TCP proxying (issue 4): PROXY protocol builders and parser as pure
functions; the relay with real sockets on 127.0.0.1 (echo, half-close,
64 MiB each way, failover, connection limit, PROXY headers to the backend,
PROXY accepted from a load balancer in front, a stalled reader); timeouts
with a fake clock; TLS in front, to the backend, and both.

Self-contained on purpose: the helpers here do not lean on tests/conftest.py.
Nothing is decided by elapsed time: L{until} waits for a named condition,
with a generous guard against hangs only.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from rproxy_tw.config import BackendConfig, ListenConfig, PoolConfig
from rproxy_tw.tcp import proxy_protocol as pp
from rproxy_tw.tcp.proxy_protocol import ProxyHeader, ProxyProtocolError, TLSInfo, build_v1, build_v2, parse
from rproxy_tw.tcp.relay import TCPProxyFactory, TCPProxyServer
from rproxy_tw.transport.proxy_header import ProxyHeaderFactory
from rproxy_tw.upstream.pool import BackendPool

HANG_GUARD = 20.0
"""Seconds before a wait is declared hung; never an assertion about speed."""

HAVE_TLS_MODULE = os.path.exists(os.path.join(os.path.dirname(__file__), "..", "rproxy_tw", "tls.py"))
NO_TLS_MODULE = "rproxy_tw/tls.py (TLS termination profiles, another engineer's issue) does not exist yet"


def proxy_header(factory: Any) -> ProxyHeaderFactory:
    """What a C{haproxy:} listener puts in front of its factory."""
    from twisted.internet import reactor

    return ProxyHeaderFactory(factory, reactor)


# ===========================================================================
# PROXY protocol: pure functions


def v4(host: str, port: int) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def v6(host: str, port: int) -> IPv6Address:
    return IPv6Address("TCP", host, port)


def test_v1_tcp4_and_tcp6_lines() -> None:
    assert build_v1(v4("203.0.113.7", 5555), v4("10.0.0.1", 6380)) == b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 6380\r\n"
    assert build_v1(v6("2001:db8::1", 1), v6("2001:db8::2", 2)) == b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n"


def test_v1_unknown_for_unix_and_missing_addresses() -> None:
    assert build_v1(UNIXAddress(b"/tmp/a"), UNIXAddress(b"/tmp/b")) == b"PROXY UNKNOWN\r\n"
    assert build_v1(None, v4("10.0.0.1", 1)) == b"PROXY UNKNOWN\r\n"
    header, used = parse(b"PROXY UNKNOWN\r\nrest")  # type: ignore[misc]
    assert (header.source, header.destination, used) == (None, None, 15)


def test_dual_stack_addresses_are_written_as_ipv4() -> None:
    # A dual-stack listener reports IPv4 clients as v4-mapped IPv6.
    line = build_v1(v6("::ffff:198.51.100.9", 40000), v6("::ffff:10.0.0.1", 443))
    assert line == b"PROXY TCP4 198.51.100.9 10.0.0.1 40000 443\r\n"
    # One real IPv6 end: both are written as IPv6.
    line = build_v1(v4("198.51.100.9", 40000), v6("2001:db8::2", 443))
    assert line == b"PROXY TCP6 ::ffff:c633:6409 2001:db8::2 40000 443\r\n"


def test_v2_tcp4_bytes_match_the_specification() -> None:
    header = build_v2(v4("203.0.113.7", 5555), v4("10.0.0.1", 6380))
    assert header == (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + bytes([0x21, 0x11, 0, 12])
        + bytes([203, 0, 113, 7, 10, 0, 0, 1])
        + (5555).to_bytes(2, "big")
        + (6380).to_bytes(2, "big")
    )


@pytest.mark.parametrize(
    "source, dest",
    [
        (v4("203.0.113.7", 5555), v4("10.0.0.1", 6380)),
        (v6("2001:db8::1", 65535), v6("2001:db8:1::2", 1)),
        (UNIXAddress(b"/run/client.sock"), UNIXAddress(b"/run/rproxy.sock")),
    ],
)
def test_v2_round_trips(source: Any, dest: Any) -> None:
    raw = build_v2(source, dest)
    header, used = parse(raw + b"payload")  # type: ignore[misc]
    assert used == len(raw)
    assert (header.version, header.command) == (2, "PROXY")
    assert (header.source, header.destination) == (source, dest)
    assert header.tls is None and header.raw == raw


def test_v2_local_command_has_no_addresses() -> None:
    raw = build_v2(v4("1.2.3.4", 1), v4("5.6.7.8", 2), local=True)
    assert raw[12:14] == b"\x20\x00"
    header, _ = parse(raw)  # type: ignore[misc]
    assert (header.command, header.source, header.destination) == ("LOCAL", None, None)


def test_v2_tls_tlvs() -> None:
    tls = TLSInfo(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", sni="redis.example.test", alpn=b"redis")
    raw = build_v2(v4("203.0.113.7", 5555), v4("10.0.0.1", 6380), tls)
    header, _ = parse(raw)  # type: ignore[misc]
    assert header.tls == tls
    kinds = [t for t, _ in header.tlvs]
    assert kinds == [pp.PP2_TYPE_ALPN, pp.PP2_TYPE_AUTHORITY, pp.PP2_TYPE_SSL]
    ssl_value = dict(header.tlvs)[pp.PP2_TYPE_SSL]
    # client = PP2_CLIENT_SSL only; verify non-zero (no client certificate)
    assert ssl_value[0] == pp.PP2_CLIENT_SSL
    assert int.from_bytes(ssl_value[1:5], "big") != 0
    # sub-TLVs: version then cipher, exactly as the spec lays them out
    assert ssl_value[5:] == (
        bytes([pp.PP2_SUBTYPE_SSL_VERSION, 0, 7]) + b"TLSv1.3"
        + bytes([pp.PP2_SUBTYPE_SSL_CIPHER, 0, 22]) + b"TLS_AES_256_GCM_SHA384"
    )


def test_v2_tls_client_certificate() -> None:
    tls = TLSInfo(version="TLSv1.2", cipher="ECDHE-ECDSA-AES128-GCM-SHA256", client_cn="alice",
                  client_cert=True, verified=True)
    header, _ = parse(build_v2(v4("1.1.1.1", 1), v4("2.2.2.2", 2), tls))  # type: ignore[misc]
    assert header.tls == tls
    ssl_value = dict(header.tlvs)[pp.PP2_TYPE_SSL]
    assert ssl_value[0] == pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN
    assert ssl_value[1:5] == b"\x00\x00\x00\x00"


def test_build_follows_the_listener_setting() -> None:
    s, d = v4("1.1.1.1", 1), v4("2.2.2.2", 2)
    assert pp.build("off", s, d) == b""
    assert pp.build("v1", s, d, TLSInfo(version="TLSv1.3")) == build_v1(s, d)
    assert pp.build("v2", s, d, TLSInfo(version="TLSv1.3")) == build_v2(s, d, TLSInfo(version="TLSv1.3"))
    with pytest.raises(ValueError):
        pp.build("v3", s, d)


@pytest.mark.parametrize("raw", [
    build_v1(v4("203.0.113.7", 5555), v4("10.0.0.1", 6380)),
    build_v2(v6("2001:db8::1", 1), v6("2001:db8::2", 2), TLSInfo(version="TLSv1.3", cipher="X")),
])
def test_every_prefix_asks_for_more(raw: bytes) -> None:
    for i in range(len(raw)):
        assert parse(raw[:i]) is None, i
    assert parse(raw) is not None


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 1.2.3.4 2001:db8::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY " + b"x" * 120,
    b"\r\n\r\n\x00\r\nQUIX\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12),  # version 3
    b"\r\n\r\n\x00\r\nQUIT\n\x2f\x11\x00\x0c" + bytes(12),  # command 0xf
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4),  # address block too short
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0e" + bytes(12) + b"\x04\x00",  # truncated TLV
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x10" + bytes(12) + b"\x04\x00\x09\x00",  # TLV past the end
])
def test_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(raw)


@settings(max_examples=200, deadline=None)
@given(
    family=st.sampled_from([4, 6]),
    a=st.integers(0, 2**128 - 1),
    b=st.integers(0, 2**128 - 1),
    ports=st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    tail=st.binary(max_size=32),
    version=st.sampled_from(["v1", "v2"]),
)
def test_round_trip_property(family: int, a: int, b: int, ports: tuple[int, int], tail: bytes, version: str) -> None:
    if family == 4:
        s, d = v4(str(ipaddress.IPv4Address(a % 2**32)), ports[0]), v4(str(ipaddress.IPv4Address(b % 2**32)), ports[1])
    else:
        s6, d6 = ipaddress.IPv6Address(a), ipaddress.IPv6Address(b)
        if s6.ipv4_mapped is not None or d6.ipv4_mapped is not None:
            return  # written as IPv4 on purpose (see the dual-stack test)
        s, d = v6(str(s6), ports[0]), v6(str(d6), ports[1])
    raw = pp.build(version, s, d)
    header, used = parse(raw + tail)  # type: ignore[misc]
    assert (header.source, header.destination, used) == (s, d, len(raw))


# ===========================================================================
# Real sockets: helpers


def until(pred: Callable[[], Any], what: str, timeout: float = HANG_GUARD) -> Deferred[Any]:
    """Fires with C{pred()} once it is true; checks every few milliseconds."""
    d: Deferred[Any] = Deferred()
    deadline = time.monotonic() + timeout

    def check() -> None:
        try:
            value = pred()
        except Exception as e:  # noqa: BLE001 - report it to the waiter
            d.errback(e)
            return
        if value:
            d.callback(value)
        elif time.monotonic() > deadline:
            d.errback(AssertionError(f"hung waiting for {what} (guard {timeout}s)"))
        else:
            reactor.callLater(0.005, check)

    check()
    return d


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@implementer(IPushProducer)
class Sender:
    """Writes C{data} to a transport in slices while it is not paused; then calls C{done}."""

    def __init__(self, transport: Any, data: bytes, done: Callable[[], None], block: int = 256 * 1024) -> None:
        self.transport = transport
        self.data = data
        self.done = done
        self.block = block
        self.pos = 0
        self.paused = False
        self.stopped = False
        self._call: Any = None

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self.paused and not self.stopped:
            self._call = reactor.callLater(0, self._write)

    def _write(self) -> None:
        self._call = None
        while not self.paused and not self.stopped and self.pos < len(self.data):
            chunk = self.data[self.pos : self.pos + self.block]
            self.pos += len(chunk)
            self.transport.write(chunk)
        if self.pos >= len(self.data) and not self.stopped:
            self.stopped = True
            self.transport.unregisterProducer()
            self.done()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """
    Either end of a test connection.  Keeps (or only hashes) what it
    receives; can send a large body and then half-close.
    """

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.buf = bytearray()
        self.count = 0
        self.sha = hashlib.sha256()
        self.eof = False
        self.closed = False
        self.sent_all = False
        self.write_done = False
        self.reason: Any = None
        self.connected_d: Deferred[Any] = Deferred()
        self.lost: Deferred[Any] = Deferred()

    def connectionMade(self) -> None:
        self.local = self.transport.getHost()
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        if self.keep:
            self.buf += data
        else:
            self.sha.update(data)

    def readConnectionLost(self) -> None:
        self.eof = True
        self._maybeClose()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.eof = True
        self.reason = reason
        self.lost.callback(self)

    def send_all(self, data: bytes, then_half_close: bool = True) -> None:
        def done() -> None:
            self.sent_all = True
            if then_half_close:
                self.half_close()

        Sender(self.transport, data, done).start()

    def half_close(self) -> None:
        """shutdown(SHUT_WR): send no more, keep reading."""
        self.write_done = True
        self.transport.loseWriteConnection()
        self._maybeClose()

    def _maybeClose(self) -> None:
        # Both directions done: close the socket (Twisted leaves that to the protocol).
        if self.eof and self.write_done and not self.closed:
            self.transport.loseConnection()

    def until_eof(self) -> Deferred[Any]:
        return until(lambda: self.eof, "the other side to close")

    def until_closed(self) -> Deferred[Any]:
        return until(lambda: self.closed, "the connection to close")


class Echo(Peer):
    """Echoes; passes the EOF back once everything is echoed."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.loseConnection()


class ReplyAfterEOF(Peer):
    """Says nothing until the client has finished, then answers with a digest of what it got."""

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.write(b"got %d bytes, sha256 %s\n" % (len(self.buf), hashlib.sha256(self.buf).hexdigest().encode()))
        self.transport.loseConnection()


class Greeter(Peer):
    """A server-speaks-first service (SMTP, IMAP): greets on connect, then echoes."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(b"220 hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.write(data)


class HeaderBackend(Peer):
    """Parses the PROXY header the proxy sends, then echoes the payload."""

    def __init__(self) -> None:
        super().__init__()
        self.header: ProxyHeader | None = None

    def dataReceived(self, data: bytes) -> None:
        Peer.dataReceived(self, data)
        if self.header is None:
            parsed = parse(bytes(self.buf))
            if parsed is None:
                return
            self.header, used = parsed
            rest = bytes(self.buf[used:])
            self.transport.write(b"ok\n" + rest)
        else:
            self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.eof = True
        self.transport.loseConnection()


class Server(Factory):
    """A test backend: one protocol instance per connection, all kept."""

    noisy = False

    def __init__(self, make: Callable[[], Peer]) -> None:
        self.make = make
        self.peers: list[Peer] = []

    def buildProtocol(self, addr: Any) -> Peer:
        p = self.make()
        self.peers.append(p)
        return p


def dead_port() -> int:
    """A local port nothing listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def listen_config(proxy_protocol: str = "off", **extra: Any) -> ListenConfig:
    return ListenConfig(endpoint="tcp:0", protocol="tcp", pool="p", proxy_protocol=proxy_protocol, **extra)


class Env:
    """Everything one test starts on 127.0.0.1, stopped afterwards."""

    def __init__(self) -> None:
        self.ports: list[Any] = []
        self.servers: list[Server] = []
        self.clients: list[Peer] = []
        self.factories: list[TCPProxyFactory] = []

    def server(self, make: Callable[[], Peer], wrap: Callable[[Factory], Any] | None = None) -> tuple[Server, int]:
        server = Server(make)
        port = reactor.listenTCP(0, wrap(server) if wrap else server, interface="127.0.0.1")
        self.ports.append(port)
        self.servers.append(server)
        return server, port.getHost().port

    def proxy(self, backends: list[str], listen: Any = None, wrap: Callable[[Any], Any] | None = None,
              **pool: Any) -> tuple[TCPProxyFactory, int]:
        pool_config = PoolConfig(name="p", backends=tuple(BackendConfig(endpoint=b) for b in backends), **pool)
        backend_pool = BackendPool(pool_config, reactor, lambda d: clientFromString(reactor, d))
        factory = TCPProxyFactory(reactor, backend_pool, listen or listen_config(), pool_config)
        port = reactor.listenTCP(0, wrap(factory) if wrap else factory, interface="127.0.0.1")
        self.ports.append(port)
        self.factories.append(factory)
        return factory, port.getHost().port

    async def connect(self, port: int, peer: Peer | None = None, tls: Any = None) -> Peer:
        peer = peer if peer is not None else Peer()
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        if tls is not None:
            endpoint = wrapClientTLS(tls, endpoint)
        await endpoint.connect(Factory.forProtocol(lambda: peer))
        self.clients.append(peer)
        return peer

    async def close(self) -> None:
        for peer in self.clients:
            if not peer.closed and peer.transport is not None:
                peer.transport.abortConnection()
        for factory in self.factories:
            factory.abortAll("test over")
        for server in self.servers:
            for peer in server.peers:
                if not peer.closed and peer.transport is not None:
                    peer.transport.abortConnection()
        for port in self.ports:
            await maybeDeferred(port.stopListening)
        await sleep(0.01)


@pytest_twisted.async_yield_fixture
async def env() -> Any:
    e = Env()
    yield e
    await e.close()


def ended(factory: TCPProxyFactory) -> list[TCPProxyServer]:
    """Collects each relay of C{factory} as it finishes."""
    out: list[TCPProxyServer] = []
    factory.on_finished = out.append
    return out


# ===========================================================================
# Relaying


def test_protocol_interfaces() -> None:
    pool_config = PoolConfig(name="p", backends=(BackendConfig("tcp:127.0.0.1:1"),))
    factory = TCPProxyFactory(Clock(), BackendPool(pool_config, Clock(), lambda d: None), listen_config(), pool_config)
    relay = factory.buildProtocol(v4("127.0.0.1", 1))
    assert verifyObject(IHalfCloseableProtocol, relay)


@pytest_twisted.ensureDeferred
async def test_echo_and_the_log_line(env: Env) -> None:
    _, backend_port = env.server(Echo)
    factory, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"])
    done = ended(factory)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = await env.connect(port)
        client.transport.write(b"hello, ")
        client.transport.write(b"world")
        await until(lambda: bytes(client.buf) == b"hello, world", "the echo")
        assert factory.counters.connections_active == 1
        assert factory.pool.backends[0].inflight == 1
        client.half_close()
        await client.until_closed()
        await until(lambda: done, "the relay to finish")
    finally:
        globalLogPublisher.removeObserver(events.append)
    relay = done[0]
    assert (relay.bytes_up, relay.bytes_down, relay.ended) == (12, 12, "client closed")
    c = factory.counters
    assert (c.connections_total, c.connections_active, c.bytes_up, c.bytes_down) == (1, 0, 12, 12)
    assert factory.pool.backends[0].inflight == 0 and factory.pool.backends[0].total == 1
    lines = [e for e in events if e.get("log_namespace", "").endswith("TCPProxyFactory") and "up" in e]
    assert len(lines) == 1
    line = lines[0]
    assert line["client"] == f"127.0.0.1:{client.local.port}"
    assert line["backend"] == f"tcp:127.0.0.1:{backend_port}"
    assert (line["up"], line["down"], line["ended"]) == (12, 12, "client closed")
    assert line["duration"] >= 0


def _half_close_client(port: int, payload: bytes) -> bytes:
    """A plain blocking client: send, shutdown(SHUT_WR), read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            data = s.recv(65536)
            if not data:
                return out
            out += data


@pytest_twisted.ensureDeferred
async def test_half_close_client_still_gets_the_reply(env: Env) -> None:
    _, backend_port = env.server(ReplyAfterEOF)
    factory, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"])
    done = ended(factory)
    payload = os.urandom(300_000)
    reply = await deferToThread(_half_close_client, port, payload)
    assert reply == b"got %d bytes, sha256 %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())
    await until(lambda: done, "the relay to finish")
    assert done[0].ended == "client closed"


@pytest_twisted.ensureDeferred
async def test_half_close_from_the_backend_side(env: Env) -> None:
    """The backend finishes first; the client keeps sending and the backend keeps reading."""
    def make() -> Peer:
        p = Peer()
        p.connectionMade = lambda: (Peer.connectionMade(p), p.send_all(b"banner\n"))  # type: ignore[method-assign]
        return p

    server, backend_port = env.server(make)
    _, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"])
    client = await env.connect(port)
    await until(lambda: client.eof, "the backend's EOF to reach the client")
    assert bytes(client.buf) == b"banner\n" and not client.closed
    client.send_all(b"still talking")
    await client.until_closed()
    await until(lambda: server.peers[0].closed, "the backend to close")
    assert bytes(server.peers[0].buf) == b"still talking"


# 64 MiB each way, at once: data integrity and both half-closes on a big stream.
BIG = 64 * 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_64_mib_each_way_intact(env: Env) -> None:
    up, down = os.urandom(BIG), os.urandom(BIG)
    # The backend streams `down` as soon as it is connected, and hashes what arrives.
    def make() -> Peer:
        p = Peer(keep=False)
        p.connectionMade = lambda: (Peer.connectionMade(p), p.send_all(down))  # type: ignore[method-assign]
        return p

    server, backend_port = env.server(make)
    factory, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"])
    done = ended(factory)
    client = await env.connect(port, Peer(keep=False))
    started = time.monotonic()
    client.send_all(up)
    await client.until_closed()
    await until(lambda: done, "the relay to finish")
    elapsed = time.monotonic() - started
    backend = server.peers[0]
    # The relay has written everything; the backend (in this process) may still be reading it.
    await until(lambda: backend.count >= BIG, "the backend to read the whole upload")
    assert (client.count, backend.count) == (BIG, BIG)
    assert client.sha.hexdigest() == hashlib.sha256(down).hexdigest()
    assert backend.sha.hexdigest() == hashlib.sha256(up).hexdigest()
    assert (done[0].bytes_up, done[0].bytes_down) == (BIG, BIG)
    print(f"\n64 MiB each way in {elapsed:.2f}s ({2 * BIG / elapsed / 2**20:.0f} MiB/s both ways together, "
          "one process)")


@pytest_twisted.ensureDeferred
async def test_dead_backend_fails_over_to_a_live_one(env: Env) -> None:
    _, live = env.server(Echo)
    dead = dead_port()
    # retries = 0, yet every backend in rotation is tried once.
    factory, port = env.proxy([f"tcp:127.0.0.1:{dead}", f"tcp:127.0.0.1:{live}"], retries=0)
    for i in range(4):
        client = await env.connect(port)
        client.transport.write(b"ping %d" % i)
        await until(lambda c=client, i=i: bytes(c.buf) == b"ping %d" % i, "the echo through the live backend")
        client.transport.loseConnection()
        await client.until_closed()
    dead_backend = factory.pool.backends[0]
    assert dead_backend.failures >= 1 and dead_backend.last_error
    assert factory.counters.connect_failures == dead_backend.failures
    assert factory.counters.no_backend == 0


@pytest_twisted.ensureDeferred
async def test_no_live_backend_closes_the_client(env: Env) -> None:
    factory, port = env.proxy([f"tcp:127.0.0.1:{dead_port()}", f"tcp:127.0.0.1:{dead_port()}"], retries=5)
    done = ended(factory)
    client = await env.connect(port)
    client.transport.write(b"anyone?")
    await client.until_eof()
    await until(lambda: done, "the relay to finish")
    assert factory.counters.connect_failures == 2  # each once: there is nobody else to try
    assert factory.counters.no_backend == 1
    assert done[0].ended == "no backend reachable (2 tried)"
    assert client.count == 0


@pytest_twisted.ensureDeferred
async def test_connection_limit(env: Env) -> None:
    _, backend_port = env.server(Echo)
    factory, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], listen=listen_config(max_connections=2))
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        held = [await env.connect(port) for _ in range(2)]
        for i, c in enumerate(held):
            c.transport.write(b"%d" % i)
        await until(lambda: all(c.buf for c in held), "both to be relayed")
        over = await env.connect(port)
        over.transport.write(b"let me in")
        await over.until_eof()
        assert over.count == 0
        assert factory.counters.connections_rejected == 1
        assert factory.counters.connections_active == 2
        held[0].transport.loseConnection()
        await held[0].until_closed()
        await until(lambda: factory.counters.connections_active == 1, "the freed slot")
        again = await env.connect(port)
        again.transport.write(b"now")
        await until(lambda: bytes(again.buf) == b"now", "a connection under the limit again")
    finally:
        globalLogPublisher.removeObserver(events.append)
    rejected = [e for e in events if "limit" in e and e.get("count")]
    assert len(rejected) == 1 and rejected[0]["limit"] == 2


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_proxy_header_to_the_backend(env: Env, version: str) -> None:
    server, backend_port = env.server(HeaderBackend)
    _, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], listen=listen_config(version))
    client = await env.connect(port)
    client.transport.write(b"payload")
    await until(lambda: bytes(client.buf) == b"ok\npayload", "the backend's answer")
    header = server.peers[0].header
    assert header is not None and header.version == int(version[1])
    assert header.source == v4("127.0.0.1", client.local.port)
    assert header.destination == v4("127.0.0.1", port)
    assert header.tls is None


@pytest_twisted.ensureDeferred
async def test_proxy_header_accepted_in_front_and_passed_on(env: Env) -> None:
    """
    A load balancer in front sends PROXY v1 (the haproxy: endpoint wrapper
    accepts it); the backend behind gets the original client in PROXY v2,
    even for a server-speaks-first service where the client sends nothing
    after the header.
    """

    # HeaderBackend answers "ok" as soon as the PROXY header arrives, like a greeting.
    server, backend_port = env.server(HeaderBackend)
    _, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], listen=listen_config("v2"), wrap=proxy_header)
    client = await env.connect(port)
    client.transport.write(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 6380\r\n")
    await until(lambda: server.peers and server.peers[0].header is not None, "the backend to get a PROXY header")
    header = server.peers[0].header
    assert header.source == v4("203.0.113.7", 5555)
    assert header.destination == v4("192.0.2.1", 6380)
    await until(lambda: bytes(client.buf) == b"ok\n", "the backend's greeting without any client payload")
    client.transport.write(b"data")
    await until(lambda: bytes(client.buf) == b"ok\ndata", "the echo")


@pytest_twisted.ensureDeferred
async def test_stalled_reader_keeps_proxy_buffers_bounded(env: Env) -> None:
    """
    The backend writes far faster than the client reads: the proxy stops
    reading from the backend once the client's socket is full, so what the
    proxy holds stays at about one read, and the backend gets paused.
    When the client reads again, every byte arrives intact.
    """
    total = 48 * 1024 * 1024
    data = os.urandom(total)
    senders: list[Any] = []

    def make() -> Peer:
        p = Peer()

        def made() -> None:
            Peer.connectionMade(p)
            p.send_all(data)
            senders.append(p.transport.producer)

        p.connectionMade = made  # type: ignore[method-assign]
        return p

    _, backend_port = env.server(make)
    factory, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"])
    client = await env.connect(port, Peer(keep=False))
    client.transport.pauseProducing()
    relay = next(iter(factory.connections))
    # Wait for the relay to stall: no byte relayed for a while.
    last = [-1, time.monotonic()]
    peak = [0]

    def stalled() -> bool:
        buffered = sum(relay.buffered())
        peak[0] = max(peak[0], buffered)
        if relay.bytes_down != last[0]:
            last[:] = [relay.bytes_down, time.monotonic()]
            return False
        return time.monotonic() - last[1] > 0.3

    await until(stalled, "the relay to stall")
    assert relay.bytes_down < total, "everything went through: the kernel buffers were large enough to hide a stall"
    assert senders and senders[0].paused, "the backend's writes were never paused"
    assert relay.upstream_gate.paused, "the proxy still reads from the backend"
    assert peak[0] <= 1024 * 1024, f"the proxy buffered {peak[0]} bytes"
    print(f"\nstalled after {relay.bytes_down} of {total} bytes; the proxy held at most {peak[0]} bytes")
    client.transport.resumeProducing()
    await until(lambda: client.count == total, "the rest of the stream", timeout=60)
    assert client.sha.hexdigest() == hashlib.sha256(data).hexdigest()


# ===========================================================================
# Timeouts, with a fake clock and in-memory transports


class HangingEndpoint:
    """A backend that never accepts: the connect Deferred only ends by cancellation."""

    def __init__(self) -> None:
        self.attempts = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        self.attempts += 1
        return Deferred()


class MemoryEndpoint:
    """A backend that accepts at once into a StringTransport."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        proto = factory.buildProtocol(v4("10.0.0.2", 6379))
        proto.makeConnection(StringTransport(peerAddress=v4("10.0.0.2", 6379)))
        self.protocols.append(proto)
        return succeed(proto)


def memory_proxy(endpoints: dict[str, Any], listen: Any = None, **pool: Any) -> tuple[TCPProxyFactory, Clock]:
    clock = Clock()
    pool_config = PoolConfig(name="p", backends=tuple(BackendConfig(endpoint=e) for e in endpoints), **pool)
    backend_pool = BackendPool(pool_config, clock, endpoints.__getitem__)
    return TCPProxyFactory(clock, backend_pool, listen or listen_config(), pool_config), clock


def memory_client(factory: TCPProxyFactory) -> tuple[TCPProxyServer, StringTransport]:
    relay = factory.buildProtocol(v4("198.51.100.1", 40000))
    transport = StringTransport(peerAddress=v4("198.51.100.1", 40000), hostAddress=v4("10.0.0.1", 6380))
    relay.makeConnection(transport)
    return relay, transport  # type: ignore[return-value]


def test_connect_timeout_fails_over() -> None:
    hanging, live = HangingEndpoint(), MemoryEndpoint()
    factory, clock = memory_proxy({"tcp:10.0.0.9:1": hanging, "tcp:10.0.0.2:6379": live},
                                  connect_timeout=2.0, retries=0)
    relay, client = memory_client(factory)
    relay.dataReceived(b"early bytes")
    assert client.producerState == "paused", "bytes before the backend connection must pause the client"
    if not live.protocols:  # the balancer tried the hanging one first
        assert hanging.attempts == 1
        clock.advance(1.9)
        assert not live.protocols
        clock.advance(0.2)
    assert len(live.protocols) == 1
    assert live.protocols[0].transport.value() == b"early bytes"
    assert client.producerState == "producing"
    if hanging.attempts:
        backend = factory.pool.backends[0]
        assert backend.failures == 1 and "2s" in backend.last_error
        assert factory.counters.connect_failures == 1


def test_idle_timeout_resets_on_traffic_then_closes() -> None:
    live = MemoryEndpoint()
    factory, clock = memory_proxy({"tcp:10.0.0.2:6379": live}, listen_config(idle_timeout=10.0))
    done = ended(factory)
    relay, client = memory_client(factory)
    upstream = live.protocols[0]
    clock.advance(8)
    relay.dataReceived(b"x")
    clock.advance(8)
    upstream.dataReceived(b"y")
    clock.advance(8)
    assert not client.disconnecting and client.value() == b"y"
    clock.advance(2.5)
    assert client.disconnecting and upstream.transport.disconnecting
    relay.connectionLost()
    upstream.connectionLost()
    assert done and done[0].ended == "idle for 10s"
    assert factory.counters.idle_timeouts == 1 and factory.counters.connections_active == 0


def test_idle_timeout_is_the_listeners_not_the_pools() -> None:
    pool_config = PoolConfig(name="p", backends=(BackendConfig("tcp:127.0.0.1:1"),), idle_timeout=60.0)
    pool = BackendPool(pool_config, Clock(), lambda d: None)
    assert TCPProxyFactory(Clock(), pool, listen_config(), pool_config).idle_timeout == 3600.0
    assert TCPProxyFactory(Clock(), pool, listen_config(idle_timeout=0), pool_config).idle_timeout == 0
    assert TCPProxyFactory(Clock(), pool, listen_config(), pool_config).max_connections == 10000


def test_quiet_relay_outlives_an_http_sized_idle_timeout() -> None:
    """
    A Redis SUBSCRIBE or a database session may carry nothing for minutes:
    by default a raw TCP relay idle for 61 s (and 59 min) stays open, while
    a listener's explicit idle_timeout still closes it, and 0 never does.
    """
    for listen, open_after, closed_after in [
        (parse_listen({}), [61.0, 3540.0], 3600.0),
        (parse_listen({"idle_timeout": 30}), [29.0], 30.0),
        (parse_listen({"idle_timeout": 0}), [61.0, 86400.0 * 30], None),
    ]:
        live = MemoryEndpoint()
        factory, clock = memory_proxy({"tcp:10.0.0.2:6379": live}, listen)
        relay, client = memory_client(factory)
        upstream = live.protocols[0]
        relay.dataReceived(b"SUBSCRIBE news\r\n")
        elapsed = 0.0
        for t in open_after:
            clock.advance(t - elapsed)
            elapsed = t
            assert not client.disconnecting and not upstream.transport.disconnecting, (listen.idle_timeout, t)
        if closed_after is not None:
            clock.advance(closed_after - elapsed)
            assert client.disconnecting and upstream.transport.disconnecting, listen.idle_timeout
            assert relay.ended == f"idle for {closed_after:g}s"
        else:
            assert not clock.getDelayedCalls(), "no idle timer at all with idle_timeout = 0"


def parse_listen(extra: dict[str, Any]) -> Any:
    """A tcp listener's config as the TOML loader makes it."""
    from rproxy_tw.config import parse_config

    config = parse_config({"listen": [{"endpoint": "tcp:0", "protocol": "tcp", "pool": "p", **extra}],
                           "pool": {"p": {"backends": ["tcp:10.0.0.2:6379"]}}})
    return config.listen[0]


def test_client_gone_while_connecting_cancels_the_attempt() -> None:
    hanging = HangingEndpoint()
    factory, clock = memory_proxy({"tcp:10.0.0.9:1": hanging}, connect_timeout=5.0)
    done = ended(factory)
    relay, _ = memory_client(factory)
    relay.connectionLost()
    assert done and done[0].ended == "client closed"
    assert factory.counters.connect_failures == 0 and not clock.getDelayedCalls()


# ===========================================================================
# TLS


def _make_pki(root: str) -> dict[str, str]:
    """A CA and a leaf for localhost/127.0.0.1, written as PEM files under C{root}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("rproxy tcp test CA")).issuer_name(name("rproxy tcp test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    os.makedirs(os.path.join(root, "trust"), exist_ok=True)
    files = {
        "ca": os.path.join(root, "trust", "ca.pem"),
        "cert": os.path.join(root, "leaf.pem"),
        "key": os.path.join(root, "leaf.key"),
        "trust_dir": os.path.join(root, "trust"),
    }
    with open(files["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(files["cert"], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(files["key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> dict[str, str]:
    return _make_pki(str(tmp_path_factory.mktemp("tcp-pki")))


def _client_tls(pki: dict[str, str], hostname: str = "localhost") -> Any:
    from twisted.internet import ssl

    with open(pki["ca"], "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    return ssl.optionsForClientTLS(hostname, trustRoot=ca)


def _server_tls(pki: dict[str, str]) -> Callable[[Any], Any]:
    """Wraps a factory in rproxy's own TLS termination, as service.py does for tls = "NAME"."""
    from rproxy_tw.config import CertificateConfig, TLSProfile
    from rproxy_tw.tls import tls_server_factory

    profile = TLSProfile(name="main", certificates=(CertificateConfig(pki["cert"], pki["key"]),))
    return lambda factory: tls_server_factory(reactor, profile, factory, http=False)


def _twisted_tls(pki: dict[str, str], half_close: bool = False) -> Callable[[Any], Any]:
    """Wraps a factory in Twisted's own TLS (for TLS backends), optionally one that half-closes."""
    from twisted.internet import ssl
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from rproxy_tw.tcp.tls_halfclose import HalfCloseBufferingTLSTransport

    with open(pki["cert"], "rb") as c, open(pki["key"], "rb") as k:
        cert = ssl.PrivateCertificate.loadPEM(c.read() + k.read())

    def wrap(factory: Any) -> Any:
        tls = TLSMemoryBIOFactory(cert.options(), False, factory)
        if half_close:
            tls.protocol = HalfCloseBufferingTLSTransport
        return tls

    return wrap


def _tls_half_close_client(port: int, cafile: str, payload: bytes, close_notify: bool, prefix: bytes = b"") -> bytes:
    """
    A TLS client (Python's ssl over a memory BIO, so that it can read after
    closing): sends C{prefix} in the clear (a load balancer's PROXY header),
    then C{payload} over TLS, then C{close_notify} (if asked) and a TCP FIN,
    then reads the answer to the end.
    """
    import ssl as pyssl

    ctx = pyssl.create_default_context(cafile=cafile)
    incoming, outgoing = pyssl.MemoryBIO(), pyssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as sock:
        sock.sendall(prefix)

        def flush() -> None:
            data = outgoing.read()
            if data:
                sock.sendall(data)

        def fill() -> None:
            if incoming.eof:
                raise AssertionError("the server closed without a TLS close")
            data = sock.recv(65536)
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()

        while True:
            try:
                tls.do_handshake()
                break
            except pyssl.SSLWantReadError:
                flush()
                fill()
        flush()
        tls.write(payload)
        flush()
        if close_notify:
            try:
                tls.unwrap()
            except pyssl.SSLWantReadError:
                pass
            flush()
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            try:
                data = tls.read(65536)
                if not data:  # the server's close_notify
                    return answer
                answer += data
            except pyssl.SSLWantReadError:
                fill()
            except (pyssl.SSLZeroReturnError, pyssl.SSLEOFError):
                return answer


@pytest.mark.skipif(not HAVE_TLS_MODULE, reason=NO_TLS_MODULE)
@pytest_twisted.ensureDeferred
async def test_tls_terminated_in_front_of_a_plain_backend(env: Env, pki: dict[str, str]) -> None:
    server, backend_port = env.server(HeaderBackend)
    factory, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], listen=listen_config("v2"), wrap=_server_tls(pki))
    done = ended(factory)
    client = await env.connect(port, tls=_client_tls(pki))
    client.transport.write(b"over tls")
    await until(lambda: bytes(client.buf) == b"ok\nover tls", "the echo over TLS")
    header = server.peers[0].header
    assert header is not None and header.tls is not None
    assert header.source == v4("127.0.0.1", client.local.port)
    assert header.tls.version in ("TLSv1.2", "TLSv1.3") and header.tls.cipher
    assert header.tls.sni == "localhost"
    assert not header.tls.client_cert
    # The client closes (close_notify): the relay passes it on and ends.
    client.transport.loseConnection()
    await until(lambda: done, "the relay to finish")
    assert done[0].bytes_up == len(b"over tls")


@pytest.mark.skipif(not HAVE_TLS_MODULE, reason=NO_TLS_MODULE)
@pytest_twisted.ensureDeferred
async def test_tls_front_backend_eof_reaches_the_client(env: Env, pki: dict[str, str]) -> None:
    """Backend finishes first: the client gets everything, then TLS close; it can still send meanwhile."""
    def make() -> Peer:
        p = Peer()
        p.connectionMade = lambda: (Peer.connectionMade(p), p.send_all(b"x" * 200_000))  # type: ignore[method-assign]
        return p

    _, backend_port = env.server(make)
    _, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], wrap=_server_tls(pki))
    client = await env.connect(port, tls=_client_tls(pki))
    await client.until_closed()
    assert client.count == 200_000


@pytest.mark.skipif(not HAVE_TLS_MODULE, reason=NO_TLS_MODULE)
@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify+FIN", "bare FIN"])
@pytest_twisted.ensureDeferred
async def test_tls_front_half_close_still_gets_the_reply(env: Env, pki: dict[str, str], close_notify: bool) -> None:
    """A TLS client that finishes sending (close_notify and/or FIN) still gets the answer sent after it."""
    _, backend_port = env.server(ReplyAfterEOF)
    factory, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], wrap=_server_tls(pki))
    done = ended(factory)
    payload = os.urandom(200_000)
    reply = await deferToThread(_tls_half_close_client, port, pki["ca"], payload, close_notify)
    assert reply == b"got %d bytes, sha256 %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())
    await until(lambda: done, "the relay to finish")
    assert done[0].ended == "client closed"


@pytest.mark.skipif(not HAVE_TLS_MODULE, reason=NO_TLS_MODULE)
@pytest_twisted.ensureDeferred
async def test_tls_front_twisted_client_close_still_gets_the_reply(env: Env, pki: dict[str, str]) -> None:
    """Twisted's TLS client sends close_notify on loseConnection() and reads on: it gets the answer."""
    _, backend_port = env.server(ReplyAfterEOF)
    _, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], wrap=_server_tls(pki))
    client = await env.connect(port, tls=_client_tls(pki))
    client.transport.write(b"question")
    client.transport.loseConnection()
    await client.until_closed()
    assert bytes(client.buf) == b"got 8 bytes, sha256 %s\n" % hashlib.sha256(b"question").hexdigest().encode()


@pytest.mark.skipif(not HAVE_TLS_MODULE, reason=NO_TLS_MODULE)
@pytest_twisted.ensureDeferred
async def test_proxy_header_in_front_of_tls_and_v2_with_tls_behind(env: Env, pki: dict[str, str]) -> None:
    """haproxy: wrapper, then TLS, then the relay: the backend learns the LB's client and the TLS facts."""

    server, backend_port = env.server(HeaderBackend)
    tls = _server_tls(pki)
    _, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], listen=listen_config("v2"),
                        wrap=lambda f: proxy_header(tls(f)))
    lb_header = build_v2(v6("2001:db8::7", 40000), v6("2001:db8::1", 6380))
    reply = await deferToThread(_tls_half_close_client, port, pki["ca"], b"hi", True, lb_header)
    assert reply == b"ok\nhi"
    header = server.peers[0].header
    assert header is not None and header.tls is not None
    assert header.source == v6("2001:db8::7", 40000) and header.destination == v6("2001:db8::1", 6380)
    assert header.tls.sni == "localhost" and header.tls.version in ("TLSv1.2", "TLSv1.3")


@pytest_twisted.ensureDeferred
async def test_tls_to_a_tls_backend(env: Env, pki: dict[str, str]) -> None:
    """TLS origination: a tls: backend endpoint, verified against the test CA."""
    _, backend_port = env.server(ReplyAfterEOF, wrap=_twisted_tls(pki, half_close=True))
    backend = f"tls:127.0.0.1:{backend_port}:trustRoots={pki['trust_dir']}"
    _, port = env.proxy([backend])
    payload = os.urandom(100_000)
    # The client's FIN goes to the backend as close_notify; the backend answers after it.
    reply = await deferToThread(_half_close_client, port, payload)
    assert reply == b"got %d bytes, sha256 %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())


@pytest_twisted.ensureDeferred
async def test_tls_backend_with_the_wrong_name_is_refused(env: Env, pki: dict[str, str]) -> None:
    _, backend_port = env.server(Echo, wrap=_twisted_tls(pki))
    backend = f"tls:127.0.0.2:{backend_port}:trustRoots={pki['trust_dir']}"  # certificate is for 127.0.0.1
    _, port = env.proxy([backend])
    client = await env.connect(port)
    client.transport.write(b"secret")
    await client.until_eof()
    assert client.count == 0


@pytest.mark.skipif(not HAVE_TLS_MODULE, reason=NO_TLS_MODULE)
@pytest_twisted.ensureDeferred
async def test_tls_to_tls_through_the_service(env: Env, pki: dict[str, str]) -> None:
    """The whole path from a config: tls = "main" on the listener, a tls: backend."""
    from twisted.application.internet import StreamServerEndpointService

    from rproxy_tw.config import parse_config
    from rproxy_tw.service import ProxyService

    _, backend_port = env.server(Echo, wrap=_twisted_tls(pki))
    config = parse_config({
        "server": {"access_log": "off"},
        "listen": [{"endpoint": "tcp:0:interface=127.0.0.1", "protocol": "tcp", "pool": "legacy", "tls": "main"}],
        "tls": {"main": {"certificates": [{"cert": pki["cert"], "key": pki["key"]}]}},
        "pool": {"legacy": {"backends": [f"tls:127.0.0.1:{backend_port}:trustRoots={pki['trust_dir']}"]}},
    }, source="test.toml")
    service = ProxyService(config, reactor)
    service.startService()
    try:
        listening = [await c._waitingForPort for c in service if isinstance(c, StreamServerEndpointService)]
        client = await env.connect(listening[0].getHost().port, tls=_client_tls(pki))
        client.transport.write(b"end to end")
        await until(lambda: bytes(client.buf) == b"end to end", "the echo through two TLS hops")
        client.transport.loseConnection()
        await client.until_closed()
    finally:
        await service.stopService()
        for factory in service.listener_factories():
            if isinstance(factory, TCPProxyFactory):
                factory.abortAll()


REDIS = shutil.which("redis-server")


@pytest.mark.skipif(not HAVE_TLS_MODULE, reason=NO_TLS_MODULE)
@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (Debian package redis-server)")
@pytest_twisted.ensureDeferred
async def test_redis_behind_the_tls_front(env: Env, pki: dict[str, str], tmp_path: Any) -> None:
    """A real legacy service: redis-server on a free port, driven through the TLS listener."""
    import ssl as pyssl

    redis_port = dead_port()
    proc = subprocess.Popen(
        [REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await until(lambda: _can_connect(redis_port), "redis-server to listen")
        _, port = env.proxy([f"tcp:127.0.0.1:{redis_port}"], wrap=_server_tls(pki))

        value = os.urandom(50_000).hex()  # 100 kB: more than one TLS record and one read
        cli = shutil.which("redis-cli")
        if cli is not None:
            # redis-cli --tls verifies the certificate against -h (the leaf has IP 127.0.0.1).
            base = [cli, "--tls", "--cacert", pki["ca"], "-h", "127.0.0.1", "-p", str(port)]

            def run(*args: str, stdin: bytes | None = None) -> bytes:
                done = subprocess.run([*base, *args], input=stdin, capture_output=True, timeout=HANG_GUARD)
                return done.stdout.strip()

            assert await deferToThread(run, "-x", "SET", "k", stdin=value.encode()) == b"OK"
            assert await deferToThread(run, "GET", "k") == value.encode()
            assert await deferToThread(run, "STRLEN", "k") == b"100000"

        # And a Python client with its own TLS stack, checking the name rather than the IP.
        def talk() -> list[bytes]:
            ctx = pyssl.create_default_context(cafile=pki["ca"])
            with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    out = []
                    for command in (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n",
                                    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"):
                        s.sendall(command)
                        out.append(s.recv(1024))
                    return out

        assert await deferToThread(talk) == [b"+OK\r\n", b"$5\r\nhello\r\n"]
    finally:
        proc.terminate()
        proc.wait(10)


def _can_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# Regression: with haproxy: in front, the client's FIN closed the whole connection (the
# wrapper is not half-closeable), so an answer still to come was lost.  The client here
# sends only after the backend's greeting came back, which made the loss certain.
import ssl as _pyssl  # noqa: E402
import time as _time  # noqa: E402


def _delayed_tls_half_close_client(port, cafile, payload, prefix, delay):
    ctx = _pyssl.create_default_context(cafile=cafile)
    incoming, outgoing = _pyssl.MemoryBIO(), _pyssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as sock:
        sock.sendall(prefix)
        def flush():
            data = outgoing.read()
            if data:
                sock.sendall(data)
        def fill():
            data = sock.recv(65536)
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()
        while True:
            try:
                tls.do_handshake(); break
            except _pyssl.SSLWantReadError:
                flush(); fill()
        flush()
        _time.sleep(delay)   # the backend's "ok\n" comes back before our payload goes
        tls.write(payload); flush()
        try:
            tls.unwrap()
        except _pyssl.SSLWantReadError:
            pass
        flush()
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            try:
                data = tls.read(65536)
                if not data:
                    return answer, "close_notify"
                answer += data
            except _pyssl.SSLWantReadError:
                fill()
            except (_pyssl.SSLZeroReturnError, _pyssl.SSLEOFError) as e:
                return answer, type(e).__name__


@pytest_twisted.ensureDeferred
async def test_half_close_through_haproxy_wrapper_and_tls_when_data_comes_late(env: Env, pki: dict[str, str]) -> None:
    """A FIN from the client must half-close through the haproxy: wrapper too (regression: the answer was lost)."""
    server, backend_port = env.server(HeaderBackend)
    tls = _server_tls(pki)
    _, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], listen=listen_config("v2"),
                        wrap=lambda f: proxy_header(tls(f)))
    lb_header = build_v2(v6("2001:db8::7", 40000), v6("2001:db8::1", 6380))
    reply = await deferToThread(_delayed_tls_half_close_client, port, pki["ca"], b"hi", lb_header, 0.3)
    assert reply[0] == b"ok\nhi"


@pytest_twisted.ensureDeferred
async def test_half_close_over_tls_when_data_comes_late(env: Env, pki: dict[str, str]) -> None:
    server, backend_port = env.server(HeaderBackend)
    tls = _server_tls(pki)
    _, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], listen=listen_config("v2"), wrap=tls)
    reply = await deferToThread(_delayed_tls_half_close_client, port, pki["ca"], b"hi", b"", 0.3)
    assert reply[0] == b"ok\nhi"


@pytest_twisted.ensureDeferred
async def test_half_close_through_a_proxy_header_listener(env: Env) -> None:
    server, backend_port = env.server(ReplyAfterEOF)
    _, port = env.proxy([f"tcp:127.0.0.1:{backend_port}"], wrap=proxy_header)
    reply = await deferToThread(_half_close_client, port, b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 6380\r\nabc")
    assert reply.startswith(b"got 3 bytes")
