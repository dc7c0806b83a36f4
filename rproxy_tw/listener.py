"""
What the service asks of the factory behind one C{[[listen]]}, whatever
it speaks (HTTP, raw TCP) and whatever wraps it (TLS).

Why an interface: a reload hands each listener its new runtime, and a
graceful stop drains, waits for and finally cuts each listener's
connections; the service says so through these calls, not by guessing at
attributes of whichever factory it holds.
"""

from __future__ import annotations

from typing import Any, Callable

from attrs import frozen
from zope.interface import Interface

from .endpoint_string import parse

__all__ = ["DEFAULT_BACKLOG", "ConnectionCounts", "IListenerFactory", "with_backlog"]

DEFAULT_BACKLOG = 511
"""
The listen queue of a C{tcp}, C{tcp6}, C{ssl} or C{unix} listener that does
not set C{backlog=} itself: nginx's default.  Twisted's is 50, which a burst
of new connections (50 clients that connect for every request) overflows: the
kernel then drops their handshakes, and each waits for a SYN retransmit (a
second, or 200 ms for the last ACK).  The kernel caps it at
C{net.core.somaxconn}.
"""

_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})


@frozen
class ConnectionCounts:
    """One listener's connections: accepted and refused (at C{max_connections}) since it started, tunnels open now."""

    accepted: int
    refused: int
    tunnels: int = 0
    """HTTP connections switched to a tunnel (WebSocket); a raw TCP listener's relays are not counted here."""


class IListenerFactory(Interface):
    """The protocol factory of one listener, as L{rproxy_tw.service.ProxyService} manages it."""

    def set_runtime(runtime: Any, listen: Any) -> None:
        """A reload: new connections and requests use C{runtime} and this listener's new C{[[listen]]}."""

    def open_connections() -> list[Any]:
        """The connections a graceful stop waits for (TLS handshakes and idle keep-alive ones included)."""

    def connection_counts() -> ConnectionCounts:
        """What the status page and metrics show of this listener's connections."""

    def drain() -> None:
        """Ask each connection to close once its present work is done; tunnels and TCP sessions go on."""

    def cut(why: str) -> None:
        """Close every connection now."""

    def watch(callback: Callable[[], None] | None) -> None:
        """Have C{callback} called whenever one of the connections ends (None: stop)."""


def with_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """
    A server endpoint string with C{backlog=} added when its type takes one
    and it has none: what the listener is started with (the configured
    string stays as it was, in logs and events).
    """
    endpoint = parse(description)
    if endpoint.kind.strip().lower() not in _BACKLOG_TYPES or "backlog" in endpoint.kwargs:
        return description
    return f"{description}:backlog={backlog}"
