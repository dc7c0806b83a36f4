"""
Unit tests of the proxy's HTTP connections without sockets: the server
connection and the upstream connection each get a C{StringTransport}, the
clock is a C{MemoryReactorClock}, and the test plays both client and origin
byte by byte.  Timeouts are driven by advancing the clock, never by waiting.
"""

from __future__ import annotations

import re

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from rproxy_tw.config import parse_config
from rproxy_tw.http.server import HTTPProxyFactory
from rproxy_tw.service import ProxyRuntime
from rproxy_tw.transport import ILingerlessClose

from .conftest import chunk, parse_responses, proxy_config, request, response

CLIENT_IP = "192.0.2.10"


class Harness:
    """One HTTP listener's factory on a memory reactor, with helpers to play client and origin."""

    def __init__(self, backends: tuple[str, ...] = ("tcp:10.0.0.1:8000",), **config: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.config = parse_config(proxy_config(*backends, **config), source="test.toml")
        self.runtime = ProxyRuntime(self.config, self.reactor)
        self.factory = HTTPProxyFactory(self.runtime, self.reactor)
        self.origins_made = 0

    def client(self, ip: str = CLIENT_IP) -> tuple[Any, StringTransport]:
        addr = IPv4Address("TCP", ip, 40000)
        proto = self.factory.buildProtocol(addr)
        # lenient: a real TCP transport accepts pauseProducing() after loseConnection().
        transport = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), lenient=True)
        proto.makeConnection(transport)
        return proto, transport

    def pending_connects(self) -> int:
        return len(self.reactor.tcpClients) - self.origins_made

    def accept_origin(self) -> tuple[Any, StringTransport]:
        """Complete the oldest connection attempt the proxy made to an origin."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[self.origins_made]
        self.origins_made += 1
        addr = IPv4Address("TCP", host, port)
        proto = factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr, lenient=True)
        proto.makeConnection(transport)
        return proto, transport

    def refuse_origin(self) -> None:
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[self.origins_made]
        self.origins_made += 1
        connector = self.reactor.connectors[-1] if self.reactor.connectors else None
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))


def take(transport: StringTransport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


def one_response(data: bytes, method: bytes = b"GET"):
    [resp], rest = parse_responses(data, [method])
    assert rest == b""
    return resp


# ---------------------------------------------------------------------------
# The bytes each side sees


def test_request_head_sent_to_origin():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"GET /x?y=1 HTTP/1.1\r\nHost: Example.com\r\nX-A: 1\r\nConnection: keep-alive, X-Drop\r\n"
                       b"X-Drop: 1\r\nX-A: 2\r\n\r\n")
    assert h.pending_connects() == 1
    host, port = h.reactor.tcpClients[0][:2]
    assert (host, port) == ("10.0.0.1", 8000)
    _up, origin = h.accept_origin()
    sent = take(origin)
    request_id = re.search(rb"\r\nX-Request-Id: ([0-9a-f]{32})\r\n", sent)
    assert request_id is not None, sent
    assert sent == (
        b"GET /x?y=1 HTTP/1.1\r\n"
        b"Host: Example.com\r\n"
        b"X-A: 1\r\n"
        b"X-A: 2\r\n"
        b"X-Request-Id: " + request_id.group(1) + b"\r\n"
        b"X-Forwarded-For: 192.0.2.10\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: Example.com\r\n"
        b"Forwarded: for=192.0.2.10;proto=http;host=Example.com\r\n"
        b"Via: 1.1 rproxy\r\n"
        b"\r\n"
    )
    assert client.value() == b""


def test_response_relayed_to_client():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    up.dataReceived(response(200, b"hello", [(b"Server", b"gunicorn/20"), (b"Set-Cookie", b"a=1"),
                                             (b"Set-Cookie", b"b=2")]))
    resp = one_response(take(client))
    assert resp.status == 200 and resp.body == b"hello"
    assert resp.header(b"set-cookie") == [b"a=1", b"b=2"]
    assert resp.header(b"server") == [b"rproxy"]
    assert not client.disconnecting


def test_origin_connection_reused_for_next_request():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(target=b"/1"))
    up, origin = h.accept_origin()
    up.dataReceived(response(200, b"one"))
    take(origin)
    proto.dataReceived(request(target=b"/2"))
    assert h.pending_connects() == 0, "a second origin connection was opened"
    assert take(origin).startswith(b"GET /2 HTTP/1.1\r\n")
    up.dataReceived(response(200, b"two"))
    first, second = parse_responses(take(client), [b"GET", b"GET"])[0]
    assert (first.body, second.body) == (b"one", b"two")


def test_idle_origin_connection_not_reused_after_keepalive_timeout():
    h = Harness(pool={"keepalive_timeout": 5.0})
    proto, client = h.client()
    proto.dataReceived(request(target=b"/1"))
    up, origin = h.accept_origin()
    up.dataReceived(response(200, b"one"))
    h.reactor.advance(6)
    proto.dataReceived(request(target=b"/2"))
    assert h.pending_connects() == 1
    assert origin.disconnecting, "the stale idle connection was not closed"


def test_pipelined_request_waits_for_the_first_answer():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(target=b"/1") + request(target=b"/2"))
    up, origin = h.accept_origin()
    assert take(origin).startswith(b"GET /1 ")
    assert h.pending_connects() == 0
    up.dataReceived(response(200, b"one"))
    assert take(origin).startswith(b"GET /2 ")
    up.dataReceived(response(200, b"two"))
    resps = parse_responses(take(client), [b"GET", b"GET"])[0]
    assert [r.body for r in resps] == [b"one", b"two"]


def test_request_body_forwarded_as_it_arrives():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(b"POST", headers=[(b"Content-Length", b"10")]) + b"01234")
    up, origin = h.accept_origin()
    head, _, body = take(origin).partition(b"\r\n\r\n")
    assert b"Content-Length: 10" in head
    assert body == b"01234"
    proto.dataReceived(b"56789")
    assert take(origin) == b"56789"


def test_chunked_request_body_forwarded_chunked():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(b"POST", headers=[(b"Transfer-Encoding", b"chunked")]))
    up, origin = h.accept_origin()
    assert b"Transfer-Encoding: chunked\r\n" in take(origin)
    proto.dataReceived(chunk(b"abc"))
    proto.dataReceived(chunk(b"defg") + b"0\r\n\r\n")
    assert take(origin) == chunk(b"abc") + chunk(b"defg") + b"0\r\n\r\n"


# ---------------------------------------------------------------------------
# Backpressure, seen as producer states


def test_full_client_buffer_pauses_origin_reads():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    up.dataReceived(response(200, length=False, headers=[(b"Content-Length", b"1000000")]) + b"x" * 1000)
    assert client.producer is not None, "nothing registered to pause the origin"
    client.producer.pauseProducing()  # the client's write buffer is full
    assert origin.producerState == "paused"
    client.producer.resumeProducing()
    assert origin.producerState == "producing"


def test_full_origin_buffer_pauses_client_reads():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(b"POST", headers=[(b"Content-Length", b"1000000")]) + b"x" * 1000)
    up, origin = h.accept_origin()
    assert origin.producer is not None, "nothing registered to pause the client"
    origin.producer.pauseProducing()  # the origin's write buffer is full
    assert client.producerState == "paused"
    origin.producer.resumeProducing()
    assert client.producerState == "producing"


def test_client_reads_paused_while_origin_connection_is_made():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(b"POST", headers=[(b"Content-Length", b"100")]) + b"x" * 50)
    assert client.producerState == "paused"
    up, origin = h.accept_origin()
    assert client.producerState == "producing"
    assert take(origin).endswith(b"\r\n\r\n" + b"x" * 50)


# ---------------------------------------------------------------------------
# Timeouts, by the clock


def test_response_timeout_gives_504_and_aborts_origin():
    h = Harness(pool={"response_timeout": 3.0})
    proto, client = h.client()
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    h.reactor.advance(2.9)
    assert client.value() == b""
    h.reactor.advance(0.2)
    resp = one_response(take(client))
    assert resp.status == 504
    assert origin.disconnecting


def test_response_timeout_counts_from_the_end_of_the_request_body():
    h = Harness(pool={"response_timeout": 3.0})
    proto, client = h.client()
    proto.dataReceived(request(b"POST", headers=[(b"Content-Length", b"4")]) + b"ab")
    up, origin = h.accept_origin()
    h.reactor.advance(2.5)
    proto.dataReceived(b"cd")
    h.reactor.advance(2.5)
    assert client.value() == b"", "504 before the origin had response_timeout to answer"
    h.reactor.advance(1)
    assert one_response(take(client)).status == 504


def test_connect_timeout_gives_504():
    h = Harness(pool={"connect_timeout": 2.0, "retries": 0})
    proto, client = h.client()
    proto.dataReceived(request())
    h.reactor.advance(2.1)
    resp = one_response(take(client))
    assert resp.status in (502, 504)


def test_connection_refused_gives_502():
    h = Harness(pool={"retries": 0})
    proto, client = h.client()
    proto.dataReceived(request())
    h.refuse_origin()
    resp = one_response(take(client))
    assert resp.status == 502
    assert not client.disconnecting


def test_connection_refused_tries_the_next_backend():
    h = Harness(backends=("tcp:10.0.0.1:8000", "tcp:10.0.0.2:8000"))
    proto, client = h.client()
    proto.dataReceived(request())
    first = h.reactor.tcpClients[0][0]
    h.refuse_origin()
    assert h.pending_connects() == 1
    assert h.reactor.tcpClients[1][0] != first
    up, origin = h.accept_origin()
    up.dataReceived(response(200, b"ok"))
    assert one_response(take(client)).status == 200


def test_origin_idle_mid_body_cuts_the_client():
    h = Harness(pool={"idle_timeout": 4.0})
    proto, client = h.client()
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    up.dataReceived(response(200, length=False, headers=[(b"Content-Length", b"10")]) + b"abc")
    h.reactor.advance(3)
    up.dataReceived(b"def")
    h.reactor.advance(3)
    assert not client.disconnecting, "cut while the origin was still sending"
    h.reactor.advance(1.5)
    assert client.disconnecting
    assert origin.disconnecting


def test_slow_request_head_gives_408():
    h = Harness(limits={"header_timeout": 5.0})
    proto, client = h.client()
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n")
    h.reactor.advance(4)
    assert client.value() == b""
    h.reactor.advance(1.5)
    resp = one_response(take(client))
    assert resp.status == 408
    assert client.disconnecting
    assert h.pending_connects() == 0


def test_idle_client_connection_closed_quietly():
    h = Harness(limits={"idle_timeout": 7.0})
    proto, client = h.client()
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    up.dataReceived(response(200, b"ok"))
    take(client)
    h.reactor.advance(6)
    assert not client.disconnecting
    h.reactor.advance(1.5)
    assert client.disconnecting
    assert client.value() == b""


def test_silent_new_connection_closed_after_header_timeout():
    h = Harness(limits={"header_timeout": 5.0})
    proto, client = h.client()
    h.reactor.advance(5.5)
    assert client.disconnecting


def test_steady_upload_longer_than_header_timeout_is_not_cut():
    h = Harness(limits={"header_timeout": 5.0, "idle_timeout": 60.0})
    proto, client = h.client()
    proto.dataReceived(request(b"POST", headers=[(b"Content-Length", b"40")]))
    up, origin = h.accept_origin()
    for _ in range(4):
        h.reactor.advance(2)
        proto.dataReceived(b"x" * 10)  # a new piece every 2 seconds
    assert client.value() == b""
    assert not client.disconnecting
    up.dataReceived(response(200, b"stored"))
    assert one_response(take(client)).status == 200


def test_stalled_upload_gives_408():
    h = Harness(limits={"header_timeout": 5.0, "idle_timeout": 5.0})
    proto, client = h.client()
    proto.dataReceived(request(b"POST", headers=[(b"Content-Length", b"40")]) + b"x" * 10)
    up, origin = h.accept_origin()
    h.reactor.advance(11)
    data = take(client)
    assert client.disconnecting
    if data:
        assert one_response(data, b"POST").status == 408


# ---------------------------------------------------------------------------
# Clients that go away


def test_client_disconnect_aborts_origin_connection():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request())
    up, origin = h.accept_origin()
    up.dataReceived(response(200, length=False, headers=[(b"Content-Length", b"100")]) + b"partial")
    proto.connectionLost(Failure(ConnectionDone()))
    assert origin.disconnecting
    up.connectionLost(Failure(ConnectionDone()))
    assert h.runtime.pools["p"].backends[0].idle == []
    assert h.runtime.pools["p"].backends[0].inflight == 0


def test_client_disconnect_while_connecting_cancels_connect():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request())
    assert h.pending_connects() == 1
    connector = h.reactor.connectors[-1]
    proto.connectionLost(Failure(ConnectionDone()))
    assert connector.stoppedConnecting


def test_local_error_pages_are_plain_and_short():
    h = Harness(routes=[{"host": "known.example", "path": "/app", "pool": "p"}])
    for host, target, status in ((b"known.example", b"/elsewhere", 404), (b"other.example", b"/app", 421)):
        proto, client = h.client()
        proto.dataReceived(request(target=target, host=host))
        resp = one_response(take(client))
        assert resp.status == status
        assert resp.one(b"content-type").startswith(b"text/plain")
        assert len(resp.body) < 200
    assert h.pending_connects() == 0


# ---------------------------------------------------------------------------
# HTTP/1.1's close: without the TLS transport's linger once the last request was read whole


@implementer(ILingerlessClose)
class _LingerRecorder(StringTransport):
    """A transport with the C{ssl} TLS transport's close that does not linger."""

    closed_without_linger = False

    def loseConnectionWithoutLinger(self) -> None:
        self.closed_without_linger = True
        self.loseConnection()


@pytest.mark.parametrize("raw, lingers", [
    (request(headers=[(b"Connection", b"close")]), False),
    (request(headers=[(b"Connection", b"close")]) + b"GET /y HTTP/1.1\r\n\r\n", True),
    (request(headers=[(b"Connection", b"close")], method=b"POST", body=b"hello")[:-2], True),
], ids=["read whole", "bytes after it", "body unread"])
def test_a_close_lingers_only_if_the_client_may_still_be_sending(raw: bytes, lingers: bool) -> None:
    h = Harness(limits={"max_body_bytes": 3})
    addr = IPv4Address("TCP", CLIENT_IP, 40000)
    proto = h.factory.buildProtocol(addr)
    client = _LingerRecorder(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), lenient=True)
    proto.makeConnection(client)
    proto.dataReceived(raw)
    if h.reactor.tcpClients:
        up, _origin = h.accept_origin()
        up.dataReceived(response(200, b"ok"))
    assert one_response(take(client)).status in (200, 413)
    assert client.disconnecting
    assert client.closed_without_linger is not lingers


# HTTP/2's close: GOAWAY on idle, and a backstop for a peer that stops reading


class _AbortRecorder(StringTransport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def test_http2_close_is_cut_when_the_peer_never_reads() -> None:
    import h2.config
    import h2.connection

    from rproxy_tw.http.h2 import H2ServerConnection

    h = Harness()
    idle = h.config.limits.idle_timeout
    conn = H2ServerConnection(h.factory)
    conn.factory = h.factory
    transport = _AbortRecorder(peerAddress=IPv4Address("TCP", CLIENT_IP, 40000), lenient=True)
    conn.makeConnection(transport)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    conn.dataReceived(client.data_to_send())
    take(transport)
    h.reactor.advance(idle)  # no stream for idle_timeout: GOAWAY, then close
    events = client.receive_data(take(transport))
    assert any(type(e).__name__ == "ConnectionTerminated" for e in events), events
    assert transport.disconnecting and not transport.aborted
    # The peer reads nothing more, so the close never completes: cut it.
    h.reactor.advance(idle - 0.5)
    assert not transport.aborted
    h.reactor.advance(0.5)
    assert transport.aborted
    conn.connectionLost(Failure(ConnectionDone()))
    assert not h.reactor.getDelayedCalls()


@pytest.mark.parametrize("raw", [
    b"GET /x HTTP/1.1\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\n\r\n",
], ids=["no host", "two hosts", "no host with a body", "no host then pipelined"])
def test_a_request_refused_at_its_head_gets_one_400_and_the_close(raw: bytes) -> None:
    h = Harness()
    proto, transport = h.client()
    proto.dataReceived(raw)
    data = take(transport)
    assert data.startswith(b"HTTP/1.1 400 "), data
    assert data.count(b"HTTP/1.1 ") == 1, data
    assert transport.disconnecting
    assert h.pending_connects() == 0


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
def test_via_to_the_origin_names_the_clients_http_version(version: bytes) -> None:
    h = Harness()
    proto, transport = h.client()
    proto.dataReceived(b"GET /x HTTP/%s\r\nHost: example.com\r\n\r\n" % version)
    _origin, upstream = h.accept_origin()
    head = upstream.value().split(b"\r\n\r\n")[0]
    assert head.startswith(b"GET /x HTTP/1.1\r\n"), head
    assert b"\r\nVia: %s rproxy" % version in head, head
