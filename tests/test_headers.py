"""
Unit tests of header rewriting (rproxy_tw.headers): pure functions over
lists of (name, value) pairs.  Examples for the rules, and Hypothesis for
the invariants that must hold for any header list.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rproxy_tw.headers import (
    ForwardingInfo,
    HOP_BY_HOP,
    MASKED_RESPONSE_HEADERS,
    connection_tokens,
    forwarded_node,
    is_trusted,
    request_head_block,
    request_headers_for_origin,
    response_added_lines,
    response_head_block,
    response_headers_for_client,
    serialize,
    trailers_for_client,
)


def info(ip: str = "192.0.2.1", trusted: bool = False, proto: str = "http") -> ForwardingInfo:
    return ForwardingInfo(ip, proto, trusted, b"rproxy")


def values(headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def names(headers) -> list[bytes]:
    return [n.lower() for n, _ in headers]


# ---------------------------------------------------------------------------
# Examples


def test_request_adds_forwarding_headers_and_via():
    out = request_headers_for_origin([(b"Host", b"shop.example"), (b"Accept", b"*/*")], info())
    assert out == [
        (b"Host", b"shop.example"),
        (b"Accept", b"*/*"),
        (b"X-Forwarded-For", b"192.0.2.1"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"shop.example"),
        (b"Forwarded", b"for=192.0.2.1;proto=http;host=shop.example"),
        (b"Via", b"1.1 rproxy"),
    ]


def test_request_without_host_has_no_forwarded_host():
    out = request_headers_for_origin([], info())
    assert values(out, b"x-forwarded-host") == []
    assert values(out, b"forwarded") == [b"for=192.0.2.1;proto=http"]


def test_https_proto():
    out = request_headers_for_origin([(b"Host", b"a")], info(proto="https"))
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"forwarded") == [b"for=192.0.2.1;proto=https;host=a"]


def test_ipv6_client_in_forwarded_is_bracketed_and_quoted():
    out = request_headers_for_origin([(b"Host", b"a")], info(ip="2001:db8::1"))
    assert values(out, b"x-forwarded-for") == [b"2001:db8::1"]
    assert values(out, b"forwarded") == [b'for="[2001:db8::1]";proto=http;host=a']


def test_untrusted_peer_forwarding_headers_dropped():
    incoming = [
        (b"Host", b"a"),
        (b"X-Forwarded-For", b"10.9.9.9"),
        (b"x-forwarded-for", b"10.8.8.8"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"evil"),
        (b"Forwarded", b"for=10.9.9.9"),
        (b"X-Real-IP", b"10.9.9.9"),
    ]
    out = request_headers_for_origin(incoming, info())
    assert values(out, b"x-forwarded-for") == [b"192.0.2.1"]
    assert values(out, b"x-forwarded-proto") == [b"http"]
    assert values(out, b"x-forwarded-host") == [b"a"]
    assert values(out, b"forwarded") == [b"for=192.0.2.1;proto=http;host=a"]
    assert values(out, b"x-real-ip") == []
    assert not any(b"10.9.9.9" in v or b"10.8.8.8" in v for _, v in out)


def test_trusted_peer_forwarding_headers_extended_in_order():
    incoming = [
        (b"Host", b"a"),
        (b"X-Forwarded-For", b"10.9.9.9, 10.8.8.8"),
        (b"X-Forwarded-For", b"10.7.7.7"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"public.example"),
        (b"Forwarded", b"for=10.9.9.9;proto=https"),
    ]
    out = request_headers_for_origin(incoming, info(trusted=True))
    assert values(out, b"x-forwarded-for") == [b"10.9.9.9, 10.8.8.8, 10.7.7.7, 192.0.2.1"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-forwarded-host") == [b"public.example"]
    assert values(out, b"forwarded") == [b"for=10.9.9.9;proto=https, for=192.0.2.1;proto=http;host=a"]


def test_request_hop_by_hop_and_connection_named_dropped():
    incoming = [
        (b"Host", b"a"),
        (b"Connection", b"Keep-Alive, X-Hop"),
        (b"connection", b" x-other ,"),
        (b"X-Hop", b"1"),
        (b"X-Other", b"2"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Sum"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"5"),
        (b"Upgrade", b"websocket"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Proxy-Anything", b"x"),
        (b"X-Kept", b"yes"),
    ]
    out = request_headers_for_origin(incoming, info())
    assert names(out)[:2] == [b"host", b"x-kept"]
    assert values(out, b"x-kept") == [b"yes"]
    for name in (b"connection", b"x-hop", b"x-other", b"keep-alive", b"te", b"trailer", b"transfer-encoding",
                 b"content-length", b"upgrade", b"proxy-authorization", b"proxy-connection", b"proxy-anything"):
        assert name not in names(out)


def test_request_upgrade_kept_for_protocol_switch():
    incoming = [(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
                (b"Sec-WebSocket-Key", b"k")]
    out = request_headers_for_origin(incoming, info(), keep_upgrade=True)
    assert values(out, b"upgrade") == [b"websocket"]
    assert [v.lower() for v in values(out, b"connection")] == [b"upgrade"]
    assert values(out, b"sec-websocket-key") == [b"k"]


def test_connection_cannot_strip_host():
    out = request_headers_for_origin([(b"Host", b"a"), (b"Connection", b"close, Host")], info())
    assert values(out, b"host") == [b"a"]


def test_connection_cannot_strip_forwarding_headers_the_proxy_sets():
    incoming = [(b"Host", b"a"), (b"Connection", b"X-Forwarded-For, Forwarded, Via, X-Forwarded-Proto")]
    out = request_headers_for_origin(incoming, info())
    assert values(out, b"x-forwarded-for") == [b"192.0.2.1"]
    assert values(out, b"forwarded") == [b"for=192.0.2.1;proto=http;host=a"]
    assert values(out, b"via") == [b"1.1 rproxy"]
    assert values(out, b"x-forwarded-proto") == [b"http"]


def test_request_via_extended():
    out = request_headers_for_origin([(b"Via", b"1.0 a"), (b"VIA", b"1.1 b")], info(), http_version=b"1.0")
    assert values(out, b"via") == [b"1.0 a, 1.1 b, 1.0 rproxy"]


def test_response_masks_origin_and_adds_server_and_via():
    incoming = [
        (b"Server", b"Apache/2.4"),
        (b"X-Powered-By", b"PHP/8"),
        (b"Content-Type", b"text/html"),
        (b"Via", b"1.1 cache"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    out = response_headers_for_client(incoming, b"rproxy", b"rproxy")
    assert out == [
        (b"Content-Type", b"text/html"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Via", b"1.1 cache, 1.1 rproxy"),
        (b"Server", b"rproxy"),
    ]


def test_response_without_server_header():
    out = response_headers_for_client([(b"Server", b"nginx")], b"rproxy", b"")
    assert values(out, b"server") == []


@pytest.mark.parametrize("name", sorted(MASKED_RESPONSE_HEADERS))
def test_every_masked_response_header_removed(name):
    out = response_headers_for_client([(name.title(), b"secret/1.0")], b"rproxy", b"rproxy")
    assert not any(v == b"secret/1.0" for _, v in out)


def test_response_hop_by_hop_dropped_and_upgrade_kept_on_101():
    incoming = [(b"Connection", b"Upgrade, X-Hop"), (b"Upgrade", b"websocket"), (b"X-Hop", b"1"),
                (b"Keep-Alive", b"timeout=5"), (b"Sec-WebSocket-Accept", b"x")]
    out = response_headers_for_client(incoming, b"rproxy", b"rproxy", keep_upgrade=True)
    assert values(out, b"upgrade") == [b"websocket"]
    assert [v.lower() for v in values(out, b"connection")] == [b"upgrade"]
    assert values(out, b"x-hop") == [] and values(out, b"keep-alive") == []
    assert values(out, b"sec-websocket-accept") == [b"x"]
    plain = response_headers_for_client(incoming, b"rproxy", b"rproxy")
    assert values(plain, b"upgrade") == [] and values(plain, b"connection") == []


def test_trailers_drop_framing_and_hop_by_hop():
    out = trailers_for_client([(b"X-Sum", b"1"), (b"Content-Length", b"3"), (b"Connection", b"x"),
                               (b"Transfer-Encoding", b"chunked"), (b"X-Sum", b"2")])
    assert out == [(b"X-Sum", b"1"), (b"X-Sum", b"2")]


def test_connection_tokens():
    assert connection_tokens([(b"Connection", b"Keep-Alive, X-A ,,x-b"), (b"CONNECTION", b"close")]) == {
        b"keep-alive", b"x-a", b"x-b", b"close"}
    assert connection_tokens([(b"X", b"y")]) == frozenset()


@pytest.mark.parametrize(
    "ip,nets,expected",
    [
        ("127.0.0.1", ["127.0.0.1/32"], True),
        ("127.0.0.2", ["127.0.0.1/32"], False),
        ("10.1.2.3", ["10.0.0.0/8", "192.168.0.0/16"], True),
        ("::ffff:10.1.2.3", ["10.0.0.0/8"], True),
        ("2001:db8::5", ["2001:db8::/32"], True),
        ("2001:db8::5", ["10.0.0.0/8"], False),
        ("unknown", ["0.0.0.0/0"], False),
        ("10.1.2.3", [], False),
    ],
)
def test_is_trusted(ip, nets, expected):
    assert is_trusted(ip, [ipaddress.ip_network(n) for n in nets]) is expected


@pytest.mark.parametrize("trusted", [False, True])
def test_unknown_client_gets_no_xff_entry_and_forwarded_for_unknown(trusted):
    """A unix socket client has no address: no made-up X-Forwarded-For entry; Forwarded: for=unknown."""
    from rproxy_tw.headers import request_head_block

    plain = [(b"Host", b"example.com")]
    chained = plain + [(b"X-Forwarded-For", b"198.51.100.9"), (b"Forwarded", b"for=198.51.100.9")]
    for headers in (plain, chained):
        for out in (request_headers_for_origin(headers, info("unknown", trusted)),
                    _parse(request_head_block(headers, info("unknown", trusted)))):
            expected_xff = [b"198.51.100.9"] if trusted and headers is chained else []
            assert values(out, b"x-forwarded-for") == expected_xff
            assert values(out, b"forwarded")[0].split(b", ")[-1] == b"for=unknown;proto=http;host=example.com"
            assert values(out, b"x-forwarded-proto") == [b"http"]


def _parse(block: bytes) -> list[tuple[bytes, bytes]]:
    return [tuple(line.split(b": ", 1)) for line in block.split(b"\r\n") if line]  # type: ignore[misc]


def test_forwarded_node():
    assert forwarded_node("192.0.2.1") == "192.0.2.1"
    assert forwarded_node("2001:db8::1") == '"[2001:db8::1]"'
    assert forwarded_node("") == "unknown"


def test_serialize():
    assert serialize([(b"A", b"1"), (b"a", b"2")]) == b"A: 1\r\na: 2\r\n"
    assert serialize([]) == b""


# ---------------------------------------------------------------------------
# Invariants for any header list

_token_chars = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"))
_plain_names = st.text(_token_chars, min_size=1, max_size=12).map(lambda s: ("X-" + s).encode())
_special_names = st.sampled_from(
    [n.title() for n in HOP_BY_HOP] + [n.title() for n in MASKED_RESPONSE_HEADERS]
    + [b"Host", b"Via", b"Content-Length", b"X-Forwarded-For", b"Forwarded", b"X-Forwarded-Proto",
       b"X-Forwarded-Host", b"X-Real-IP", b"Set-Cookie", b"Cookie", b"Proxy-Foo", b"CONNECTION", b"x-a"]
)
_names = st.one_of(_plain_names, _special_names)
_values = st.binary(min_size=0, max_size=20).map(lambda b: bytes(c for c in b if 0x20 < c < 0x7F))
_connection_values = st.lists(st.one_of(_names, st.sampled_from([b"close", b"keep-alive", b"upgrade"])),
                              max_size=3).map(lambda ns: b", ".join(ns))
_header = st.one_of(st.tuples(_names, _values), st.tuples(st.just(b"Connection"), _connection_values))
_headers = st.lists(_header, max_size=15)

_ALWAYS_DROPPED_UP = HOP_BY_HOP | {b"content-length", b"transfer-encoding"}
_SET_BY_PROXY = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via", b"x-real-ip",
                 b"host"}


def _kept_in(headers, dropped) -> list[tuple[bytes, bytes]]:
    """The headers a rewrite must pass through untouched, in order."""
    named = connection_tokens(headers)
    return [(n, v) for n, v in headers
            if n.lower() not in dropped and n.lower() not in named and n.lower() not in _SET_BY_PROXY
            and not n.lower().startswith(b"proxy-")]


@settings(derandomize=True, max_examples=300, deadline=None)
@given(_headers, st.booleans())
def test_request_rewrite_invariants(headers, trusted):
    out = request_headers_for_origin(headers, info(trusted=trusted))
    out_names = names(out)
    named = connection_tokens(headers) - _SET_BY_PROXY
    for name in out_names:
        assert name not in _ALWAYS_DROPPED_UP, name
        assert name not in named, name
        assert not name.startswith(b"proxy-")
    # Everything else passes through with every value, in order.
    others = [(n, v) for n, v in out if n.lower() not in _SET_BY_PROXY]
    assert others == _kept_in(headers, _ALWAYS_DROPPED_UP)
    # One of each header the proxy sets; the client's address is always the last hop.
    for name in (b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"via"):
        assert out_names.count(name) == 1, name
    assert values(out, b"x-forwarded-for")[0].split(b", ")[-1] == b"192.0.2.1"
    assert values(out, b"via")[0].endswith(b"1.1 rproxy")
    if not trusted:
        assert values(out, b"x-forwarded-for") == [b"192.0.2.1"]
        assert values(out, b"x-forwarded-proto") == [b"http"]
        assert values(out, b"forwarded")[0].startswith(b"for=192.0.2.1;proto=http")
        assert values(out, b"x-real-ip") == []


@settings(derandomize=True, max_examples=300, deadline=None)
@given(_headers)
def test_response_rewrite_invariants(headers):
    out = response_headers_for_client(headers, b"rproxy", b"rproxy")
    out_names = names(out)
    named = connection_tokens(headers) - {b"via", b"server"}
    for name in out_names:
        assert name not in _ALWAYS_DROPPED_UP, name
        assert name not in MASKED_RESPONSE_HEADERS or (name == b"server"), name
        assert name not in named, name
    assert values(out, b"server") == [b"rproxy"]
    assert out_names.count(b"via") == 1
    dropped = _ALWAYS_DROPPED_UP | MASKED_RESPONSE_HEADERS
    others = [(n, v) for n, v in out if n.lower() not in {b"via", b"server"}]
    expected = [(n, v) for n, v in headers
                if n.lower() not in dropped and n.lower() not in connection_tokens(headers) and n.lower() != b"via"]
    assert others == expected


@settings(derandomize=True, max_examples=200, deadline=None)
@given(_headers)
def test_host_always_reaches_origin_unchanged_when_not_named_in_connection(headers):
    if b"host" in connection_tokens(headers):
        return
    out = request_headers_for_origin(headers, info())
    assert values(out, b"host") == values(headers, b"host")


# The one-pass serializers used on the hot path must say exactly what the general rewrite says.



# The serializers remember each name's action by the name as it arrived: the same names in
# other cases, underscored spellings of the forwarding headers and Proxy-* ones must still
# come out as the general rewrite says.
_block_names = st.one_of(
    _names,
    st.sampled_from([b"X_Forwarded_For", b"x_real_ip", b"X-Forwarded_Host", b"x_client_cert_subject",
                     b"Proxy-Authorization", b"PROXY-X", b"proxy-", b"X_Plain", b"DATE", b"date", b"Date",
                     b"Server", b"SERVER", b"Content-Type", b"content-type"]),
)
_block_header = st.one_of(st.tuples(_block_names, _values), st.tuples(st.just(b"Connection"), _connection_values))
_block_headers = st.lists(_block_header, max_size=15)


@settings(derandomize=True, max_examples=400, deadline=None)
@given(_block_headers, st.booleans(), st.booleans(), st.sampled_from([b"1.1", b"1.0", b"2"]),
       st.sampled_from(["192.0.2.7", "2001:db8::7", "unknown"]))
def test_request_head_block_equals_general_rewrite(headers, trusted, upgrade, version, client_ip):
    info = ForwardingInfo(client_ip, "https", trusted, b"rproxy")
    expected = serialize(request_headers_for_origin(headers, info, version, keep_upgrade=upgrade))
    assert request_head_block(headers, info, keep_upgrade=upgrade, http_version=version) == expected
    # Twice: the per-connection cache of the added lines must not go stale.
    assert request_head_block(headers, info, keep_upgrade=upgrade, http_version=version) == expected
    assert b"Via: %s rproxy\r\n" % version in expected or b", %s rproxy\r\n" % version in expected


def test_request_head_block_names_each_requests_version_on_one_connection():
    """The added lines are remembered per connection: a request of another HTTP version must not get the last ones."""
    info = ForwardingInfo("192.0.2.7", "https", False, b"rproxy")
    headers = [(b"Host", b"example.com"), (b"Accept", b"*/*")]
    for version in (b"1.1", b"2", b"2", b"1.0", b"1.1"):
        block = request_head_block(headers, info, http_version=version)
        assert block == serialize(request_headers_for_origin(headers, info, version))
        assert b"\r\nVia: %s rproxy\r\n" % version in block


@settings(derandomize=True, max_examples=400, deadline=None)
@given(_block_headers, st.booleans())
def test_response_head_block_equals_general_rewrite_or_defers(headers, dated):
    from twisted.internet.task import Clock

    clock = Clock() if dated else None
    if clock is not None:
        clock.advance(1_700_000_000)
    for _ in range(2):  # the second time from the remembered names
        block = response_head_block(headers, response_added_lines(b"rproxy", b"rproxy"), clock)
        if block is not None:
            assert block == serialize(response_headers_for_client(headers, b"rproxy", b"rproxy", clock=clock))


def _settings():
    from rproxy_tw.http.exchange import ExchangeSettings

    return ExchangeSettings(b"rproxy", b"rproxy", response_timeout=60, idle_timeout=60, retries=0)


@settings(derandomize=True, max_examples=400, deadline=None)
@given(_block_headers, st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=4))
def test_remembered_client_headers_equal_the_general_rewrite(headers, seconds):
    """Every answer, remembered or not, is what the rewrite says at that moment (a Date the proxy adds moves on)."""
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1_700_000_000)
    s = _settings()
    for step in seconds:
        clock.advance(step)
        got = s.client_headers(headers, clock)
        assert got == response_headers_for_client(headers, b"rproxy", b"rproxy", clock=clock)
        got.append((b"X-Changed", b"by a filter"))  # the caller's own list: the memory is not touched


def test_a_date_the_proxy_adds_is_never_remembered():
    from twisted.internet.task import Clock

    clock = Clock()
    clock.advance(1_700_000_000)
    s = _settings()
    undated = [(b"Content-Type", b"text/plain")]
    dropped = [(b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT"), (b"Connection", b"date")]
    for headers in (undated, dropped):
        first = s.client_headers(headers, clock)
        clock.advance(1)
        second = s.client_headers(headers, clock)
        assert values(first, b"date") == [http_date_at(int(clock.seconds()) - 1)]
        assert values(second, b"date") == [http_date_at(int(clock.seconds()))]
    dated = [(b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT")]
    assert s.client_headers(dated, clock) == s.client_headers(dated, clock)
    assert len(s._client_heads) == 1


def test_remembered_client_heads_are_bounded():
    from twisted.internet.task import Clock

    from rproxy_tw.http.exchange import CLIENT_HEADS_BYTES, CLIENT_HEADS_ENTRIES

    s = _settings()
    for i in range(CLIENT_HEADS_ENTRIES + 10):
        s.client_headers([(b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT"), (b"ETag", b'"%d"' % i)], Clock())
    assert 0 < len(s._client_heads) <= CLIENT_HEADS_ENTRIES
    s._client_heads.clear()
    large = [(b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT"), (b"X-Large", b"y" * CLIENT_HEADS_BYTES)]
    assert s.client_headers(large, Clock()) == response_headers_for_client(large, b"rproxy", b"rproxy")
    assert s._client_heads == {}


def http_date_at(second: int) -> bytes:
    from twisted.web.http import datetimeToString

    return datetimeToString(second)


def test_remembered_header_names_are_bounded():
    from rproxy_tw import headers as module

    info = ForwardingInfo("192.0.2.7", "http", False, b"rproxy")
    for i in range(3 * module._MEMO_NAMES):
        name = b"X-Name-%d" % i
        assert request_head_block([(b"Host", b"a"), (name, b"v")], info).startswith(b"Host: a\r\n%s: v\r\n" % name)
        assert response_head_block([(name, b"v")], b"Via: 1.1 rproxy") == b"%s: v\r\nVia: 1.1 rproxy\r\n" % name
    long_name = b"X-" + b"n" * 100
    assert request_head_block([(b"Host", b"a"), (long_name, b"v")], info).startswith(b"Host: a\r\n%s: v" % long_name)
    assert long_name not in module._REQUEST_BY_NAME
    assert len(module._REQUEST_BY_NAME) <= module._MEMO_NAMES
    assert len(module._RESPONSE_BY_NAME) <= module._MEMO_NAMES
