"""
What an HTTP/2 connection writes, without sockets: the proxy's
C{H2ServerConnection} on a C{StringTransport}, origins on C{StringTransport}s,
a C{MemoryReactorClock}, and the C{h2} package as the client, with its
inbound header validation on: a response head that breaks RFC 9113's rules
is a C{ProtocolError} in the client, so these tests see what a strict
browser would.

The proxy does not check its own response heads again (L{rproxy_tw.http.h2}
writes frames with L{rproxy_tw.http.h2session}): these tests hold its header
rewriting to the rules a strict client enforces, whatever the origin sends.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from rproxy_tw.config import parse_config
from rproxy_tw.http.h2 import HEAD_CACHE_BYTES, HEAD_CACHE_ENTRIES, H2ServerConnection, _head_blocks, response_block
from rproxy_tw.http.server import HTTPProxyFactory
from rproxy_tw.service import ProxyRuntime

from .conftest import proxy_config, response

CLIENT = IPv4Address("TCP", "192.0.2.10", 40000)
SERVER = IPv4Address("TCP", "127.0.0.1", 8443)


class CountingTransport(StringTransport):
    """A C{StringTransport} that also keeps each write, to count them."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class H2Harness:
    """One TLS listener's factory on a memory reactor, an HTTP/2 client connection to it, and its origins."""

    def __init__(self, **config: Any) -> None:
        self.reactor = MemoryReactorClock()
        cfg = parse_config(proxy_config("tcp:10.0.0.1:8000", **config), source="test.toml")
        self.factory = HTTPProxyFactory(ProxyRuntime(cfg, self.reactor), self.reactor, scheme="https")
        self.conn = H2ServerConnection(self.factory)
        self.transport = CountingTransport(peerAddress=CLIENT, hostAddress=SERVER, lenient=True)
        self.conn.makeConnection(self.transport)
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.events: list[Any] = []
        self.origins: list[tuple[Any, StringTransport]] = []
        self.exchange()

    def turn(self) -> None:
        """The end of a reactor turn: what the connection put off until then happens."""
        self.reactor.advance(0)

    def exchange(self) -> list[Any]:
        """Send what the client has, end the turn, and let the client read what came back."""
        data = self.client.data_to_send()
        if data:
            self.conn.dataReceived(data)
        self.turn()
        return self.read()

    def read(self) -> list[Any]:
        out = self.transport.value()
        self.transport.clear()
        events = self.client.receive_data(out) if out else []
        self.events += events
        return events

    def get(self, path: bytes = b"/", n: int = 1) -> list[int]:
        ids = []
        for _ in range(n):
            sid = self.client.get_next_available_stream_id()
            self.client.send_headers(sid, [(b":method", b"GET"), (b":path", path), (b":scheme", b"https"),
                                           (b":authority", b"example.com")], end_stream=True)
            ids.append(sid)
        self.exchange()
        return ids

    def origin(self, i: int) -> tuple[Any, StringTransport]:
        """The C{i}th connection the proxy opened to an origin (accepted on first use)."""
        while len(self.origins) <= i:
            host, port, factory, _t, _b = self.reactor.tcpClients[len(self.origins)]
            proto = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport(peerAddress=IPv4Address("TCP", host, port), lenient=True)
            proto.makeConnection(transport)
            self.origins.append((proto, transport))
        return self.origins[i]

    def answer(self, i: int, data: bytes) -> None:
        """Origin C{i} sends C{data} (its request is taken off its transport)."""
        proto, transport = self.origin(i)
        transport.clear()
        proto.dataReceived(data)

    def response_of(self, sid: int) -> tuple[list[tuple[bytes, bytes]], bytes, bool]:
        headers: list[tuple[bytes, bytes]] = []
        body = b""
        ended = False
        for e in self.events:
            if getattr(e, "stream_id", None) != sid:
                continue
            if isinstance(e, h2.events.ResponseReceived):
                headers = list(e.headers)
            elif isinstance(e, h2.events.DataReceived):
                body += e.data
            elif isinstance(e, h2.events.StreamEnded):
                ended = True
        return headers, body, ended


def field(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


# ---------------------------------------------------------------------------
# The proxy's rewriting keeps to the rules


def test_origin_fields_forbidden_in_http2_never_reach_the_client() -> None:
    """
    Connection-specific fields (RFC 9113 8.2.2), upper-case names and padded
    values from the origin: the client, which validates what it receives,
    gets a well-formed head without them.
    """
    h = H2Harness()
    [sid] = h.get()
    h.answer(0, response(200, b"hello", [
        (b"Connection", b"keep-alive, X-Hop"), (b"Keep-Alive", b"timeout=5"), (b"X-Hop", b"1"),
        (b"Proxy-Connection", b"keep-alive"), (b"Upgrade", b"h2c"), (b"TE", b"trailers"),
        (b"X-Mixed-Case", b"Value"), (b"X-Padded", b"  padded value  "), (b"Set-Cookie", b"a=1"),
    ]))
    h.turn()
    h.read()  # a ProtocolError here would be a malformed head
    headers, body, ended = h.response_of(sid)
    names = [n for n, _ in headers]
    assert headers[0] == (b":status", b"200") and body == b"hello" and ended
    for forbidden in (b"connection", b"keep-alive", b"x-hop", b"proxy-connection", b"upgrade", b"te",
                      b"transfer-encoding"):
        assert forbidden not in names
    assert all(n == n.lower() for n in names)
    assert field(headers, b"x-mixed-case") == [b"Value"]
    assert field(headers, b"x-padded") == [b"padded value"]
    assert field(headers, b"set-cookie") == [b"a=1"]


def test_chunked_origin_response_is_sent_without_transfer_encoding() -> None:
    h = H2Harness()
    [sid] = h.get()
    h.answer(0, response(200, b"5\r\nhello\r\n0\r\n\r\n", [(b"Transfer-Encoding", b"chunked")], length=False))
    h.turn()
    h.read()
    headers, body, ended = h.response_of(sid)
    assert body == b"hello" and ended
    assert field(headers, b"transfer-encoding") == []


@pytest.mark.parametrize("line", [b":status: 500", b"X-Bad Name: 1", b"X-Nul: a\x00b", b"X-Bare-CR: a\rb"])
def test_origin_head_that_http2_cannot_carry_is_a_502(line: bytes) -> None:
    """A pseudo-header, a space in a name, NUL or a bare CR from the origin: its parser refuses the head."""
    h = H2Harness()
    [sid] = h.get()
    h.answer(0, b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 2\r\n\r\nok")
    h.turn()
    h.read()
    headers, body, ended = h.response_of(sid)
    assert field(headers, b":status") == [b"502"] and ended
    assert b"ok" != body


def test_trailers_keep_to_the_rules_too() -> None:
    h = H2Harness()
    [sid] = h.get()
    h.answer(0, response(200, b"5\r\nhello\r\n0\r\nX-Checksum: 1\r\nConnection: close\r\nX-Pad:  2 \r\n\r\n",
                         [(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-Checksum")], length=False))
    h.turn()
    h.read()
    trailers = [e for e in h.events if isinstance(e, h2.events.TrailersReceived)]
    _headers, body, ended = h.response_of(sid)
    assert body == b"hello" and ended
    if trailers:  # trailers the client did not ask for (no "te: trailers") may be dropped
        names = [n for n, _ in trailers[0].headers]
        assert b"connection" not in names and all(n == n.lower() for n in names)


# ---------------------------------------------------------------------------
# One write per connection and reactor turn

_HEADERS_FRAME, _DATA_FRAME, _END_STREAM = 0x1, 0x0, 0x1


def frames(data: bytes) -> list[tuple[int, int, int, int]]:
    """(type, flags, stream, length) of each frame in C{data} (RFC 9113 4.1)."""
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        out.append((data[pos + 3], data[pos + 4], int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF, length))
        pos += 9 + length
    assert pos == len(data)
    return out


def test_small_response_leaves_in_one_write_with_end_stream_on_its_data() -> None:
    h = H2Harness()
    [sid] = h.get()
    h.transport.writes.clear()
    h.answer(0, response(200, b"x" * 1024, [(b"Content-Type", b"application/octet-stream")]))
    assert h.transport.writes == []  # nothing until the turn ends
    h.turn()
    assert len(h.transport.writes) == 1
    assert [(t, f & _END_STREAM, s) for t, f, s, _ in frames(h.transport.writes[0])] == [
        (_HEADERS_FRAME, 0, sid), (_DATA_FRAME, _END_STREAM, sid)]
    h.read()
    _headers, body, ended = h.response_of(sid)
    assert body == b"x" * 1024 and ended


def test_ten_streams_answered_in_one_turn_leave_in_one_write() -> None:
    h = H2Harness()
    sids = h.get(n=10)
    h.transport.writes.clear()
    for i in range(10):
        h.answer(i, response(200, b"%d" % i * 100))
    h.turn()
    assert len(h.transport.writes) == 1
    assert len(frames(h.transport.writes[0])) == 20
    h.read()
    for i, sid in enumerate(sids):
        headers, body, ended = h.response_of(sid)
        assert field(headers, b":status") == [b"200"] and ended
    assert sorted(h.response_of(sid)[1] for sid in sids) == sorted(b"%d" % i * 100 for i in range(10))


def test_response_without_body_ends_its_stream_in_the_same_write() -> None:
    h = H2Harness()
    [sid] = h.get()
    h.transport.writes.clear()
    h.answer(0, response(204, b"", length=False))
    h.turn()
    assert len(h.transport.writes) == 1
    h.read()
    headers, body, ended = h.response_of(sid)
    assert field(headers, b":status") == [b"204"] and body == b"" and ended


def test_a_shut_window_still_pauses_the_origin_and_the_rest_follows_the_window() -> None:
    """Coalescing keeps the backpressure: what the client's window does not allow waits, and the origin stops."""
    h = H2Harness()
    [sid] = h.get()
    body = b"y" * (200 * 1024)
    up, origin = h.origin(0)
    origin.clear()
    wire = response(200, body)
    up.dataReceived(wire[:-100 * 1024])  # the head and half the body, more than the 64 KiB window
    h.turn()
    h.read()
    assert origin.producerState == "paused"
    got = len(h.response_of(sid)[1])
    assert 0 < got < len(body)
    sent_rest = False
    for _ in range(20):
        for e in h.events:
            if isinstance(e, h2.events.DataReceived) and not getattr(e, "acked", False):
                h.client.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                e.acked = True
        h.exchange()
        if not sent_rest and origin.producerState == "producing":
            sent_rest = True
            up.dataReceived(wire[-100 * 1024:])
            h.turn()
            h.read()
        if h.response_of(sid)[2]:
            break
    _headers, received, ended = h.response_of(sid)
    assert sent_rest and received == body and ended


def test_a_client_that_shrinks_the_header_table_still_reads_every_head() -> None:
    h = H2Harness()
    h.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    h.exchange()
    h.exchange()  # the settings ACK
    sids = h.get(n=2)
    for i in range(2):
        h.answer(i, response(200, b"ok", [(b"X-Field", b"%d" % i)]))
    h.turn()
    h.read()
    for i, sid in enumerate(sids):
        headers, body, ended = h.response_of(sid)
        assert field(headers, b"x-field") == [b"%d" % i] and body == b"ok" and ended


def test_an_interim_response_is_sent_at_the_end_of_the_turn() -> None:
    """A client waiting for 100 Continue must get it without anything else happening on the connection."""
    h = H2Harness()
    sid = h.client.get_next_available_stream_id()
    h.client.send_headers(sid, [(b":method", b"POST"), (b":path", b"/up"), (b":scheme", b"https"),
                                (b":authority", b"example.com"), (b"expect", b"100-continue"),
                                (b"content-length", b"2")])
    h.exchange()
    h.answer(0, b"HTTP/1.1 100 Continue\r\n\r\n")
    h.turn()
    events = h.read()
    interim = [e for e in events if isinstance(e, h2.events.InformationalResponseReceived)]
    assert [dict(e.headers)[b":status"] for e in interim] == [b"100"]


def test_a_finished_stream_is_freed_by_reference_counting() -> None:
    """No reference cycle per stream: the garbage collector need not run for each request."""
    import gc
    import weakref

    h = H2Harness()
    [sid] = h.get()
    stream = weakref.ref(h.conn.streams[sid])
    gc.collect()
    gc.disable()
    try:
        h.answer(0, response(200, b"hello"))
        h.turn()
        h.read()
        assert h.response_of(sid)[1:] == (b"hello", True)
        assert stream() is None
    finally:
        gc.enable()


# ---------------------------------------------------------------------------
# The idle timeout of an HTTP/2 connection


def _goaway(h: H2Harness) -> bool:
    return any(isinstance(e, h2.events.ConnectionTerminated) for e in h.events)


def test_an_idle_connection_is_closed_after_idle_timeout() -> None:
    h = H2Harness(limits={"idle_timeout": 10})
    h.reactor.advance(9.9)
    h.read()
    assert not _goaway(h) and not h.transport.disconnecting
    h.reactor.advance(0.2)
    h.read()
    assert _goaway(h) and h.transport.disconnecting


def test_the_idle_time_starts_when_the_last_stream_ends() -> None:
    """A stream open longer than idle_timeout keeps the connection; the idle time counts from its end."""
    h = H2Harness(limits={"idle_timeout": 10})
    h.reactor.advance(5)
    [sid] = h.get()
    h.origin(0)  # connected at once
    h.reactor.advance(25)  # the origin takes its time to answer (its own deadline is longer)
    h.read()
    assert not _goaway(h)
    h.answer(0, response(200, b"late"))
    h.turn()
    h.reactor.advance(9.9)
    h.read()
    assert h.response_of(sid)[1:] == (b"late", True)
    assert not _goaway(h)
    h.reactor.advance(0.2)
    h.read()
    assert _goaway(h) and h.transport.disconnecting


def test_requests_keep_a_connection_open_past_idle_timeout() -> None:
    h = H2Harness(limits={"idle_timeout": 10})
    for i in range(5):
        h.reactor.advance(6)
        [sid] = h.get()
        h.answer(0, response(200, b"%d" % i))
        h.turn()
        h.read()
        assert h.response_of(sid)[1:] == (b"%d" % i, True)
    assert not _goaway(h) and not h.transport.disconnecting


# ---------------------------------------------------------------------------
# Encoded response heads, remembered (rproxy_tw.http.h2.response_block)


def test_a_head_that_changes_in_one_field_is_never_served_a_remembered_block() -> None:
    h = H2Harness()
    heads = [
        (200, [(b"ETag", b'"a"'), (b"Content-Type", b"text/plain")], b"x" * 10),
        (200, [(b"ETag", b'"b"'), (b"Content-Type", b"text/plain")], b"x" * 10),  # another ETag
        (200, [(b"ETag", b'"b"'), (b"Content-Type", b"text/plain")], b"x" * 11),  # another length
        (404, [(b"ETag", b'"b"'), (b"Content-Type", b"text/plain")], b"x" * 11),  # another status
        (200, [(b"ETag", b'"a"'), (b"Content-Type", b"text/plain")], b"x" * 10),  # the first again
    ]
    for status, headers, body in heads:
        [sid] = h.get()
        h.answer(0, response(status, body, headers))  # the origin connection is kept alive and reused
        h.turn()
        h.read()
        got, received, ended = h.response_of(sid)
        assert ended and received == body
        assert field(got, b":status") == [b"%d" % status]
        assert field(got, b"etag") == [headers[0][1]]
        assert field(got, b"content-length") == [b"%d" % len(body)]


def test_the_remembered_block_is_the_head_encoded_afresh() -> None:
    decoder = hpack.Decoder()
    headers = [(b"Server", b"rproxy"), (b"Cache-Control", b" max-age=60 "), (b"Connection", b"keep-alive")]
    first = response_block(200, headers, 5)
    assert response_block(200, list(headers), 5) == first
    assert decoder.decode(first, raw=True) == [(b":status", b"200"), (b"server", b"rproxy"),
                                               (b"cache-control", b"max-age=60"), (b"content-length", b"5")]


def test_heads_with_credentials_are_not_remembered_and_the_memory_is_bounded() -> None:
    _head_blocks.clear()
    block = response_block(200, [(b"Set-Cookie", b"session=secret")], None)
    assert hpack.Decoder().decode(block, raw=True) == [(b":status", b"200"), (b"set-cookie", b"session=secret")]
    assert _head_blocks == {}
    for i in range(HEAD_CACHE_ENTRIES + 10):
        response_block(200, [(b"ETag", b'"%d"' % i)], 1)
    assert 0 < len(_head_blocks) <= HEAD_CACHE_ENTRIES
    response_block(200, [(b"X-Large", b"y" * (HEAD_CACHE_BYTES + 1))], None)
    assert all(len(block) <= HEAD_CACHE_BYTES for block in _head_blocks.values())
