"""
After C{101 Switching Protocols} (WebSocket and other upgrades), the client
and origin connections carry raw bytes both ways, each pausing the other when
it cannot keep up.
"""

from __future__ import annotations

from typing import Any

from ..transport.flow import GateProducer

__all__ = ["Tunnel"]


class Tunnel:
    """Relays bytes between a client connection and an upstream connection."""

    def __init__(self, client: Any, upstream: Any) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = False
        self.from_client = 0
        """Bytes the client sent through the tunnel."""
        self.to_client = 0
        """Bytes the origin sent through the tunnel."""

    def start(self, from_client: bytes, from_upstream: bytes) -> None:
        client, upstream = self.client, self.upstream
        client.tunnel = self
        upstream.tunnel = self
        client.gate.resume("pipeline")
        client.flow.attach(upstream.gate)
        upstream.transport.registerProducer(GateProducer(client.gate, "upstream"), True)
        client.flush()
        if from_upstream:
            self.fromUpstream(from_upstream)
        if from_client:
            self.fromClient(from_client)

    def fromClient(self, data: bytes) -> None:
        self.from_client += len(data)
        self.upstream.write(data)

    def fromUpstream(self, data: bytes) -> None:
        self.to_client += len(data)
        self.client.write(data)

    def peerLost(self, side: Any) -> None:
        """One side closed: close the other once its pending bytes are written."""
        if self.closed:
            return
        self.closed = True
        other = self.upstream if side is self.client else self.client
        other.tunnel = None
        try:
            other.transport.unregisterProducer()
        except Exception:  # noqa: BLE001 - already gone
            pass
        other.transport.loseConnection()
        self.client.tunnelClosed(self)
