"""
Integration tests of the HTTP proxy core: a real proxy on 127.0.0.1 between
real clients (raw sockets, treq, curl) and real origins (raw protocols that
send exact bytes, and twisted.web Sites) that each test starts.

Each test asserts on what a user sees: the status, headers and bytes the
client received, and the bytes and headers the origin received.
"""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.web.resource import Resource

from .conftest import (
    FloodProducer,
    chunk,
    proxy_config,
    request,
    response,
    turns,
    until,
)

inline = pytest_twisted.inlineCallbacks


class Echo(Resource):
    """A twisted.web origin that tells what it received."""

    isLeaf = True

    def render(self, req):
        body = req.content.read()
        req.setHeader(b"content-type", b"text/plain")
        return b"%s %s %d\n%s" % (req.method, req.uri, len(body), body)


# ---------------------------------------------------------------------------
# Round trips


@inline
def test_get_and_post_round_trip_through_twisted_web_origin(net):
    site = yield net.web_origin(Echo())
    proxy = yield net.proxy(proxy_config(site.backend))

    r = yield treq.get(proxy.url + "/hello?x=1", headers={"Host": "example.com"})
    assert r.code == 200
    assert (yield r.content()) == b"GET /hello?x=1 0\n"

    payload = bytes(range(256)) * 100
    r = yield treq.post(proxy.url + "/upload", data=payload)
    assert r.code == 200
    assert (yield r.content()) == b"POST /upload %d\n" % len(payload) + payload


@inline
def test_origin_receives_request_as_sent_with_forwarding_headers(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"PUT", b"/a/b%20c?q=1&r", host=b"Example.com:8080",
                        headers=[(b"X-Custom", b"v1"), (b"Accept", b"*/*")], body=b"data"))
    [resp] = yield client.until_responses([b"PUT"])
    assert resp.status == 200
    assert resp.body == b"PUT /a/b%20c?q=1&r\ndata"
    [got] = origin.requests
    assert got.method == b"PUT"
    assert got.target == b"/a/b%20c?q=1&r"
    assert got.version == "1.1"
    assert got.one(b"host") == b"Example.com:8080"
    assert got.one(b"x-custom") == b"v1"
    assert got.one(b"content-length") == b"4"
    assert got.body == b"data"


# ---------------------------------------------------------------------------
# Streaming


@inline
def test_request_body_streams_to_origin_before_client_finishes_content_length(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"POST", b"/up", headers=[(b"Content-Length", b"20")]) + b"first-part")
    # The origin gets the first part while the client still owes ten bytes.
    yield until(lambda: origin.requests and origin.requests[0].body == b"first-part", "first part at origin")
    assert not origin.requests[0].complete
    client.send(b"0123456789")
    [resp] = yield client.until_responses([b"POST"])
    assert resp.status == 200
    assert resp.body == b"POST /up\nfirst-part0123456789"


@inline
def test_request_body_streams_to_origin_chunked(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"POST", b"/up", headers=[(b"Transfer-Encoding", b"chunked")]) + chunk(b"hello "))
    yield until(lambda: origin.requests and origin.requests[0].body == b"hello ", "first chunk at origin")
    got = origin.requests[0]
    assert not got.complete
    assert got.one(b"transfer-encoding") == b"chunked"
    assert got.one(b"content-length") is None
    client.send(chunk(b"world") + b"0\r\n\r\n")
    [resp] = yield client.until_responses([b"POST"])
    assert resp.status == 200
    assert resp.body == b"POST /up\nhello world"
    assert got.complete


@inline
def test_response_body_streams_to_client_before_origin_finishes(net):
    held = []
    origin = yield net.origin(lambda req: (req.write(response(200, headers=[(b"Transfer-Encoding", b"chunked")],
                                                              length=False) + chunk(b"first")), held.append(req)))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    # The origin has not finished: the client must already see the first chunk.
    yield client.until_contains(b"first")
    [resp] = client.responses([b"GET"])
    assert resp.status == 200 and not resp.complete
    held[0].write(chunk(b"second") + b"0\r\n\r\n")
    [resp] = yield client.until_responses([b"GET"])
    assert resp.body == b"firstsecond"


@inline
def test_response_body_with_content_length_streams(net):
    held = []
    origin = yield net.origin(lambda req: (req.write(response(200, length=False, headers=[(b"Content-Length", b"10")])
                                                     + b"12345"), held.append(req)))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    yield client.until_contains(b"12345")
    held[0].write(b"67890")
    [resp] = yield client.until_responses([b"GET"])
    assert resp.one(b"content-length") == b"10"
    assert resp.body == b"1234567890"


# ---------------------------------------------------------------------------
# Backpressure


BIG = 64 * 1024 * 1024


@inline
def test_slow_client_pauses_reading_from_origin(net):
    """
    A client that reads nothing: the origin's writes stop far short of the
    body (its transport pauses it), then the client reads every byte.
    """
    floods = []

    def handler(req):
        req.write(response(200, length=False, headers=[(b"Content-Length", b"%d" % BIG)]))
        flood = FloodProducer(req.conn.transport, BIG)
        floods.append(flood)
        flood.start()

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.transport.pauseProducing()  # the client reads nothing
    client.send(request())
    yield origin.until_requests(1)
    flood = yield until(lambda: floods and floods[0].paused and floods[0].written > 0 and floods[0], "origin paused")
    # A proxy without backpressure would keep draining the origin: give it
    # many rounds to do so; the origin must stay paused well short of the end.
    for _ in range(5):
        yield turns(20)
        assert not flood.finished, "the origin wrote the whole body to a client that reads nothing"
    assert flood.written < BIG // 2
    stalled_at = flood.written
    client.transport.resumeProducing()
    yield until(lambda: len(client.buf) >= BIG, "client to read the whole body", timeout=60)
    assert flood.written == BIG and flood.written > stalled_at
    [resp] = client.responses([b"GET"])
    assert resp.complete and len(resp.body) == BIG


@inline
def test_slow_origin_pauses_reading_from_client_upload(net):
    """An origin that reads nothing: the client's upload is paused well short of the end."""
    origin = yield net.origin(lambda req: req.respond(200, b"%d" % len(req.body)),
                              on_head=lambda req: req.conn.transport.pauseProducing())
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"POST", b"/up", headers=[(b"Content-Length", b"%d" % BIG)]))
    flood = FloodProducer(client.transport, BIG)
    flood.start()
    yield until(lambda: flood.paused and flood.written > 0, "client upload paused")
    for _ in range(5):
        yield turns(20)
        assert not flood.finished, "the client wrote the whole upload to an origin that reads nothing"
    assert flood.written < BIG // 2
    for conn in origin.connections:
        conn.transport.resumeProducing()
    yield until(lambda: origin.requests and origin.requests[0].complete, "origin to receive the whole upload",
                timeout=60)
    assert len(origin.requests[0].body) == BIG
    [resp] = yield client.until_responses([b"POST"])
    assert resp.status == 200
    assert resp.body == b"%d" % BIG


# ---------------------------------------------------------------------------
# Connections


@inline
def test_origin_connection_is_reused_across_requests_and_clients(net):
    site = yield net.web_origin(Echo())
    proxy = yield net.proxy(proxy_config(site.backend))
    for i in range(3):
        client = yield net.client(proxy.port)
        client.send(request(target=b"/c%d" % i) + request(target=b"/c%d/again" % i))
        [a, b] = yield client.until_responses([b"GET", b"GET"])
        assert a.body.startswith(b"GET /c%d " % i)
        assert b.body.startswith(b"GET /c%d/again " % i)
    assert site.connections == 1


@inline
def test_origin_never_receives_connection_close(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(headers=[(b"Connection", b"close")]))
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert resp.status == 200
    assert b"close" in resp.one(b"connection").lower()
    [got] = origin.requests
    assert got.header(b"connection") == []


@inline
def test_pipelined_requests_answered_in_order(net):
    def handler(req):
        req.respond(200, b"answer to " + req.target + b" body=" + req.body)

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(
        request(target=b"/one")
        + request(b"POST", b"/two", body=b"payload")
        + request(b"HEAD", b"/three")
        + request(target=b"/four")
    )
    resps = yield client.until_responses([b"GET", b"POST", b"HEAD", b"GET"])
    assert [r.status for r in resps] == [200, 200, 200, 200]
    assert resps[0].body == b"answer to /one body="
    assert resps[1].body == b"answer to /two body=payload"
    assert resps[2].body == b""
    assert resps[2].one(b"content-length") == b"%d" % len(b"answer to /three body=")
    assert resps[3].body == b"answer to /four body="
    assert [r.target for r in origin.requests] == [b"/one", b"/two", b"/three", b"/four"]
    assert not client.closed


@inline
def test_pipelined_requests_keep_order_when_first_answer_is_slow(net):
    held = []

    def handler(req):
        if req.target == b"/slow":
            held.append(req)
        else:
            req.respond(200, req.target)

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/slow") + request(target=b"/fast"))
    yield until(lambda: held, "slow request at origin")
    yield turns(10)
    assert client.buf == b"", "an answer arrived before the first request was answered"
    held[0].respond(200, b"/slow")
    resps = yield client.until_responses([b"GET", b"GET"])
    assert [r.body for r in resps] == [b"/slow", b"/fast"]


@inline
def test_http10_client_gets_answer_and_close(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/old", host=None, version=b"HTTP/1.0"))
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert resp.status == 200
    assert resp.body == b"GET /old\n"
    assert resp.header(b"transfer-encoding") == []


@inline
def test_http10_request_without_host_reaches_origin_with_a_host(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/old", host=None, version=b"HTTP/1.0"))
    yield client.until_closed()
    [got] = origin.requests
    assert got.version == "1.1"
    assert len(got.header(b"host")) == 1 and got.one(b"host")


@inline
def test_many_pipelined_requests_with_bodies_answered_in_order(net):
    origin = yield net.origin(lambda req: req.respond(200, req.target + b":" + req.body))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    methods = []
    data = b""
    for i in range(50):
        if i % 3 == 0:
            data += request(b"POST", b"/%d" % i, body=b"body%d" % i)
            methods.append(b"POST")
        else:
            data += request(target=b"/%d" % i)
            methods.append(b"GET")
    client.send(data)
    resps = yield client.until_responses(methods)
    for i, resp in enumerate(resps):
        assert resp.status == 200
        assert resp.body == b"/%d:%s" % (i, b"body%d" % i if i % 3 == 0 else b"")
    assert len(origin.connections) == 1


@inline
def test_request_after_connection_close_is_not_answered(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/last", headers=[(b"Connection", b"close")]) + request(target=b"/ignored"))
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert resp.body == b"GET /last\n"
    assert b"/ignored" not in client.buf
    assert [r.target for r in origin.requests] == [b"/last"]


@pytest.mark.parametrize("closing", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
], ids=["connection-close", "http10-origin"])
@inline
def test_origin_connection_not_reused_when_origin_says_close(net, closing):
    def handler(req):
        req.write(closing)
        # Then the origin closes: the proxy must open a new connection for the next request.
        req.conn.transport.loseConnection()

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    for i in range(3):
        client.send(request(target=b"/%d" % i))
        resps = yield client.until_responses([b"GET"] * (i + 1))
        assert resps[-1].status == 200 and resps[-1].body == b"ok"
        # Connection: close concerned the origin hop only.
        assert resps[-1].header(b"connection") == []
    assert not client.closed
    assert len(origin.connections) == 3
    assert all(len(c.requests) == 1 for c in origin.connections)


@inline
def test_empty_post_and_get_with_body(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"POST", b"/empty", body=b"") + request(b"GET", b"/withbody", body=b"odd but legal"))
    empty, withbody = yield client.until_responses([b"POST", b"GET"])
    assert empty.body == b"POST /empty\n"
    assert withbody.body == b"GET /withbody\nodd but legal"
    assert origin.requests[0].one(b"content-length") == b"0"
    assert origin.requests[1].one(b"content-length") == b"13"


# ---------------------------------------------------------------------------
# Access log


@pytest.mark.parametrize("fmt", ["combined", "json"])
@inline
def test_access_log_line_per_request(net, tmp_path, fmt):
    import json
    import re

    log = tmp_path / "access.log"
    origin = yield net.origin(lambda req: req.respond(201, b"12345"))
    proxy = yield net.proxy(proxy_config(origin.backend, server={"access_log": str(log), "access_log_format": fmt}))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/logged?q=1", headers=[(b"User-Agent", b"tester/1.0"),
                                                        (b"Referer", b"http://ref.example/")]))
    yield client.until_responses([b"GET"])
    yield until(lambda: log.exists() and log.read_text().endswith("\n"), "access log line")
    [line] = log.read_text().splitlines()
    if fmt == "combined":
        assert re.fullmatch(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
                            r'"GET /logged\?q=1 HTTP/1\.1" 201 5 "http://ref\.example/" "tester/1\.0"', line), line
    else:
        entry = json.loads(line)
        assert entry["client"] == "127.0.0.1"
        assert entry["method"] == "GET" and entry["uri"] == "/logged?q=1"
        assert entry["status"] == 201 and entry["bytes"] == 5
        assert entry["user_agent"] == "tester/1.0"
