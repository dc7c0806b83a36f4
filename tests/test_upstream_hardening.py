"""
Origins that misbehave at the framing level: a response head (or trailer
section) that never ends, and a body cut short by a reset.  The proxy must
stop reading a head over the bounds of C{[limits]} and answer 502, and must
never pass a body cut by a reset on as complete.
"""

from __future__ import annotations

from typing import Any

import h2.errors
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.interfaces import IPullProducer
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from rproxy_tw.config import LimitsConfig

from .conftest import FloodProducer, chunk, curl, proxy_config, request, response, until
from .test_http_server import Harness, one_response, take
from .test_tls import PKI, pki  # noqa: F401 - pki is a fixture
from .test_tls_h2 import _H2Client, _Origin, _Req, _running, _status, _stop

inline = pytest_twisted.inlineCallbacks

LIMITS = LimitsConfig()
HEAD_BOUND = LIMITS.max_request_line + LIMITS.max_header_bytes + 1024
"""The most a response head may take with the default [limits]."""

FLOOD = 32 * 1024 * 1024
"""What a flooding origin offers in all (bounded, so that an unfixed proxy still ends)."""

SOCKET_SLACK = 8 * 1024 * 1024
"""What kernel buffers and the reads in flight may take beyond the bound before the cut reaches the origin."""


@pytest.fixture
def logged() -> Any:
    """The text of every log event while the test runs."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) for e in events]
    globalLogPublisher.removeObserver(events.append)


def assert_plain_502(resp: Any, no_traceback: Any) -> None:
    assert resp.status == 502, resp
    assert resp.one(b"content-type").startswith(b"text/plain")
    assert resp.one(b"content-length") is not None
    no_traceback(resp.body)


# ---------------------------------------------------------------------------
# Item 1: the response head is bounded


def _flooding_origin(start: bytes, floods: list[FloodProducer], block: bytes = b"a" * 65536) -> Any:
    def handler(req: Any) -> None:
        req.write(start)
        flood = FloodProducer(req.conn.transport, FLOOD, block=block)
        floods.append(flood)
        flood.start()

    return handler


@inline
def test_endless_origin_header_line_is_cut_with_502(net, no_traceback, logged):
    """Status line, then one header line that never ends: 502 at once, and the proxy stops reading."""
    floods: list[FloodProducer] = []
    origin = yield net.origin(_flooding_origin(b"HTTP/1.1 200 OK\r\nX-Endless: ", floods))
    proxy = yield net.proxy(proxy_config(origin.backend, pool={"passive": {"consecutive_failures": 1, "max_ejection_share": 1.0}}))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert_plain_502(resp, no_traceback)
    yield until(lambda: origin.connections[0].closed, "the proxy to close the flooding origin's connection")
    written = floods[0].written
    assert written < FLOOD, "the proxy read the whole flood"
    assert written <= HEAD_BOUND + SOCKET_SLACK, written
    # Passive health counts it against the backend (one failure ejects, here).
    backend = proxy.service.runtime.pools["p"].backends[0]
    assert not backend.healthy
    assert any("response head over" in line for line in logged()), logged()


def test_origin_head_read_stops_at_the_bound():
    """Without sockets: the bytes read of an endless header line before the cut are the bound plus one read."""
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    read = 0
    piece = b"a" * 1024
    up.dataReceived(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    while not origin.disconnected and read < 10 * HEAD_BOUND:
        up.dataReceived(piece)
        read += len(piece)
    assert origin.disconnected, "the proxy never stopped reading"
    assert read <= HEAD_BOUND + len(piece), read
    resp = one_response(take(client))
    assert resp.status == 502


@inline
def test_endless_status_line_is_cut_with_502(net, no_traceback):
    floods: list[FloodProducer] = []
    origin = yield net.origin(_flooding_origin(b"HTTP/1.1 200 ", floods))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert_plain_502(resp, no_traceback)
    yield until(lambda: origin.connections[0].closed, "the origin's connection to close")
    assert floods[0].written <= HEAD_BOUND + SOCKET_SLACK


@inline
def test_endless_stream_of_headers_is_cut_with_502(net, no_traceback):
    """Many short header lines (a callback each) are bounded by count and bytes too."""
    floods: list[FloodProducer] = []
    origin = yield net.origin(_flooding_origin(b"HTTP/1.1 200 OK\r\n", floods, block=b"X-A: b\r\n" * 8192))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert_plain_502(resp, no_traceback)
    yield until(lambda: origin.connections[0].closed, "the origin's connection to close")


@inline
def test_too_many_origin_headers_give_502(net, no_traceback):
    origin = yield net.origin(lambda req: req.respond(200, b"ok", [(b"X-N%d" % i, b"v") for i in range(150)]))
    proxy = yield net.proxy(proxy_config(origin.backend, limits={"max_headers": 100}))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert_plain_502(resp, no_traceback)


@inline
def test_few_large_origin_headers_over_the_byte_bound_give_502(net, no_traceback):
    """Few fields, but 30 KB of them in one write: the size bound holds, not only the count."""
    origin = yield net.origin(lambda req: req.respond(200, b"ok", [(b"X-Big-%d" % i, b"v" * 3000) for i in range(10)]))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert_plain_502(resp, no_traceback)


@inline
def test_large_origin_head_within_the_limits_is_passed(net):
    """A big but bounded head (90 fields, 14 KB of cookies and policies) goes through untouched."""
    headers = [(b"X-Field-%d" % i, b"v" * 150) for i in range(90)]
    origin = yield net.origin(lambda req: req.respond(200, b"body", headers))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200 and resp.body == b"body"
    assert resp.header(b"x-field-89") == [b"v" * 150]


@inline
def test_endless_trailer_line_cuts_the_response(net):
    """A trailer section is a head too: an endless one cuts the response (too late for a 502)."""
    floods: list[FloodProducer] = []
    start = response(200, length=False, headers=[(b"Transfer-Encoding", b"chunked")]) + chunk(b"hello") + \
        b"0\r\nX-Trailer: "
    origin = yield net.origin(_flooding_origin(start, floods))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert resp.status == 200 and not resp.complete
    assert resp.body == b"hello"
    yield until(lambda: origin.connections[0].closed, "the origin's connection to close")
    assert floods[0].written <= HEAD_BOUND + SOCKET_SLACK


@inline
def test_endless_chunk_extension_cuts_the_response(net):
    """A chunk-size line that never ends (an endless extension) is bounded like a head line."""
    floods: list[FloodProducer] = []
    start = response(200, length=False, headers=[(b"Transfer-Encoding", b"chunked")]) + chunk(b"hello") + b"5;x="
    origin = yield net.origin(_flooding_origin(start, floods))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert resp.status == 200 and not resp.complete and resp.body == b"hello"
    yield until(lambda: origin.connections[0].closed, "the origin's connection to close")
    assert floods[0].written <= HEAD_BOUND + SOCKET_SLACK


@inline
def test_long_chunked_body_in_small_reads_is_not_mistaken_for_a_head(net):
    """Many chunks whose size lines end reads must not add up to a 'head': only an open section counts."""
    body = b"".join(chunk(b"%05d" % i) for i in range(20000)) + b"0\r\n\r\n"

    def handler(req: Any) -> None:
        req.write(response(200, length=False, headers=[(b"Transfer-Encoding", b"chunked")]))
        for i in range(0, len(body), 7):
            reactor.callLater(0, req.conn.transport.write, body[i : i + 7])

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200 and resp.body == b"".join(b"%05d" % i for i in range(20000))


# ---------------------------------------------------------------------------
# Item 4: a body cut by a reset is not complete


@implementer(IPullProducer)
class _SendThenReset:
    """Writes C{data}; once Twisted has handed it all to the kernel, resets the connection (SO_LINGER 0)."""

    def __init__(self, transport: Any, data: bytes, clean: bool = False) -> None:
        self.transport = transport
        self.data = data
        self.clean = clean
        self.sent = False

    def resumeProducing(self) -> None:
        if not self.sent:
            self.sent = True
            self.transport.write(self.data)
            return
        self.transport.unregisterProducer()
        if self.clean:
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def stopProducing(self) -> None:
        pass


BODY = (bytes(range(256)) * 196)[:50_000]
assert len(BODY) == 50_000

CUT_HEADS = {
    "close-delimited": response(200, length=False),
    "content-length": response(200, length=False, headers=[(b"Content-Length", b"100000")]),
}


def _resetting_origin(head: bytes, clean: bool = False, chunked: bool = False) -> Any:
    def handler(req: Any) -> None:
        data = head + (chunk(BODY) if chunked else BODY)
        req.answered = True
        req.conn.transport.registerProducer(_SendThenReset(req.conn.transport, data, clean), False)

    return handler


@inline
def test_close_delimited_response_reset_mid_body_is_cut_for_http11(net, logged):
    """curl through HTTP/1.1: a reset close-delimited body is an error (exit 18), not a complete 200."""
    origin = yield net.origin(_resetting_origin(response(200, length=False)))
    proxy = yield net.proxy(proxy_config(origin.backend))
    out, err, code = yield curl("--http1.1", "-o", "-", f"{proxy.url}/cut")
    assert code != 0, (code, err)
    assert len(out) <= len(BODY)
    # And on a raw connection: no last chunk, and the connection is closed.
    client = yield net.client(proxy.port)
    client.send(request(target=b"/raw"))
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert resp.status == 200 and resp.chunked and not resp.complete
    assert b"0\r\n\r\n" not in bytes(client.buf)
    assert any("failed during GET request" in line for line in logged()), logged()


@inline
def test_close_delimited_response_ended_cleanly_is_complete(net):
    """A clean close (FIN) still ends a close-delimited body: curl exits 0 with every byte."""
    origin = yield net.origin(_resetting_origin(response(200, length=False), clean=True))
    proxy = yield net.proxy(proxy_config(origin.backend))
    out, err, code = yield curl("--http1.1", "-o", "-", f"{proxy.url}/whole")
    assert code == 0, err
    assert out == BODY


@inline
def test_framed_responses_reset_mid_body_are_cut(net):
    """A Content-Length or chunked body cut by a reset fails too (curl exits non-zero)."""
    for head, chunked in ((CUT_HEADS["content-length"], False),
                          (response(200, length=False, headers=[(b"Transfer-Encoding", b"chunked")]), True)):
        origin = yield net.origin(_resetting_origin(head, chunked=chunked))
        proxy = yield net.proxy(proxy_config(origin.backend))
        out, err, code = yield curl("--http1.1", "-o", "-", f"{proxy.url}/cut")
        assert code != 0, (head, code, err)
        assert len(out) <= len(BODY)


@pytest_twisted.inlineCallbacks
def test_close_delimited_response_reset_mid_body_resets_the_http2_stream(pki: PKI) -> None:  # noqa: F811
    """Through HTTP/2: the stream is reset (RST_STREAM), not ended with END_STREAM."""
    origin = _Origin()
    clean = {"/clean": True}

    def answer(req: _Req) -> None:
        data = response(200, length=False) + BODY
        is_clean = clean.get(req.url.decode(), False)
        req.transport.registerProducer(_SendThenReset(req.transport, data, is_clean), False)

    origin.answer = answer  # type: ignore[method-assign]
    service, http, origin_port, port = yield _running(pki, origin)

    def client() -> Any:
        c = _H2Client(pki, port)
        try:
            sid = c.request(b"GET", b"/cut")
            c.read(lambda: c.responses[sid]["ended"])
            whole = c.request(b"GET", b"/clean")
            c.read(lambda: c.responses[whole]["ended"])
            return c.responses[sid], c.responses[whole]
        finally:
            c.close()

    try:
        cut, whole = yield threads.deferToThread(client)
    finally:
        yield _stop(service, http, origin_port)
    assert _status(cut) == 200
    assert cut["reset"] == h2.errors.ErrorCodes.INTERNAL_ERROR, cut["reset"]
    assert len(cut["body"]) <= len(BODY)
    assert whole["reset"] is None and bytes(whole["body"]) == BODY
