"""
Flow control between two transports.

A transport can be asked to stop reading for several reasons at once (its
peer's write buffer is full, a pipelined request waits its turn, no upstream
connection exists yet).  L{ReadGate} counts the reasons so that one reason
ending does not resume reading while another still holds.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

__all__ = ["ReadGate", "GateProducer"]


class ReadGate:
    """Pauses C{transport} while at least one reason holds."""

    __slots__ = ("transport", "reasons")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.transport.resumeProducing()

    @property
    def paused(self) -> bool:
        return bool(self.reasons)


@implementer(IPushProducer)
class GateProducer:
    """
    The producer registered on one transport to pause reading from the
    other: when C{consumer}'s buffer fills, Twisted calls C{pauseProducing}.
    """

    __slots__ = ("gate", "reason", "on_stop")

    def __init__(self, gate: ReadGate, reason: str, on_stop: Any = None) -> None:
        self.gate = gate
        self.reason = reason
        self.on_stop = on_stop

    def pauseProducing(self) -> None:
        self.gate.pause(self.reason)

    def resumeProducing(self) -> None:
        self.gate.resume(self.reason)

    def stopProducing(self) -> None:
        self.gate.resume(self.reason)
        if self.on_stop is not None:
            self.on_stop()
