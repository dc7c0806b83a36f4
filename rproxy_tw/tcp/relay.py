"""
Raw TCP proxying: each client connection of a C{protocol = "tcp"} listener
is relayed to one backend of the listener's pool, bytes both ways as they
arrive.

The pieces, per client connection:

  - L{TCPProxyServer} is the client side.  It picks a backend (the pool's
    balancing rule, client IP from C{getPeer()}), connects with the pool's
    C{connect_timeout}, fails over to the next backend on failure, then relays.
  - L{_UpstreamProtocol} is the backend side; it only forwards events to its
    L{TCPProxyServer}, which holds all the state of the relay.
  - Backpressure: each transport has a streaming producer registered that
    pauses I{reading} from the other side when its write buffer is full, so a
    stalled reader costs at most a socket buffer and one read's worth of
    bytes on each side, whatever the volume.
  - Half-close: an EOF read from one side becomes C{loseWriteConnection()} on
    the other, and the relay ends when both directions are done.  Over TLS
    (terminated here or originated to the backend) there is no half-close in
    Twisted's TLS: the EOF becomes a TLS close (C{close_notify}) after the
    pending bytes, and the relay keeps reading the other direction until that
    side closes too.

L{TCPProxyFactory} works as is behind a plain endpoint, behind
C{haproxy:} (PROXY protocol accepted from a load balancer in front: the
relay is built only once the incoming header is read, by
L{rproxy_tw.transport.proxy_header}, so it chooses the backend and builds the
outgoing PROXY header with the client's address) and wrapped in C{TLSMemoryBIOFactory} (TLS termination: the
backend connection starts once the handshake is done, so a failed handshake
never reaches a backend, and the PROXY v2 header can carry what was
negotiated).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import math

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableDescriptor,
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..events import TCPSessionClosed
from ..listener import ConnectionCounts, IListenerFactory
from ..transport import describe_address, ip_of
from ..transport.fastwrite import direct_writer, held_bytes
from ..transport.flow import GateProducer, ReadGate
from ..logs import observer as log_observer
from . import proxy_protocol
from .proxy_protocol import TLSInfo
from .tls_halfclose import allow_half_close

__all__ = ["TCPCounters", "TCPProxyFactory", "TCPProxyServer", "tls_info_of"]


READ_SIZE = 256 * 1024
"""
Bytes per read from either side of a plain TCP relay (Twisted reads 64 KiB).
With writes sent at once (L{direct_writer}) this took a 1 GiB relay on
127.0.0.1 from about 1.0 to 1.5 GiB/s, level with HAProxy here; it also sets
when a side's write buffer pauses the other, so a stalled reader costs at most
about two of these per direction.
"""


@attrs.define
class TCPCounters:
    """
    Running totals of one TCP listener, read by metrics and status pages.
    Mutable and updated in place, like L{Backend}'s counters.
    """

    connections_total: int = 0
    """Connections accepted (the rejected ones are not counted here)."""
    connections_active: int = 0
    """Accepted connections not yet closed on both sides."""
    connections_rejected: int = 0
    """Connections closed at once because the listener was at C{max_connections}."""
    connect_failures: int = 0
    """Backend connection attempts that failed or timed out (each try counts)."""
    no_backend: int = 0
    """Clients closed because no backend could be connected to."""
    idle_timeouts: int = 0
    """Relays closed because no byte moved for C{idle_timeout} seconds."""
    bytes_up: int = 0
    """Bytes read from clients (and relayed to backends)."""
    bytes_down: int = 0
    """Bytes read from backends (and relayed to clients)."""


class _Gate(ReadGate):
    """
    A L{ReadGate} that stays shut once its side has sent EOF: resuming a
    Twisted TCP transport after C{readConnectionLost} would start reading
    the finished socket again.
    """

    __slots__ = ("eof",)

    def __init__(self, transport: Any) -> None:
        super().__init__(transport)
        self.eof = False

    def pause(self, reason: str) -> None:
        if self.eof:
            self.reasons.add(reason)
        else:
            super().pause(reason)

    def resume(self, reason: str) -> None:
        if self.eof:
            self.reasons.discard(reason)
        else:
            super().resume(reason)


def _half_closeable(transport: Any) -> bool:
    """
    Whether C{loseWriteConnection()} shuts down only the write side of
    C{transport} without skipping bytes of a layer in between: true for
    socket transports (Twisted's, and ours), seen directly or through pass-through
    wrappers (such as C{haproxy:}'s); false under TLS.
    """
    t = transport
    while isinstance(t, ProtocolWrapper) and not isinstance(t, TLSMemoryBIOProtocol):
        t = t.transport
    return IHalfCloseableDescriptor.providedBy(t)


def _shutdown_write(transport: Any) -> None:
    """Tell C{transport}'s peer we will send no more, after what is buffered."""
    if _half_closeable(transport):
        transport.loseWriteConnection()
    else:
        # TLS waits for the producer to go before it sends close_notify.
        _unregister(transport)
        transport.loseConnection()


def _unregister(transport: Any) -> None:
    try:
        transport.unregisterProducer()
    except Exception:  # noqa: BLE001 - nothing registered, or already gone
        pass


def _keep_alive(transport: Any) -> None:
    """
    Turn on TCP keepalive under C{transport} (through TLS and C{haproxy:}
    wrappers): a relay may idle for an hour, or for ever, and a peer that
    vanished without a FIN is then found by the kernel, not kept.
    """
    t = transport
    while isinstance(t, ProtocolWrapper):
        t = t.transport
    if ITCPTransport.providedBy(t):
        try:
            t.setTcpKeepAlive(1)
        except OSError:  # not a TCP socket after all, or already closed
            pass


def tls_info_of(transport: ITransport) -> TLSInfo | None:
    """
    What TLS negotiated on C{transport}, or L{None} when it is not a TLS
    transport (C{getHandle()} is then a socket, not an OpenSSL connection).
    """
    try:
        handle = transport.getHandle()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - no handle, no TLS
        return None
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - Twisted's TLS needs pyOpenSSL
        return None
    if not isinstance(handle, SSL.Connection):
        return None

    def text(value: Any) -> str | None:
        if value is None:
            return None
        return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)

    cert = handle.get_peer_certificate()
    cn = None
    if cert is not None:
        cn = cert.get_subject().commonName
    return TLSInfo(
        version=text(handle.get_protocol_version_name()),
        cipher=text(handle.get_cipher_name()),
        sni=text(handle.get_servername()),
        alpn=handle.get_alpn_proto_negotiated() or None,
        client_cn=cn,
        client_cert=cert is not None,
        verified=cert is not None and handle.get_verified_chain() is not None,
    )


@implementer(IHalfCloseableProtocol)
class _UpstreamProtocol(Protocol):
    """The backend side of one relay: forwards every event to its L{TCPProxyServer}."""

    def __init__(self, relay: TCPProxyServer) -> None:
        self.relay = relay

    def connectionMade(self) -> None:
        _keep_alive(self.transport)
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            allow_half_close(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.relay.upstreamData(self, data)

    def readConnectionLost(self) -> None:
        self.relay.upstreamEOF(self)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay.upstreamLost(self, reason)


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, relay: TCPProxyServer) -> None:
        self.relay = relay

    def buildProtocol(self, addr: IAddress | None) -> _UpstreamProtocol:
        return _UpstreamProtocol(self.relay)


class _Rejected(Protocol):
    """Stands in for a relay over the connection limit: closes at once, nothing buffered."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class TCPProxyServer(Protocol):
    """
    The client side of one relay, and the relay's state: which backend, how
    many bytes each way, which directions are finished, and why it ended.
    """

    _log = Logger(observer=log_observer)

    def __init__(self, factory: TCPProxyFactory) -> None:
        self.factory = factory
        self.clock: IReactorTime = factory.reactor
        # What the listener had when this relay began: a reload does not move it.
        self.pool: Any = factory.pool
        self.passive: Any = factory.passive
        self.connect_timeout: float = factory.connect_timeout
        self.retries: int = factory.retries
        self.client = "?"
        self.client_ip = ""
        self.backend: Any = None
        self.upstream: _UpstreamProtocol | None = None
        self.header = b""
        self.pending: list[bytes] | None = []
        """Client bytes read before the backend connection exists; L{None} once relaying."""
        self.tried: list[Any] = []
        self.budget = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.started_at = 0.0
        self.last_traffic = 0.0
        self.ended: str | None = None
        """How the relay ended (the first cause wins), for the log line."""
        self.started = False
        self.client_eof = False
        self.upstream_eof = False
        self.client_closed = False
        self.upstream_closed = False
        self.finished = False
        self.client_gate: _Gate | None = None
        self.upstream_gate: _Gate | None = None
        self._connecting: Deferred[Any] | None = None
        self._idle_call: IDelayedCall | None = None
        self._write_client: Callable[[bytes], None] | None = None
        self._write_upstream: Callable[[bytes], None] | None = None

    # -- client side ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.started_at = self.last_traffic = self.clock.seconds()
        self.client_gate = _Gate(self.transport)
        self._write_client = direct_writer(self.transport, read_size=READ_SIZE)
        self.client = describe_address(self.transport.getPeer())  # type: ignore[union-attr]
        self._armIdle(self.factory.idle_timeout)
        _keep_alive(self.transport)
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            allow_half_close(self.transport)
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            return  # handshakeCompleted() starts the relay
        self._start()

    def handshakeCompleted(self) -> None:
        """TLS terminated in front: the session is known, the backend may be chosen."""
        if not self.started and not self.client_closed:
            self._start()

    def _start(self) -> None:
        self.started = True
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self.client = describe_address(peer)
        self.client_ip = ip_of(peer) or ""
        version = self.factory.proxy_protocol
        if version != "off":
            tls = tls_info_of(transport) if version == "v2" else None
            self.header = proxy_protocol.build(version, peer, transport.getHost(), tls)
        pool = self.pool
        healthy = len(pool.candidates())
        # At least every backend in rotation once, however low `retries` is.
        self.budget = max(self.retries + 1, healthy)
        self._connectNext()

    def dataReceived(self, data: bytes) -> None:
        n = len(data)
        self.bytes_up += n
        self.factory.counters.bytes_up += n
        self.last_traffic = self.clock.seconds()
        if self.pending is None:
            if not self.upstream_closed:
                self._write_upstream(data)  # type: ignore[misc]
        else:
            self.pending.append(data)
            self.client_gate.pause("connecting")  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        """The client will send no more: pass the EOF on once its bytes are relayed."""
        if self.client_eof:
            return
        self.client_eof = True
        self.client_gate.eof = True  # type: ignore[union-attr]
        self._why("client closed")
        if self.upstream is not None and not self.upstream_closed:
            _unregister(self.upstream.transport)
            _shutdown_write(self.upstream.transport)
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.client_closed:
            return
        self.client_closed = True
        if self.client_gate is not None:
            self.client_gate.eof = True
        if not self.started:
            self._why("client closed before the relay started" + self._reasonSuffix(reason))
        elif reason.check(ConnectionDone):
            self._why("client closed")
        else:
            self._why("client connection lost" + self._reasonSuffix(reason))
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        upstream = self.upstream
        if upstream is not None and not self.upstream_closed:
            # The client can read nothing more; what it sent still goes.
            _unregister(upstream.transport)
            upstream.transport.loseConnection()  # type: ignore[union-attr]
        self._finishIfClosed()

    # -- choosing and connecting a backend ---------------------------------------------------

    def _connectNext(self) -> None:
        if self.client_closed:
            return
        pool = self.pool
        backend = pool.pick(self.client_ip, (), self.tried) if len(self.tried) < self.budget else None
        if backend is None:
            self._giveUp()
            return
        self.tried.append(backend)
        self.backend = backend
        d = backend.endpoint.connect(_UpstreamFactory(self))
        self._connecting = d
        timeout = self.connect_timeout
        timer = self.clock.callLater(timeout, d.cancel) if timeout > 0 else None
        d.addCallbacks(
            self._upstreamConnected,
            self._connectFailed,
            callbackArgs=(backend, timer, d),
            errbackArgs=(backend, timer, d),
        )

    def _connectFailed(self, failure: Failure, backend: Any, timer: IDelayedCall | None, d: Deferred[Any]) -> None:
        if timer is not None and timer.active():
            timer.cancel()
        if self._connecting is d:
            self._connecting = None
        if self.client_closed:
            return  # we cancelled it: the client is gone
        if failure.check(CancelledError):
            why, kind = f"no connection within {self.connect_timeout:g}s", "timeout"
        else:
            why, kind = failure.getErrorMessage() or failure.type.__name__, "connect"  # type: ignore[union-attr]
        backend.failures += 1
        backend.last_error = why
        self.factory.counters.connect_failures += 1
        self.report_failure(backend, kind)
        self._log.warn(
            "tcp {client}: connect to backend {backend} of pool {pool} failed: {why}",
            client=self.client,
            backend=backend.name,
            pool=self.pool.name,
            why=why,
        )
        self._connectNext()

    def _giveUp(self) -> None:
        self.factory.counters.no_backend += 1
        if self.tried:
            why = f"no backend reachable ({len(self.tried)} tried)"
        else:
            why = "no backend in rotation"
        self._why(why)
        self._log.warn(
            "tcp {client}: {why} in pool {pool}; closing the client", client=self.client, why=why,
            pool=self.pool.name,
        )
        self.backend = None
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _upstreamConnected(self, upstream: _UpstreamProtocol, backend: Any, timer: IDelayedCall | None,
                           d: Deferred[Any]) -> None:
        if timer is not None and timer.active():
            timer.cancel()
        if self._connecting is d:
            self._connecting = None
        if self.client_closed:
            upstream.transport.abortConnection()  # type: ignore[union-attr]
            return
        backend.inflight += 1
        backend.total += 1
        if self.passive is not None:
            self.passive.report_success(backend)
        self.upstream = upstream
        transport = upstream.transport
        assert transport is not None and self.transport is not None
        self.upstream_gate = _Gate(transport)
        # Each side's full write buffer pauses reading from the other side.
        self.transport.registerProducer(GateProducer(self.upstream_gate, "client busy"), True)
        transport.registerProducer(GateProducer(self.client_gate, "backend busy"), True)  # type: ignore[arg-type]
        write = self._write_upstream = direct_writer(transport, read_size=READ_SIZE)
        pending, self.pending = self.pending, None
        if self.header or pending:
            write(b"".join([self.header, *(pending or ())]))
        self.client_gate.resume("connecting")  # type: ignore[union-attr]
        if self.client_eof:
            _unregister(transport)
            _shutdown_write(transport)

    # -- backend side ------------------------------------------------------------------------

    def upstreamData(self, upstream: _UpstreamProtocol, data: bytes) -> None:
        if upstream is not self.upstream or self.client_closed:
            return
        n = len(data)
        self.bytes_down += n
        self.factory.counters.bytes_down += n
        self.last_traffic = self.clock.seconds()
        self._write_client(data)  # type: ignore[misc]

    def upstreamEOF(self, upstream: _UpstreamProtocol) -> None:
        """The backend will send no more: pass the EOF on to the client."""
        if upstream is not self.upstream or self.upstream_eof:
            return
        self.upstream_eof = True
        self.upstream_gate.eof = True  # type: ignore[union-attr]
        self._why("backend closed")
        if not self.client_closed:
            _unregister(self.transport)
            _shutdown_write(self.transport)
        self._closeIfDone()

    def upstreamLost(self, upstream: _UpstreamProtocol, reason: Failure) -> None:
        if upstream is not self.upstream or self.upstream_closed:
            return
        self.upstream_closed = True
        self.upstream_eof = True
        if self.upstream_gate is not None:
            self.upstream_gate.eof = True
        if self.backend is not None:
            self.backend.inflight -= 1
        if reason.check(ConnectionDone):
            self._why("backend closed")
        else:
            self._why("backend connection lost" + self._reasonSuffix(reason))
            if not self.client_eof and self.backend is not None:
                self.report_failure(self.backend, "reset")
        if not self.client_closed:
            # The backend can take nothing more: the client gets what is buffered, then a close.
            _unregister(self.transport)
            self.transport.loseConnection()  # type: ignore[union-attr]
        self._finishIfClosed()

    def report_failure(self, backend: Any, kind: str) -> None:
        if self.passive is not None:
            self.passive.report_failure(backend, kind)

    def buffered(self) -> tuple[int, int, int]:
        """
        Bytes this relay holds in memory: waiting to be written to the client,
        waiting to be written to the backend, and read from the client before
        the backend connection existed.  Backpressure keeps each near one
        read's worth, whatever the reader's speed.
        """
        to_client = held_bytes(self.transport) if not self.client_closed else 0
        to_backend = 0
        if self.upstream is not None and not self.upstream_closed:
            to_backend = held_bytes(self.upstream.transport)
        return to_client, to_backend, sum(map(len, self.pending or ()))

    # -- ending ------------------------------------------------------------------------------

    def _why(self, why: str) -> None:
        if self.ended is None:
            self.ended = why

    @staticmethod
    def _reasonSuffix(reason: Failure) -> str:
        if reason.check(ConnectionDone):
            return ""
        return f": {reason.getErrorMessage() or reason.type.__name__}"  # type: ignore[union-attr]

    def _closeIfDone(self) -> None:
        """Both directions finished: close both connections."""
        if self.client_eof and self.upstream_eof:
            if not self.client_closed:
                _unregister(self.transport)
                self.transport.loseConnection()  # type: ignore[union-attr]
            if self.upstream is not None and not self.upstream_closed:
                _unregister(self.upstream.transport)
                self.upstream.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self, why: str) -> None:
        """Close both sides now, dropping whatever is buffered (idle timeout, shutdown)."""
        self._why(why)
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        if self.upstream is not None and not self.upstream_closed:
            self.upstream.transport.abortConnection()  # type: ignore[union-attr]
        if not self.client_closed and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _armIdle(self, delay: float) -> None:
        if 0 < delay < math.inf:  # 0 or math.inf: no idle timeout
            self._idle_call = self.clock.callLater(delay, self._idleCheck)

    def _idleCheck(self) -> None:
        # One timer per relay, moved along lazily: traffic only stamps a time.
        self._idle_call = None
        if self.finished:
            return
        timeout = self.factory.idle_timeout
        remaining = self.last_traffic + timeout - self.clock.seconds()
        if remaining > 0:
            self._armIdle(remaining)
            return
        self.factory.counters.idle_timeouts += 1
        self.abort(f"idle for {timeout:g}s")

    def _finishIfClosed(self) -> None:
        if self.finished or not self.client_closed:
            return
        if self.upstream is not None and not self.upstream_closed:
            return
        self.finished = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self.factory.relayFinished(self)


@implementer(IListenerFactory)
class TCPProxyFactory(Factory):
    """
    The factory of one C{protocol = "tcp"} listener: per-listener settings,
    the connection limit, and the counters metrics read.

    @param reactor: provides C{IReactorTime}; the only clock used.
    @param pool: the listener's L{BackendPool} (an C{IBackendPool}).
    @param listen: the listener's config; C{proxy_protocol}, and
        C{max_connections} and C{idle_timeout} when the config has them.
    @param pool_config: the pool's config: C{connect_timeout}, C{retries}.
        Its C{idle_timeout} is HTTP's; a relay's is the listener's
        (L{rproxy_tw.config.TCP_IDLE_TIMEOUT} by default), long enough for quiet sessions.
    @param passive: optional passive health (C{report_success(backend)},
        C{report_failure(backend, kind)}) fed with connect results.
    """

    _log = Logger(observer=log_observer)
    noisy = False

    def __init__(self, reactor: Any, pool: Any, listen: Any, pool_config: Any, passive: Any = None) -> None:
        self.reactor = reactor
        self.name = listen.endpoint
        self.configure(pool, listen, pool_config, passive)
        self.counters = TCPCounters()
        self.connections: set[TCPProxyServer] = set()
        """Relays in progress (status pages, L{abortAll}); each has C{.transport}, the client side."""
        self._rejected_logged_at: float | None = None
        self._rejected_unlogged = 0
        self.on_finished: Callable[[TCPProxyServer], None] | None = None
        """Called with each relay as it ends (tests, access logs)."""
        self.on_close: Callable[[], None] | None = None
        """Called after each relay ends (a stop waiting for the last one)."""

    def configure(self, pool: Any, listen: Any, pool_config: Any, passive: Any = None) -> None:
        """
        Take the listener's settings (at a reload too): new relays use them,
        relays open keep the pool and settings they started with.
        """
        self.pool = pool
        self.listen = listen
        self.pool_config = pool_config
        self.passive = passive
        self.events = pool.events
        """The L{rproxy_tw.events.EventBus} told of each relay that ends (the pool's: the runtime's)."""
        self.proxy_protocol: str = listen.proxy_protocol
        self.max_connections: int = listen.max_connections
        self.idle_timeout: float = listen.idle_timeout
        """Seconds a relay may move no byte before both sides close; 0 or C{math.inf}: never."""
        self.connect_timeout: float = float(pool_config.connect_timeout)
        self.retries: int = int(pool_config.retries)

    def set_runtime(self, runtime: Any, listen: Any) -> None:
        """A reload: this listener's pool (which may be another one now) and settings from C{runtime}."""
        self.configure(runtime.pools[listen.pool], listen, runtime.config.pools[listen.pool],
                       runtime.passive.get(listen.pool))

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        counters = self.counters
        if self.max_connections and counters.connections_active >= self.max_connections:
            counters.connections_rejected += 1
            self._logRejected(addr)
            if self.events is not None and self.events.wanted:
                from ..events import ConnectionRefused

                self.events.publish(ConnectionRefused(self.listen.endpoint, ip_of(addr) or "unknown",
                                                      "max_connections", f"max_connections {self.max_connections}"))
            return _Rejected()
        counters.connections_total += 1
        counters.connections_active += 1
        relay = TCPProxyServer(self)
        self.connections.add(relay)
        return relay

    def _logRejected(self, addr: IAddress | None) -> None:
        # One line a second at most: a flood must not become a log flood.
        self._rejected_unlogged += 1
        now = self.reactor.seconds()
        if self._rejected_logged_at is not None and now - self._rejected_logged_at < 1.0:
            return
        self._log.warn(
            "tcp listener {listener}: rejected {count} connection(s) (last from {client}): "
            "at max_connections {limit}",
            listener=self.name,
            count=self._rejected_unlogged,
            client=describe_address(addr),
            limit=self.max_connections,
        )
        self._rejected_logged_at = now
        self._rejected_unlogged = 0

    def relayFinished(self, relay: TCPProxyServer) -> None:
        """Both connections of C{relay} are closed: count it out and log its line."""
        if relay not in self.connections:
            return
        self.connections.discard(relay)
        self.counters.connections_active -= 1
        self._log.info(
            "tcp {listener} {client} -> {backend}: {ended}; {up} bytes up, {down} bytes down, {duration}s",
            listener=self.name,
            pool=relay.pool.name,
            client=relay.client,
            backend=relay.backend.name if relay.backend is not None else "-",
            ended=relay.ended or "closed",
            up=relay.bytes_up,
            down=relay.bytes_down,
            duration=round(self.reactor.seconds() - relay.started_at, 3),
        )
        events = self.events
        if events is not None and events.wanted:
            events.publish(TCPSessionClosed(
                listener=self.name,
                client=relay.client,
                backend=relay.backend.name if relay.backend is not None else None,
                bytes_from_client=relay.bytes_up,
                bytes_to_client=relay.bytes_down,
                started=relay.started_at,
                finished=self.reactor.seconds(),
                reason=relay.ended or "closed",
            ))
        if self.on_finished is not None:
            self.on_finished(relay)
        if self.on_close is not None:
            self.on_close()

    def report_success(self, backend: Any) -> None:
        if self.passive is not None:
            self.passive.report_success(backend)

    def report_failure(self, backend: Any, kind: str) -> None:
        if self.passive is not None:
            self.passive.report_failure(backend, kind)

    # -- IListenerFactory ---------------------------------------------------------------------

    def open_connections(self) -> list[Any]:
        return list(self.connections)

    def connection_counts(self) -> ConnectionCounts:
        return ConnectionCounts(self.counters.connections_total, self.counters.connections_rejected)

    def drain(self) -> None:
        """Raw TCP sessions are left to finish: there is no point at which one is idle."""

    def cut(self, why: str) -> None:
        self.abortAll(why)

    def watch(self, callback: Callable[[], None] | None) -> None:
        self.on_close = callback

    def abortAll(self, why: str = "listener stopped") -> None:
        """Close every relay now, e.g. when a stopping service must not wait for long-lived connections."""
        for relay in list(self.connections):
            relay.abort(why)
