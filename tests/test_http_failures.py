"""
Integration tests of failures: dead, slow, broken and truncating origins,
clients that go away, and the limits that refuse bad requests.  Every
answer the proxy makes itself is short plain text with no traceback.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from .conftest import chunk, free_port, proxy_config, request, response, until

inline = pytest_twisted.inlineCallbacks


def assert_plain_error(resp, status, no_traceback):
    assert resp.status == status
    assert resp.one(b"content-type").startswith(b"text/plain")
    assert 0 < len(resp.body) < 200
    no_traceback(resp.body)


# ---------------------------------------------------------------------------
# Origins that fail


@inline
def test_dead_origin_gives_502(net, no_traceback):
    proxy = yield net.proxy(proxy_config(f"tcp:127.0.0.1:{free_port()}"))
    client = yield net.client(proxy.port)
    client.send(request() + request(target=b"/again"))
    first, second = yield client.until_responses([b"GET", b"GET"])
    assert_plain_error(first, 502, no_traceback)
    # The client connection survives an origin failure.
    assert_plain_error(second, 502, no_traceback)


@inline
def test_dead_backend_fails_over_to_live_one(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(f"tcp:127.0.0.1:{free_port()}", origin.backend))
    for i in range(4):
        client = yield net.client(proxy.port)
        client.send(request(target=b"/%d" % i))
        [resp] = yield client.until_responses([b"GET"])
        assert resp.status == 200, resp
        assert resp.body == b"GET /%d\n" % i


@inline
def test_slow_origin_gives_504(net, no_traceback):
    origin = yield net.origin(lambda req: None)  # never answers
    proxy = yield net.proxy(proxy_config(origin.backend, pool={"response_timeout": 0.5}))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert_plain_error(resp, 504, no_traceback)
    # The stuck origin connection is not kept: the origin sees it closed.
    yield until(lambda: origin.connections[0].closed, "stuck origin connection closed")


@inline
def test_origin_that_stalls_mid_body_is_cut(net):
    origin = yield net.origin(lambda req: req.write(response(200, length=False,
                                                             headers=[(b"Content-Length", b"100")]) + b"partial"))
    proxy = yield net.proxy(proxy_config(origin.backend, pool={"idle_timeout": 0.5}))
    client = yield net.client(proxy.port)
    client.send(request())
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert resp.status == 200 and not resp.complete
    assert resp.body == b"partial"


MALFORMED = {
    "garbage status line": b"SPDY/9 fine thanks\r\n\r\n",
    "non-numeric status": b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
    "two content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "bad content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\nBroken header line\r\nContent-Length: 0\r\n\r\n",
    "closed before answering": b"",
    "closed mid-head": b"HTTP/1.1 200 OK\r\nContent-Len",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
@inline
def test_malformed_origin_response_gives_502(net, no_traceback, raw):
    def handler(req):
        req.write(raw)
        req.conn.transport.loseConnection()

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert_plain_error(resp, 502, no_traceback)
    assert b"SPDY" not in client.buf and b"Broken" not in client.buf


MALFORMED_BODY = {
    "bad chunk size": b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk longer than its size": b"3\r\nabcdef\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED_BODY.values(), ids=MALFORMED_BODY.keys())
@inline
def test_malformed_origin_body_gives_502_or_cut_response(net, no_traceback, raw):
    def handler(req):
        req.write(response(200, length=False, headers=[(b"Transfer-Encoding", b"chunked")]) + raw)

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    yield until(lambda: client.closed or (client.responses([b"GET"]) and client.responses([b"GET"])[0].complete),
                "a complete response or a closed connection")
    [resp] = client.responses([b"GET"])
    if resp.status == 502:
        assert_plain_error(resp, 502, no_traceback)
    else:
        # Too late for a status: the client must see the response cut short.
        assert resp.status == 200
        assert client.closed and not resp.complete
    yield until(lambda: origin.connections[0].closed, "broken origin connection closed")


@inline
def test_origin_response_with_length_and_chunked_is_not_smuggled(net, no_traceback):
    """A response with both framings: 502, or the chunked framing wins and no Content-Length reaches the client."""
    def handler(req):
        req.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunk(b"hello world") + b"0\r\n\r\n")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    yield until(lambda: client.closed or (client.responses([b"GET"]) and client.responses([b"GET"])[0].complete),
                "a complete response or a closed connection")
    [resp] = client.responses([b"GET"])
    if resp.status == 502:
        assert_plain_error(resp, 502, no_traceback)
    else:
        assert resp.header(b"content-length") == []
        assert resp.body == b"hello world"


@inline
def test_origin_closing_mid_body_truncates_client_response(net):
    origin = yield net.origin(lambda req: (req.write(response(200, length=False, headers=[(b"Content-Length", b"100")])
                                                     + b"only-part"), req.conn.transport.loseConnection()))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    # The client sees the promised length and a connection cut short: a truncation, not a clean end.
    assert resp.status == 200
    assert resp.one(b"content-length") == b"100"
    assert resp.body == b"only-part"
    assert not resp.complete


@inline
def test_origin_closing_mid_chunked_body_truncates_client_response(net):
    origin = yield net.origin(lambda req: (req.write(response(200, length=False,
                                                              headers=[(b"Transfer-Encoding", b"chunked")])
                                                     + chunk(b"only-part")), req.conn.transport.loseConnection()))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert resp.status == 200 and resp.chunked
    assert resp.body == b"only-part"
    assert not resp.complete, "the client saw a terminating chunk for a cut response"
    assert not client.buf.endswith(b"0\r\n\r\n")


@inline
def test_client_disconnect_mid_response_closes_origin_connection(net):
    def handler(req):
        req.write(response(200, length=False, headers=[(b"Content-Length", b"1000000")]) + b"x" * 1000)

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    yield client.until_contains(b"x" * 1000)
    client.abort()
    yield until(lambda: origin.connections[0].closed, "origin connection closed after the client left")
    # The proxy keeps serving: the next client gets a new origin connection.
    client2 = yield net.client(proxy.port)
    client2.send(request(b"HEAD"))
    [resp] = yield client2.until_responses([b"HEAD"])
    assert resp.status == 200
    assert len(origin.connections) == 2


@inline
def test_client_disconnect_before_response_closes_origin_connection(net):
    origin = yield net.origin(lambda req: None)  # never answers
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    yield origin.until_requests(1)
    client.abort()
    yield until(lambda: origin.connections[0].closed, "origin connection closed after the client left")


@inline
def test_client_disconnect_mid_upload_closes_origin_connection(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"POST", headers=[(b"Content-Length", b"1000")]) + b"some")
    yield until(lambda: origin.requests and origin.requests[0].body == b"some", "partial upload at origin")
    client.abort()
    yield until(lambda: origin.connections[0].closed, "origin connection closed after the client left")
    assert not origin.requests[0].complete


@inline
def test_origin_closing_kept_alive_connection_is_retried_transparently(net):
    """An idle pooled connection the origin closed must not turn into a 502."""
    def handler(req):
        req.respond(200, req.target)
        if req.target == b"/first":
            # Close right after answering, without saying so.
            req.conn.transport.loseConnection()

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/first"))
    yield client.until_responses([b"GET"])
    yield until(lambda: origin.connections[0].closed, "origin closed the first connection")
    client.send(request(target=b"/second"))
    first, second = yield client.until_responses([b"GET", b"GET"])
    assert second.status == 200 and second.body == b"/second"


# ---------------------------------------------------------------------------
# Limits and bad requests


@pytest.fixture
def limited(net):
    @inline
    def start(**limits):
        origin = yield net.origin()
        proxy = yield net.proxy(proxy_config(origin.backend, limits=limits))
        client = yield net.client(proxy.port)
        return origin, client

    return start


@inline
def test_long_uri_gives_414(limited, no_traceback):
    origin, client = yield limited(max_request_line=1024)
    client.send(request(target=b"/" + b"a" * 2000))
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert_plain_error(resp, 414, no_traceback)
    assert origin.requests == []


@inline
def test_uri_just_under_the_limit_is_served(limited):
    origin, client = yield limited(max_request_line=1024)
    client.send(request(target=b"/" + b"a" * 900))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200


@inline
def test_too_many_headers_gives_431(limited, no_traceback):
    origin, client = yield limited(max_headers=10)
    client.send(request(headers=[(b"X-H%d" % i, b"v") for i in range(20)]))
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert_plain_error(resp, 431, no_traceback)
    assert origin.requests == []


@inline
def test_too_big_header_gives_431(limited, no_traceback):
    origin, client = yield limited(max_header_bytes=1024)
    client.send(request(headers=[(b"Cookie", b"c" * 4000)]))
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert_plain_error(resp, 431, no_traceback)
    assert origin.requests == []


@inline
def test_content_length_over_limit_gives_413(limited, no_traceback):
    origin, client = yield limited(max_body_bytes=1000)
    client.send(request(b"POST", headers=[(b"Content-Length", b"5000")]) + b"x" * 100)
    yield client.until_closed()
    [resp] = client.responses([b"POST"])
    assert_plain_error(resp, 413, no_traceback)
    assert origin.requests == []


@inline
def test_chunked_body_over_limit_gives_413_or_cut(limited, no_traceback):
    origin, client = yield limited(max_body_bytes=1000)
    client.send(request(b"POST", headers=[(b"Transfer-Encoding", b"chunked")]) + chunk(b"x" * 600) + chunk(b"y" * 600))
    yield client.until_closed()
    # The origin never gets a complete request of more than the limit.
    assert all(not r.complete for r in origin.requests)
    rs = client.responses([b"POST"])
    if rs:
        assert_plain_error(rs[0], 413, no_traceback)


BAD_REQUESTS = {
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, (400, 501)),
    "no http version": (b"GET /\r\n\r\n", (400, 505)),
    "bad content-length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12abc\r\n\r\n", (400,)),
    "two content-lengths": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", (400,)),
    "content-length and chunked": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", (400,)),
    "chunked not last": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", (400, 501)),
    "bad chunk size": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", (400,)),
    "missing host": (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", (400,)),
    "two hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", (400,)),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", (400,)),
    "bare LF in header": (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\nX-B: c\r\n\r\n", (400,)),
    "unknown method": (b"BREW /pot HTTP/1.1\r\nHost: a\r\n\r\n", (400, 501)),
}


@pytest.mark.parametrize("raw,statuses", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
@inline
def test_bad_request_refused_and_never_reaches_origin(limited, no_traceback, raw, statuses):
    origin, client = yield limited()
    client.send(raw)
    yield client.until_closed()
    [resp] = client.responses([b"POST"])
    assert resp.status in statuses, resp
    assert_plain_error(resp, resp.status, no_traceback)
    assert [r for r in origin.requests if r.complete] == []


@inline
def test_unknown_transfer_coding_is_refused_or_kept(limited):
    origin, client = yield limited()
    client.send(b"POST /gz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                + chunk(b"\x1f\x8b not really gzip") + b"0\r\n\r\n")
    yield until(lambda: client.closed or client.responses([b"POST"]), "an answer")
    [resp] = client.responses([b"POST"])
    if resp.status != 501:
        [got] = origin.requests
        assert got.header(b"transfer-encoding") == [b"gzip, chunked"]


@inline
def test_requests_before_a_bad_one_are_answered_in_order(limited):
    origin, client = yield limited()
    client.send(request(target=b"/good") + b"GET / HTTP/1.1\r\nHost : a\r\n\r\n")
    yield client.until_closed()
    good, bad = client.responses([b"GET", b"GET"])
    assert good.status == 200 and good.body == b"GET /good\n"
    assert bad.status == 400


@inline
def test_connect_method_refused(limited, no_traceback):
    origin, client = yield limited()
    client.send(b"CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n")
    yield client.until_closed()
    [resp] = client.responses([b"CONNECT"])
    assert resp.status in (400, 405, 501)
    no_traceback(resp.body)
    assert origin.requests == []


@inline
def test_origin_response_with_unknown_final_transfer_coding_is_read_until_close(net):
    """RFC 9112 6.3: Transfer-Encoding whose final coding is not chunked means the body ends at the close."""
    origin = yield net.origin(lambda req: (req.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: x-custom\r\n\r\n"
                                                     + b"body-until-close"), req.conn.transport.loseConnection()))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    yield until(lambda: client.closed or (client.responses([b"GET"]) and client.responses([b"GET"])[0].complete),
                "a complete response or a closed connection")
    [resp] = client.responses([b"GET"])
    assert resp.status == 200
    assert resp.body == b"body-until-close"
    assert resp.complete, "a clean close ended the origin's body: the client must see a complete response"
    assert b"x-custom" not in resp.header(b"transfer-encoding")
