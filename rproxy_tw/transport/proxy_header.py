"""
The PROXY protocol accepted from a load balancer in front (C{haproxy:} listeners).

A connection on such a listener starts with a PROXY header naming the
client; only then does the listener's own protocol (TLS, HTTP, a raw TCP
relay) see the connection, built by its factory with the client's address,
and C{getPeer()}/C{getHost()} say what the header said from its first call.
Twisted's own C{haproxy:} wrapper connects the wrapped protocol at once and
says nothing when the header arrives, yet the client's address is what picks
a backend by hash, goes into the PROXY header a relay sends on, and fills
C{X-Forwarded-For}.  The header itself is read by the pure parser in
L{rproxy_tw.tcp.proxy_protocol}: bounded by the specification's sizes (107
bytes for v1, 16 + 65,535 for v2), and it must arrive within C{timeout}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from ..logs import observer as log_observer
from . import describe_address
from ..tcp.proxy_protocol import ProxyHeader, ProxyProtocolError, parse

__all__ = ["HEADER_TIMEOUT", "ProxyHeaderEndpoint", "ProxyHeaderFactory"]

HEADER_TIMEOUT = 10.0
"""Seconds a connection may take to send its PROXY header, by default (HAProxy's C{timeout client} order)."""


@implementer(IHalfCloseableProtocol)
class ProxyHeaderReader(ProtocolWrapper):
    """
    One connection: reads the PROXY header, then builds the listener's
    protocol with the client's address and hands it the rest of the bytes.
    Until then it is no transport to anyone.  A FIN from the client reaches
    a protocol that half-closes as such (a relay still owes the answer),
    and closes the connection for any other (as a plain socket would).
    """

    factory: ProxyHeaderFactory

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        self.factory = factory
        self.wrappedProtocol: Any = None
        self.header: ProxyHeader | None = None
        """The header, once read (the listener's protocol exists only then)."""
        self._received = b""
        self._deadline: IDelayedCall | None = None

    def logPrefix(self) -> str:
        return super().logPrefix() if self.wrappedProtocol is not None else "ProxyHeaderReader"

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self._deadline = self.factory.clock.callLater(self.factory.timeout, self._tooSlow)

    def _tooSlow(self) -> None:
        self._deadline = None
        self.factory.refused(self.transport.getPeer(), f"no PROXY header within {self.factory.timeout:g}s")
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.header is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        received = self._received + data
        try:
            parsed = parse(received)
        except ProxyProtocolError as e:
            self._refuse(str(e))
            return
        if parsed is None:
            self._received = received
            return
        self.header, used = parsed
        self._received = b""
        self._cancelDeadline()
        protocol = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if protocol is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = protocol
        self.factory.registerProtocol(self)
        protocol.makeConnection(self)
        rest = received[used:]
        if rest and self.connected and not self.disconnecting:
            protocol.dataReceived(rest)

    def _refuse(self, why: str) -> None:
        self._cancelDeadline()
        self.factory.refused(self.transport.getPeer(), f"bad PROXY header ({why})")
        self.transport.loseConnection()

    def _cancelDeadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def getPeer(self) -> IAddress:
        if self.header is not None and self.header.source is not None:
            return self.header.source
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        if self.header is not None and self.header.destination is not None:
            return self.header.destination
        return self.transport.getHost()

    def readConnectionLost(self) -> None:
        if self.header is not None and IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.header is not None and IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008 - Twisted's signature
        self._cancelDeadline()
        if self.wrappedProtocol is None:
            return
        self.factory.unregisterProtocol(self)
        self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None


class ProxyHeaderFactory(WrappingFactory):
    """Wraps a listener's factory: its protocols are built once each connection's PROXY header is read."""

    protocol = ProxyHeaderReader
    noisy = False
    log = Logger(observer=log_observer)

    def __init__(self, wrappedFactory: Factory, clock: IReactorTime, timeout: float = HEADER_TIMEOUT) -> None:  # noqa: N803
        super().__init__(wrappedFactory)
        self.clock = clock
        self.timeout = timeout
        self._logged_at: float | None = None
        self._unlogged = 0

    def refused(self, peer: IAddress, why: str) -> None:
        """A connection closed for its header: one log line a second at most (a flood is not a log flood)."""
        self._unlogged += 1
        now = self.clock.seconds()
        if self._logged_at is None or now - self._logged_at >= 1.0:
            self.log.info("closed {count} connection(s) for their PROXY header; the last, from {peer}: {why}",
                          count=self._unlogged, peer=describe_address(peer), why=why)
            self._logged_at = now
            self._unlogged = 0

    def buildProtocol(self, addr: IAddress) -> ProxyHeaderReader:
        return self.protocol(self)


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """Listens as C{endpoint} does, every connection starting with a PROXY header."""

    def __init__(self, endpoint: IStreamServerEndpoint, clock: IReactorTime, timeout: float = HEADER_TIMEOUT) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout

    def listen(self, protocolFactory: Factory) -> Deferred[Any]:  # noqa: N803 - the interface's name
        return self.endpoint.listen(ProxyHeaderFactory(protocolFactory, self.clock, self.timeout))


