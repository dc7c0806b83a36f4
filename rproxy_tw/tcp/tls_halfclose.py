"""
Half-close over TLS, for TCP relays.

Twisted's TLS transport ends the whole connection when the peer's
C{close_notify} arrives (and on a bare TCP FIN), so a client that sends its
last bytes, closes its sending side and waits for the answer (what
C{shutdown(SHUT_WR)} does on plain TCP) gets nothing back through a TLS
front.  TLS 1.3 says (RFC 8446, section 6.1) that C{close_notify} closes only
the sender's direction, and stunnel and HAProxy treat it that way.

The subclasses here do the same when the application protocol is an
C{IHalfCloseableProtocol}:

  - the peer's C{close_notify}, or a TCP FIN without one (many clients send
    no C{close_notify}: stunnel takes the FIN as the end of data too), becomes
    C{readConnectionLost()}, and writing goes on;
  - C{loseWriteConnection()} sends our C{close_notify} after the pending
    bytes and goes on reading until the peer closes too;
  - once both sides are done, the TCP connection is closed.

Protocols that are not half-closeable keep Twisted's behaviour.  The code
follows Twisted's own C{_flushReceiveBIO} (Twisted 24-26); if Twisted's
internals move, L{allow_half_close} does nothing for the classes it does not
know, and relays fall back to whole-connection closes.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import directlyProvidedBy, directlyProvides, implementer

__all__ = [
    "HalfCloseTLSMemoryBIOProtocol",
    "HalfCloseBufferingTLSTransport",
    "allow_half_close",
]


class _HalfCloseTLS:
    """The half-close behaviour, mixed into Twisted's TLS transport classes."""

    _peerEOF = False
    """The peer has finished sending (C{close_notify}, or a FIN without one)."""
    _tcpEOF = False
    """The peer's TCP FIN has arrived."""

    def _halfClose(self: Any) -> bool:
        return not self.disconnecting and IHalfCloseableProtocol.providedBy(self.wrappedProtocol)

    def _peerFinished(self: Any) -> None:
        self._peerEOF = True
        self.wrappedProtocol.readConnectionLost()

    def _flushReceiveBIO(self: Any) -> None:
        while not self._lostTLSConnection and not self._peerEOF:
            try:
                data = self._tlsConnection.recv(2**15)
            except WantReadError:
                break
            except ZeroReturnError:
                if self._halfClose():
                    self._peerFinished()
                else:
                    self._shutdownTLS()
                    self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        if self._tlsConnection is not None:
            self._flushSendBIO()

    def _shutdownTLS(self: Any) -> None:
        super()._shutdownTLS()  # type: ignore[misc]
        if self._peerEOF and not self._aborted:
            # Both directions are done; the peer's close_notify may never come
            # (it sent a bare FIN), so do not wait for it.
            self.transport.loseConnection()

    def readConnectionLost(self: Any) -> None:
        """The TCP FIN (only delivered to us because we are half-closeable)."""
        self._tcpEOF = True
        if self._peerEOF or self._lostTLSConnection:
            if self.disconnecting:
                self.transport.loseConnection()
            return
        if not self._halfClose():
            self.transport.loseConnection()
            return
        # A FIN without close_notify: the end of the data, as stunnel takes it.
        # Every byte received has been through OpenSSL already (dataReceived
        # drains it), so at most a partial record is dropped.  OpenSSL is not
        # told (bio_shutdown would make its state fatal and stop our writes).
        self._peerFinished()

    def writeConnectionLost(self: Any) -> None:
        pass

    def loseWriteConnection(self: Any) -> None:
        """Send C{close_notify} after what is buffered; keep reading."""
        self.loseConnection()


@implementer(IHalfCloseableProtocol)
class HalfCloseTLSMemoryBIOProtocol(_HalfCloseTLS, TLSMemoryBIOProtocol):
    """L{TLSMemoryBIOProtocol} with TLS half-close for half-closeable protocols."""


@implementer(IHalfCloseableProtocol)
class HalfCloseBufferingTLSTransport(_HalfCloseTLS, BufferingTLSTransport):
    """L{BufferingTLSTransport} (Twisted's default TLS transport) with TLS half-close."""


_VARIANTS: dict[type, type] = {
    TLSMemoryBIOProtocol: HalfCloseTLSMemoryBIOProtocol,
    BufferingTLSTransport: HalfCloseBufferingTLSTransport,
}


def allow_half_close(transport: Any) -> bool:
    """
    Give a TLS transport of Twisted's own classes the half-close behaviour.

    Called by a relay from C{connectionMade}, before any byte is read: the
    TLS factories of listeners and of C{tls:} endpoints are built elsewhere,
    so the relay upgrades the transport it is handed instead (the variant
    only adds methods; the instance's state is the same).  A factory can also
    set C{protocol = HalfCloseBufferingTLSTransport} and skip this.

    @return: whether C{transport} now half-closes (false for unknown classes).
    """
    cls = type(transport)
    if cls in (HalfCloseTLSMemoryBIOProtocol, HalfCloseBufferingTLSTransport):
        return True
    variant = _VARIANTS.get(cls)
    if variant is None:
        return False
    transport.__class__ = variant
    # zope caches the class in what the instance directly provides; refresh it
    # so that the new class's IHalfCloseableProtocol is seen.
    directlyProvides(transport, directlyProvidedBy(transport))
    return True
