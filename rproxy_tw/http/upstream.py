"""
HTTP/1.1 connections to origins, and the bounded keep-alive pool of them.

One L{UpstreamConnection} carries one exchange at a time (no pipelining to
origins: a failure would be ambiguous).  When a response ends cleanly and the
request was sent whole, the connection goes back to its backend's idle list
for the next request; nothing ever sends C{Connection: close} to an origin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import LimitsConfig
from ..logs import observer as log_observer
from ..transport.fastwrite import direct_writer, no_delay
from ..transport.flow import GateProducer, ReadGate

if TYPE_CHECKING:
    from ..upstream.pool import Backend
    from .exchange import ProxyExchange

__all__ = ["UpstreamConnection", "UpstreamConnector", "BadResponse", "ResponseHeadTooLarge"]


class BadResponse(Exception):
    """The origin's response could not be parsed."""


class ResponseHeadTooLarge(BadResponse):
    """The origin's response head (or trailer section) is over the bounds of C{[limits]}."""


class _NoBody(Exception):
    """Raised from a parser callback to end a response that has no body (HEAD)."""


class UpstreamConnection(Protocol):
    """The client side of one HTTP/1.1 connection to a backend."""

    _log = Logger(observer=log_observer)

    def __init__(self, backend: Backend, connector: UpstreamConnector) -> None:
        self.backend = backend
        self.connector = connector
        self.exchange: ProxyExchange | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.gate: ReadGate | None = None
        self.requests = 0
        self.idle_since = 0.0
        self.connected = False
        self.received = False
        self.no_body = False
        self._keep_after_head = True
        self._upgrading = False
        self._timer: Any = None
        self.last_read = 0.0
        self.sent_at = 0.0
        self.tunnel: Any = None
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._interim = False
        self._close_delimited = False
        self._read_size = 0
        """The size of the read being parsed."""
        # A head, chunk-size line or trailer section is being read: its bytes
        # are counted, as llhttp hands over a header line only once it is whole
        # (and a chunk extension never).
        self._in_head = False
        self._head_bytes = 0

    # -- connection life --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        self.gate = ReadGate(self.transport)
        self.client_producer = GateProducer(self.gate, "client")
        self._watch()
        """Registered on the client's transport while this connection answers it."""
        self.write = direct_writer(self.transport, read_size=256 * 1024)
        no_delay(self.transport)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        timer = self._timer
        if timer is not None:
            self._timer = None
            if timer.active():
                timer.cancel()
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.peerLost(self)
            return
        ex = self.exchange
        if ex is None:
            self.connector.forget(self)
            return
        self.exchange = None
        if self._close_delimited:
            self._close_delimited = False
            if reason is None or reason.check(ConnectionDone):
                # A clean close is the end of this response's body.
                ex.responseEnd(self._trailers or ())
                return
            # A reset (or a TLS error) is not: the body was cut short.
        ex.upstreamLost(self, reason)

    def _watch(self) -> None:
        """
        Start this connection's one timer.  It never waits longer than the
        shortest of the pool's timeouts, and on firing works out the deadline
        of the present state (response head due, body silent, idle in the
        pool) from timestamps: requests move timestamps, never the timer.
        """
        self._timer = self.connector.clock.callLater(self.connector.span, self._deadline)

    def _deadline(self) -> None:
        self._timer = None
        if not self.connected or self.tunnel is not None:
            return
        clock = self.connector.clock
        now = clock.seconds()
        ex = self.exchange
        if ex is not None:
            settings = ex.settings
            if ex.headSent:
                deadline = self.last_read + settings.idle_timeout
            else:
                deadline = self.sent_at + settings.response_timeout
        else:
            deadline = self.idle_since + self.connector.keepalive_timeout
        if now < deadline:
            self._timer = clock.callLater(min(deadline - now, self.connector.span), self._deadline)
            return
        if ex is not None:
            self._watch()
            ex._timedOut()
        else:
            self.connector.forget(self)
            self.transport.loseConnection()

    def close(self) -> None:
        if self.connected:
            self.transport.loseConnection()

    def abort(self) -> None:
        if self.connected:
            self.transport.abortConnection()

    # -- one exchange -----------------------------------------------------------------------

    def send(self, exchange: ProxyExchange, head: bytes, no_body: bool) -> None:
        """Send a request head; the body follows through L{writeBody}."""
        self.exchange = exchange
        self.received = False
        self.no_body = no_body
        self.requests += 1
        self.sent_at = self.connector.clock.seconds()
        self.write(head)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.fromUpstream(data)
            return
        ex = self.exchange
        if ex is None:
            # An idle connection must not speak; whatever this is, it is not ours.
            self.transport.abortConnection()
            return
        self.received = True
        self.last_read = self.connector.clock.seconds()
        self._read_size = len(data)
        downstream = ex.downstream
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            upgrading, self._upgrading = self._upgrading, False
            if self.exchange is not None and upgrading:
                self.exchange.upstreamUpgraded(self, data[e.args[0] :])
            else:
                self._fail(BadResponse("unexpected protocol upgrade"))
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _NoBody):
                self.parser = httptools.HttpResponseParser(self)
                self._complete()
            else:
                self._fail(e.__context__ or e)
        except httptools.HttpParserError as e:
            self._fail(BadResponse(str(e)))
        else:
            if self._in_head:
                # A section still open after this read: bound it by the bytes
                # read, since an endless line gives no callback to check.
                # The read that opened it is not counted (it may hold a body).
                if self._head_bytes:
                    self._head_bytes += len(data)
                    if self._head_bytes > self.connector.max_head_bytes:
                        section = "response head" if self._trailers is None else "chunk line or trailer section"
                        self._fail(ResponseHeadTooLarge(f"{section} over {self.connector.max_head_bytes} bytes"))
                else:
                    self._head_bytes = 1
        downstream.flush()

    def _fail(self, why: BaseException) -> None:
        ex = self.exchange
        self.exchange = None
        self._close_delimited = False
        self._in_head = False
        self.transport.abortConnection()
        if ex is None:
            return
        if isinstance(why, BadResponse):
            # The origin's fault: it counts against the backend, as a reset does.
            passive = ex.settings.passive
            if passive is not None:
                passive.report_failure(self.backend, "reset")
        if isinstance(why, ResponseHeadTooLarge):
            self._log.warn("backend {backend} of pool {pool} sent a {why}: stopped reading it",
                           backend=self.backend.name, pool=ex.pool.name, why=why)
        ex.upstreamBroken(self, why)

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reason = b""
        self._headers = []
        self._trailers = None
        self._in_head = True
        self._head_bytes = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        if len(self._reason) > self.connector.max_status_line:
            raise ResponseHeadTooLarge(f"status line over {self.connector.max_status_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only appended here (this runs for every field of every response):
        # the bytes of a section are bounded per read in dataReceived, and
        # its field count and size are checked once it is complete.
        if self._trailers is None:
            self._headers.append((name, value))
        else:
            self._trailers.append((name, value))
            self._checkFields(self._trailers, "trailer section")

    def _checkFields(self, fields: list[tuple[bytes, bytes]], section: str) -> None:
        connector = self.connector
        if len(fields) > connector.max_headers or \
                sum(len(n) + len(v) + 4 for n, v in fields) > connector.max_header_bytes:
            raise ResponseHeadTooLarge(
                f"{section} over {connector.max_headers} fields or {connector.max_header_bytes} bytes"
            )

    def on_chunk_header(self) -> None:
        # Either a chunk's data follows, or (after the last chunk) the trailer section.
        self._in_head = True
        self._head_bytes = 0

    def on_chunk_complete(self) -> None:
        # The next chunk-size line follows (or the message ends).
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        connector = self.connector
        if self._head_bytes or self._read_size > connector.max_header_bytes or \
                len(self._headers) > connector.max_headers:
            # A head that could be over the bound (read in several pieces, or
            # from one large read): add up its size.  Small ones cannot be.
            self._checkFields(self._headers, "response head")
        parser = self.parser
        status = parser.get_status_code()
        ex = self.exchange
        assert ex is not None
        if status == 101:
            self._upgrading = True
        elif 100 <= status < 200:
            self._interim = True
            ex.responseInterim(status, self._reason, self._headers)
            return
        self._trailers = []
        body_allowed = not (self.no_body or status in (204, 304))
        content_length = None
        chunked = False
        transfer_encoded = False
        for name, value in self._headers:
            # Compare lengths first: most headers are neither, and this runs per response.
            size = len(name)
            if size == 14 and name.lower() == b"content-length":
                content_length = int(value)
            elif size == 17 and name.lower() == b"transfer-encoding":
                transfer_encoded = True
                # RFC 9112 6.3: chunked framing only when chunked is the final coding;
                # any other final coding means the body ends when the connection closes.
                chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        if transfer_encoded:
            content_length = None
        framed = chunked or content_length is not None
        self._close_delimited = body_allowed and not framed
        if chunked and body_allowed:
            # The first chunk-size line is bounded as the head was.
            self._in_head = True
            self._head_bytes = 0
        ex.responseHead(status, self._reason, self._headers, content_length, chunked)
        if self.no_body and status >= 200:
            self._keep_after_head = parser.should_keep_alive()
            raise _NoBody()

    def on_body(self, body: bytes) -> None:
        self._in_head = False
        self.exchange.responseBody(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self._in_head = False
        if self._interim:
            self._interim = False
            return
        if self._upgrading:
            # The parser stops next with HttpParserUpgrade: the switch is handled there.
            return
        self._complete()

    def _complete(self) -> None:
        ex = self.exchange
        self.exchange = None
        self._close_delimited = False
        trailers = self._trailers or ()
        keep = self.parser.should_keep_alive() if not self.no_body else self._keep_after_head
        if ex is None:
            return
        # Back in the pool first, so that a pipelined next request reuses it.
        self.connector.release(self, keep and ex.requestSent)
        ex.responseEnd(trailers)


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, backend: Backend, connector: UpstreamConnector) -> None:
        self.backend = backend
        self.connector = connector

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        conn = UpstreamConnection(self.backend, self.connector)
        conn.factory = self
        return conn


class UpstreamConnector:
    """
    Gives out connections to backends: an idle kept-alive one when there is
    one, else a new one (with a connect timeout).  Keeps at most C{keepalive}
    idle connections per backend, each for at most C{keepalive_timeout}.
    """

    _log = Logger(observer=log_observer)

    unreplayable_reuse: float = 1.0
    """
    Seconds an idle connection may have waited and still carry a request that
    cannot be sent again (a POST): an origin closing a connection after its
    own idle timeout (Node's and Apache's are 5 s) can cross such a request on
    the wire, and it would get a 502 with no retry.  Requests that can be
    replayed take any idle connection, and are retried if that happens.
    """

    def __init__(self, clock: IReactorTime, keepalive: int, keepalive_timeout: float, connect_timeout: float,
                 span: float | None = None, limits: LimitsConfig | None = None) -> None:
        self.clock = clock
        self.keepalive = keepalive
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        self.span = span if span is not None else keepalive_timeout
        """The longest a connection's timer waits: the pool's shortest timeout."""
        # An origin's response head is bounded as a client's request head is,
        # by C{[limits]} (their defaults when none is given).
        if limits is None:
            limits = LimitsConfig()
        self.max_status_line: int = limits.max_request_line
        self.max_header_bytes: int = limits.max_header_bytes
        self.max_headers: int = limits.max_headers
        self.max_head_bytes = self.max_status_line + self.max_header_bytes + 1024
        """The most bytes a response head or trailer section may take, line breaks and all."""

    def idle(self, backend: Backend, replayable: bool = True) -> UpstreamConnection | None:
        """
        A kept-alive connection to C{backend}, or None.  Not C{replayable}:
        only one idle for less than L{unreplayable_reuse} (the one released
        last is the freshest; older ones stay for requests that can be replayed).
        """
        idle = backend.idle
        if not idle:
            return None
        now = self.clock.seconds()
        while idle:
            conn = idle.pop()
            if conn.connected and now - conn.idle_since < self.keepalive_timeout:
                if not replayable and now - conn.idle_since >= self.unreplayable_reuse:
                    idle.append(conn)
                    return None
                return conn
            conn.close()
        return None

    def connect(self, backend: Backend) -> Deferred[UpstreamConnection]:
        """A new connection to C{backend}; fails after C{connect_timeout}."""
        d = backend.endpoint.connect(_UpstreamFactory(backend, self))
        timer = self.clock.callLater(self.connect_timeout, d.cancel)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            elif isinstance(result, Failure):
                result = Failure(ConnectTimeout(f"connect timed out after {self.connect_timeout:g}s"))
            return result

        d.addBoth(done)
        return d

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """An exchange on C{conn} is over: keep the connection for reuse, or close it."""
        if not conn.connected:
            return
        if not reusable or len(conn.backend.idle) >= self.keepalive:
            conn.close()
            return
        gate = conn.gate
        if gate is not None and gate.reasons:
            gate.reasons.clear()
            conn.transport.resumeProducing()
        conn.idle_since = self.clock.seconds()
        conn.backend.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """An idle connection closed: take it off its backend's list."""
        try:
            conn.backend.idle.remove(conn)
        except ValueError:
            pass

    def sweep(self, backends: list[Backend]) -> None:
        """Close idle connections kept longer than C{keepalive_timeout}."""
        now = self.clock.seconds()
        for backend in backends:
            stale = [c for c in backend.idle if now - c.idle_since >= self.keepalive_timeout]
            for conn in stale:
                self.forget(conn)
                conn.close()


class ConnectTimeout(Exception):
    """The backend did not accept the connection in time."""


ConnectCallback = Callable[[UpstreamConnection], None]
