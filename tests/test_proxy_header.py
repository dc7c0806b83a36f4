"""
haproxy: listeners read the PROXY header before the listener's own protocol
exists (rproxy_tw.transport.proxy_header), on StringTransport and Clock.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from zope.interface import implementer

from rproxy_tw.tcp.proxy_protocol import build_v1, build_v2
from rproxy_tw.endpoint_string import behind_proxy_header
from rproxy_tw.transport.proxy_header import ProxyHeaderFactory

BALANCER = IPv4Address("TCP", "10.0.0.2", 41000)
LISTENER = IPv4Address("TCP", "10.0.0.9", 8080)
CLIENT = IPv4Address("TCP", "203.0.113.7", 5555)
DESTINATION = IPv4Address("TCP", "192.0.2.1", 443)


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self, addr: Any) -> None:
        self.built_for = addr
        self.peer: Any = None
        self.host: Any = None
        self.received = b""
        self.read_eof = False
        self.lost = False

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()
        self.host = self.transport.getHost()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_eof = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class RecordingFactory(Factory):
    def __init__(self, refuse: bool = False) -> None:
        self.built: list[Recorder] = []
        self.refuse = refuse

    def buildProtocol(self, addr: Any) -> Recorder | None:
        if self.refuse:
            return None
        protocol = Recorder(addr)
        self.built.append(protocol)
        return protocol


def connect(timeout: float = 5.0, refuse: bool = False) -> tuple[Any, StringTransportWithDisconnection, RecordingFactory, Clock]:
    clock = Clock()
    inner = RecordingFactory(refuse)
    reader = ProxyHeaderFactory(inner, clock, timeout).buildProtocol(BALANCER)
    transport = StringTransportWithDisconnection(hostAddress=LISTENER, peerAddress=BALANCER)
    transport.protocol = reader
    reader.makeConnection(transport)
    return reader, transport, inner, clock


def test_the_protocol_is_built_for_the_client_once_the_header_is_read() -> None:
    reader, transport, inner, _ = connect()
    header = build_v1(CLIENT, DESTINATION)
    for byte in header[:-1]:
        reader.dataReceived(bytes([byte]))
    assert inner.built == []  # nothing sees the connection before the header
    assert reader.logPrefix() == "ProxyHeaderReader"
    reader.dataReceived(header[-1:] + b"GET / HTTP/1.1\r\n")
    [protocol] = inner.built
    assert protocol.built_for == CLIENT
    assert (protocol.peer, protocol.host) == (CLIENT, DESTINATION)
    assert protocol.received == b"GET / HTTP/1.1\r\n"
    assert reader.logPrefix() == "Recorder (ProxyHeaderReader)"
    reader.dataReceived(b"Host: a\r\n")
    assert protocol.received == b"GET / HTTP/1.1\r\nHost: a\r\n"
    assert transport.connected


def test_v2_over_ipv6_and_local_health_checks() -> None:
    reader, _, inner, _ = connect()
    client, destination = IPv6Address("TCP", "2001:db8::7", 40000), IPv6Address("TCP", "2001:db8::1", 443)
    reader.dataReceived(build_v2(client, destination) + b"x")
    assert (inner.built[0].peer, inner.built[0].host, inner.built[0].received) == (client, destination, b"x")
    reader, _, inner, _ = connect()
    reader.dataReceived(build_v2(None, None))  # LOCAL: the balancer's own check, its own addresses
    assert (inner.built[0].peer, inner.built[0].host) == (BALANCER, LISTENER)


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"PROXY TCP4 nonsense\r\n", b"PROXY " + b"1" * 120,
                                  b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x0c"])
def test_a_bad_header_closes_the_connection_and_builds_nothing(data: bytes) -> None:
    reader, transport, inner, clock = connect()
    reader.dataReceived(data)
    assert inner.built == [] and not transport.connected
    assert clock.getDelayedCalls() == []


def test_refusals_are_logged_once_a_second_with_a_count() -> None:
    from twisted.logger import capturedLogs

    clock = Clock()
    factory = ProxyHeaderFactory(RecordingFactory(), clock)
    with capturedLogs() as events:
        for _ in range(50):
            reader = factory.buildProtocol(BALANCER)
            transport = StringTransportWithDisconnection(hostAddress=LISTENER, peerAddress=BALANCER)
            transport.protocol = reader
            reader.makeConnection(transport)
            reader.dataReceived(b"GET / HTTP/1.1\r\n")
            assert not transport.connected
        clock.advance(1.0)
        reader = factory.buildProtocol(BALANCER)
        transport = StringTransportWithDisconnection(hostAddress=LISTENER, peerAddress=BALANCER)
        transport.protocol = reader
        reader.makeConnection(transport)
        reader.dataReceived(b"junk")
    lines = [e for e in events if "PROXY header" in e.get("log_format", "")]
    assert [e["count"] for e in lines] == [1, 50]
    assert "10.0.0.2:41000" == lines[-1]["peer"] and "bad PROXY header" in lines[-1]["why"]


def test_a_header_too_slow_aborts_the_connection() -> None:
    reader, transport, inner, clock = connect(timeout=5.0)
    reader.dataReceived(b"PROXY TCP4 203.0.")
    clock.advance(4.9)
    assert transport.connected
    clock.advance(0.2)
    assert not transport.connected and inner.built == []


def test_the_deadline_ends_with_the_header() -> None:
    reader, transport, inner, clock = connect(timeout=5.0)
    reader.dataReceived(build_v1(CLIENT, DESTINATION))
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    assert transport.connected and len(inner.built) == 1


def test_a_refusing_factory_closes_the_connection() -> None:
    reader, transport, inner, _ = connect(refuse=True)
    reader.dataReceived(build_v1(CLIENT, DESTINATION))
    assert not transport.connected


def test_a_fin_reaches_a_half_closeable_protocol_and_closes_before_the_header() -> None:
    reader, transport, inner, _ = connect()
    reader.dataReceived(build_v1(CLIENT, DESTINATION))
    reader.readConnectionLost()
    assert inner.built[0].read_eof and transport.connected  # a relay still owes the answer
    reader, transport, inner, _ = connect()
    reader.readConnectionLost()
    assert not transport.connected


def test_the_connection_lost_reaches_only_a_built_protocol() -> None:
    reader, transport, inner, clock = connect()
    reader.connectionLost(None)
    assert clock.getDelayedCalls() == []
    reader, transport, inner, _ = connect()
    reader.dataReceived(build_v1(CLIENT, DESTINATION))
    reader.connectionLost(None)
    assert inner.built[0].lost


def test_haproxy_prefix() -> None:
    assert behind_proxy_header("haproxy:tcp:80") == (True, "tcp:80")
    assert behind_proxy_header("tcp:80") == (False, "tcp:80")
