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

__all__ = ["ReadGate", "GateProducer", "ResponseFlow"]


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


@implementer(IPushProducer)
class ResponseFlow:
    """
    Registered once on a client connection's transport: when the client's
    write buffer fills, whichever upstream connection is answering at the
    time stops being read.  Registering a producer per request cost
    measurably (most with TLS, whose transport wraps each one).
    """

    __slots__ = ("paused", "gate")

    def __init__(self) -> None:
        self.paused = False
        self.gate: ReadGate | None = None

    def attach(self, gate: ReadGate) -> None:
        """C{gate}'s connection now feeds the client."""
        self.gate = gate
        if self.paused:
            gate.pause("client")

    def detach(self, gate: ReadGate) -> None:
        if self.gate is gate:
            self.gate = None
        if gate.reasons:
            gate.resume("client")

    def pauseProducing(self) -> None:
        self.paused = True
        if self.gate is not None:
            self.gate.pause("client")

    def resumeProducing(self) -> None:
        self.paused = False
        if self.gate is not None:
            self.gate.resume("client")

    def stopProducing(self) -> None:
        self.resumeProducing()
