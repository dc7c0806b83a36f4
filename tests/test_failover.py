"""
Failover, health and stickiness through a real proxy (issue 5), seen from
the outside: real origins, real clients and a real L{ProxyService} on
127.0.0.1, all in the test's reactor.

What a user sees is what is asserted: every status and body a client
received, and which origin received which request.  Where a test needs to
know when the proxy changed its mind about a backend, it reads the state the
proxy keeps for a status page (C{pool.backends[i].healthy} and C{.since}),
never a wall-clock measurement of how fast something went.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import httptools
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from rproxy_tw.upstream.health import HealthMonitor

from .conftest import Response, free_port, parse_responses, poke, proxy_config, request, turns, until

inline = pytest_twisted.inlineCallbacks

INTERVAL = 0.2
TIMEOUT = 0.2
RISE = 2
FALL = 2
HEALTH = {"type": "http", "path": "/healthz", "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL}

SLACK = 0.5
"""
Seconds allowed on top of the configured detection bounds for the reactor to
get round to a probe's timer while it is also serving the test's own load on
a shared machine.  The bounds are checked on the proxy's own C{since}
timestamps (the reactor's clock), not on how fast the test ran.
"""

DOWN_BOUND = FALL * INTERVAL * (1 + HealthMonitor.JITTER) + TIMEOUT
"""Out of rotation at most this long after a backend dies: C{fall} jittered intervals and one probe timeout."""

UP_BOUND = RISE * INTERVAL * (1 + HealthMonitor.JITTER) + TIMEOUT
"""Back in rotation at most this long after it returns."""


# ---------------------------------------------------------------------------
# Named twisted.web origins that can be killed and restarted on the same port


class _Named(Resource):
    """C{GET /healthz} answers C{ok}; any other GET answers the origin's name (or is held)."""

    isLeaf = True

    def __init__(self, origin: WebOrigin) -> None:
        super().__init__()
        self.origin = origin

    def render_GET(self, req: Any) -> Any:
        if req.path == b"/healthz":
            self.origin.probes += 1
            return b"ok"
        self.origin.received += 1
        req.setHeader(b"content-type", b"text/plain")
        if self.origin.hold:
            self.origin.held.append(req)
            reactor.callLater(0, poke)
            return NOT_DONE_YET
        return self.origin.name.encode("ascii")


class _QuietSite(Site):
    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass


class WebOrigin:
    """
    A twisted.web origin on 127.0.0.1 that answers with its name.  L{kill}
    does what a crashed server does to its clients: the listening socket goes
    away and every open connection is reset; L{start} again listens on the
    same port.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.listening: Any = None
        self.hold = False
        self.held: list[Any] = []
        self.received = 0
        self.probes = 0
        self.factory = WrappingFactory(_QuietSite(_Named(self)))
        self.factory.noisy = False

    @property
    def backend(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @inlineCallbacks
    def start(self) -> Any:
        port = yield TCP4ServerEndpoint(reactor, self.port, interface="127.0.0.1").listen(self.factory)
        self.port = port.getHost().port
        self.listening = port

    def kill(self) -> Deferred[Any]:
        """Stop listening and reset every open connection, in one reactor turn."""
        port, self.listening = self.listening, None
        stopped = port.stopListening()
        for wrapper in list(self.factory.protocols):
            wrapper.transport.abortConnection()
        self.held = []
        return stopped


class Farm:
    """The web origins of one test; stopped (and their connections reset) afterwards."""

    def __init__(self) -> None:
        self.origins: list[WebOrigin] = []

    @inlineCallbacks
    def start(self, *names: str) -> Any:
        started = []
        for name in names:
            origin = WebOrigin(name)
            yield origin.start()
            self.origins.append(origin)
            started.append(origin)
        return started

    @inlineCallbacks
    def close(self) -> Any:
        for origin in self.origins:
            if origin.listening is not None:
                yield origin.kill()


@pytest_twisted.async_yield_fixture
async def farm(net: Any) -> Any:
    # Depends on net, so it closes first: origins go before the proxy stops.
    f = Farm()
    yield f
    await f.close()


# ---------------------------------------------------------------------------
# Clients


class _OneShot(Protocol):
    """Sends one request on a fresh connection and collects the answer (never retries)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.buf = b""
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        poke()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        poke()


@inlineCallbacks
def fetch(net: Any, port: int, method: bytes = b"GET", target: bytes = b"/",
          headers: Sequence[tuple[bytes, bytes]] = (), body: bytes | None = None,
          source: str | None = None) -> Any:
    """One request on its own connection (from C{source}, a 127/8 address); the L{Response}."""
    proto = _OneShot(request(method, target, headers=headers, body=body))
    factory = Factory.forProtocol(lambda: proto)
    factory.noisy = False
    bind = (source, 0) if source else None
    yield TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind).connect(factory)
    net.protocols.append(proto)

    def done() -> Any:
        rs, _ = parse_responses(proto.buf, [method], proto.closed)
        if rs and rs[0].complete:
            return rs[0]
        if proto.closed:
            raise AssertionError(f"connection closed without a complete response: {proto.buf!r}")
        return None

    resp = yield until(done, f"response to {method!r} {target!r}")
    proto.transport.loseConnection()
    return resp


def set_cookie(resp: Response, name: bytes) -> bytes | None:
    """The value the response's Set-Cookie gives cookie C{name}, if any."""
    for value in resp.header(b"set-cookie"):
        pair = value.split(b";")[0]
        k, _, v = pair.partition(b"=")
        if k.strip() == name:
            return v.strip()
    return None


class _LoopConnection(Protocol):
    """
    One keep-alive connection of a L{GetLoop}: sends a GET, waits for the whole
    response, sends the next.  It never retries: a request the connection
    loses is a failed request.
    """

    def __init__(self, loop: GetLoop) -> None:
        self.loop = loop
        self.parser: Any = None
        self.outstanding = False
        self.complete = False
        self.keep_alive = False
        self.body: list[bytes] = []
        self.closed = False

    def connectionMade(self) -> None:
        self.loop.next(self)

    def send(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.body = []
        self.complete = False
        self.outstanding = True
        self.transport.write(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    def dataReceived(self, data: bytes) -> None:
        if not self.outstanding:
            self.loop.failures.append(f"unexpected bytes between responses: {data[:80]!r}")
            self.transport.abortConnection()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.loop.failures.append(f"malformed response: {e}")
            self.outstanding = False
            self.transport.abortConnection()
            return
        if self.complete:
            self.outstanding = False
            self.loop.record(self.parser.get_status_code(), b"".join(self.body))
            if self.keep_alive:
                self.loop.pace(self)
            else:
                self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        if self.outstanding:
            self.outstanding = False
            self.loop.failures.append(f"connection lost with a request in flight: {reason.getErrorMessage()}")
        self.loop.lost(self)


class GetLoop:
    """
    C{GET /} through the proxy on C{concurrency} keep-alive connections, at
    least C{minimum} requests in all, then more (up to C{cap}) while
    C{extend()} is false.  L{finished} fires when every connection is closed.
    """

    def __init__(self, net: Any, port: int, concurrency: int, minimum: int, cap: int, gap: float = 0.0) -> None:
        self.net = net
        self.gap = gap
        self.port = port
        self.concurrency = concurrency
        self.minimum = minimum
        self.cap = cap
        self.extend: Callable[[], bool] = lambda: True
        self.started = 0
        self.results: list[tuple[float, int, bytes]] = []
        """(reactor time the response completed, status, body) of every response."""
        self.failures: list[str] = []
        self.open = 0
        self.finished: Deferred[None] = Deferred()

    def start(self) -> None:
        for _ in range(self.concurrency):
            self._connect()

    def _connect(self) -> None:
        self.open += 1
        proto = _LoopConnection(self)
        self.net.protocols.append(proto)
        factory = Factory.forProtocol(lambda: proto)
        factory.noisy = False
        d = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)

        def refused(f: Any) -> None:
            self.failures.append(f"connect to the proxy failed: {f.getErrorMessage()}")
            self.lost(proto)

        d.addErrback(refused)

    def more(self) -> bool:
        if self.started >= self.cap:
            return False
        return self.started < self.minimum or not self.extend()

    def next(self, proto: _LoopConnection) -> None:
        if proto.closed:
            return
        if self.more():
            self.started += 1
            proto.send()
        else:
            proto.transport.loseConnection()

    def pace(self, proto: _LoopConnection) -> None:
        """The next GET on C{proto}, after C{gap} seconds (so that the loop spans the whole scenario)."""
        if self.gap:
            reactor.callLater(self.gap, self.next, proto)
        else:
            self.next(proto)

    def record(self, status: int, body: bytes) -> None:
        self.results.append((reactor.seconds(), status, body))
        poke()

    def lost(self, proto: _LoopConnection) -> None:
        self.open -= 1
        if self.more():
            self._connect()
        elif self.open == 0 and not self.finished.called:
            self.finished.callback(None)
        poke()

    def served_by(self, name: str, after: float = 0.0, before: float = float("inf")) -> int:
        body = name.encode("ascii")
        return sum(1 for t, _, b in self.results if b == body and after < t < before)


def sleep(seconds: float) -> Deferred[None]:
    """Let the reactor run for a while (a wait, never an assertion about speed)."""
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


# ---------------------------------------------------------------------------
# (1) A loop of GETs while an origin dies and comes back


@pytest.mark.parametrize(
    "passive",
    [{"enabled": False}, {"consecutive_failures": 3, "base_ejection": 1.0}],
    ids=["active-only", "active-and-passive"],
)
@inline
def test_get_loop_has_no_failures_while_an_origin_is_killed_and_restarted(net, farm, passive):
    """
    Ten keep-alive clients, each pausing 25 ms between its GETs so that the
    2000-odd requests span the whole kill and restart, and none of them ever
    retries: a GET the proxy fails is a failed GET.

    With passive detection off, it is the active monitor that takes the dead
    origin out, so the bound checked is its bound, and every request that
    meets the dead origin before then is retried by the proxy.  With it on
    (a 1 s ejection instead of the default 10 s, to keep the test short),
    live traffic ejects the origin sooner, and it returns only once the
    ejection has ended and the probes pass again.
    """
    names = ("alpha", "bravo", "charlie")
    origins = yield farm.start(*names)
    proxy = yield net.proxy(proxy_config(*[o.backend for o in origins], pool={"health": HEALTH, "passive": passive}))
    pool = proxy.service.pool("p")
    victim = origins[1]
    backend = pool.backend(victim.backend)

    loop = GetLoop(net, proxy.port, concurrency=10, minimum=2000, cap=20000, gap=0.025)
    loop.start()
    yield until(lambda: len(loop.results) >= 300, "300 responses before the kill")
    assert loop.served_by("bravo") > 0

    # Kill it while it holds GETs it has read but not answered: the proxy has
    # sent them, and they must be answered by the others.
    victim.hold = True
    yield until(lambda: victim.held, "a GET in flight at the victim")
    killed_at = reactor.seconds()
    yield victim.kill()

    yield until(lambda: not backend.healthy, "the dead origin to leave rotation")
    down_since = backend.since
    assert killed_at <= down_since <= killed_at + DOWN_BOUND + SLACK, (
        f"left rotation {down_since - killed_at:.3f}s after the kill; bound {DOWN_BOUND:.2f}s + {SLACK}s slack "
        f"({backend.last_error})"
    )
    # It stays out while it is dead (also once a passive ejection has run
    # out), and the loop goes on without it.
    count = len(loop.results)
    yield until(lambda: len(loop.results) >= count + 200, "200 responses with the origin dead")
    yield sleep(3 * INTERVAL + passive.get("base_ejection", 0.0))
    assert not backend.healthy
    assert backend.since == down_since

    victim.hold = False
    restarted_at = reactor.seconds()
    yield victim.start()
    assert victim.backend == backend.name  # the same port
    yield until(lambda: backend.healthy, "the restarted origin to return")
    up_since = backend.since
    assert restarted_at <= up_since <= restarted_at + UP_BOUND + SLACK, (
        f"returned {up_since - restarted_at:.3f}s after the restart; bound {UP_BOUND:.2f}s + {SLACK}s slack"
    )
    loop.extend = lambda: loop.served_by("bravo", after=up_since) >= 30
    yield loop.finished

    assert loop.failures == []
    statuses: dict[int, int] = {}
    for _, status, _ in loop.results:
        statuses[status] = statuses.get(status, 0) + 1
    assert statuses == {200: loop.started}, statuses
    assert loop.started >= 2000
    assert {b for _, _, b in loop.results} == {n.encode() for n in names}
    # Nothing came from it while it was dead; requests reached it again after it returned.
    assert loop.served_by("bravo", after=killed_at, before=restarted_at) == 0
    assert loop.served_by("bravo", after=up_since) >= 30
    for other in ("alpha", "charlie"):
        assert loop.served_by(other, after=killed_at, before=restarted_at) > 0


# ---------------------------------------------------------------------------
# (2) A request that must not be replayed


def _close_after_some_body(req: Any, data: bytes) -> None:
    req.conn.transport.loseConnection()


def _reset_after_some_body(req: Any, data: bytes) -> None:
    req.conn.transport.abortConnection()


@pytest.mark.parametrize("dies", [_close_after_some_body, _reset_after_some_body], ids=["close", "reset"])
@inline
def test_post_to_origin_dying_mid_body_gets_502_and_is_never_replayed(net, dies):
    origins = []
    for _ in range(3):
        origins.append((yield net.origin(on_body=dies)))
    proxy = yield net.proxy(proxy_config(*[o.backend for o in origins]))
    client = yield net.client(proxy.port)
    # The head and the first 1000 of 10000 bytes: all of it would fit in the
    # replay buffer, but POST is never replayed.
    client.send(request(b"POST", b"/order", headers=[(b"Content-Length", b"10000")]) + b"x" * 1000)
    yield until(lambda: client.responses([b"POST"]) and client.responses([b"POST"])[0].complete or client.closed,
                "an answer to the POST")
    [resp] = client.responses([b"POST"])
    assert resp.status == 502
    yield turns(20)
    posts = [r for o in origins for r in o.requests]
    assert len(posts) == 1, posts
    assert posts[0].method == b"POST" and posts[0].body and not posts[0].complete


@inline
def test_post_whole_body_read_then_origin_closes_gets_502_and_is_never_replayed(net):
    origins = []
    for _ in range(3):
        origins.append((yield net.origin(lambda req: req.conn.transport.loseConnection())))
    proxy = yield net.proxy(proxy_config(*[o.backend for o in origins]))
    resp = yield fetch(net, proxy.port, b"POST", b"/order", body=b"item=1")
    assert resp.status == 502
    yield turns(20)
    posts = [r for o in origins for r in o.requests]
    assert [(r.method, r.body) for r in posts] == [(b"POST", b"item=1")]


@pytest.mark.parametrize("body", [b"", None], ids=["content-length-0", "no-body"])
@inline
def test_bodyless_post_on_kept_alive_origin_connection_is_never_replayed(net, body):
    """
    The origin reads a POST that arrives on a kept-alive connection and then
    closes it without answering (a worker that crashed while handling it).
    The proxy cannot tell this from an idle connection the origin happened to
    close, so it must not send the POST again (RFC 9110 9.2.2: a proxy MUST
    NOT automatically retry non-idempotent requests).
    """

    def handler(req: Any) -> None:
        if req.method == b"POST":
            req.conn.transport.loseConnection()
        else:
            req.respond(200, b"fine")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    warm = yield fetch(net, proxy.port, b"GET", b"/warm")
    assert warm.status == 200
    assert len(origin.connections) == 1
    resp = yield fetch(net, proxy.port, b"POST", b"/order", body=body)
    assert resp.status == 502
    yield turns(20)
    posts = [r for r in origin.requests if r.method == b"POST"]
    assert len(posts) == 1, f"the POST reached the origin {len(posts)} times"


# ---------------------------------------------------------------------------
# (3) Idempotent requests are retried on another backend


def _named(name: bytes) -> Callable[[Any], None]:
    def handler(req: Any) -> None:
        req.respond(200, name + b" " + req.method + b" " + req.body)

    return handler


def _reset(req: Any) -> None:
    req.conn.transport.abortConnection()


def _close(req: Any) -> None:
    req.conn.transport.loseConnection()


def _half_head_then_reset(req: Any) -> None:
    req.conn.transport.write(b"HTTP/1.1 200 O")
    req.conn.transport.abortConnection()


@pytest.mark.parametrize("fails", [_reset, _close, _half_head_then_reset], ids=["reset", "close", "half-head"])
@inline
def test_get_to_origin_failing_after_request_is_retried_on_another(net, fails):
    bad = yield net.origin(fails)
    good = []
    for i in range(2):
        good.append((yield net.origin(_named(b"good%d" % i))))
    proxy = yield net.proxy(proxy_config(bad.backend, *[o.backend for o in good]))
    for i in range(6):
        resp = yield fetch(net, proxy.port, b"GET", b"/item/%d" % i)
        assert resp.status == 200
        assert resp.body.split(b" ")[:2] in ([b"good0", b"GET"], [b"good1", b"GET"])
    # The failing origin did receive requests (so they were retried), and every
    # GET was answered exactly once by a good one.
    assert len(bad.requests) >= 1
    assert all(r.complete for r in bad.requests)
    answered = sorted(r.target for o in good for r in o.requests)
    assert answered == sorted(b"/item/%d" % i for i in range(6))


@inline
def test_put_within_replay_buffer_is_replayed_whole_on_another(net):
    bad = yield net.origin(_reset)
    good = yield net.origin(_named(b"good"))
    proxy = yield net.proxy(proxy_config(bad.backend, good.backend, pool={"balance": "round_robin"}))
    bodies = [bytes([65 + i]) * 3000 for i in range(2)]
    for body in bodies:
        resp = yield fetch(net, proxy.port, b"PUT", b"/doc", body=body)
        assert resp.status == 200
        assert resp.body == b"good PUT " + body
    assert len(bad.requests) >= 1
    assert [r.body for r in good.requests] == bodies


@inline
def test_put_larger_than_replay_buffer_is_not_replayed(net):
    bad = yield net.origin(_reset)
    good = yield net.origin(_named(b"good"))
    proxy = yield net.proxy(proxy_config(bad.backend, good.backend, pool={"replay_buffer": 1024}))
    answered = 0
    for _ in range(2):  # round robin: one of two PUTs goes to the bad origin
        resp = yield fetch(net, proxy.port, b"PUT", b"/doc", body=b"z" * 4096)
        if bad.requests:
            break
        assert resp.status == 200
        answered += 1
    assert len(bad.requests) == 1 and bad.requests[0].body == b"z" * 4096
    assert resp.status == 502
    # The good origin got only the PUTs sent to it first, never a replay.
    assert len(good.requests) == answered


# ---------------------------------------------------------------------------
# (4) Stickiness


def _served(resp: Response) -> str:
    assert resp.status == 200, resp
    return resp.body.decode()


@inline
def test_hash_header_pins_each_user_and_a_departure_moves_only_its_users(net, farm):
    origins = yield farm.start("alpha", "bravo", "charlie")
    proxy = yield net.proxy(proxy_config(*[o.backend for o in origins],
                                         pool={"balance": "hash:header:X-User", "health": HEALTH}))
    users = [b"user-%d" % i for i in range(24)]
    home: dict[bytes, str] = {}
    for user in users:
        seen = set()
        for _ in range(4):
            seen.add(_served((yield fetch(net, proxy.port, headers=[(b"X-User", user)]))))
        assert len(seen) == 1, f"{user!r} was served by {seen}"
        home[user] = seen.pop()
    assert len(set(home.values())) > 1, "every user hashed to one origin"

    # One origin leaves: only its users move, and they move to live ones.
    gone = max(set(home.values()), key=lambda n: list(home.values()).count(n))
    victim = next(o for o in origins if o.name == gone)
    backend = proxy.service.pool("p").backend(victim.backend)
    yield victim.kill()
    yield until(lambda: not backend.healthy, "the dead origin to leave rotation")
    for user in users:
        now = _served((yield fetch(net, proxy.port, headers=[(b"X-User", user)])))
        if home[user] == gone:
            assert now != gone
        else:
            assert now == home[user], f"{user!r} moved from {home[user]} to {now} though its origin is up"


@inline
def test_hash_client_ip_pins_each_address(net, farm):
    origins = yield farm.start("alpha", "bravo", "charlie")
    proxy = yield net.proxy(proxy_config(*[o.backend for o in origins], pool={"balance": "hash:client_ip"}))
    home = {}
    for i in range(2, 14):
        source = f"127.0.0.{i}"
        seen = set()
        for _ in range(3):
            seen.add(_served((yield fetch(net, proxy.port, source=source))))
        assert len(seen) == 1, f"{source} was served by {seen}"
        home[source] = seen.pop()
    assert len(set(home.values())) > 1, "every address hashed to one origin"


@inline
def test_cookie_sticks_to_origin_and_falls_back_when_that_origin_dies(net, farm):
    origins = yield farm.start("alpha", "bravo", "charlie")
    proxy = yield net.proxy(proxy_config(*[o.backend for o in origins],
                                         pool={"balance": "cookie:srv", "health": HEALTH}))
    # Three new visitors: each is served by some origin and told to come back to it.
    cookies: dict[str, bytes] = {}
    for _ in range(3):
        resp = yield fetch(net, proxy.port)
        name = _served(resp)
        value = set_cookie(resp, b"srv")
        assert value, resp.header(b"set-cookie")
        assert b"HttpOnly" in resp.one(b"set-cookie")
        cookies[name] = value
    assert len(cookies) == 3 and len(set(cookies.values())) == 3

    # With the cookie, every request goes back to the same origin, and the
    # cookie is not set again.
    for name, value in cookies.items():
        for _ in range(4):
            resp = yield fetch(net, proxy.port, headers=[(b"Cookie", b"a=1; srv=" + value)])
            assert _served(resp) == name
            assert resp.header(b"set-cookie") == []

    # The pinned origin dies: before health checks notice (connect failure,
    # retried) and after (not a candidate), the visitor is served by another
    # and re-pinned to it; the new pin then holds.
    victim = origins[0]
    old = cookies[victim.name]
    backend = proxy.service.pool("p").backend(victim.backend)
    yield victim.kill()
    for when in ("before detection", "after detection"):
        if when == "after detection":
            yield until(lambda: not backend.healthy, "the dead origin to leave rotation")
        resp = yield fetch(net, proxy.port, headers=[(b"Cookie", b"srv=" + old)])
        now = _served(resp)
        assert now != victim.name, when
        new = set_cookie(resp, b"srv")
        assert new == cookies[now], when
        again = yield fetch(net, proxy.port, headers=[(b"Cookie", b"srv=" + new)])
        assert _served(again) == now
        assert again.header(b"set-cookie") == []
    # A cookie naming no backend at all is treated like none.
    resp = yield fetch(net, proxy.port, headers=[(b"Cookie", b"srv=0123456789abcdef")])
    assert _served(resp) != victim.name
    assert set_cookie(resp, b"srv") == cookies[_served(resp)]


# ---------------------------------------------------------------------------
# (5) Draining


class HoldingOrigin:
    """A raw origin answering with its name, or holding requests while C{hold} is set."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.hold = False
        self.held: list[Any] = []
        self.origin: Any = None

    def handler(self, req: Any) -> None:
        if self.hold:
            self.held.append(req)
        else:
            req.respond(200, self.name)

    def release(self) -> None:
        held, self.held = self.held, []
        for req in held:
            req.respond(200, self.name)


@inline
def test_drain_sends_no_new_requests_and_lets_in_flight_finish(net):
    named = [HoldingOrigin(b"o%d" % i) for i in range(3)]
    for n in named:
        n.origin = yield net.origin(n.handler)
        n.hold = True
    proxy = yield net.proxy(proxy_config(*[n.origin.backend for n in named]))
    pool = proxy.service.pool("p")

    slow = yield net.client(proxy.port)
    slow.send(request(b"GET", b"/slow"))
    yield until(lambda: any(n.held for n in named), "the first GET to reach an origin")
    [victim] = [n for n in named if n.held]
    for n in named:
        n.hold = False

    proxy.service.set_draining("p", victim.origin.backend, True)
    backend = pool.backend(victim.origin.backend)
    assert backend.draining and backend.healthy and backend.inflight == 1
    for i in range(12):
        resp = yield fetch(net, proxy.port, target=b"/new/%d" % i)
        assert resp.status == 200 and resp.body != victim.name
    assert len(victim.origin.requests) == 1

    # The request in flight finishes normally.
    victim.release()
    [resp] = yield slow.until_responses([b"GET"])
    assert resp.status == 200 and resp.body == victim.name
    assert not slow.closed
    yield until(lambda: backend.inflight == 0, "the drained backend to have nothing in flight")

    proxy.service.set_draining("p", victim.origin.backend, False)
    bodies = []
    for _ in range(6):
        bodies.append((yield fetch(net, proxy.port)).body)
    assert victim.name in bodies


@inline
def test_drain_true_in_config_starts_drained(net):
    named = [HoldingOrigin(b"o%d" % i) for i in range(2)]
    for n in named:
        n.origin = yield net.origin(n.handler)
    proxy = yield net.proxy(proxy_config({"endpoint": named[0].origin.backend, "drain": True},
                                         named[1].origin.backend))
    for _ in range(6):
        assert (yield fetch(net, proxy.port)).body == b"o1"
    assert named[0].origin.requests == []
    proxy.service.set_draining("p", named[0].origin.backend, False)
    bodies = []
    for _ in range(4):
        bodies.append((yield fetch(net, proxy.port)).body)
    assert b"o0" in bodies


# ---------------------------------------------------------------------------
# (6) Nothing healthy; backups


@inline
def test_no_healthy_backend_gets_503_with_retry_after_until_one_returns(net, farm):
    ports = [free_port(), free_port()]
    proxy = yield net.proxy(proxy_config(*[f"tcp:127.0.0.1:{p}" for p in ports], pool={"health": HEALTH}))
    pool = proxy.service.pool("p")
    yield until(lambda: not any(b.healthy for b in pool.backends), "every backend to leave rotation")
    resp = yield fetch(net, proxy.port)
    assert resp.status == 503
    retry_after = resp.one(b"retry-after")
    assert retry_after is not None and retry_after.isdigit(), resp.headers
    for marker in (b"Traceback", b"rproxy_tw", b"twisted"):
        assert marker not in resp.body

    # One comes back on its port: served again.
    origin = WebOrigin("phoenix")
    origin.port = ports[1]
    yield origin.start()
    farm.origins.append(origin)
    yield until(lambda: pool.backends[1].healthy, "the returning backend")
    resp = yield fetch(net, proxy.port)
    assert resp.status == 200 and resp.body == b"phoenix"


@inline
def test_every_backend_draining_gets_503_with_retry_after(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    proxy.service.set_draining("p", origin.backend, True)
    resp = yield fetch(net, proxy.port)
    assert resp.status == 503
    assert resp.one(b"retry-after") is not None
    assert origin.requests == []


@inline
def test_backup_serves_only_while_no_primary_is_healthy(net, farm):
    primary, backup = yield farm.start("primary", "backup")
    proxy = yield net.proxy(proxy_config(primary.backend, {"endpoint": backup.backend, "backup": True},
                                         pool={"health": HEALTH}))
    backend = proxy.service.pool("p").backend(primary.backend)
    for _ in range(4):
        assert _served((yield fetch(net, proxy.port))) == "primary"
    assert backup.received == 0
    yield primary.kill()
    # Before and after the monitor notices, the backup answers.
    assert _served((yield fetch(net, proxy.port))) == "backup"
    yield until(lambda: not backend.healthy, "the primary to leave rotation")
    for _ in range(3):
        assert _served((yield fetch(net, proxy.port))) == "backup"
    yield primary.start()
    yield until(lambda: backend.healthy, "the primary to return")
    for _ in range(4):
        assert _served((yield fetch(net, proxy.port))) == "primary"


@inline
def test_a_post_takes_an_idle_connection_only_if_it_waited_briefly(net):
    """
    An origin may close an idle connection (its own keep-alive timeout) just
    as a request goes out on it; a GET is then retried, a POST cannot be.  So
    a POST takes only a connection idle for less than the connector's
    C{unreplayable_reuse}, and otherwise a new one: here that limit is 0.
    """
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    connector = proxy.service.runtime.connectors["p"]
    connector.unreplayable_reuse = 3600.0  # (not the default 1 s: a loaded machine must not change the outcome)
    first = yield fetch(net, proxy.port, b"POST", b"/order", body=b"item=1")
    assert first.status == 200 and len(origin.connections) == 1
    quick = yield fetch(net, proxy.port, b"POST", b"/order", body=b"item=2")
    assert quick.status == 200 and len(origin.connections) == 1  # idle for less than the limit: reused
    connector.unreplayable_reuse = 0.0
    post = yield fetch(net, proxy.port, b"POST", b"/order", body=b"item=3")
    assert post.status == 200 and len(origin.connections) == 2  # a new connection
    get = yield fetch(net, proxy.port, b"GET", b"/page")
    assert get.status == 200 and len(origin.connections) == 2  # a GET reuses an idle one
    assert [r.body for r in origin.requests if r.method == b"POST"] == [b"item=1", b"item=2", b"item=3"]
