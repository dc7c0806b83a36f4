"""
The C{Date} header (RFC 9110 6.6.1): every response carries exactly one.
Answers the proxy makes itself take theirs from the injected clock, as
IMF-fixdate; a proxied response keeps the origin's, also when the proxy is
mounted in an application's own twisted.web C{Site} (which adds one of its
own that must not be sent as a second).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from rproxy_tw import ProxyService, parse_config
from rproxy_tw.config import ListenConfig
from rproxy_tw.http.server import HTTPProxyFactory, error_response, http_date

from .conftest import curl, free_port, parse_responses, proxy_config, request
from .test_http_server import Harness, one_response, take
from .test_tls import PKI, pki  # noqa: F401 - pki is a fixture
from .test_tls_h2 import _H2Client, _Origin, _running, _status

inline = pytest_twisted.inlineCallbacks

ORIGIN_DATE = b"Sun, 06 Nov 1994 08:49:37 GMT"
IMF_FIXDATE = 784111777  # ORIGIN_DATE, in seconds since the epoch


def dates(headers: Any) -> list[bytes]:
    return [v for n, v in headers if n.lower() == b"date"]


def head_dates(raw: bytes) -> list[bytes]:
    """The Date values of every response head in curl -D output."""
    return [line.split(b":", 1)[1].strip() for line in raw.split(b"\r\n") if line.lower().startswith(b"date:")]


# ---------------------------------------------------------------------------
# The formatter


def test_http_date_is_imf_fixdate_from_the_clock_cached_per_second():
    clock = Clock()
    clock.advance(IMF_FIXDATE)
    first = http_date(clock)
    assert first == ORIGIN_DATE
    clock.advance(0.5)
    assert http_date(clock) is first, "formatted again within the same second"
    clock.advance(0.5)
    assert http_date(clock) == b"Sun, 06 Nov 1994 08:49:38 GMT"


def test_error_response_has_one_date():
    raw = error_response(502, "Bad Gateway", False, date=ORIGIN_DATE)
    resp = one_response(raw)
    assert dates(resp.headers) == [ORIGIN_DATE]


# ---------------------------------------------------------------------------
# HTTP/1.1: the proxy's own answers, on the injected clock


def test_proxy_answers_carry_one_date_from_the_injected_clock():
    h = Harness(routes=[{"path": "/only", "pool": "p"}])
    h.reactor.advance(IMF_FIXDATE)
    for raw, status in ((request(target=b"/elsewhere"), 404), (request(host=None), 400)):
        proto, client = h.client()
        proto.dataReceived(raw)
        resp = one_response(take(client))
        assert resp.status == status
        assert dates(resp.headers) == [ORIGIN_DATE], resp
    proto, client = h.client()
    proto.dataReceived(request(target=b"/only"))
    h.refuse_origin()
    resp = one_response(take(client))
    assert resp.status == 502 and dates(resp.headers) == [ORIGIN_DATE], resp


def test_https_redirect_carries_one_date():
    h = Harness()
    h.reactor.advance(IMF_FIXDATE)
    factory = HTTPProxyFactory(h.runtime, h.reactor, listen=ListenConfig("tcp:0", redirect_https=443))
    h.factory = factory
    proto, client = h.client()
    proto.dataReceived(request(target=b"/x"))
    resp = one_response(take(client))
    assert resp.status == 308 and dates(resp.headers) == [ORIGIN_DATE]


def test_proxied_response_keeps_the_origins_one_date():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request())
    up, _origin = h.accept_origin()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nDate: %s\r\nContent-Length: 2\r\n\r\nok" % ORIGIN_DATE)
    resp = one_response(take(client))
    assert dates(resp.headers) == [ORIGIN_DATE]


def test_proxied_response_gets_one_date_when_the_origin_sent_none():
    """RFC 9110 6.6.1: a proxy forwarding an undated response adds the Date it received it (nginx does)."""
    for extra in (b"", b"Connection: x-a\r\n", b"Connection: date\r\nDate: %s\r\n" % ORIGIN_DATE):
        h = Harness()
        h.reactor.advance(IMF_FIXDATE)
        proto, client = h.client()
        proto.dataReceived(request())
        up, _origin = h.accept_origin()
        up.dataReceived(b"HTTP/1.1 200 OK\r\n%sContent-Length: 2\r\n\r\nok" % extra)
        resp = one_response(take(client))
        assert dates(resp.headers) == [ORIGIN_DATE], (extra, resp.headers)


@inline
def test_real_listener_errors_carry_one_date(net):
    """404, 400 and 502 over a socket, as curl sees them."""
    proxy = yield net.proxy(proxy_config(f"tcp:127.0.0.1:{free_port()}", routes=[{"path": "/p", "pool": "p"}]))
    for target in ("/nowhere", "/p/dead"):
        out, err, code = yield curl("-D", "-", "-o", "/dev/null", f"{proxy.url}{target}")
        assert code == 0, err
        assert len(head_dates(out)) == 1, out
    client = yield net.client(proxy.port)
    client.send(request(host=None))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 400 and len(dates(resp.headers)) == 1, resp


@inline
def test_local_resource_on_proxy_listener_has_one_date(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend), mounts=[("/status", Data(b"ok", "text/plain"))])
    client = yield net.client(proxy.port)
    client.send(request(target=b"/status"))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200 and len(dates(resp.headers)) == 1, resp


# ---------------------------------------------------------------------------
# The proxy mounted in an application's own Site


def _embedded(net: Any, backend: str) -> str:
    """An application's Site on 127.0.0.1 with the proxy (not started: no listeners of its own) at /proxy."""
    svc = ProxyService(parse_config(proxy_config(backend)), reactor)
    root = Resource()
    root.putChild(b"proxy", svc.resource)
    site = Site(root)
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    net.ports.append(port)
    return f"http://127.0.0.1:{port.getHost().port}"


@inline
def test_embedded_proxy_sends_one_date_the_origins(net):
    with_date = yield net.origin(lambda req: req.respond(200, b"dated", [(b"Date", ORIGIN_DATE)]))
    base = _embedded(net, with_date.backend)
    out, err, code = yield curl("-D", "-", f"{base}/proxy/")
    assert code == 0, err
    assert head_dates(out) == [ORIGIN_DATE], out
    assert out.endswith(b"dated")


@inline
def test_embedded_proxy_adds_one_date_when_the_origin_sent_none(net):
    undated = yield net.origin(lambda req: req.respond(200, b"undated"))
    base = _embedded(net, undated.backend)
    out, err, code = yield curl("-D", "-", f"{base}/proxy/")
    assert code == 0, err
    assert len(head_dates(out)) == 1, out


@inline
def test_embedded_proxy_error_has_one_date(net):
    base = _embedded(net, f"tcp:127.0.0.1:{free_port()}")
    out, err, code = yield curl("-D", "-", f"{base}/proxy/x")
    assert code == 0, err
    [resp], _ = parse_responses(out, [b"GET"])
    assert resp.status == 502 and len(dates(resp.headers)) == 1, out


# ---------------------------------------------------------------------------
# HTTP/2


@pytest_twisted.inlineCallbacks
def test_http2_proxy_answers_carry_one_date(pki: PKI) -> None:  # noqa: F811
    """A refusal (431) and a 502 made by the proxy on HTTP/2 each carry one date field."""
    origin = _Origin()
    service, http, origin_port, port = yield _running(pki, origin)
    yield origin_port.stopListening()

    def client() -> Any:
        c = _H2Client(pki, port)
        try:
            big = c.request(b"GET", b"/big", headers=[(b"x-big", b"y" * 20000)])
            dead = c.request(b"GET", b"/dead")
            c.read(lambda: c.responses[big]["ended"] and c.responses[dead]["ended"])
            return c.responses[big], c.responses[dead]
        finally:
            c.close()

    try:
        big, dead = yield threads.deferToThread(client)
    finally:
        yield service.stopService()
        for conn in list(http.connections):
            conn.transport.abortConnection()
    assert _status(big) == 431 and len(dates(big["headers"])) == 1, big["headers"]
    assert _status(dead) == 502 and len(dates(dead["headers"])) == 1, dead["headers"]
