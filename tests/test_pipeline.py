"""
The request pipeline, seen from outside: one set of request checks on all
three entry points (HTTP/1.1, HTTP/2, the embedded twisted.web path),
request filters that answer locally or later, response filters that stream,
header rules, error pages, and the events every path publishes.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from rproxy_tw import ProxyService, parse_config
from rproxy_tw.accesslog import AccessLog
from rproxy_tw.events import EventRecorder, IEventObserver, RequestFinished
from rproxy_tw.http.exchange import IDownstream, IExchange, ProxyExchange
from rproxy_tw.http.h2 import H2Stream
from rproxy_tw.http.local import LocalResourceExchange
from rproxy_tw.http.server import HTTPServerConnection, LocalResponse
from rproxy_tw.pipeline import (
    DownstreamWrapper,
    HeaderRules,
    IRequestFilter,
    IResponseFilter,
    LocalAnswer,
    ResponseHeaders,
    StickyCookie,
)

from .conftest import proxy_config, request, until
from .test_tls import PKI, pki  # noqa: F401 - pki is a fixture
from .test_tls_h2 import _H2Client, _status

inline = pytest_twisted.inlineCallbacks

LIMITS = {"max_request_line": 1024, "max_headers": 40, "max_body_bytes": 1000}


# ---------------------------------------------------------------------------
# Three entry points to one proxy


class Proxy:
    """One proxy with a plain listener, a TLS listener (HTTP/2) and its tree mounted in an app's Site at /app."""

    def __init__(self, net: Any, pki: PKI, origin: Any, extra: dict[str, Any] | None = None) -> None:
        self.net = net
        self.pki = pki
        self.origin = origin
        self.extra = extra or {}

    @inline
    def start(self) -> Any:
        config = proxy_config(self.origin.backend, limits=LIMITS, **self.extra)
        config["listen"].append({"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main"})
        config["tls"] = {"main": {"certificates": [{"cert": self.pki.path("www-ec.pem"),
                                                     "key": self.pki.path("www-ec.key")}]}}
        running = yield self.net.proxy(config)
        self.service: ProxyService = running.service
        self.port, self.tls_port = running.ports
        root = Resource()
        root.putChild(b"app", self.service.resource)
        site = Site(root)
        site.displayTracebacks = False
        app_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.net.ports.append(app_port)
        self.app_port = app_port.getHost().port
        return self

    @inline
    def http1(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] = (), body: bytes | None = None,
              host: bytes = b"www.example.test", embedded: bool = False) -> Any:
        client = yield self.net.client(self.app_port if embedded else self.port)
        client.send(request(method, (b"/app" if embedded else b"") + target, host=host, headers=headers, body=body))
        [resp] = yield client.until_responses([method])
        return resp.status, resp.body, resp.headers

    @inline
    def http2(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] = (), body: bytes | None = None,
              authority: bytes = b"www.example.test") -> Any:
        def run() -> Any:
            c = _H2Client(self.pki, self.tls_port)
            try:
                c.conn.config.validate_outbound_headers = False
                c.conn.config.normalize_outbound_headers = False
                sid = c.conn.get_next_available_stream_id()
                fields = [(b":method", method), (b":scheme", b"https"), (b":authority", authority), (b":path", target),
                          *[(n.lower(), v) for n, v in headers]]
                if body is not None:
                    fields.append((b"content-length", b"%d" % len(body)))
                c.conn.send_headers(sid, fields, end_stream=body is None)
                if body is not None:
                    c.conn.send_data(sid, body, end_stream=True)
                c.flush()
                c.responses[sid] = {"headers": None, "body": bytearray(), "ended": False, "reset": None}
                c.read(lambda: c.responses[sid]["ended"])
                return c.responses[sid]
            finally:
                c.close()

        r = yield threads.deferToThread(run)
        return _status(r), bytes(r["body"]), list(r["headers"])

    def send(self, entry: str, *args: Any, **kw: Any) -> Deferred[Any]:
        if entry == "http/2":
            return self.http2(*args, **kw)
        return self.http1(*args, embedded=entry == "embedded", **kw)


ENTRIES = ["http/1.1", "http/2", "embedded"]


@pytest.fixture
def origin(net: Any) -> Any:
    return net.origin()


# One table of bad request heads, the same answer on every entry point.
BAD_HEADS = {
    "dot segments above the root": (b"GET", b"/../etc/passwd", [], None, 400),
    "broken percent-encoding": (b"GET", b"/a%zz", [], None, 400),
    "NUL escape in the path": (b"GET", b"/a%00b", [], None, 400),
    "too many header fields": (b"GET", b"/", [(b"X-F%d" % i, b"v") for i in range(60)], None, 431),
    "request target too long": (b"GET", b"/" + b"a" * 2000, [], None, 414),
    "declared body over the limit": (b"POST", b"/", [], b"x" * 2000, 413),
    "two Host headers": (b"GET", b"/", [(b"Host", b"other.test")], None, 400),
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", sorted(BAD_HEADS))
@inline
def test_bad_request_heads_get_the_same_answer_on_every_entry_point(net, pki, entry: str, case: str) -> None:
    origin = yield net.origin()
    proxy = yield Proxy(net, pki, origin).start()
    method, target, headers, body, expected = BAD_HEADS[case]
    status, _, _ = yield proxy.send(entry, method, target, headers, body)
    assert status == expected
    assert origin.requests == []


@pytest.mark.parametrize("entry", ENTRIES)
@inline
def test_an_invalid_host_is_refused_on_every_entry_point(net, pki, entry: str) -> None:
    origin = yield net.origin()
    proxy = yield Proxy(net, pki, origin).start()
    if entry == "http/2":
        status, _, _ = yield proxy.http2(b"GET", b"/", authority=b"a b")
    else:
        status, _, _ = yield proxy.http1(b"GET", b"/", host=b"a b", embedded=entry == "embedded")
    assert status == 400
    assert origin.requests == []


# ---------------------------------------------------------------------------
# Filters


@implementer(IRequestFilter)
class RefuseDenied:
    """Answers locally for /deny..., lets everything else through."""

    def filterRequest(self, request: Any, exchange: Any) -> LocalAnswer | None:
        if request.path.startswith(b"/deny"):
            return LocalAnswer(403, b"denied by a filter\n", ((b"Content-Type", b"text/plain"),))
        return None


@implementer(IRequestFilter)
class DecideLater:
    """Answers after a delay: /later-deny locally, anything else passes (with a header added)."""

    def __init__(self) -> None:
        self.waited = 0

    def filterRequest(self, request: Any, exchange: Any) -> Deferred[Any]:
        self.waited += 1

        def decide() -> LocalAnswer | None:
            if request.path.startswith(b"/later-deny"):
                return LocalAnswer(429, b"later\n")
            request.headers = [*request.headers, (b"X-Decided", b"later")]
            return None

        return deferLater(reactor, 0.05, decide)


class _Upper(DownstreamWrapper):
    def writeBody(self, data: bytes) -> None:
        self.inner.writeBody(data.upper())


@implementer(IResponseFilter)
class UpperCaseBody:
    """Rewrites each body piece as it passes (never holds the body)."""

    def wrap(self, exchange: Any, downstream: Any) -> Any:
        return _Upper(downstream)


@pytest.mark.parametrize("entry", ENTRIES)
@inline
def test_a_request_filter_answers_locally(net, pki, entry: str) -> None:
    origin = yield net.origin()
    proxy = yield Proxy(net, pki, origin).start()
    proxy.service.add_filter(RefuseDenied())
    status, body, _ = yield proxy.send(entry, b"GET", b"/deny/x")
    assert (status, body) == (403, b"denied by a filter\n")
    assert origin.requests == []
    status, body, _ = yield proxy.send(entry, b"GET", b"/fine")
    assert status == 200
    assert [r.target for r in origin.requests] == [b"/fine"]


@pytest.mark.parametrize("entry", ENTRIES)
@inline
def test_a_request_filter_answers_through_a_deferred(net, pki, entry: str) -> None:
    origin = yield net.origin()
    proxy = yield Proxy(net, pki, origin).start()
    later = DecideLater()
    proxy.service.add_filter(later)
    status, body, _ = yield proxy.send(entry, b"GET", b"/later-deny")
    assert (status, body) == (429, b"later\n")
    assert origin.requests == []
    status, body, _ = yield proxy.send(entry, b"POST", b"/upload", body=b"payload" * 10)
    assert status == 200
    [got] = origin.requests
    assert got.one(b"x-decided") == b"later"
    assert got.body == b"payload" * 10, "the body waited for the filter and arrived whole"
    assert later.waited == 2


@pytest.mark.parametrize("entry", ENTRIES)
@inline
def test_a_response_filter_rewrites_the_body_as_it_streams(net, pki, entry: str) -> None:
    origin = yield net.origin(lambda req: req.respond(200, b"hello from the origin"))
    proxy = yield Proxy(net, pki, origin).start()
    proxy.service.add_filter(UpperCaseBody())
    status, body, _ = yield proxy.send(entry, b"GET", b"/x")
    assert (status, body) == (200, b"HELLO FROM THE ORIGIN")


@inline
def test_a_response_filter_passes_pieces_on_before_the_response_ends(net, pki) -> None:
    held: list[Any] = []
    origin = yield net.origin(lambda req: held.append(req))
    proxy = yield Proxy(net, pki, origin).start()
    proxy.service.add_filter(UpperCaseBody())
    client = yield net.client(proxy.port)
    client.send(request(b"GET", b"/stream"))
    yield until(lambda: held, "request at the origin")
    held[0].write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
    yield until(lambda: b"FIRST" in client.buf, "the first piece, rewritten, before the rest is sent")
    held[0].write(b"-last")
    [resp] = yield client.until_responses([b"GET"])
    assert resp.body == b"FIRST-LAST"


# ---------------------------------------------------------------------------
# Header rules and error pages from the config


RULES = {
    "request_headers": {"set": {"X-Route": "$route", "X-Seen-By": "rproxy for $client_ip"},
                        "add": {"X-Trace": "$request_id"}, "remove": ["Cookie"]},
    "response_headers": {"set": {"X-Frame-Options": "DENY"}, "remove": ["X-Powered-By"],
                         "add": {"X-Served-Route": "$route"}},
}


@pytest.mark.parametrize("entry", ENTRIES)
@inline
def test_header_rules_rewrite_the_request_and_the_response(net, pki, entry: str) -> None:
    origin = yield net.origin(lambda req: req.respond(200, b"ok", [(b"X-Powered-By", b"PHP/5"),
                                                                   (b"X-Frame-Options", b"ALLOW")]))
    proxy = yield Proxy(net, pki, origin, {"routes": [{"path": "/", "pool": "p", **RULES}]}).start()
    status, _, headers = yield proxy.send(entry, b"GET", b"/page", [(b"Cookie", b"secret=1")])
    assert status == 200
    [got] = origin.requests
    assert got.one(b"x-route") == b"*/"
    assert got.one(b"x-seen-by") == b"rproxy for 127.0.0.1"
    assert got.one(b"cookie") is None
    request_id = got.one(b"x-request-id")
    assert request_id is not None and len(request_id) == 32
    assert got.one(b"x-trace") == request_id  # $request_id is the id the request carries
    names = {n.lower(): v for n, v in headers}
    assert names[b"x-frame-options"] == b"DENY"
    assert b"x-powered-by" not in names
    assert names[b"x-served-route"] == b"*/"


@inline
def test_header_rules_apply_to_the_proxys_own_answers(net, pki) -> None:
    proxy = yield Proxy(net, pki, (yield net.origin()),
                        {"routes": [{"path": "/", "pool": "p", **RULES}],
                         "pool": {"connect_timeout": 1.0}}).start()
    proxy.origin.listening.stopListening()
    yield deferLater(reactor, 0.05, lambda: None)
    status, _, headers = yield proxy.http1(b"GET", b"/")
    assert status == 502
    assert (b"X-Frame-Options", b"DENY") in headers


def _pages(tmp_path: Any) -> dict[str, Any]:
    (tmp_path / "404.html").write_bytes(b"<h1>Nothing here</h1>\n")
    (tmp_path / "502.html").write_bytes(b"<h1>The app is down</h1>\n")
    return {"404": str(tmp_path / "404.html"), "502": str(tmp_path / "502.html")}


@pytest.mark.parametrize("entry", ["http/1.1", "http/2"])
@inline
def test_error_pages_replace_the_proxys_own_answers(net, pki, tmp_path, entry: str) -> None:
    pages = _pages(tmp_path)
    dead = yield net.origin()
    dead.listening.stopListening()
    origin = yield net.origin()
    proxy = yield Proxy(net, pki, origin, {
        "routes": [{"host": "www.example.test", "path": "/down/", "pool": "dead", "error_pages": {"502": pages["502"]}},
                   {"host": "www.example.test", "path": "/up/", "pool": "p"}],
        "pools": {"dead": {"backends": [dead.backend]}},
    }).start()
    proxy.service.config  # noqa: B018 - the config loaded with its pages
    status, body, headers = yield proxy.send(entry, b"GET", b"/down/x")
    assert (status, body) == (502, b"<h1>The app is down</h1>\n")
    assert dict((n.lower(), v) for n, v in headers)[b"content-type"].startswith(b"text/html")
    status, body, _ = yield proxy.send(entry, b"GET", b"/nowhere")
    assert status == 404 and body == b"Not Found: no route for this path\n", "no global 404 page configured"


@inline
def test_a_global_error_page_serves_every_route(net, pki, tmp_path) -> None:
    pages = _pages(tmp_path)
    origin = yield net.origin()
    config = proxy_config(origin.backend, routes=[{"host": "a.test", "path": "/only/", "pool": "p"}])
    config["error_pages"] = {"404": pages["404"]}
    running = yield net.proxy(config)
    client = yield net.client(running.port)
    client.send(request(b"GET", b"/elsewhere", host=b"a.test"))
    [resp] = yield client.until_responses([b"GET"])
    assert (resp.status, resp.body) == (404, b"<h1>Nothing here</h1>\n")
    assert resp.one(b"content-type") == b"text/html; charset=utf-8"


def test_header_rules_and_pages_are_checked_at_load(tmp_path) -> None:
    from rproxy_tw.config import ConfigError

    base = proxy_config("tcp:127.0.0.1:1")
    for route_extra, problem in [
        ({"request_headers": {"set": {"Host": "x"}}}, "set by the proxy itself"),
        ({"request_headers": {"set": {"X-A": "$nope"}}}, "unknown variable $nope"),
        ({"response_headers": {"add": {"Bad Name": "v"}}}, "is not a header name"),
        ({"response_headers": {"remove": ["Content-Length"]}}, "set by the proxy itself"),
        ({"error_pages": {"200": "x.html"}}, "must be a 4xx or 5xx status code"),
        ({"error_pages": {"404": str(tmp_path / "missing.html")}}, "cannot read"),
    ]:
        data = {**base, "route": [{"path": "/", "pool": "p", **route_extra}]}
        with pytest.raises(ConfigError) as e:
            parse_config(data, source="t.toml")
        assert problem in str(e.value)
        assert str(e.value).startswith("t.toml: route[0].")


# ---------------------------------------------------------------------------
# Events


@pytest.mark.parametrize("entry", ENTRIES)
@inline
def test_every_entry_point_publishes_request_finished(net, pki, entry: str) -> None:
    origin = yield net.origin(lambda req: req.respond(200, b"twelve bytes"))
    proxy = yield Proxy(net, pki, origin).start()
    recorder = EventRecorder()
    proxy.service.runtime.events.subscribe(recorder)
    status, _, _ = yield proxy.send(entry, b"GET", b"/page?q=1", [(b"User-Agent", b"test-agent")])
    assert status == 200
    yield until(lambda: recorder.of(RequestFinished), "the event")
    [event] = recorder.of(RequestFinished)
    assert event.status == 200
    assert event.bytes_sent == 12
    assert event.route == "*/"
    assert event.pool == "p"
    assert event.backend == origin.backend
    assert event.user_agent == b"test-agent"
    assert event.client == "127.0.0.1"
    assert event.duration is not None and event.duration >= 0


@inline
def test_the_embedded_path_is_in_the_access_log(net, tmp_path) -> None:
    log = tmp_path / "access.log"
    origin = yield net.origin()
    proxy = ProxyService(parse_config(proxy_config(origin.backend, server={"access_log": str(log)})), reactor)
    root = Resource()
    root.putChild(b"app", proxy.resource)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    net.ports.append(port)
    client = yield net.client(port.getHost().port)
    client.send(request(b"GET", b"/app/page"))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200
    yield until(lambda: log.exists() and log.read_text(), "the access log line")
    assert '"GET /app/page HTTP/1.1" 200 ' in log.read_text()


# ---------------------------------------------------------------------------
# Interfaces


def test_the_pipeline_seams_provide_their_interfaces() -> None:
    verifyClass(IExchange, ProxyExchange)
    verifyClass(IExchange, LocalResponse)
    verifyClass(IExchange, LocalResourceExchange)
    verifyClass(IDownstream, HTTPServerConnection)
    verifyClass(IDownstream, H2Stream)
    verifyClass(IDownstream, DownstreamWrapper)
    verifyObject(IEventObserver, AccessLog(reactor, "json"))
    verifyObject(IEventObserver, EventRecorder())
    verifyObject(IRequestFilter, HeaderRules(None, None))  # type: ignore[arg-type]
    verifyObject(IResponseFilter, HeaderRules(None, None))  # type: ignore[arg-type]
    verifyObject(IResponseFilter, ResponseHeaders(()))
    verifyObject(IResponseFilter, StickyCookie(None))
    for step in (RefuseDenied(), DecideLater()):
        verifyObject(IRequestFilter, step)
    verifyObject(IResponseFilter, UpperCaseBody())
    from rproxy_tw.http.server import HTTPProxyFactory
    from rproxy_tw.listener import IListenerFactory
    from rproxy_tw.tcp.relay import TCPProxyFactory

    verifyClass(IListenerFactory, HTTPProxyFactory)
    verifyClass(IListenerFactory, TCPProxyFactory)
