"""
Writing to a plain TCP transport without a trip through the reactor.

Twisted's C{transport.write} only buffers: it registers the socket for
writability (an C{epoll_ctl}), waits for the next reactor turn, sends, and
unregisters (another C{epoll_ctl}).  Profiling the proxy at 1 KiB requests
showed those steps to be a third of all CPU time.  When nothing is buffered
yet, sending at once is what nginx and HAProxy do; only what the kernel does
not take is left to Twisted's buffering (and so to its producer and
backpressure machinery, which stays in charge).  While a pull (non-streaming)
producer is registered every write goes through Twisted's buffer, since that
is where Twisted learns to ask it for more.

Used only for Twisted's own C{tcp.Connection} transports; any other transport
(TLS, UNIX, test transports) gets its ordinary C{write}.  This module is the
one place that reads Twisted's write buffers, which have no public API: here
to send at once, and in L{held_bytes} to tell how much a transport holds.  The environment
variable C{RPROXY_NO_DIRECT_WRITE=1} turns it off, for A/B measurements.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import ITCPTransport
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol

from .tcp_server import TCPServerConnection

__all__ = ["direct_writer", "held_bytes", "no_delay"]

_READ_SIZE = 256 * 1024
_DISABLED = bool(__import__("os").environ.get("RPROXY_NO_DIRECT_WRITE"))


def direct_writer(transport: Any, read_size: int | None = None) -> Callable[[bytes], None]:
    """
    A C{write(data)} for C{transport} that sends immediately when its buffer is
    empty.

    @param read_size: if given, also the size of each read from this
        transport (Twisted's default is 64 KiB; larger reads mean fewer turns
        of the reactor for large bodies).
    """
    if type(transport) is TCPServerConnection:
        # Sends at once by itself.
        if read_size:
            transport.read_size = read_size
        return transport.write
    if type(transport) not in (tcp.Server, tcp.Client) or transport.TLS or _DISABLED:
        return transport.write
    if read_size:
        transport.bufferSize = read_size
    sock = transport.socket
    send = sock.send
    fallback = transport.write

    def write(data: bytes) -> None:
        if (
            transport._tempDataLen
            or len(transport.dataBuffer) > transport.offset
            or not transport.connected
            or transport.disconnecting
            or transport.TLS
            # A pull producer is asked for more when Twisted's buffer empties,
            # which Twisted only sees if the write goes through that buffer.
            or (transport.producer is not None and not transport.streamingProducer)
        ):
            fallback(data)
            return
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let Twisted meet the error on its own write path and report it.
            fallback(data)
            return
        if sent < len(data):
            fallback(data[sent:] if sent else data)

    return write


def no_delay(transport: Any) -> None:
    """
    Turn Nagle off where the transport allows it: a proxy writes whole
    heads and bodies and must not wait for an ACK before the next one.
    """
    if ITCPTransport.providedBy(transport):
        try:
            transport.setTcpNoDelay(True)
        except OSError:
            pass


def held_bytes(transport: Any) -> int:
    """
    Bytes written to C{transport} and not yet handed to the kernel: in
    Twisted's socket buffer and, under TLS, in what waits for the handshake.
    Tests use it to show that backpressure keeps a proxy's memory flat.
    """
    held = 0
    t = transport
    while isinstance(t, ProtocolWrapper):
        if isinstance(t, TLSMemoryBIOProtocol):
            held += sum(map(len, t._appSendBuffer))
        t = t.transport
    if isinstance(t, FileDescriptor):
        held += len(t.dataBuffer) - t.offset + t._tempDataLen
    elif isinstance(t, TCPServerConnection):
        held += t.buffered()
    return held
