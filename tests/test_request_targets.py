"""
Request targets, hosts and methods: the pure checks in L{rproxy_tw.http.target},
then what a client and an origin see through a real proxy on 127.0.0.1.

A route must hold what it names: C{/api/../x} is not below C{/api/}, an
absolute-form target names its own host, and nothing a client puts in a
method, target or Host reaches the origin unless it is well formed.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st

from rproxy_tw.http.exchange import RequestRejected
from rproxy_tw.http.target import is_token, normalize_path, parse_target, valid_host

from .conftest import proxy_config, request, response

inline = pytest_twisted.inlineCallbacks


# ---------------------------------------------------------------------------
# normalize_path


@pytest.mark.parametrize(
    "raw, normal",
    [
        (b"/", b"/"),
        (b"/api/x", b"/api/x"),
        (b"/api/../x", b"/x"),
        (b"/api/%2e%2e/x", b"/x"),
        (b"/api/%2E%2e/x", b"/x"),
        (b"/api/.%2e/x", b"/x"),
        (b"/api/./x", b"/api/x"),
        (b"/api/x/..", b"/api/"),
        (b"/api/x/.", b"/api/x/"),
        (b"/api//x", b"/api/x"),
        (b"//api/x", b"/api/x"),
        (b"/api/", b"/api/"),
        (b"/a%2Fb", b"/a%2Fb"),
        (b"/a%2fb", b"/a%2Fb"),
        (b"/a%2F..%2Fb", b"/a%2F..%2Fb"),
        (b"/%7euser/%41", b"/~user/A"),
        (b"/a%20b", b"/a%20b"),
        (b"/a%252e%252e/x", b"/a%252e%252e/x"),
        (b"/a/b/../../c", b"/c"),
        (b"/a...", b"/a..."),
        (b"/.well-known/x", b"/.well-known/x"),
    ],
)
def test_normalize_path(raw: bytes, normal: bytes) -> None:
    assert normalize_path(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [b"/..", b"/../x", b"/a/../../x", b"/%2e%2e/x", b"/./../x", b"/a/..;/b", b"/a/.;x/b", b"/%zz", b"/%2",
     b"/a\\..\\b", b"x", b"", b"/a%00b", b"/a/%00"],
)
def test_normalize_path_refuses(raw: bytes) -> None:
    with pytest.raises(RequestRejected) as e:
        normalize_path(raw)
    assert e.value.status == 400


_piece = st.sampled_from(["a", "b", ".", "..", "%2e", "%2E%2e", "", "%2F", "%7e", "x%20y", "..."])


@settings(derandomize=True, max_examples=500, deadline=None)
@given(st.lists(_piece, min_size=1, max_size=8))
def test_normalized_paths_are_stable_and_have_no_dot_segments(pieces: list[str]) -> None:
    raw = ("/" + "/".join(pieces)).encode()
    try:
        normal = normalize_path(raw)
    except RequestRejected:
        return
    assert normalize_path(normal) == normal
    segments = normal.split(b"/")[1:]
    assert b"." not in segments and b".." not in segments
    assert b"//" not in normal
    assert b"%2e" not in normal.lower().replace(b"%252e", b"")


@settings(derandomize=True, max_examples=500, deadline=None)
@given(st.lists(_piece, min_size=1, max_size=8))
def test_a_path_that_normalises_under_a_prefix_stays_under_it(pieces: list[str]) -> None:
    """What the origin receives is what the route matched: a prefix match can never be walked out of."""
    raw = ("/api/" + "/".join(pieces)).encode()
    try:
        normal = normalize_path(raw)
    except RequestRejected:
        return
    decoded = normal.replace(b"%2F", b"\x00")  # data, not a separator
    depth = 0
    for segment in decoded.split(b"/")[1:]:
        assert segment not in (b"..", b".")
        depth += 1
    assert depth >= 1


# ---------------------------------------------------------------------------
# Hosts, methods, targets


@pytest.mark.parametrize(
    "host", [b"a.test", b"a.test:8080", b"A.Test", b"127.0.0.1", b"127.0.0.1:80", b"[::1]", b"[::1]:8443",
             b"xn--bcher-kva.example", b"a_b.test", b"a.test.", b"a.test:"])
def test_valid_hosts(host: bytes) -> None:
    assert valid_host(host)


@pytest.mark.parametrize(
    "host", [b"", b"a b", b"t/x y", b"t\tx", b"a@b", b"user@a.test", b"a.test:80:80", b"a.test:8o", b"[::1",
             b"[]", b"[::1]x", b"a.test:1234567", b"a.test:99999", b"[::1]:65536", b"a<b", b"a\"b", b"a\\b", b"%zz.test", b"a.test/x"])
def test_invalid_hosts(host: bytes) -> None:
    assert not valid_host(host)


def test_methods_are_tokens() -> None:
    assert is_token(b"GET") and is_token(b"PROPFIND") and is_token(b"M-SEARCH")
    for bad in (b"", b"GET /smuggled/evil", b"G(E)T", b"GET\t", b"G\x00T", b"G@T"):
        assert not is_token(bad)


def test_parse_target_forms() -> None:
    assert parse_target(b"GET", b"/a/../b?x=1#frag") == (b"/b", b"x=1", None)
    assert parse_target(b"GET", b"/a#frag?not-a-query") == (b"/a", b"", None)
    assert parse_target(b"OPTIONS", b"*") == (b"*", b"", None)
    assert parse_target(b"GET", b"http://Other.Example/steal?q") == (b"/steal", b"q", b"Other.Example")
    assert parse_target(b"GET", b"https://[::1]:8443") == (b"/", b"", b"[::1]:8443")
    assert parse_target(b"GET", b"http://a.test?q=1") == (b"/", b"q=1", b"a.test")


@pytest.mark.parametrize(
    "method, target, absolute",
    [(b"GET", b"*", True), (b"GET", b"echo", True), (b"GET", b"/echo HTTP/1.1", True), (b"GET", b"/a\tb", True),
     (b"GET", b"ftp://a.test/x", True), (b"GET", b"http://user@a.test/x", True), (b"GET", b"http://a b/x", True),
     (b"GET", b"http://a.test/x", False), (b"GET", b"", True), (b"GET", b"/a\x7f", True)])
def test_parse_target_refuses(method: bytes, target: bytes, absolute: bool) -> None:
    with pytest.raises(RequestRejected) as e:
        parse_target(method, target, absolute_allowed=absolute)
    assert e.value.status == 400


# ---------------------------------------------------------------------------
# Through a real proxy


def _two_routes(api: str, rest: str, **route: object) -> dict:
    return proxy_config(
        routes=[{"host": "a.test", "path": "/api/", "pool": "api", **route}, {"host": "a.test", "path": "/", "pool": "rest"}],
        pools={"api": {"backends": [api]}, "rest": {"backends": [rest]}},
    )


@pytest.mark.parametrize("target", [b"/api/../x", b"/api/%2e%2e/x", b"/api/%2E%2e/x", b"/api/./../x", b"//x"])
@inline
def test_dot_segments_do_not_walk_out_of_a_route(net, target: bytes) -> None:
    api = yield net.origin()
    rest = yield net.origin()
    proxy = yield net.proxy(_two_routes(api.backend, rest.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", target, host=b"a.test"))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200
    assert api.requests == [], "the /api/ origin was reached from outside /api/"
    [got] = rest.requests
    assert got.target == b"/x"


@inline
def test_origin_receives_the_normalised_path_under_a_stripped_prefix(net) -> None:
    api = yield net.origin()
    rest = yield net.origin()
    proxy = yield net.proxy(_two_routes(api.backend, rest.backend, strip_prefix=True))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", b"/api/v1/./users/%2e%2e/groups?q=a/../b", host=b"a.test"))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200
    [got] = api.requests
    assert got.target == b"/v1/groups?q=a/../b"
    assert rest.requests == []


@pytest.mark.parametrize("target", [b"/../x", b"/api/../../x", b"/%2e%2e/etc/passwd", b"/api/..;/x"])
@inline
def test_a_path_climbing_above_the_root_is_a_400(net, target: bytes, no_traceback) -> None:
    api = yield net.origin()
    rest = yield net.origin()
    proxy = yield net.proxy(_two_routes(api.backend, rest.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", target, host=b"a.test"))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 400
    no_traceback(resp.body)
    assert api.requests == [] and rest.requests == []


@inline
def test_a_fragment_is_not_forwarded(net) -> None:
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", b"/page?x=1#section"))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200
    assert origin.requests[0].target == b"/page?x=1"


@pytest.mark.parametrize("host", [b"a b", b"t/x y", b"t\tx", b"a@b.test", b"a.test:x"])
@inline
def test_an_invalid_host_is_a_400(net, host: bytes) -> None:
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", b"/", host=host))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 400
    assert origin.requests == []


@inline
def test_an_absolute_form_target_is_routed_by_its_own_authority(net) -> None:
    app = yield net.origin()
    other = yield net.origin()
    proxy = yield net.proxy(proxy_config(
        routes=[{"host": "app.test", "path": "/", "pool": "app"}, {"host": "other.test", "path": "/", "pool": "other"}],
        pools={"app": {"backends": [app.backend]}, "other": {"backends": [other.backend]}},
    ))
    client = yield net.client(proxy.port)
    # A host nothing serves: 421, and app.test's origin never sees the request.
    client.send(request(b"GET", b"http://elsewhere.example/steal", host=b"app.test"))
    client.send(request(b"GET", b"http://other.test/page?q=1", host=b"app.test"))
    first, second = yield client.until_responses([b"GET", b"GET"])
    assert first.status == 421
    assert second.status == 200
    assert app.requests == []
    [got] = other.requests
    assert got.target == b"/page?q=1"
    assert got.header(b"host") == [b"other.test"]


@inline
def test_pipelined_request_with_connection_close_is_answered_then_the_connection_closes(net) -> None:
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", b"/a", host=b"a.test") + request(b"GET", b"/b", host=b"a.test",
                                                                 headers=[(b"Connection", b"close")])
                + request(b"GET", b"/never", host=b"a.test"))
    yield client.until_closed()
    first, second = client.responses([b"GET", b"GET"])
    assert (first.status, first.body) == (200, b"GET /a\n")
    assert (second.status, second.body) == (200, b"GET /b\n")
    assert second.one(b"connection") == b"close"
    assert [r.target for r in origin.requests] == [b"/a", b"/b"], "a request after the close was processed"


@inline
def test_http10_request_without_keep_alive_is_the_last_one_read(net) -> None:
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", b"/a", version=b"HTTP/1.0") + request(b"GET", b"/b"))
    yield client.until_closed()
    [only] = client.responses([b"GET"])
    assert only.status == 200
    assert [r.target for r in origin.requests] == [b"/a"]


@inline
def test_origin_response_is_unaffected_by_the_close_of_a_later_request(net) -> None:
    """The close is for the request that carried it: an earlier slow answer still arrives whole."""
    held = []
    origin = yield net.origin(lambda req: held.append(req) if req.target == b"/slow" else req.respond(200, b"b"))
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", b"/slow") + request(b"GET", b"/b", headers=[(b"Connection", b"close")]))
    from .conftest import until

    yield until(lambda: held, "slow request at the origin")
    held[0].write(response(200, b"slow body"))
    yield client.until_closed()
    first, second = client.responses([b"GET", b"GET"])
    assert (first.status, first.body) == (200, b"slow body")
    assert (second.status, second.body) == (200, b"b")


# ---------------------------------------------------------------------------
# The client address behind a PROXY header (haproxy: listeners)


def _haproxy_config(backend: str, log: str, **pool: object) -> dict:
    config = proxy_config(backend, server={"access_log": log, "trusted_proxies": ["127.0.0.1/32"]}, pool=pool)
    config["listen"] = [{"endpoint": "haproxy:tcp:0:interface=127.0.0.1"}]
    return config


@inline
def test_a_haproxy_listener_forwards_the_address_in_the_proxy_header(net, tmp_path) -> None:
    origin = yield net.origin()
    log = tmp_path / "access.log"
    proxy = yield net.proxy(_haproxy_config(origin.backend, str(log)))
    client = yield net.client(proxy.port)
    # The load balancer in front (127.0.0.1, trusted) speaks for 203.0.113.7,
    # whose own X-Forwarded-For claim is not to be believed.
    client.send(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n"
                + request(b"GET", b"/who", headers=[(b"X-Forwarded-For", b"198.51.100.99")]))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200
    [got] = origin.requests
    assert got.one(b"x-forwarded-for") == b"203.0.113.7"
    assert got.one(b"forwarded").startswith(b"for=203.0.113.7;")
    yield net.close()
    assert log.read_text().startswith("203.0.113.7 - - [")


@inline
def test_a_haproxy_listener_balances_by_the_address_in_the_proxy_header(net) -> None:
    first = yield net.origin()
    second = yield net.origin()
    config = _haproxy_config(first.backend, "off", balance="hash:client_ip")
    config["pool"]["p"]["backends"].append(second.backend)
    proxy = yield net.proxy(config)
    seen = set()
    for i in range(24):
        client = yield net.client(proxy.port)
        client.send(b"PROXY TCP4 203.0.113.%d 127.0.0.1 40000 80\r\n" % (i + 1) + request(b"GET", b"/"))
        [resp] = yield client.until_responses([b"GET"])
        assert resp.status == 200
        seen.add(len(first.requests))
    # Every client came from 127.0.0.1; only the PROXY header's addresses spread them over both backends.
    assert first.requests and second.requests


@inline
def test_a_haproxy_listener_refuses_at_connect_the_clients_its_deny_list_names(net) -> None:
    origin = yield net.origin()
    config = _haproxy_config(origin.backend, "off")
    config["waf"] = {"deny": ["203.0.113.66/32"]}
    proxy = yield net.proxy(config)
    denied = yield net.client(proxy.port)
    denied.send(b"PROXY TCP4 203.0.113.66 127.0.0.1 40000 80\r\n" + request(b"GET", b"/"))
    yield denied.until_closed()
    assert bytes(denied.buf) == b"" and origin.requests == []
    allowed = yield net.client(proxy.port)
    allowed.send(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n" + request(b"GET", b"/"))
    [resp] = yield allowed.until_responses([b"GET"])
    assert resp.status == 200 and len(origin.requests) == 1


@inline
def test_a_refused_head_gets_one_answer_even_when_the_parser_objects_next(net) -> None:
    """501 for an unknown transfer coding, then nothing more: llhttp's own error on the same bytes is not a second answer."""
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", b"/", headers=[(b"Transfer-Encoding", b"xchunked")]))
    yield client.until_closed()
    assert client.buf.count(b"HTTP/1.1 ") == 1, client.buf
    assert client.buf.startswith(b"HTTP/1.1 501 ")
    assert origin.requests == []


@inline
def test_transfer_encoding_in_an_http10_request_is_a_400_and_nothing_after_it_is_read(net) -> None:
    """RFC 9112 section 6.1: HTTP/1.0 framing with Transfer-Encoding is faulty (nginx answers 400 too)."""
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(b"POST /a HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\n\r\n" + request(b"GET", b"/smuggled", host=b"a.test"))
    yield client.until_closed()
    assert client.buf.count(b"HTTP/1.1 ") == 1, client.buf
    assert client.buf.startswith(b"HTTP/1.1 400 ")
    assert origin.requests == []


@settings(derandomize=True, max_examples=500, deadline=None)
@given(st.lists(_piece, min_size=1, max_size=8), st.sampled_from(["", "?q=1", "?a/../b"]))
def test_parse_target_path_is_normalize_path(pieces: list[str], query: str) -> None:
    """parse_target repeats normalize_path's fast-path test inline: both must give the same path, or both refuse."""
    raw = ("/" + "/".join(pieces)).encode()
    try:
        want = normalize_path(raw)
    except RequestRejected:
        with pytest.raises(RequestRejected):
            parse_target(b"GET", raw + query.encode())
        return
    assert parse_target(b"GET", raw + query.encode()) == (want, query[1:].encode(), None)


@pytest.mark.parametrize("byte", [0x00, 0x01, 0x09, 0x0B, 0x7F, 0x80, 0xFF])
@inline
def test_controls_and_high_bytes_in_an_http11_target_are_a_400(net, byte: int) -> None:
    """parse_target trusts llhttp to refuse these on HTTP/1.1 (characters_checked): this holds it to that."""
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", b"/a" + bytes([byte]) + b"b"))
    yield client.until_closed()
    assert client.buf.startswith(b"HTTP/1.1 400 "), client.buf[:80]
    assert origin.requests == []


_target_piece = st.sampled_from(["a", ".", "..", "%2e", "%2F", "%41", "%zz", "%00", "", "\\", "#f", "?q", "?a/../b",
                                 "//", "x.y", ";", "..;"])


@settings(derandomize=True, max_examples=600, deadline=None)
@given(st.sampled_from(["/", "", "*", "http://b.test", "https://b.test:8443/", "HTTP://b.test", "ftp://b.test/",
                        "http://a b/"]),
       st.lists(_target_piece, max_size=6), st.sampled_from([b"GET", b"OPTIONS"]), st.sampled_from([b"1.1", b"2"]))
def test_read_request_head_target_is_parse_target(start: str, pieces: list[str], method: bytes,
                                                  version: bytes) -> None:
    """read_request_head repeats parse_target's first case inline: both must read a target alike, or both refuse."""
    from rproxy_tw.config import LimitsConfig
    from rproxy_tw.http.request import read_request_head

    target = (start + "/".join(pieces)).encode()
    http1 = version != b"2"
    headers = [(b"Host", b"a.test")]
    try:
        path, query, authority = parse_target(method, target, http1, http1)
    except RequestRejected as e:
        with pytest.raises(RequestRejected) as refused:
            read_request_head(method, target, version, headers, LimitsConfig(), sizes_checked=True)
        assert refused.value.status == e.status
        return
    request = read_request_head(method, target, version, headers, LimitsConfig(), sizes_checked=True)
    assert (request.path, request.query) == ((b"/", b"") if path == b"*" else (path, query))
    assert request.asterisk == (path == b"*")
    assert request.host == (authority or b"a.test")
