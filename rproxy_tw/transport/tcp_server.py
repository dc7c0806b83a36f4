"""
A TCP listening port and its server connections, over the reactor's
C{IReactorFDSet}.

Why not Twisted's C{tcp.Port} and C{tcp.Server}: a client that connects
for every request (health checkers, scripts, many API clients) paid more
in Twisted's accept and close than in its request.  Profiled per
connection, Twisted's accept loop (a generator under a log-buffering
context manager), a transport built with a dozen attributes and two
formatted strings, the peer's address built twice, and a close that takes
a reactor turn of its own (register for writability, wake up, send
nothing, unregister twice, C{shutdown}, C{close}) were a third of the
proxy's work for such a client.  Here:

- the accept loop takes what the kernel has queued, at most
  L{ACCEPTS_PER_TURN}, in one plain loop;
- a connection is registered with the reactor once, for reading, and for
  writing only while the kernel refuses bytes; it reads once as soon as it
  is started (a client that speaks first has often sent its request by
  then), without waiting for the reactor's next turn;
- a write is sent at once when nothing waits before it (nginx's and
  HAProxy's way; Twisted only buffers, and sends on the next turn);
- a close whose bytes are all sent takes the socket off the reactor at
  once (one C{epoll_ctl}) and sends the FIN (C{shutdown}: this side closes
  first and keeps the TIME_WAIT, not the client); the socket is closed,
  and the protocol hears of it, at the start of the next turn, together
  with every other connection that closed in this one, as it would from
  Twisted (never from inside its own call to C{loseConnection}).  The
  descriptor stays open until then so that its number cannot be reused by
  a connection accepted later in the same turn, which an event of this
  turn still waiting for it would reach.  What is written after
  C{loseConnection} went out before the close when bytes were still
  waiting, and is dropped once the close is under way (as after Twisted's
  connection ends).

What the transport promises is Twisted's: L{ITCPTransport}, producer and
consumer (a streaming producer is paused while more than
L{WRITE_HIGH_WATER} bytes wait, a pull producer asked for more when none
do), half-close for L{IHalfCloseableProtocol}s, C{abortConnection} with a
reset.  Only C{tcp} and C{tcp6} listeners use it (L{server_endpoint});
everything else, and every client connection, is Twisted's.  The
environment variable C{RPROXY_TWISTED_TCP=1} gives C{tcp} listeners
Twisted's port back, for A/B measurements.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any, Callable

from twisted.internet.abstract import isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import (
    CannotListenError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
)
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IListeningPort,
    ILoggingContext,
    IPushProducer,
    IReactorFDSet,
    IReactorTime,
    IReadWriteDescriptor,
    IStreamServerEndpoint,
    ISystemHandle,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..endpoint_string import parse
from ..listener import DEFAULT_BACKLOG, with_backlog

__all__ = [
    "ACCEPTS_PER_TURN",
    "READ_SIZE",
    "WRITE_HIGH_WATER",
    "TCPListeningPort",
    "TCPServerConnection",
    "TCPServerEndpoint",
    "adopt_tcp_port",
    "adopts_tcp",
    "server_endpoint",
]

READ_SIZE = 64 * 1024
"""Bytes asked of the kernel per read (Twisted's size), unless a protocol asks for larger reads."""

WRITE_HIGH_WATER = 64 * 1024
"""Bytes the kernel refused that may wait before a streaming producer is paused (Twisted's bound)."""

ACCEPTS_PER_TURN = 128
"""New connections taken in one wake-up of the listener, at most: the rest wait for the next turn."""

ACCEPT_PAUSE = 0.1
"""Seconds the listener stops accepting when the process is out of file descriptors (or the kernel of memory)."""

_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_CLIENT_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
"""C{accept} errors about one client only (EPERM: netfilter refused it): the next may be fine."""
_RESET = struct.pack("ii", 1, 0)
_DONE = Failure(ConnectionDone())
_LOST = Failure(ConnectionLost())
_TWISTED_TCP = bool(os.environ.get("RPROXY_TWISTED_TCP"))
_log = Logger()


class _LostLater:
    """
    Connections whose socket closed in this reactor turn, told their
    protocols on the next one: one timed call for all of them, not one each.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._due: list[tuple[TCPServerConnection, Failure]] = []

    def add(self, connection: TCPServerConnection, reason: Failure) -> None:
        if not self._due:
            self.clock.callLater(0, self._tell)
        self._due.append((connection, reason))

    def _tell(self) -> None:
        due, self._due = self._due, []
        for connection, reason in due:
            try:
                connection.connectionLost(reason)
            except Exception:  # noqa: BLE001 - one protocol's bug must not keep the others from hearing
                _log.failure("{connection}: connectionLost failed", connection=connection)


@implementer(ITCPTransport, IPushProducer, IConsumer, IReadWriteDescriptor, IHalfCloseableDescriptor, ISystemHandle)
class TCPServerConnection:
    """
    One accepted TCP connection: the transport of its protocol, and the
    reactor's reader (and, while the kernel refuses bytes, writer) of its
    socket.

    @ivar connected: true from the accept until the protocol is told the
        connection is lost.
    @ivar disconnecting: C{loseConnection} (or an abort, or a failed send)
        was called: nothing more is written.
    @ivar read_size: bytes asked of the kernel per read.
    """

    # Set in __init__, not as class defaults: CPython 3.11 specializes
    # reading an instance's own attribute, not a class default read
    # through the instance, and these are read on every write and close.
    producer: Any
    streamingProducer: bool
    producerPaused: bool
    disconnecting: bool
    disconnected: bool
    read_size: int
    _reading: bool
    _writing: bool
    _read_ended: bool
    _write_ending: bool
    _write_ended: bool
    _closed: bool
    _ended: bool
    _reset: bool
    _host: IPv4Address | IPv6Address | None
    _no_delay: bool | None

    def __init__(self, sock: socket.socket, protocol: Any, peer: IPv4Address | IPv6Address,
                 port: TCPListeningPort, log_prefix: str) -> None:
        self.socket = sock
        self.protocol = protocol
        self.fileno: Callable[[], int] = sock.fileno
        self._peer = peer
        self._port = port
        self.reactor = port.reactor
        self._send = sock.send
        self._out = bytearray()
        self._log_prefix = log_prefix
        self.connected = True
        self.producer = None
        self.streamingProducer = self.producerPaused = False
        self.disconnecting = self.disconnected = False
        self.read_size = READ_SIZE
        self._reading = self._writing = self._read_ended = False
        self._write_ending = self._write_ended = self._closed = self._ended = self._reset = False
        self._host = self._no_delay = None

    def __repr__(self) -> str:
        return f"<{type(self.protocol).__name__} {self._log_prefix} on {self._port.port_number}>"

    # -- reactor registration ----------------------------------------------------------------

    def _start_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self.reactor.addReader(self)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self.reactor.addWriter(self)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)

    # -- IReadWriteDescriptor ------------------------------------------------------------------

    def logPrefix(self) -> str:
        return self._log_prefix

    def doRead(self) -> Any:
        try:
            data = self.socket.recv(self.read_size)
        except BlockingIOError:
            return None
        except OSError:
            return _LOST.value
        if not data:
            return _DONE.value
        self.protocol.dataReceived(data)
        return None

    def read_first(self) -> None:
        """
        Read once without waiting for the reactor to say so: an HTTP or
        TLS client speaks first, and its request is often in the kernel
        already when the connection is accepted (then it is served a
        reactor turn, and an event's dispatch, sooner).  Nothing there, an
        end or an error: the reactor finds it as it would have.
        """
        try:
            data = self.socket.recv(self.read_size)
        except OSError:
            return
        if data:
            self.protocol.dataReceived(data)

    def doWrite(self) -> Any:
        if self._ended:
            return None  # ended by what ran earlier in this reactor turn
        out = self._out
        if out:
            try:
                sent = self._send(out)
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return None  # the kernel is short of memory for now: writable again later
                return _LOST.value
            del out[:sent]
            if out:
                return None
        self._stop_writing()
        self._flushed()
        return None

    def readConnectionLost(self, reason: Failure) -> None:
        """The peer's FIN (the reactor has stopped reading): a half-closeable protocol may go on writing."""
        self._reading = False
        self._read_ended = True
        half = IHalfCloseableProtocol(self.protocol, None)
        if half is None:
            self.connectionLost(reason)
            return
        try:
            half.readConnectionLost()
        except Exception:  # noqa: BLE001 - the protocol's bug ends its connection, as Twisted's does
            failure = Failure()
            _log.failure("{connection}: readConnectionLost failed", failure, connection=self)
            self.connectionLost(failure)

    def writeConnectionLost(self, reason: Failure) -> None:
        self.connectionLost(reason)

    def connectionLost(self, reason: Failure) -> None:
        """
        The one end of a connection: its socket closed (if it is not yet),
        its producer stopped, its protocol told once.
        """
        if self.disconnected:
            return
        self._close_socket(self._reset)
        self.disconnected = True
        self.disconnecting = True
        self.connected = False
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        protocol, self.protocol = self.protocol, None
        protocol.connectionLost(reason)

    # -- closing -------------------------------------------------------------------------------

    def _close_socket(self, reset: bool = False) -> None:
        """Off the reactor (while the descriptor still means this socket), then closed; a reset if asked."""
        if self._closed:
            return
        self._closed = self._ended = True
        self._stop_reading()
        self._stop_writing()
        sock = self.socket
        if reset:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            except OSError:
                pass
        sock.close()

    def _end(self, reason: Failure, reset: bool = False) -> None:
        """
        Off the reactor now; on the next turn the socket is closed (reset,
        if asked) and the protocol told.  The descriptor stays open until
        then: closed now, its number could go to a connection accepted (or
        an origin connection opened) later in this turn, and an event this
        turn's poll returned for the old socket would reach the new one.  A
        reset waits as Twisted's abort does: a client whose connection is
        refused at once sees it open, then reset, not a failed connect.
        """
        if self._ended:
            return
        self._ended = True
        self._reset = reset
        self.disconnecting = True
        self._stop_reading()
        self._stop_writing()
        self._port.lost_later.add(self, reason)

    def _flushed(self) -> None:
        """Everything written is in the kernel: feed the producer, or finish a close asked for."""
        producer = self.producer
        if producer is not None and (not self.streamingProducer or self.producerPaused):
            self.producerPaused = False
            producer.resumeProducing()
        elif self.disconnecting:
            self._close_flushed()
        elif self._write_ending and not self._write_ended:
            self._send_fin()
            half = IHalfCloseableProtocol(self.protocol, None)
            if half is not None:
                half.writeConnectionLost()

    def _close_flushed(self) -> None:
        """
        A close whose bytes are all in the kernel: the FIN goes now, the
        descriptor closes on the next turn (L{_end}).  Sent at once, it makes
        this side the first to close, which keeps the connection's TIME_WAIT
        here, as nginx's close does; sent a turn later, a client that reads
        the response and closes first keeps it instead, a local port held
        for a minute per connection (one that connects per request runs
        short of ports: 28,000 of them by default).
        """
        self._send_fin()
        self._end(_DONE)

    def _send_fin(self) -> None:
        """Shut the write side (once): the peer reads the end of the stream after what was sent."""
        if self._write_ended:
            return
        self._write_ended = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already

    def loseConnection(self) -> None:
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        self._stop_reading()
        producer = self.producer
        if self._out or (producer is not None and (not self.streamingProducer or self.producerPaused)):
            # The buffer drains first (and a producer that is owed a resume
            # gets it): the close is finished by doWrite or unregisterProducer.
            self._start_writing()
        else:
            self._close_flushed()

    def loseWriteConnection(self) -> None:
        if self.disconnecting or self._write_ending:
            return
        self._write_ending = True
        self._start_writing()

    def abortConnection(self) -> None:
        if self._ended or self.disconnected:
            return
        self._out.clear()
        self._end(Failure(ConnectionAborted()), reset=True)

    # -- writing -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._ended or self._write_ended or not data:
            return
        out = self._out
        if out or self.disconnecting or (self.producer is not None and not self.streamingProducer):
            # Bytes wait already (they go first), a close waits for the
            # buffer to drain (doWrite finishes it), or a pull producer
            # learns of room only from doWrite.
            out += data
            self._start_writing()
            if len(out) > WRITE_HIGH_WATER:
                self._pause_producer()
            return
        try:
            sent = self._send(data)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                self._end(Failure(ConnectionLost(str(e))))
                return
            sent = 0  # the kernel is short of memory for now: doWrite tries again
        if sent < len(data):
            out += memoryview(data)[sent:]
            self._start_writing()
            if len(out) > WRITE_HIGH_WATER:
                self._pause_producer()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def _pause_producer(self) -> None:
        producer = self.producer
        if producer is not None and self.streamingProducer and not self.producerPaused:
            self.producerPaused = True
            producer.pauseProducing()

    def buffered(self) -> int:
        """Bytes written and not yet taken by the kernel."""
        return len(self._out)

    # -- IConsumer -----------------------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"Cannot register producer {producer}, because producer {self.producer} "
                               "was never unregistered.")
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer = producer
        self.streamingProducer = streaming
        self.producerPaused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producerPaused = False
        if (self.disconnecting or self._write_ending) and not self._ended:
            self._start_writing()  # a close waited for the producer: doWrite finishes it

    # -- IPushProducer (reading) ---------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._stop_reading()

    def resumeProducing(self) -> None:
        if not self.disconnecting and not self._read_ended and not self._ended:
            self._start_reading()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- addresses and options -----------------------------------------------------------------

    def getPeer(self) -> IPv4Address | IPv6Address:
        return self._peer

    def getHost(self) -> IPv4Address | IPv6Address:
        host = self._host
        if host is None:
            host = self._host = self._port.host_of(self.socket)
        return host

    def getHandle(self) -> socket.socket:
        return self.socket

    def getTcpNoDelay(self) -> bool:
        return bool(self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def setTcpNoDelay(self, enabled: bool) -> None:
        enabled = bool(enabled)
        if self._no_delay is not enabled:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, enabled)
            self._no_delay = enabled

    def getTcpKeepAlive(self) -> bool:
        return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, bool(enabled))


@implementer(IListeningPort)
class TCPListeningPort:
    """
    A listening TCP socket: accepts, builds each connection's protocol
    with the factory, and starts it on a L{TCPServerConnection}.

    C{TCP_NODELAY} is set on the listening socket: Linux's accepted sockets
    inherit it, so a protocol that turns Nagle off (every one of ours does,
    as nginx's and HAProxy's connections have it off) costs no system call.
    """

    disconnecting = False
    """Stopped listening (what Twisted's port says by this name, which callers read)."""

    def __init__(self, reactor: Any, sock: socket.socket, factory: Any) -> None:
        self.reactor = reactor
        self.socket = sock
        self.factory = factory
        self.fileno: Callable[[], int] = sock.fileno
        self.lost_later = _LostLater(reactor)
        # The socket module's accept() is Python around the C call, and asks
        # the listening socket for its family and type (each an enum made
        # anew) for every connection: here they are looked up once.
        self._accept = sock._accept
        self._kind = (int(sock.family), int(sock.type), sock.proto)
        self._address_type = IPv6Address if sock.family == socket.AF_INET6 else IPv4Address
        bound = sock.getsockname()
        self.port_number: int = bound[1]
        self._host = self._address_type("TCP", *bound)  # IPv6: flow info and scope too, as Twisted's
        self._wildcard = bound[0] in ("0.0.0.0", "::")
        self._prefixes: dict[type, str] = {}
        self._prefix = _log_prefix_of(factory)
        self._sessions = 0
        self._listening = False
        self._paused_call: Any = None
        self._refused = 0
        self.no_delay: bool | None = None
        """Whether accepted sockets have C{TCP_NODELAY} already: learnt from the first one (None: not yet)."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.no_delay = False

    def __repr__(self) -> str:
        return f"<{self._prefix} on {self.port_number}>"

    def startListening(self) -> None:
        self.factory.doStart()
        self._listening = True
        self.reactor.addReader(self)
        _log.info("{factory} starting on {port}", factory=self._prefix, port=self.port_number)

    def stopListening(self) -> Deferred[None]:
        if not self._listening:
            return succeed(None)
        self.connectionLost(_DONE)
        return succeed(None)

    loseConnection = stopListening

    def connectionLost(self, reason: Failure) -> None:
        """The port closes (a stop, or the reactor's shutdown): no more accepts; open connections go on."""
        if not self._listening:
            return
        self._listening = False
        self.disconnecting = True
        if self._paused_call is not None and self._paused_call.active():
            self._paused_call.cancel()
        self._paused_call = None
        self.reactor.removeReader(self)
        self.socket.close()
        _log.info("({factory} on {port} closed)", factory=self._prefix, port=self.port_number)
        self.factory.doStop()

    def getHost(self) -> IPv4Address | IPv6Address:
        return self._host

    def host_of(self, sock: socket.socket) -> IPv4Address | IPv6Address:
        """A connection's own address: the port's, unless the port listens on every interface."""
        if not self._wildcard:
            return self._host
        return self._address_type("TCP", *sock.getsockname())

    def logPrefix(self) -> str:
        return self._prefix

    def doRead(self) -> None:
        accept = self._accept
        family, kind, proto = self._kind
        address_type = self._address_type
        for _ in range(ACCEPTS_PER_TURN):
            if not self._listening:
                return  # stopped by a connection started in this loop
            try:
                fd, addr = accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(e)
                    return
                if e.errno in _CLIENT_GONE:
                    continue
                raise  # the listening socket itself is broken: the reactor closes the port, as Twisted's
            try:
                sock = socket.socket(family, kind, proto, fd)
            except OSError:
                os.close(fd)
                continue
            try:
                sock.setblocking(False)
                if len(addr) == 4 and addr[3]:
                    # IPv6 with a scope (fe80::1%eth0): the numeric form names it.
                    addr = (socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0], *addr[1:])
                no_delay = self.no_delay
                if no_delay is None:
                    no_delay = self.no_delay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                peer = address_type("TCP", *addr)
            except OSError:
                sock.close()  # gone before it was set up (a reset, for one)
                continue
            try:
                self._start(sock, peer, no_delay)
            except Exception:  # noqa: BLE001 - one connection's failure must not close the port
                _log.failure("{factory} on {port}: a new connection failed to start",
                             factory=self._prefix, port=self.port_number)

    def _start(self, sock: socket.socket, peer: IPv4Address | IPv6Address, no_delay: bool) -> None:
        """
        One accepted socket's protocol, started on its transport.  A
        protocol that fails to start is reset, and told so on the next turn
        (as any lost connection: what it registered is released).
        """
        try:
            protocol = self.factory.buildProtocol(peer)
        except BaseException:
            sock.close()
            raise
        if protocol is None:
            sock.close()
            return
        kind = type(protocol)
        prefix = self._prefixes.get(kind)
        if prefix is None:
            prefix = self._prefixes[kind] = _log_prefix_of(protocol)
        self._sessions = session = self._sessions + 1
        transport = TCPServerConnection(sock, protocol, peer, self, f"{prefix},{session},{peer.host}")
        if no_delay:
            transport._no_delay = True
        transport._start_reading()
        try:
            protocol.makeConnection(transport)
            if transport._reading:
                transport.read_first()
        except BaseException:
            transport._end(Failure(), reset=True)
            raise

    def _pause_accepting(self, error: OSError) -> None:
        """Out of descriptors: the queue waits (a level-triggered listener would spin) and is tried again soon."""
        self._refused += 1
        _log.warn("{factory} on {port}: cannot accept ({error}); accepting again in {pause} s",
                  factory=self._prefix, port=self.port_number, error=error.strerror,
                  pause=ACCEPT_PAUSE)
        self.reactor.removeReader(self)
        self._paused_call = self.reactor.callLater(ACCEPT_PAUSE, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._paused_call = None
        if self._listening:
            self.reactor.addReader(self)


def _log_prefix_of(thing: Any) -> str:
    """What Twisted's log lines call a factory or protocol: its own C{logPrefix()}, else its class's name."""
    context = ILoggingContext(thing, None)
    return context.logPrefix() if context is not None else type(thing).__name__


@implementer(IStreamServerEndpoint)
class TCPServerEndpoint:
    """A C{tcp} or C{tcp6} listener on L{TCPListeningPort}: the reactor needs only C{IReactorFDSet} and time."""

    def __init__(self, reactor: Any, port: int, backlog: int = DEFAULT_BACKLOG, interface: str = "",
                 family: socket.AddressFamily = socket.AF_INET) -> None:
        self.reactor = reactor
        self.port = port
        self.backlog = backlog
        self.interface = interface
        self.family = family

    def listen(self, protocolFactory: Any) -> Deferred[TCPListeningPort]:
        try:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
        except OSError as e:  # out of descriptors, for one
            return fail(CannotListenError(self.interface, self.port, e))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
        except OSError as e:
            sock.close()
            return fail(CannotListenError(self.interface, self.port, e))
        sock.setblocking(False)
        port = TCPListeningPort(self.reactor, sock, protocolFactory)
        port.startListening()
        return succeed(port)


def adopts_tcp(reactor: Any) -> bool:
    """Whether C{tcp} listeners on C{reactor} get L{TCPListeningPort} (a real reactor, and not turned off)."""
    return not _TWISTED_TCP and IReactorFDSet.providedBy(reactor) and IReactorTime.providedBy(reactor)


def adopt_tcp_port(reactor: Any, fd: int, family: int, factory: Any) -> TCPListeningPort:
    """
    Listen on a TCP socket opened elsewhere (a worker's share of the
    supervisor's), as C{adoptStreamPort} does: the descriptor is
    duplicated, the caller's stays the caller's to close.
    """
    sock = socket.socket(family, socket.SOCK_STREAM, fileno=os.dup(fd))
    sock.setblocking(False)
    port = TCPListeningPort(reactor, sock, factory)
    port.startListening()
    return port


def server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    The server endpoint of a listener's endpoint string: C{tcp} and C{tcp6}
    on L{TCPServerEndpoint} when L{adopts_tcp}, everything else through
    Twisted's C{serverFromString} (with L{with_backlog}'s default backlog).
    """
    endpoint = parse(description)
    kind = endpoint.kind.strip().lower()
    if kind not in ("tcp", "tcp6") or not adopts_tcp(reactor) or set(endpoint.kwargs) - {"port", "interface", "backlog"}:
        return serverFromString(reactor, with_backlog(description))
    args, kwargs = endpoint.args, endpoint.kwargs
    port = int(args[0] if args else kwargs["port"])
    interface = args[2] if len(args) > 2 else kwargs.get("interface", "::" if kind == "tcp6" else "")
    # Twisted's tcp: listens on IPv6 when the interface is an IPv6 address.
    family = socket.AF_INET6 if kind == "tcp6" or isIPv6Address(interface) else socket.AF_INET
    backlog = int(args[1] if len(args) > 1 else kwargs.get("backlog", DEFAULT_BACKLOG))
    return TCPServerEndpoint(reactor, port, backlog, interface, family)
