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

__all__ = ["EndOfTurn"]

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
