"""
Integration tests of what the proxy does to messages: hop-by-hop headers,
repeated headers, forwarding headers, masking of the origin, and framing
(HEAD, 1xx, 204, 304, chunked with trailers, close-delimited, upgrades).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import inlineCallbacks
from twisted.web.resource import Resource

from .conftest import chunk, proxy_config, request, response, until

inline = pytest_twisted.inlineCallbacks


# ---------------------------------------------------------------------------
# Hop-by-hop headers


@inline
def test_hop_by_hop_request_headers_not_forwarded(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(headers=[
        (b"Connection", b"keep-alive, X-Private-Hop"),
        (b"Connection", b"X-Second-Hop"),
        (b"X-Private-Hop", b"secret"),
        (b"X-Second-Hop", b"secret2"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Checksum"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic Zm9vOmJhcg=="),
        (b"Proxy-Connection", b"keep-alive"),
        (b"X-End-To-End", b"kept"),
    ]))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200
    [got] = origin.requests
    for name in (b"x-private-hop", b"x-second-hop", b"keep-alive", b"te", b"trailer", b"upgrade",
                 b"proxy-authorization", b"proxy-connection", b"connection"):
        assert name not in got.names(), f"{name!r} forwarded to the origin"
    assert got.one(b"x-end-to-end") == b"kept"


@inline
def test_hop_by_hop_response_headers_not_relayed(net):
    def handler(req):
        req.respond(200, b"ok", [
            (b"Connection", b"X-Origin-Hop"),
            (b"X-Origin-Hop", b"internal"),
            (b"Keep-Alive", b"timeout=5, max=100"),
            (b"Proxy-Authenticate", b"Basic realm=x"),
            (b"Upgrade", b"h2c"),
            (b"Trailer", b"X-Checksum"),
            (b"X-End-To-End", b"kept"),
        ])

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200 and resp.body == b"ok"
    for name in (b"x-origin-hop", b"keep-alive", b"proxy-authenticate", b"upgrade", b"trailer"):
        assert name not in resp.names(), f"{name!r} relayed to the client"
    assert [v.lower() for v in resp.header(b"connection")] in ([], [b"keep-alive"])
    assert resp.one(b"x-end-to-end") == b"kept"


# ---------------------------------------------------------------------------
# Repeated headers


@inline
def test_repeated_request_headers_keep_every_value_in_order(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(headers=[
        (b"X-Foo", b"first"),
        (b"Cookie", b"a=1"),
        (b"X-Foo", b"second"),
        (b"Cookie", b"b=2"),
        (b"X-Foo", b"third, fourth"),
    ]))
    yield client.until_responses([b"GET"])
    [got] = origin.requests
    assert got.header(b"x-foo") == [b"first", b"second", b"third, fourth"]
    assert got.header(b"cookie") == [b"a=1", b"b=2"]


@inline
def test_repeated_response_headers_keep_every_value_in_order(net):
    def handler(req):
        req.respond(200, b"ok", [
            (b"Set-Cookie", b"a=1; Path=/"),
            (b"X-Foo", b"first"),
            (b"Set-Cookie", b"b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
            (b"X-Foo", b"second"),
            (b"Cache-Control", b"no-store"),
            (b"Cache-Control", b"private"),
        ])

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert resp.header(b"set-cookie") == [b"a=1; Path=/", b"b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT"]
    assert resp.header(b"x-foo") == [b"first", b"second"]
    assert resp.header(b"cache-control") == [b"no-store", b"private"]


# ---------------------------------------------------------------------------
# Forwarding headers, Via, masking


FORGED = [
    (b"X-Forwarded-For", b"203.0.113.7"),
    (b"X-Forwarded-Proto", b"https"),
    (b"X-Forwarded-Host", b"forged.example"),
    (b"Forwarded", b"for=203.0.113.7;proto=https"),
]


@inline
def test_forwarding_headers_set_and_forged_ones_dropped_from_untrusted_peer(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(host=b"shop.example.com", headers=FORGED))
    yield client.until_responses([b"GET"])
    [got] = origin.requests
    assert got.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert got.header(b"x-forwarded-proto") == [b"http"]
    assert got.header(b"x-forwarded-host") == [b"shop.example.com"]
    assert got.header(b"forwarded") == [b"for=127.0.0.1;proto=http;host=shop.example.com"]
    assert b"203.0.113.7" not in bytes(got.conn.received)


@inline
def test_forwarding_headers_extended_from_trusted_peer(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend, server={"trusted_proxies": ["127.0.0.1/32"]}))
    client = yield net.client(proxy.port)
    client.send(request(host=b"shop.example.com", headers=FORGED))
    yield client.until_responses([b"GET"])
    [got] = origin.requests
    assert got.header(b"x-forwarded-for") == [b"203.0.113.7, 127.0.0.1"]
    assert got.header(b"x-forwarded-proto") == [b"https"]
    assert got.header(b"x-forwarded-host") == [b"forged.example"]
    assert got.header(b"forwarded") == [b"for=203.0.113.7;proto=https, for=127.0.0.1;proto=http;host=shop.example.com"]


@inline
def test_forwarded_host_with_port_is_quoted(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(host=b"shop.example.com:8080"))
    yield client.until_responses([b"GET"])
    [got] = origin.requests
    assert got.header(b"forwarded") == [b'for=127.0.0.1;proto=http;host="shop.example.com:8080"']


@inline
def test_via_added_both_ways_and_existing_via_extended(net):
    origin = yield net.origin(lambda req: req.respond(200, b"ok", [(b"Via", b"1.1 cdn-edge")]))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(headers=[(b"Via", b"1.0 corporate")]))
    [resp] = yield client.until_responses([b"GET"])
    [got] = origin.requests
    assert got.header(b"via") == [b"1.0 corporate, 1.1 rproxy"]
    assert resp.header(b"via") == [b"1.1 cdn-edge, 1.1 rproxy"]


@inline
def test_origin_software_is_masked(net):
    def handler(req):
        req.respond(200, b"ok", [
            (b"Server", b"Apache/2.4.41 (Ubuntu)"),
            (b"X-Powered-By", b"PHP/7.4.3"),
            (b"X-AspNet-Version", b"4.0.30319"),
        ])

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert resp.header(b"server") == [b"rproxy"]
    assert resp.header(b"x-powered-by") == []
    assert resp.header(b"x-aspnet-version") == []
    assert b"Apache" not in client.buf and b"PHP" not in client.buf


@inline
def test_server_header_can_be_removed(net):
    origin = yield net.origin(lambda req: req.respond(200, b"ok", [(b"Server", b"nginx/1.18")]))
    proxy = yield net.proxy(proxy_config(origin.backend, server={"server_header": ""}))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert resp.header(b"server") == []


# ---------------------------------------------------------------------------
# Framing


@inline
def test_head_response_has_length_but_no_body(net):
    def handler(req):
        if req.method == b"HEAD":
            req.write(response(200, length=False, headers=[(b"Content-Length", b"1000")]))
        else:
            req.respond(200, b"after")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"HEAD", b"/h") + request(target=b"/next"))
    head, nxt = yield client.until_responses([b"HEAD", b"GET"])
    assert head.status == 200
    assert head.one(b"content-length") == b"1000"
    assert head.body == b""
    assert nxt.body == b"after"


@inline
def test_head_response_to_chunked_resource(net):
    def handler(req):
        if req.method == b"HEAD":
            req.write(response(200, length=False, headers=[(b"Transfer-Encoding", b"chunked")]))
        else:
            req.respond(200, b"after")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"HEAD", b"/h") + request(target=b"/next"))
    head, nxt = yield client.until_responses([b"HEAD", b"GET"])
    assert head.status == 200 and head.body == b""
    assert nxt.body == b"after"
    # The origin connection is still usable for the second request.
    assert len(origin.connections) == 1


@pytest.mark.parametrize("status", [204, 304])
@inline
def test_no_body_statuses_framed_and_connection_reused(net, status):
    def handler(req):
        if req.target == b"/empty":
            req.write(response(status, length=False, reason=b"Whatever", headers=[(b"ETag", b'"v1"')]))
        else:
            req.respond(200, b"after")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/empty") + request(target=b"/next"))
    empty, nxt = yield client.until_responses([b"GET", b"GET"])
    assert empty.status == status
    assert empty.one(b"etag") == b'"v1"'
    assert empty.header(b"transfer-encoding") == []
    if status == 204:
        assert empty.header(b"content-length") == []
    assert nxt.status == 200 and nxt.body == b"after"
    assert len(origin.connections) == 1


@inline
def test_304_with_representation_length_has_no_body(net):
    def handler(req):
        if req.target == b"/cached":
            req.write(response(304, length=False, reason=b"Not Modified", headers=[(b"Content-Length", b"5000")]))
        else:
            req.respond(200, b"after")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/cached", headers=[(b"If-None-Match", b'"v1"')]) + request(target=b"/next"))
    cached, nxt = yield client.until_responses([b"GET", b"GET"])
    assert cached.status == 304 and cached.body == b""
    assert nxt.body == b"after"


@inline
def test_expect_100_continue_relayed(net):
    def on_head(req):
        if req.one(b"expect") == b"100-continue":
            req.conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    origin = yield net.origin(lambda req: req.respond(201, b"got " + req.body), on_head=on_head)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"PUT", b"/file", headers=[(b"Expect", b"100-continue"), (b"Content-Length", b"7")]))
    # The client sends its body only after the 100 arrives.
    yield client.until_contains(b"100 Continue\r\n\r\n")
    assert client.buf.startswith(b"HTTP/1.1 100 Continue\r\n")
    assert origin.requests[0].body == b""
    client.send(b"payload")
    [resp] = yield client.until_responses([b"PUT"])
    assert resp.interim == [(100, [])]
    assert resp.status == 201 and resp.body == b"got payload"


@inline
def test_103_early_hints_relayed_before_final_response(net):
    def handler(req):
        req.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        req.respond(200, b"page")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert resp.interim == [(103, [(b"Link", b"</style.css>; rel=preload")])]
    assert resp.status == 200 and resp.body == b"page"


@inline
def test_chunked_response_with_trailers_relayed(net):
    def handler(req):
        req.write(response(200, length=False, headers=[(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-Checksum")])
                  + chunk(b"hello ") + chunk(b"world") + b"0\r\nX-Checksum: abc123\r\n\r\n")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(headers=[(b"TE", b"trailers")]) + request(target=b"/next"))
    first, nxt = yield client.until_responses([b"GET", b"GET"])
    assert first.chunked
    assert first.body == b"hello world"
    assert first.trailers == [(b"X-Checksum", b"abc123")]
    assert nxt.complete


@inline
def test_close_delimited_response_to_http11_client_is_chunked(net):
    def handler(req):
        req.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello, ")
        req.write(b"close-delimited world")
        req.conn.transport.loseConnection()

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200
    assert resp.chunked
    assert resp.body == b"hello, close-delimited world"
    # The client connection stays open for the next request.
    client.send(request(target=b"/again"))
    yield client.until_responses([b"GET", b"GET"])
    assert not client.closed


@inline
def test_close_delimited_response_to_http10_client_ends_with_close(net):
    def handler(req):
        req.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nold ")
        req.write(b"client body")
        req.conn.transport.loseConnection()

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(host=b"example.com", version=b"HTTP/1.0"))
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert resp.status == 200
    assert resp.header(b"transfer-encoding") == []
    assert resp.body == b"old client body"


@inline
def test_chunked_response_to_http10_client_is_unchunked(net):
    def handler(req):
        req.write(response(200, length=False, headers=[(b"Transfer-Encoding", b"chunked")])
                  + chunk(b"abc") + chunk(b"def") + b"0\r\n\r\n")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(version=b"HTTP/1.0"))
    yield client.until_closed()
    [resp] = client.responses([b"GET"])
    assert resp.header(b"transfer-encoding") == []
    assert resp.body == b"abcdef"


@inline
def test_http10_keep_alive_client_keeps_connection(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/1", version=b"HTTP/1.0", headers=[(b"Connection", b"keep-alive")]))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.body == b"GET /1\n"
    assert [v.lower() for v in resp.header(b"connection")] == [b"keep-alive"]
    client.send(request(target=b"/2", version=b"HTTP/1.0", headers=[(b"Connection", b"keep-alive")]))
    resps = yield client.until_responses([b"GET", b"GET"])
    assert resps[1].body == b"GET /2\n"


# ---------------------------------------------------------------------------
# Upgrades


def _ws_origin_handler(req):
    if req.one(b"upgrade") == b"websocket":
        req.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello-from-origin")
        req.conn.echo = True
    else:
        req.respond(200, b"plain")


WS_REQUEST = request(target=b"/ws", headers=[
    (b"Connection", b"Upgrade"),
    (b"Upgrade", b"websocket"),
    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"Sec-WebSocket-Version", b"13"),
])




def _hello_or_origin_closed(client, origin):
    return until(lambda: b"hello-from-origin" in client.buf or (origin.connections and origin.connections[0].closed),
                 "origin's first tunnel bytes at the client")


@inlineCallbacks
def _open_tunnel(net):
    """An origin that tunnels, the proxy in front of it, and a client through both, past the 101."""
    origin = yield net.origin(_ws_origin_handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(WS_REQUEST)
    yield _hello_or_origin_closed(client, origin)
    assert b"hello-from-origin" in client.buf
    return origin, client


@inline
def test_websocket_upgrade_tunnelled_both_ways(net):
    # Bytes the origin sends right behind its 101 reach the client.
    origin, client = yield _open_tunnel(net)
    [resp] = client.responses([b"GET"])
    assert resp.status == 101
    assert resp.one(b"upgrade") == b"websocket"
    assert b"upgrade" in resp.one(b"connection").lower()
    assert resp.one(b"sec-websocket-accept") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    [got] = origin.requests
    assert got.one(b"upgrade") == b"websocket"
    assert b"upgrade" in got.one(b"connection").lower()
    assert got.one(b"sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="
    # Then raw bytes both ways, several times.
    for message in (b"\x81\x05hello", b"GET / HTTP/1.1\r\n\r\n"):
        client.send(message)
        yield client.until_contains(b"echo:" + message)
    # A bulk message (the origin echoes it piece by piece).
    client.send(b"\x00" * 1000000)
    yield until(lambda: client.buf.count(b"\x00") == 1000000, "bulk echo")
    # The client closing closes the origin side.
    client.transport.loseConnection()
    yield until(lambda: origin.connections[0].closed, "origin side of the tunnel to close")


@inline
def test_a_clients_last_tunnel_bytes_reach_the_origin_before_its_side_closes(net):
    """Bytes a client sends with its close go through the tunnel before the origin side closes."""
    origin, client = yield _open_tunnel(net)
    client.transport.write(b"last-words")
    client.transport.loseConnection()
    yield until(lambda: origin.connections[0].closed, "origin side of the tunnel to close")
    assert origin.connections[0].received.endswith(b"last-words")


@inline
def test_the_status_counts_a_listeners_connections_and_open_tunnels(net):
    from rproxy_tw.admin.status import status

    origin = yield net.origin(_ws_origin_handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    plain = yield net.client(proxy.port)
    plain.send(request(target=b"/plain"))
    yield plain.until_responses([b"GET"])
    tunnel = yield net.client(proxy.port)
    tunnel.send(WS_REQUEST)
    yield _hello_or_origin_closed(tunnel, origin)
    [listener] = status(proxy.service, None, None)["listeners"]
    assert (listener["accepted"], listener["rejected"], listener["tunnels"]) == (2, 0, 1)
    assert listener["open_connections"] == 2


@inline
def test_websocket_tunnel_closed_by_origin_closes_client(net):
    origin, client = yield _open_tunnel(net)
    origin.connections[0].transport.write(b"bye")
    origin.connections[0].transport.loseConnection()
    yield client.until_closed()
    assert client.buf.endswith(b"bye")


@inline
def test_bytes_sent_behind_upgrade_request_reach_origin_through_tunnel(net):
    origin = yield net.origin(_ws_origin_handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(WS_REQUEST + b"early-bytes")
    yield until(lambda: b"echo:early-bytes" in client.buf or client.closed, "early bytes echoed")
    [resp] = client.responses([b"GET"])
    assert resp.status == 101
    assert b"echo:early-bytes" in client.buf
    assert b"501" not in client.buf


@inline
def test_upgrade_refused_by_origin_keeps_http(net):
    origin = yield net.origin(lambda req: req.respond(200, b"no upgrade for " + req.target))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(WS_REQUEST + request(target=b"/after"))
    first, second = yield client.until_responses([b"GET", b"GET"])
    assert first.status == 200 and first.body == b"no upgrade for /ws"
    assert second.status == 200 and second.body == b"no upgrade for /after"
    assert [r.target for r in origin.requests] == [b"/ws", b"/after"]


class Got(Resource):
    isLeaf = True

    def render(self, request):
        return b"got " + request.content.read()


@inline
def test_upgrade_request_with_body_refused_by_origin(net):
    # A twisted.web origin: it ignores Upgrade and reads the body by its Content-Length.
    site = yield net.web_origin(Got())
    proxy = yield net.proxy(proxy_config(site.backend, pool={"response_timeout": 1.0}))
    client = yield net.client(proxy.port)
    client.send(request(b"POST", b"/h2c", body=b"abc", headers=[
        (b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c"),
        (b"HTTP2-Settings", b"AAMAAABkAAQCAAAAAAIAAAAA")]))
    yield until(lambda: client.closed or (client.responses([b"POST"]) and client.responses([b"POST"])[0].complete),
                "a complete response or a closed connection")
    [resp] = client.responses([b"POST"])
    assert resp.status == 200
    assert resp.body == b"got abc"


@inline
def test_101_without_upgrade_request_is_502(net, no_traceback):
    origin = yield net.origin(lambda req: req.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                                                    b"Connection: upgrade\r\n\r\n"))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 502
    no_traceback(resp.body)


# ---------------------------------------------------------------------------
# Request targets


@inline
def test_options_asterisk_forwarded_as_asterisk(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"OPTIONS", b"*"))
    [resp] = yield client.until_responses([b"OPTIONS"])
    assert resp.status == 200
    [got] = origin.requests
    assert got.target == b"*"


@inline
def test_websocket_access_log_line_is_written_when_the_tunnel_closes_with_both_sizes(net, tmp_path):
    import json

    log = tmp_path / "access.log"
    origin = yield net.origin(_ws_origin_handler)
    proxy = yield net.proxy(proxy_config(origin.backend, server={"access_log": str(log), "access_log_format": "json"}))
    client = yield net.client(proxy.port)
    client.send(WS_REQUEST)
    yield _hello_or_origin_closed(client, origin)
    yield until(lambda: b"hello-from-origin" in client.buf, "tunnel open")
    assert log.read_text() == "", "the line was written at the 101, before the tunnel carried anything"
    client.send(b"x" * 5000)
    yield until(lambda: client.buf.count(b"x") >= 5000 or client.closed, "echo")
    assert client.buf.count(b"x") >= 5000, client.buf[-300:]
    client.transport.loseConnection()
    yield until(lambda: log.read_text(), "the access log line")
    [line] = [json.loads(x) for x in log.read_text().splitlines()]
    assert line["status"] == 101
    assert line["bytes_received"] == 5000
    assert line["bytes"] >= 5000 + len(b"hello-from-origin")
    assert line["duration"] is not None and line["duration"] >= 0
