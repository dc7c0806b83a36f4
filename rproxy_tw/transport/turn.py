"""
Calls put off to the end of the reactor turn that asked for them.

A reactor turn serves every event one poll returned: under load, the new
connections and responses of dozens of clients.  What is gathered during
the turn and done once it ends (one C{callLater(0)} for all of it, run
before the reactor polls again) costs one timed call, not one each, and
happens together: the requests of a turn reach an origin back to back,
which wakes it once for all of them instead of once per request (a wake-up
of an idle CPU is what a send costs most on a virtual machine).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["SEND_AT_ONCE", "EndOfTurn", "TurnWriter"]

SEND_AT_ONCE = 16 * 1024
"""
Bytes a L{TurnWriter} sends at once rather than at the end of the turn: what
waits for the turn's end is this much per connection at most (a body's large
reads go out as they come), and only small writes gain from going together.
"""

_log = Logger()


class EndOfTurn:
    """
    Calls made when the present reactor turn ends, in the order they were
    added.  One failing call is logged and does not keep the others from
    being made.  A call added while they are made gets a timed call of its
    own (the reactor makes it on its next turn).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._due: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def add(self, call: Callable[..., Any], *args: Any) -> None:
        if not self._due:
            self.clock.callLater(0, self._run)
        self._due.append((call, args))

    def _run(self) -> None:
        due, self._due = self._due, []
        for call, args in due:
            try:
                call(*args)
            except Exception:  # noqa: BLE001 - one call's bug must not cost the others theirs
                _log.failure("{call} at the end of a reactor turn failed", call=call)


class TurnWriter:
    """
    One connection's writes, sent when the reactor turn ends (at once past
    L{SEND_AT_ONCE} bytes), as one send: a response's head and body, or the
    responses of several pipelined requests, leave together, and the turn's
    sends on every connection follow each other after its reads.

    Whoever closes the connection calls L{flush} first (what waits would be
    lost otherwise); an abort calls L{drop}.
    """

    __slots__ = ("_send", "_turn", "_unsent", "_unsent_bytes")

    def __init__(self, send: Callable[[bytes], None], turn: EndOfTurn) -> None:
        """
        @param send: sends at once (the transport's write).
        @param turn: where the flush at the turn's end is scheduled.
        """
        self._send = send
        self._turn = turn
        self._unsent: list[bytes] = []
        self._unsent_bytes = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        unsent = self._unsent
        if not unsent:
            if len(data) >= SEND_AT_ONCE:
                self._send(data)
                return
            self._turn.add(self.flush)
        unsent.append(data)
        self._unsent_bytes += len(data)
        if self._unsent_bytes >= SEND_AT_ONCE:
            self.flush()

    def flush(self) -> None:
        """Send what waits for the end of the turn now."""
        unsent = self._unsent
        if not unsent:
            return
        data = unsent[0] if len(unsent) == 1 else b"".join(unsent)
        unsent.clear()
        self._unsent_bytes = 0
        self._send(data)

    def drop(self) -> None:
        """Forget what waits: the connection was aborted or is gone."""
        self._unsent.clear()
        self._unsent_bytes = 0

    def waiting(self) -> int:
        """Bytes written and not yet sent."""
        return self._unsent_bytes
