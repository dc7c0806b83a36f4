"""
The first deadline of many connections on one timer.

A client that connects for every request is answered and gone in
milliseconds, long before its C{header_timeout}: a timer of its own
(a C{DelayedCall} made, pushed on the reactor's heap, cancelled, and later
swept from the heap) was pure cost for each such connection.  Connections
that start with the same span are due in the order they came, so one
C{DelayedCall} for the oldest serves them all: a new connection costs a
dict insert, a closed one a dict removal.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime

__all__ = ["FirstDeadlines"]


class FirstDeadlines:
    """
    Connections waiting for their first deadline, in the order they are due.

    A connection leaves when it is due (C{on_due} is called with it: its own
    timer logic takes over from there), when it is closed, or when it needs
    a timer of its own sooner (L{discard}).  A deadline earlier than one
    already watched (a reload shortened the span) is refused: that
    connection keeps a timer of its own, and the order holds.

    @ivar pending: each watched connection's deadline, in the order due.
    """

    def __init__(self, clock: IReactorTime, on_due: Callable[[Any], None]) -> None:
        self.clock = clock
        self.on_due = on_due
        self.pending: dict[Any, float] = {}
        self._last = 0.0
        self._call: Any = None
        self._due = 0.0
        """When C{_call} fires."""

    def watch(self, conn: Any, deadline: float, delay: float) -> bool:
        """
        Call C{on_due(conn)} at C{deadline} (C{delay} seconds from now), unless
        it is discarded first.  False: not watched (due before another).
        """
        pending = self.pending
        if pending and deadline < self._last:
            return False
        self._last = deadline
        pending[conn] = deadline
        if self._call is None:
            self._call = self.clock.callLater(delay, self._fire)
            self._due = deadline
        elif deadline < self._due:  # all that was watched for then is gone, and the span is shorter now
            self._call.reset(delay)
            self._due = deadline
        return True

    def deadline(self, conn: Any) -> float | None:
        """C{conn}'s deadline if it is watched."""
        return self.pending.get(conn)

    def discard(self, conn: Any) -> None:
        """C{conn} no longer waits here (closed, or on a timer of its own)."""
        self.pending.pop(conn, None)

    def _fire(self) -> None:
        self._call = None
        now = self.clock.seconds()
        pending = self.pending
        due = []
        for conn, deadline in pending.items():
            if deadline > now:
                break
            due.append(conn)
        for conn in due:
            del pending[conn]
        if pending:
            self._due = next(iter(pending.values()))
            self._call = self.clock.callLater(self._due - now, self._fire)
        for conn in due:
            self.on_due(conn)
