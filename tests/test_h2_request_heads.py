"""
HTTP/2 request heads are checked as HTTP/1.1 ones are: pseudo-header fields
are not copied into the origin's request line unchecked (a route and
access-control bypass on lenient origins), and a malformed one is the
client's error (400 on its stream), never a 500.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from .test_tls import PKI, pki  # noqa: F401 - pki is a fixture
from .test_tls_h2 import _H2Client, _Origin, _running, _status, _stop


def _raw_request(c: _H2Client, fields: list[tuple[bytes, bytes]]) -> int:
    """Send header fields exactly as given (the client's own checks switched off)."""
    c.conn.config.validate_outbound_headers = False
    c.conn.config.normalize_outbound_headers = False
    sid = c.conn.get_next_available_stream_id()
    c.conn.send_headers(sid, fields, end_stream=True)
    c.flush()
    c.responses[sid] = {"headers": None, "body": bytearray(), "ended": False, "reset": None}
    return sid


BAD_HEADS = {
    "method with a space and a path": [(b":method", b"GET /smuggled/evil"), (b":path", b"/echo")],
    "path with a version": [(b":method", b"GET"), (b":path", b"/echo HTTP/1.1")],
    "method with parentheses": [(b":method", b"G(E)T"), (b":path", b"/echo")],
    "path without a leading slash": [(b":method", b"GET"), (b":path", b"echo")],
    "absolute-form path": [(b":method", b"GET"), (b":path", b"https://www.example.test/echo")],
    "path with a tab": [(b":method", b"GET"), (b":path", b"/a\tb")],
    "asterisk for GET": [(b":method", b"GET"), (b":path", b"*")],
    "path climbing above the root": [(b":method", b"GET"), (b":path", b"/../etc/passwd")],
    "empty method": [(b":method", b""), (b":path", b"/echo")],
    "path with bytes above 0x7E": [(b":method", b"GET"), (b":path", b"/echo\xc3\xa9")],
}


@pytest_twisted.inlineCallbacks
def _through_the_proxy(pki: PKI, origin: _Origin, use: Any) -> Any:
    """Start a proxy in front of C{origin}, run C{use(client)} with an HTTP/2 client in a thread, stop."""
    service, http, origin_port, port = yield _running(pki, origin)

    def run() -> Any:
        c = _H2Client(pki, port)
        try:
            return use(c)
        finally:
            c.close()

    try:
        return (yield threads.deferToThread(run))
    finally:
        yield _stop(service, http, origin_port)


def _answer(c: _H2Client, sid: int) -> dict[str, Any]:
    c.read(lambda: c.responses[sid]["ended"])
    return c.responses[sid]


@pytest.mark.parametrize("name", sorted(BAD_HEADS))
@pytest_twisted.inlineCallbacks
def test_http2_malformed_pseudo_headers_get_a_400_and_reach_no_origin(pki: PKI, name: str) -> None:
    origin = _Origin()

    def use(c: _H2Client) -> Any:
        fields = [*BAD_HEADS[name][:1], (b":scheme", b"https"), (b":authority", b"www.example.test"),
                  *BAD_HEADS[name][1:]]
        bad = _raw_request(c, fields)
        good = c.request(b"GET", b"/after")
        return _answer(c, bad), _answer(c, good)

    bad, good = yield _through_the_proxy(pki, origin, use)
    assert _status(bad) == 400, bad
    assert _status(good) == 200, "the connection's other streams go on"
    assert [r.url for r in origin.requests] == [b"/after"]


@pytest.mark.parametrize("authority", [b"a b", b"t/x y", b"www.example.test@evil.test", b"t\tx"])
@pytest_twisted.inlineCallbacks
def test_http2_invalid_authority_is_a_400(pki: PKI, authority: bytes) -> None:
    origin = _Origin()
    r = yield _through_the_proxy(pki, origin, lambda c: _answer(c, _raw_request(
        c, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority), (b":path", b"/x")])))
    assert _status(r) == 400
    assert origin.requests == []


@pytest_twisted.inlineCallbacks
def test_http2_path_is_normalised_before_the_origin_sees_it(pki: PKI) -> None:
    origin = _Origin()
    r = yield _through_the_proxy(pki, origin, lambda c: _answer(c, c.request(b"GET", b"/a/%2e%2e/b/./c?x=1#frag")))
    assert _status(r) == 200
    assert [req.url for req in origin.requests] == [b"/b/c?x=1"]
