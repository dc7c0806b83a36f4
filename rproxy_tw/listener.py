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

from zope.interface import Interface

__all__ = ["IListenerFactory"]


class IListenerFactory(Interface):
    """The protocol factory of one listener, as L{rproxy_tw.service.ProxyService} manages it."""

    def set_runtime(runtime: Any, listen: Any) -> None:
        """A reload: new connections and requests use C{runtime} and this listener's new C{[[listen]]}."""

    def open_connections() -> list[Any]:
        """The connections a graceful stop waits for (TLS handshakes and idle keep-alive ones included)."""

    def drain() -> None:
        """Ask each connection to close once its present work is done; tunnels and TCP sessions go on."""

    def cut(why: str) -> None:
        """Close every connection now."""

    def watch(callback: Callable[[], None] | None) -> None:
        """Have C{callback} called whenever one of the connections ends (None: stop)."""
