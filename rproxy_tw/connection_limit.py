"""
C{max_connections} for a listener whose protocols count themselves in no
shared place (HTTP: a TLS handshake in progress is not yet an HTTP
connection): count from C{buildProtocol} to C{connectionLost}, and close
what is over the limit at once, as the TCP listener does.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from .logs import observer as log_observer
from .transport import ip_of

__all__ = ["ConnectionLimit"]


class _Rejected(Protocol):
    """Stands in for a connection over the limit: closed at once, nothing read or written."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class ConnectionLimit:
    """
    The open connections of one listener, against its C{max_connections}.

    @ivar active: connections built and not yet lost.
    @ivar open: those connections' protocols (a graceful stop drains them,
        TLS handshakes in progress included).
    @ivar rejected: connections closed at once because C{active} was at the limit.
    @ivar on_close: called after each counted connection is lost (a stop
        waiting for the last one).
    """

    _log = Logger(observer=log_observer)

    def __init__(self, clock: IReactorTime, listener: str, limit: int) -> None:
        self.clock = clock
        self.listener = listener
        self.limit = limit
        self.active = 0
        self.open: set[Any] = set()
        self.rejected = 0
        self.accepted = 0
        """Connections counted since the listener started (metrics read it)."""
        self.on_close: Callable[[], None] | None = None
        self._logged_at: float | None = None
        self._unlogged = 0

    def full(self, addr: Any) -> Protocol | None:
        """At the limit: the protocol that closes this connection at once (the rejection is counted)."""
        if self.active < self.limit or not self.limit:  # 0: no limit
            return None
        self.rejected += 1
        self._unlogged += 1
        now = self.clock.seconds()
        # One line a second at most: a flood must not become a log flood.
        if self._logged_at is None or now - self._logged_at >= 1.0:
            self._log.warn(
                "listener {listener}: rejected {count} connection(s) (last from {client}): at max_connections {limit}",
                listener=self.listener, count=self._unlogged, client=ip_of(addr) or addr, limit=self.limit,
            )
            self._logged_at = now
            self._unlogged = 0
        return _Rejected()

    def track(self, protocol: Any) -> Any:
        """Count C{protocol} as open until its C{connectionLost}."""
        self.active += 1
        self.accepted += 1
        self.open.add(protocol)
        # One partial of a method, not a closure made per connection.
        protocol.connectionLost = partial(self._lost, protocol, protocol.connectionLost)
        return protocol

    def _lost(self, protocol: Any, lost: Callable[[Any], None], reason: Any = None) -> None:
        if protocol in self.open:
            self.open.discard(protocol)
            self.active -= 1
            # The partial and the protocol hold each other: let go, so that
            # reference counting frees the connection, not the garbage collector.
            # (Deleted, not popped from __dict__, which CPython would have to
            # build for the occasion.)
            try:
                del protocol.connectionLost
            except AttributeError:
                pass
        lost(reason)
        if self.on_close is not None:
            self.on_close()
