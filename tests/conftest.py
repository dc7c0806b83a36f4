"""
Test helpers for the HTTP proxy: real origins, real clients and a real proxy
on 127.0.0.1, all in the test's own reactor.

Everything a test starts goes through the L{net} fixture, which closes it
afterwards (listeners, the proxy service, and every connection still open),
so no test leaks sockets into the next.

Nothing here decides a test by time: L{until} waits for a condition the
test names, with a generous deadline that only guards against a hang.
"""

from __future__ import annotations

import random
import socket
from typing import Any, Callable, Iterable, Sequence

import httptools
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.web.server import Site
from zope.interface import implementer

from rproxy_tw import ProxyService, parse_config

HANG_GUARD = 10.0
"""Seconds before a wait is declared hung.  Never an assertion about speed."""

Headers = list[tuple[bytes, bytes]]


# ---------------------------------------------------------------------------
# Waiting for conditions


class _Conditions:
    """Conditions waited on; re-checked whenever any test protocol sees an event."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def poke(self) -> None:
        still = []
        for pred, d in self.waiting:
            if d.called:
                continue
            try:
                value = pred()
            except Exception as e:  # noqa: BLE001 - report it to the waiter
                d.errback(e)
                continue
            if value:
                d.callback(value)
            else:
                still.append((pred, d))
        self.waiting = still


CONDITIONS = _Conditions()


def poke() -> None:
    CONDITIONS.poke()


def until(pred: Callable[[], Any], what: str = "condition", timeout: float = HANG_GUARD) -> Deferred[Any]:
    """
    A Deferred that fires with C{pred()} once it is true.  Protocols in this
    module poke on every event; a slow timer also re-checks, for conditions
    on state they do not own.
    """
    d: Deferred[Any] = Deferred()
    value = pred()
    if value:
        d.callback(value)
        return d
    CONDITIONS.waiting.append((pred, d))

    def recheck() -> None:
        if not d.called:
            CONDITIONS.poke()
            calls[0] = reactor.callLater(0.02, recheck)

    calls = [reactor.callLater(0.02, recheck)]

    def hung() -> None:
        if not d.called:
            d.errback(AssertionError(f"hung waiting for {what} (guard {timeout}s)"))

    guard = reactor.callLater(timeout, hung)

    def cleanup(result: Any) -> Any:
        for call in (guard, calls[0]):
            if call.active():
                call.cancel()
        return result

    d.addBoth(cleanup)
    return d


def turns(n: int = 20) -> Deferred[None]:
    """Let the reactor run C{n} short rounds (gives a wrong proxy time to misbehave)."""
    d: Deferred[None] = Deferred()

    def step(left: int) -> None:
        if left <= 0:
            d.callback(None)
        else:
            reactor.callLater(0.005, step, left - 1)

    step(n)
    return d


# ---------------------------------------------------------------------------
# Parsing what a client received


class Response:
    """One response as the client saw it on the wire."""

    def __init__(self) -> None:
        self.version = b""
        self.status = 0
        self.reason = b""
        self.headers: Headers = []
        self.interim: list[tuple[int, Headers]] = []
        self.body = b""
        self.trailers: Headers = []
        self.chunked = False
        self.complete = False

    def header(self, name: bytes) -> list[bytes]:
        """Every value of C{name}, in order (comma-joined values are not split)."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def one(self, name: bytes) -> bytes | None:
        values = self.header(name)
        assert len(values) <= 1, f"{name!r} appears {len(values)} times: {values!r}"
        return values[0] if values else None

    def names(self) -> list[bytes]:
        return [n.lower() for n, _ in self.headers]

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers!r} body={self.body[:80]!r}... complete={self.complete}>"


def _parse_head(block: bytes) -> tuple[bytes, int, bytes, Headers]:
    lines = block.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep, f"malformed header line {line!r}"
        assert name == name.strip(), f"whitespace around header name {name!r}"
        headers.append((name, value.strip()))
    return version, int(code), reason, headers


def parse_responses(data: bytes, methods: Sequence[bytes], closed: bool = False) -> tuple[list[Response], bytes]:
    """
    Split C{data} into responses to requests made with C{methods}, strictly
    by HTTP/1.1 framing.  The last may be incomplete.  Returns the responses
    and the bytes after the last complete one.
    """
    out: list[Response] = []
    pos = 0
    for method in methods:
        r = Response()
        while True:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                return out, data[pos:]
            r.version, r.status, r.reason, r.headers = _parse_head(data[pos:end])
            pos = end + 4
            if 100 <= r.status < 200 and r.status != 101:
                r.interim.append((r.status, r.headers))
                continue
            break
        out.append(r)
        te = [v.lower() for v in r.header(b"transfer-encoding")]
        cl = r.header(b"content-length")
        if method == b"HEAD" or r.status in (101, 204, 304):
            r.complete = True
        elif te:
            assert te == [b"chunked"], f"unexpected transfer-encoding {te!r}"
            assert not cl, "both Content-Length and Transfer-Encoding"
            r.chunked = True
            body = []
            while True:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    r.body = b"".join(body)
                    return out, data[pos:]
                size = int(data[pos:eol].split(b";")[0], 16)
                if size == 0:
                    tend = data.find(b"\r\n\r\n", eol)
                    if data[eol : eol + 4] == b"\r\n\r\n":
                        tend = eol
                        trailer_block = b""
                    elif tend < 0:
                        r.body = b"".join(body)
                        return out, data[pos:]
                    else:
                        trailer_block = data[eol + 2 : tend]
                    for line in trailer_block.split(b"\r\n") if trailer_block else []:
                        name, _, value = line.partition(b":")
                        r.trailers.append((name, value.strip()))
                    pos = tend + 4
                    break
                if len(data) < eol + 2 + size + 2:
                    body.append(data[eol + 2 : eol + 2 + size])
                    r.body = b"".join(body)
                    return out, data[pos:]
                body.append(data[eol + 2 : eol + 2 + size])
                assert data[eol + 2 + size : eol + 4 + size] == b"\r\n", "chunk not followed by CRLF"
                pos = eol + 4 + size
            r.body = b"".join(body)
            r.complete = True
        elif cl:
            assert len(set(cl)) == 1, f"conflicting Content-Length {cl!r}"
            n = int(cl[0])
            r.body = data[pos : pos + n]
            if len(r.body) < n:
                return out, b""
            pos += n
            r.complete = True
        else:
            # Close-delimited: the body is everything until the connection closes.
            r.body = data[pos:]
            pos = len(data)
            r.complete = closed
            return out, b""
    return out, data[pos:]


# ---------------------------------------------------------------------------
# Clients


class RawClient(Protocol):
    """A client that sends exact bytes and keeps every byte it receives."""

    def __init__(self) -> None:
        self.buf = bytearray()  # bytearray: appending stays linear for big bodies
        self.closed = False
        self.reason: Any = None

    def connectionMade(self) -> None:
        poke()

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        poke()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.reason = reason
        poke()

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def responses(self, methods: Sequence[bytes]) -> list[Response]:
        return parse_responses(bytes(self.buf), methods, self.closed)[0]

    def until_contains(self, needle: bytes) -> Deferred[Any]:
        return until(lambda: needle in self.buf, f"client to receive {needle[:60]!r}")

    def until_closed(self) -> Deferred[Any]:
        return until(lambda: self.closed, "client connection to close")

    def until_responses(self, methods: Sequence[bytes]) -> Deferred[list[Response]]:
        def done() -> Any:
            rs = self.responses(methods)
            return rs if len(rs) == len(methods) and all(r.complete for r in rs) else None

        return until(done, f"{len(methods)} complete responses")

    def abort(self) -> None:
        self.transport.abortConnection()


def request(method: bytes = b"GET", target: bytes = b"/", host: bytes | None = b"example.com",
            headers: Iterable[tuple[bytes, bytes]] = (), body: bytes | None = None,
            version: bytes = b"HTTP/1.1") -> bytes:
    """The bytes of one request; a Content-Length is added for C{body}."""
    lines = [b"%s %s %s" % (method, target, version)]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [b"%s: %s" % (n, v) for n, v in headers]
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def response(status: int = 200, body: bytes = b"", headers: Iterable[tuple[bytes, bytes]] = (),
             reason: bytes = b"OK", length: bool = True) -> bytes:
    """The bytes of one origin response, with a Content-Length unless C{length} is false."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines += [b"%s: %s" % (n, v) for n, v in headers]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# ---------------------------------------------------------------------------
# Origins


class OriginRequest:
    """A request as a raw origin received it."""

    def __init__(self, conn: OriginConnection) -> None:
        self.conn = conn
        self.method = b""
        self.target = b""
        self.version = ""
        self.headers: Headers = []
        self.body = bytearray()
        self.complete = False
        self.answered = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def one(self, name: bytes) -> bytes | None:
        values = self.header(name)
        assert len(values) <= 1, f"{name!r} appears {len(values)} times: {values!r}"
        return values[0] if values else None

    def names(self) -> list[bytes]:
        return [n.lower() for n, _ in self.headers]

    def write(self, data: bytes) -> None:
        self.answered = True
        self.conn.transport.write(data)

    def respond(self, status: int = 200, body: bytes = b"", headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self.write(response(status, body, headers))

    def __repr__(self) -> str:
        return f"<OriginRequest {self.method!r} {self.target!r} {self.headers!r}>"


class OriginConnection(Protocol):
    """
    One connection to a raw origin: parses requests (strictly, with llhttp)
    and hands each to the origin's handler; records every byte received.
    """

    def __init__(self, origin: RawOrigin) -> None:
        self.origin = origin
        self.received = bytearray()
        self.requests: list[OriginRequest] = []
        self.parser = httptools.HttpRequestParser(self)
        self.current: OriginRequest | None = None
        self.echo = False
        """After answering 101: echo whatever arrives."""
        self.closed = False
        self.parse_error: Exception | None = None

    def connectionMade(self) -> None:
        self.origin.connections.append(self)
        poke()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        poke()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.origin.on_tunnel(self, data)
            poke()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            leftover = data[e.args[0] :]
            if self.echo:
                if leftover:
                    self.origin.on_tunnel(self, leftover)
            else:
                self.parser = httptools.HttpRequestParser(self)
                if leftover:
                    self.parser.feed_data(leftover)
        except httptools.HttpParserError as e:
            self.parse_error = e
            self.transport.abortConnection()
        poke()

    def on_message_begin(self) -> None:
        self.current = OriginRequest(self)
        self.requests.append(self.current)
        self.origin.requests.append(self.current)

    def on_url(self, url: bytes) -> None:
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.current
        req.method = self.parser.get_method()
        req.version = self.parser.get_http_version()
        if self.origin.on_head is not None:
            self.origin.on_head(req)

    def on_body(self, body: bytes) -> None:
        self.current.body += body
        if self.origin.on_body is not None:
            self.origin.on_body(self.current, body)

    def on_message_complete(self) -> None:
        req = self.current
        req.complete = True
        if not req.answered or self.origin.handle_answered:
            self.origin.handler(req)


def default_handler(req: OriginRequest) -> None:
    """Answer with what was asked: C{METHOD TARGET} and the body received."""
    req.respond(200, b"%s %s\n%s" % (req.method, req.target, req.body), [(b"Content-Type", b"text/plain")])


class RawOrigin(Factory):
    """
    An origin on 127.0.0.1 whose answers are bytes the test writes: it can
    send anything at all (malformed, close-delimited, 1xx, 101...).

    @ivar handler: called with each complete L{OriginRequest}.
    @ivar on_head: called when a request's head has arrived (before its body).
    @ivar on_body: called with each piece of a request body as it arrives.
    """

    noisy = False

    def __init__(self, handler: Callable[[OriginRequest], None] | None = None,
                 on_head: Callable[[OriginRequest], None] | None = None,
                 on_body: Callable[[OriginRequest, bytes], None] | None = None) -> None:
        self.handler = handler or default_handler
        self.on_head = on_head
        self.on_body = on_body
        self.handle_answered = False
        self.connections: list[OriginConnection] = []
        self.requests: list[OriginRequest] = []
        self.port = 0
        self.listening: Any = None

    def buildProtocol(self, addr: Any) -> OriginConnection:
        return OriginConnection(self)

    def on_tunnel(self, conn: OriginConnection, data: bytes) -> None:
        conn.transport.write(b"echo:" + data)

    @property
    def backend(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def until_requests(self, n: int) -> Deferred[Any]:
        return until(lambda: len(self.requests) >= n, f"origin to receive {n} request(s)")


class CountingSite(Site):
    """A twisted.web Site that counts the connections made to it."""

    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.connections = 0
        self.displayTracebacks = False
        self.noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        pass


@implementer(IPushProducer)
class FloodProducer:
    """
    Writes C{total} bytes to a transport as fast as the transport allows:
    blocks are written until the transport pauses it, then again when it resumes.  Counts what it wrote and
    how often it was paused.
    """

    def __init__(self, transport: Any, total: int, block: bytes = b"x" * 65536,
                 done: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.total = total
        self.block = block
        self.written = 0
        self.paused = False
        self.pauses = 0
        self.finished = False
        self.done = done
        self._call: Any = None

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self.paused and not self.finished:
            self._call = reactor.callLater(0, self._write)

    def _write(self) -> None:
        self._call = None
        # Write until the transport pauses us (it does so from inside write()
        # once its buffer is full), at most 16 blocks a turn.
        for _ in range(16):
            if self.paused or self.finished:
                break
            n = min(len(self.block), self.total - self.written)
            self.written += n
            self.transport.write(self.block[:n])
            if self.written >= self.total:
                self.finished = True
                self.transport.unregisterProducer()
                if self.done is not None:
                    self.done()
        poke()
        self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1
        poke()

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.finished = True


# ---------------------------------------------------------------------------
# The proxy


def proxy_config(*backends: str, routes: list[dict[str, Any]] | None = None, pool: dict[str, Any] | None = None,
                 pools: dict[str, Any] | None = None, server: dict[str, Any] | None = None,
                 limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config dict: one listener on 127.0.0.1:0, every path to pool "p" of C{backends}."""
    all_pools = {"p": {"backends": list(backends), **(pool or {})}} if backends else {}
    all_pools.update(pools or {})
    data: dict[str, Any] = {
        "listen": [{"endpoint": "tcp:0:interface=127.0.0.1"}],
        "route": routes if routes is not None else [{"path": "/", "pool": "p"}],
        "pool": all_pools,
        "server": {"access_log": "off", **(server or {})},
    }
    if limits:
        data["limits"] = limits
    return data


class RunningProxy:
    def __init__(self, service: ProxyService, ports: Sequence[int | None]) -> None:
        self.service = service
        self.ports = list(ports)  # every listener's port, in config order (None: a unix socket)
        self.port = self.ports[0]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def factory(self) -> Any:
        """The first listener's own factory (HTTP or raw TCP, inside any TLS)."""
        return self.service.listener_factories()[0]


def free_port() -> int:
    """
    A local port nothing listens on: for a dead backend, or for a listener
    whose port must be known before it listens (a child process's, a reload's).
    A port the kernel hands out for bind(0) is an ephemeral one, which any
    outgoing connection may take before the listener binds it (CI saw it
    once); this one is below Linux's ephemeral range (32768-60999), chosen at
    random so that tests do not collide, and checked by binding it.
    """
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(20000, 32768)
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        return port
    raise RuntimeError("no free port below the ephemeral range")


class Net:
    """Starts things on 127.0.0.1 for one test, and stops them all afterwards."""

    def __init__(self) -> None:
        self.ports: list[Any] = []
        self.services: list[Any] = []
        self.protocols: list[Any] = []
        self.origins: list[RawOrigin] = []
        self.sites: list[Site] = []

    @inlineCallbacks
    def proxy(self, config: dict[str, Any], mounts: Sequence[tuple[str, Any]] = ()) -> Any:
        """Start a ProxyService for C{config}; the port of its first listener."""
        svc = ProxyService(parse_config(config, source="test.toml"), reactor)
        for path, resource in mounts:
            svc.mount(path, resource)
        svc.startService()
        self.services.append(svc)
        ports = yield svc.listening()
        hosts = [p.getHost() for p in ports]
        # A unix socket listener has no port.
        return RunningProxy(svc, [h.port if isinstance(h, (IPv4Address, IPv6Address)) else None for h in hosts])

    @inlineCallbacks
    def origin(self, handler: Callable[[OriginRequest], None] | None = None, **kw: Any) -> Any:
        origin = RawOrigin(handler, **kw)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(origin)
        origin.port = port.getHost().port
        origin.listening = port
        self.ports.append(port)
        self.origins.append(origin)
        return origin

    @inlineCallbacks
    def web_origin(self, resource: Any) -> Any:
        """A twisted.web Site origin; returns the site (with .port and .backend)."""
        site = CountingSite(resource)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        site.port = port.getHost().port  # type: ignore[attr-defined]
        site.backend = f"tcp:127.0.0.1:{site.port}"  # type: ignore[attr-defined]
        self.ports.append(port)
        self.sites.append(site)
        return site

    @inlineCallbacks
    def client(self, port: int, protocol: Any = None) -> Any:
        proto = protocol if protocol is not None else RawClient()
        factory = Factory.forProtocol(lambda: proto)
        factory.noisy = False
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
        self.protocols.append(proto)
        return proto

    @inlineCallbacks
    def close(self) -> Any:
        for proto in self.protocols:
            if proto.transport is not None and not getattr(proto, "closed", False):
                proto.transport.abortConnection()
        for svc in self.services:
            yield svc.stopService()
            for factory in svc.listener_factories():
                for conn in factory.open_connections():
                    conn.transport.abortConnection()
            for pool in svc.runtime.pools.values():
                for backend in pool.backends:
                    for conn in list(backend.idle):
                        conn.abort()
        for port in self.ports:
            yield port.stopListening()
        for origin in self.origins:
            for conn in origin.connections:
                if not conn.closed:
                    conn.transport.abortConnection()
        # Let the aborts be processed before the next test.
        yield turns(2)


def web_client() -> Any:
    """A treq client with its own non-persistent pool: no connection outlives the request."""
    import treq.client
    from twisted.web.client import Agent, HTTPConnectionPool

    return treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


@inlineCallbacks
def curl(*args: str) -> Any:
    """
    Run curl without blocking the reactor (the proxy under test runs in it).
    Returns (stdout bytes, stderr bytes, exit code).
    """
    import os

    from twisted.internet.utils import getProcessOutputAndValue

    import shutil

    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    out, err, code = yield getProcessOutputAndValue(path, ["-sS", "--max-time", "20", *args], env=dict(os.environ))
    return out, err, code


@pytest_twisted.async_yield_fixture
async def net() -> Any:
    n = Net()
    yield n
    await n.close()


@pytest.fixture
def no_traceback() -> Callable[[bytes], None]:
    def check(body: bytes) -> None:
        for marker in (b"Traceback", b'File "', b"twisted.", b"rproxy_tw", b"httptools", b"Exception"):
            assert marker not in body, f"internal detail {marker!r} leaked in {body!r}"

    return check
