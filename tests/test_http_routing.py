"""
Routing through a running proxy: virtual hosts, longest prefix and
strip_prefix decide which origin gets a request and with what path; the
proxy answers 404 and 421 itself.  Some clients here are curl.
"""

from __future__ import annotations

import hashlib

import pytest_twisted
from twisted.web.resource import Resource

from .conftest import curl, proxy_config, request

inline = pytest_twisted.inlineCallbacks


def named(name: bytes):
    """An origin handler that says who it is and what path it got."""
    return lambda req: req.respond(200, name + b" " + req.target)


@inline
def start_routed(net):
    origins = {}
    for name in ("www", "wild", "api", "static", "default"):
        origins[name] = yield net.origin(named(name.encode()))
    routes = [
        {"host": "www.example.com", "path": "/", "pool": "www"},
        {"host": "www.example.com", "path": "/api/", "pool": "api", "strip_prefix": True},
        {"host": "*.example.com", "path": "/", "pool": "wild"},
        {"path": "/static/", "pool": "static"},
        {"path": "/", "pool": "default"},
    ]
    pools = {name: {"backends": [o.backend]} for name, o in origins.items()}
    proxy = yield net.proxy(proxy_config(routes=routes, pools=pools))
    return proxy, origins


@inline
def get(net, proxy, host: bytes, target: bytes):
    client = yield net.client(proxy.port)
    client.send(request(target=target, host=host))
    [resp] = yield client.until_responses([b"GET"])
    client.abort()
    return resp


@inline
def test_virtual_hosts_and_prefixes_pick_the_origin(net):
    proxy, origins = yield start_routed(net)
    cases = [
        (b"www.example.com", b"/index.html", b"www /index.html"),
        (b"WWW.EXAMPLE.COM:8080", b"/", b"www /"),
        (b"www.example.com", b"/api/users?id=7", b"api /users?id=7"),
        (b"www.example.com", b"/api", b"api /"),
        (b"shop.example.com", b"/api/users", b"wild /api/users"),
        (b"deep.shop.example.com", b"/x", b"default /x"),
        (b"other.test", b"/static/app.js", b"static /static/app.js"),
        (b"other.test", b"/anything", b"default /anything"),
    ]
    for host, target, expected in cases:
        resp = yield get(net, proxy, host, target)
        assert (resp.status, resp.body) == (200, expected), (host, target)
    # Each origin got only its own requests.
    assert [r.target for r in origins["api"].requests] == [b"/users?id=7", b"/"]
    assert [r.target for r in origins["www"].requests] == [b"/index.html", b"/"]


@inline
def test_no_route_is_404_and_unknown_host_is_421(net, no_traceback):
    origin = yield net.origin()
    routes = [
        {"host": "www.example.com", "path": "/app/", "pool": "p"},
        {"host": "*.example.org", "path": "/", "pool": "p"},
    ]
    proxy = yield net.proxy(proxy_config(origin.backend, routes=routes))
    resp = yield get(net, proxy, b"www.example.com", b"/other")
    assert resp.status == 404
    no_traceback(resp.body)
    resp = yield get(net, proxy, b"unknown.example.net", b"/app/")
    assert resp.status == 421
    no_traceback(resp.body)
    resp = yield get(net, proxy, b"a.example.org", b"/x")
    assert resp.status == 200
    assert [r.target for r in origin.requests] == [b"/x"]


@inline
def test_404_keeps_the_connection_usable(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend, routes=[{"path": "/app/", "pool": "p"}]))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/nope") + request(target=b"/app/yes"))
    nope, yes = yield client.until_responses([b"GET", b"GET"])
    assert nope.status == 404
    assert yes.status == 200 and yes.body == b"GET /app/yes\n"


@inline
def test_absolute_form_request_target_is_routed_by_path(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend, routes=[{"path": "/app/", "pool": "p", "strip_prefix": True}]))
    client = yield net.client(proxy.port)
    client.send(request(target=b"http://www.example.com/app/x?y=1", host=b"www.example.com"))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200
    assert [r.target for r in origin.requests] == [b"/x?y=1"]


# ---------------------------------------------------------------------------
# With curl


@inline
def test_curl_virtual_host_and_strip_prefix(net):
    proxy, origins = yield start_routed(net)
    out, err, code = yield curl("--resolve", f"www.example.com:{proxy.port}:127.0.0.1",
                                f"http://www.example.com:{proxy.port}/api/v1/items?x=1")
    assert code == 0, err
    assert out == b"api /v1/items?x=1"
    [got] = origins["api"].requests
    assert got.one(b"host") == b"www.example.com:%d" % proxy.port
    assert got.one(b"x-forwarded-for") == b"127.0.0.1"


class Digest(Resource):
    """Answers with the length and SHA-256 of the request body."""

    isLeaf = True

    def render(self, request):
        body = request.content.read()
        return b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())


@inline
def test_curl_large_upload_with_expect_100_continue(net, tmp_path):
    site = yield net.web_origin(Digest())
    proxy = yield net.proxy(proxy_config(site.backend))
    payload = bytes(range(256)) * (4 * 4096)  # 4 MiB: curl sends Expect: 100-continue
    path = tmp_path / "payload"
    path.write_bytes(payload)
    out, err, code = yield curl("-H", "Expect: 100-continue", "--data-binary", f"@{path}", f"{proxy.url}/upload")
    assert code == 0, err
    assert out == b"%d %s" % (len(payload), hashlib.sha256(payload).hexdigest().encode())


@inline
def test_curl_chunked_upload(net, tmp_path):
    site = yield net.web_origin(Digest())
    proxy = yield net.proxy(proxy_config(site.backend))
    payload = b"0123456789abcdef" * 70000
    path = tmp_path / "payload"
    path.write_bytes(payload)
    out, err, code = yield curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{path}", f"{proxy.url}/up")
    assert code == 0, err
    assert out == b"%d %s" % (len(payload), hashlib.sha256(payload).hexdigest().encode())


@inline
def test_curl_http10_download(net):
    def handler(req):
        req.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(proxy_config(origin.backend))
    out, err, code = yield curl("-0", "-i", f"{proxy.url}/old")
    assert code == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == b"hello world"
    assert b"transfer-encoding" not in head.lower()


@inline
def test_curl_h2c_upgrade_attempt_is_answered_over_http11(net):
    """curl --http2 on plain HTTP asks to upgrade to h2c; an origin that does not switch answers normally."""
    site = yield net.web_origin(Digest())
    proxy = yield net.proxy(proxy_config(site.backend))
    out, err, code = yield curl("--http2", "-i", f"{proxy.url}/h2c", "--next", "--http2", "-i", f"{proxy.url}/again")
    assert code == 0, err
    assert out.count(b"HTTP/1.1 200 OK\r\n") == 2, out
    assert b"101 Switching" not in out
