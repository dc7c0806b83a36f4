"""
rproxy's own HTTP/1.1 server connection.

Why not twisted.web's C{HTTPChannel}: it reads each request body whole before
C{render()} and costs tens of microseconds a request in layers a proxy does
not need.  This connection parses with httptools (llhttp, strict about
framing: one Content-Length, chunked last), walks the Resource tree once per
request head, and streams bodies both ways with backpressure.  Pipelined
requests are answered in order: a request parsed while another is being
answered waits, and reading stops until its turn.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import httptools
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..headers import ForwardingInfo, http_date, is_trusted, serialize, trailers_for_client
from ..logs import observer as log_observer
from ..events import EventBus
from ..listener import ConnectionCounts, IListenerFactory
from ..pipeline import EMPTY_CHAIN, FilterChain, ResponseHeaders
from ..routing import ErrorPage, ProxyRoute
from ..tls import client_subject, close_waits_for_peer
from .exchange import IDownstream, IExchange, ProxyExchange, RequestRejected as _Reject
from ..transport import ILingerlessClose, ip_of
from ..transport.deadlines import FirstDeadlines
from ..transport.fastwrite import direct_writer, no_delay
from ..transport.flow import ReadGate, ResponseFlow
from .request import ProxyRequest, read_request_head

__all__ = ["HTTPProxyFactory", "HTTPServerConnection", "LocalResponse", "http_date"]

Headers = Sequence[tuple[bytes, bytes]]

REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    204: b"No Content",
    304: b"Not Modified",
    400: b"Bad Request",
    308: b"Permanent Redirect",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def error_body(status: int, message: str) -> bytes:
    return (message + "\n").encode("utf-8")


def error_response(status: int, message: str, close: bool, extra: Headers = (), server: bytes = b"rproxy",
                   date: bytes = b"", page: Any = None) -> bytes:
    """
    A whole answer made by the proxy: plain text, or the configured error
    C{page} (an L{rproxy_tw.config.ErrorPageConfig}).  C{date} is
    L{http_date} (none when empty).
    """
    body, content_type = (page.body, page.content_type.encode("ascii")) if page is not None else \
        (error_body(status, message), b"text/plain; charset=utf-8")
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        status,
        REASONS.get(status, b"Error"),
        content_type,
        len(body),
    )
    if date:
        head += b"Date: " + date + b"\r\n"
    if server:
        head += b"Server: " + server + b"\r\n"
    head += serialize(extra)
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


FORWARDING_CACHE = 1024
"""Client addresses whose L{ForwardingInfo} a listener keeps (all are dropped when full: a bound, not an LRU)."""

CLOSE_GRACE = 5.0
"""Seconds a closing connection on Twisted's TLS may wait for the peer's close_notify before it is cut."""


@implementer(IExchange)
class LocalResponse:
    """An answer made by the proxy itself (errors, 404, 421...)."""

    backend = None
    pool = None
    route_name = None
    head_at = None
    attempts = 0
    body_seen = 0
    headSent = False
    upgrade = False
    http_version = b"1.1"

    def __init__(self, conn: Any, status: int, message: str, close: bool = False, extra: Headers = (),
                 request: Any = None, started_at: float | None = None):
        self.conn = conn
        self.status = status
        self.message = message
        self.close = close
        self.keep_alive = not close
        self.extra = extra
        self.request = request
        """The L{ProxyRequest} when the head could be read (a 404 or 421), else None."""
        if request is not None:
            self.http_version = request.http_version
        self.started_at = started_at
        self.finished = False
        self.requestComplete = False

    def start(self) -> None:
        self.conn.writeLocal(self.status, self.message, self.close, self.extra)
        self.finished = True
        self.conn.exchangeDone(self)

    def requestBodyData(self, data: bytes) -> None:
        pass

    def requestBodyEnd(self) -> None:
        self.requestComplete = True

    def cancel(self) -> None:
        self.finished = True


class _ChallengeBody:
    """The body of an ACME HTTP-01 answer, in the shape of an error page (what C{writeLocal} sends)."""

    content_type = "application/octet-stream"

    def __init__(self, body: bytes) -> None:
        self.body = body


class ChallengeAnswer(LocalResponse):
    """
    The key authorization for an ACME HTTP-01 token (L{rproxy_tw.acme}):
    answered by a plain HTTP listener before routing and before any https
    redirect, exactly the bytes the CA expects.
    """

    def __init__(self, conn: Any, key_authorization: bytes, keep_alive: bool, request: Any,
                 started: float | None) -> None:
        super().__init__(conn, 200, "OK", close=not keep_alive, request=request, started_at=started)
        self.page = _ChallengeBody(key_authorization)

    def start(self) -> None:
        self.conn.writeLocal(self.status, self.message, self.close, self.extra, self.page)
        self.finished = True
        self.conn.exchangeDone(self)


@implementer(IDownstream)
class HTTPServerConnection(Protocol):
    """One client connection speaking HTTP/1.1 (or 1.0) to the proxy."""

    _log = Logger(observer=log_observer)

    # Slots for what every connection sets: a plain instance of this class
    # would have 41 attributes, and from 30 on CPython (3.11) gives up the
    # shared key table and inline values of a class's instances, so that
    # each connection gets a dict of its own, made and grown at its start
    # (creating a connection took 4.4 µs).  (The base class has a
    # __dict__: anything else still goes there.)
    __slots__ = (
        "factory", "transport", "connected", "parser", "current", "parsing", "queue", "gate", "http_version",
        "tunnel", "disconnected", "closing", "_input_done", "in_head", "_head_bytes", "_url", "_headers",
        "_read_size", "_timer", "_close_by", "_since", "_span", "_idle_limit", "_leftover", "_rate_since",
        "_rate_bytes", "_chunked", "_close_after", "_body_bytes", "_upgrade_pending", "_upgrade_exchange",
        "_tunnelled", "_raw_body", "_raw_remaining", "_head", "flow", "write", "client_ip", "info",
        "wants_block", "draining", "_read_past_end",
    )

    def __init__(self, factory: HTTPProxyFactory) -> None:
        self.factory = factory
        self.transport: Any = None
        self.connected = 0
        self.wants_block = True
        self.draining = False
        """A graceful stop asked this connection to close after its current response."""
        self._read_past_end = False
        """Bytes came after the last request: the client may still be sending, so the close lingers."""
        self.parser = httptools.HttpRequestParser(self)
        self.current: Any = None
        self.parsing: Any = None
        self.queue: collections.deque[Any] = collections.deque()
        self.gate: ReadGate | None = None
        self.http_version = b"1.1"
        self.tunnel: Any = None
        self.disconnected = False
        self.closing = False
        self._input_done = False
        """The last request was read (it asked to close): what follows is not processed."""
        self.in_head = False
        self._head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._read_size = 0
        """The size of the read being parsed: a head that came in one small read needs no size check."""
        self._timer: Any = None
        self._close_by = 0.0
        """When a close under way is cut: the connection's one timer serves as its backstop too."""
        self._since = 0.0
        self._span = 1.0
        self._idle_limit = 0.0
        self._leftover = b""
        self._rate_since = 0.0
        self._rate_bytes = 0
        """C{[limits] min_body_rate}: when the present window of the body being read began, and its bytes so far."""
        # Response state of the current exchange.
        self._chunked = False
        self._close_after = False
        self._body_bytes = 0
        self._upgrade_pending = False
        self._upgrade_exchange: Any = None
        self._tunnelled: Any = None
        """The exchange whose 101 started the tunnel now open, logged when the tunnel closes."""
        self._raw_body: Any = None
        self._raw_remaining = 0
        self._head: bytes | None = None
        self.flow = ResponseFlow()
        self.write: Callable[[bytes], None] = self._notConnected
        self.client_ip = "-"
        self.info: ForwardingInfo | None = None

    # -- connection -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        transport = self.transport
        self.gate = ReadGate(transport)
        self.write = direct_writer(transport)
        transport.registerProducer(self.flow, True)
        no_delay(transport)
        f.connections.add(self)
        self._span = min(f.limits.header_timeout, f.limits.idle_timeout)
        if f.limits.min_body_rate:
            self._span = min(self._span, f.limits.body_rate_window)
        self._since = now = f.clock.seconds()
        # Until a first request, a silent connection may idle only header_timeout.
        self._idle_limit = f.limits.header_timeout
        # The first deadline is the listener's to watch (most connections end
        # before it); the connection's own timer starts when it is reached.
        if not f.first_deadlines.watch(self, now + self._span, self._span):
            self._timer = f.clock.callLater(self._span, self._timedOut)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.disconnected = True
        self.factory.connections.discard(self)
        # Else every closed connection would stay referenced, by a call in the
        # reactor or the listener's watch, for up to idle_timeout: at a
        # thousand connections a second, tens of thousands.
        self._stopTimer()
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.peerLost(self)
        current = self.current
        if current is not None and not current.finished:
            # The client went away before its answer was complete: logged as
            # nginx does, 499 unless a status was already sent.
            if not current.status or not current.headSent:
                current.status = 499
            self.factory.exchange_finished(self, current, self._body_bytes)
        for ex in (current, self.parsing, *self.queue):
            if ex is not None and not ex.finished:
                ex.cancel()
        self.queue.clear()
        self.current = self.parsing = None

    def _stopTimer(self) -> None:
        """No deadline any more: the connection's timer is cancelled, or it leaves the listener's watch."""
        timer = self._timer
        if timer is None:
            self.factory.first_deadlines.discard(self)
            return
        self._timer = None
        if timer.active():
            timer.cancel()

    def _close(self) -> None:
        """
        Close after what was written.  Reading goes on (and is discarded):
        a TLS close waits for the peer's close_notify, which a paused
        transport would never read.

        A backstop cuts a close that never ends: after C{idle_timeout} for
        plain TCP and the C{ssl} TLS transport (their close ends by itself
        once the response is sent, so only a reader that stopped reading
        meets it; a slow one must not lose the response's tail), after
        C{CLOSE_GRACE} for Twisted's TLS, whose close waits for the peer's
        close_notify, which many clients never send.
        """
        self.closing = True
        self.parser = None  # type: ignore[assignment]
        # A TLS transport only starts its close once no producer is registered.
        self.transport.unregisterProducer()
        if self._input_done and not self._read_past_end and ILingerlessClose.providedBy(self.transport):
            # The last request was read whole and nothing came after it: the
            # ssl TLS transport may close without waiting for the client's.
            self.transport.loseConnectionWithoutLinger()
        else:
            self.transport.loseConnection()
        limits = self.factory.limits
        grace = CLOSE_GRACE if close_waits_for_peer(self.transport) else max(CLOSE_GRACE, limits.idle_timeout)
        self._closeBy(grace)

    def _closeBy(self, grace: float) -> None:
        """Cut the close if it has not ended in C{grace} seconds: the connection's timer fires by then."""
        clock = self.factory.clock
        self._close_by = clock.seconds() + grace
        timer = self._timer
        if timer is None:
            deadlines = self.factory.first_deadlines
            first = deadlines.deadline(self)
            if first is None or first > self._close_by:
                # Not watched, or the backstop comes first: a timer of its own.
                deadlines.discard(self)
                self._timer = clock.callLater(grace, self._timedOut)
        elif timer.getTime() > self._close_by:
            timer.reset(grace)

    def _forceClose(self) -> None:
        transport = self.transport
        tcp = transport.transport if close_waits_for_peer(transport) else None
        if tcp is not None and not tcp.disconnecting:
            # Twisted's TLS has sent its close_notify and waits for the peer's:
            # stop waiting, but close the TCP connection in order, so that
            # the response's tail still reaches a slow reader.
            tcp.loseConnection()
            self._closeBy(max(CLOSE_GRACE, self.factory.limits.idle_timeout))
            return
        transport.abortConnection()

    def drain(self) -> None:
        """
        A graceful stop: an idle connection closes now, a busy one after its
        current response (which says C{Connection: close} if its head is not
        sent yet).  A tunnel (WebSocket), or an upgrade waiting for the
        origin's answer, is left to finish; calling again once it is idle
        closes it.
        """
        if self.disconnected or self.closing:
            return
        self.draining = True
        current = self.current
        if self.tunnel is not None or self._upgrade_pending or (current is not None and current.upgrade):
            return
        if self.current is None and self.parsing is None and not self.in_head:
            self._close()
        else:
            self._close_after = True

    def _notConnected(self, data: bytes) -> None:
        raise RuntimeError("write before connectionMade")

    def _timedOut(self) -> None:
        """
        The connection's one timer fired: work out the deadline of the present
        state from timestamps (requests move timestamps, never the timer) and
        act on it, or wait again, never longer than the shortest timeout.
        """
        self._timer = None
        if self.disconnected:
            return
        clock = self.factory.clock
        now = clock.seconds()
        if self.closing:
            # Closing: only the backstop of the close is left to watch.
            if now >= self._close_by:
                self._forceClose()
            else:
                self._timer = clock.callLater(self._close_by - now, self._timedOut)
            return
        if self.tunnel is not None:
            return
        limits = self.factory.limits
        since = self._since
        if self.in_head:
            deadline, why = since + limits.header_timeout, "head"
        elif self.parsing is not None and not self.parsing.requestComplete and not self.gate.paused:
            deadline, why = since + limits.idle_timeout, "body"
            if limits.min_body_rate and self._bodyTooSlow(now, limits):
                self._slowBody(limits)
                return
        elif self.current is None and self.parsing is None:
            deadline, why = since + self._idle_limit, "idle"
        else:
            deadline, why = now + limits.idle_timeout, "busy"
            self._rate_since, self._rate_bytes = now, 0  # reading paused by the proxy: not the client's time
        if now < deadline:
            self._timer = clock.callLater(min(deadline - now, self._span), self._timedOut)
            return
        if why == "idle":
            # Idle keep-alive connection: close quietly, as nginx does.
            self._close()
        elif why == "head":
            self._reject(408, "Request Timeout: the request head took too long")
        else:
            self._reject(408, "Request Timeout: the request body stalled")

    def _bodyTooSlow(self, now: float, limits: Any) -> bool:
        """
        Whether the body being read averaged less than C{min_body_rate}
        bytes a second over the window that just ended (slow POST).  Time
        the proxy itself paused reading is not counted against the client.
        """
        elapsed = now - self._rate_since
        if elapsed < limits.body_rate_window:
            return False
        slow = self._rate_bytes < limits.min_body_rate * elapsed
        self._rate_since, self._rate_bytes = now, 0
        return slow

    def _slowBody(self, limits: Any) -> None:
        """A slow POST: answer 408 and close, with one log line and a refusal event."""
        self.factory.runtime.scrubbing.refusals.slow_body(self.parsing, self.client_ip, limits.min_body_rate)
        self._reject(408, "Request Timeout: the request body came too slowly")

    def _rearm(self) -> None:
        """A new phase starts now (head, body, idle): the timer finds its deadline when it fires."""
        self._since = self.factory.clock.seconds()

    # -- input ------------------------------------------------------------------------------

    def _identify(self) -> None:
        """
        Who the client is, read at its first bytes rather than at connect: on
        a C{haproxy:} listener the PROXY header, parsed before those bytes
        reach us, names the client, and C{getPeer()} only says so afterwards.
        """
        ip = client_address(self.transport)
        self.client_ip = ip
        self.info = forwarding_info(self.factory, self.transport, ip)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.fromClient(data)
            return
        if self.info is None:
            self._identify()
        self._read_size = len(data)
        if self._raw_remaining:
            data = self._rawBodyData(data)
            if not data:
                return
        if self._upgrade_pending:
            self._leftover += data
            return
        if self.parser is None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgradeRequested(data[e.args[0] :])
        except httptools.HttpParserError as e:
            if self.closing:
                return  # already answered (a refusal at the head), and closing
            if self._input_done:
                # Bytes after a request that closes the connection: RFC 9112
                # section 9.6 says they are not processed.
                self.parser = None  # type: ignore[assignment]
                self._read_past_end = True
            else:
                self._parseFailed(e)
        else:
            if self.in_head:
                if self._head_bytes:
                    limits = self.factory.limits
                    if self._head_bytes + len(data) > limits.max_request_line + limits.max_header_bytes + 1024:
                        self._reject(431, "Request Header Fields Too Large")
                        return
                    self._head_bytes += len(data)
                else:
                    self._head_bytes = 1

    def _parseFailed(self, e: httptools.HttpParserError) -> None:
        """The parser stopped on a request it cannot accept: answer it, in turn."""
        if isinstance(e, httptools.HttpParserCallbackError):
            cause = e.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status, cause.message)
            else:
                self._log.failure("request handling failed", Failure(cause) if cause else None)
                self._reject(500, "Internal Server Error")
        elif isinstance(e, httptools.HttpParserInvalidMethodError):
            self._reject(501, "Not Implemented: unknown request method")
        elif isinstance(e, httptools.HttpParserInvalidURLError):
            self._reject(400, "Bad Request: invalid request target")
        else:
            self._reject(400, f"Bad Request: {e}")

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we cannot parse or accept, in turn, then close."""
        self.parser = None  # type: ignore[assignment]
        self.in_head = False
        if self.parsing is not None and self.parsing is not self.current and not self.parsing.finished:
            # The request being parsed never started; drop it.
            try:
                self.queue.remove(self.parsing)
            except ValueError:
                pass
            self.parsing.cancel()
        elif self.parsing is not None and self.parsing is self.current and not self.parsing.finished:
            if self.parsing.headSent:
                self.current.cancel()
                self.transport.abortConnection()
                return
            self.current.cancel()
            self.current = None
        self.parsing = None
        response = LocalResponse(self, status, message, close=True)
        if self.current is None:
            self.current = response
            response.start()
        else:
            self.queue.append(response)

    # -- parser callbacks -------------------------------------------------------------------

    # Once the connection closes (a request refused at its head, say), llhttp
    # may still call back for the rest of what it was fed: those are ignored.

    def on_message_begin(self) -> None:
        if self.closing or self._input_done:
            if self._input_done:
                self._read_past_end = True
            return
        self.in_head = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []
        self._since = self.factory.clock.seconds()  # _rearm(), without the call: this runs per request

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.factory.limits.max_request_line:
            raise _Reject(414, "URI Too Long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only appended here (this runs for every field of every request):
        # the bytes of a head are bounded per read in dataReceived, and its
        # field count and size are checked once it is complete.
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.closing or self._input_done:
            return
        self.in_head = False
        headers = self._headers
        limits = self.factory.limits
        if len(headers) > limits.max_headers or ((self._head_bytes or self._read_size > limits.max_header_bytes) and
                                                  sum(len(n) + len(v) + 4 for n, v in headers) > limits.max_header_bytes):
            # A head read in one small piece cannot be over the size bound: only others are added up.
            raise _Reject(431, "Request Header Fields Too Large")
        parser = self.parser
        version = parser.get_http_version()
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        if version == "1.1":
            http_version = b"1.1"
        elif version == "1.0":
            http_version = b"1.0"
        else:
            raise _Reject(505, "HTTP Version Not Supported")
        exchange = self.factory.handle(self, method, self._url, http_version, headers, keep_alive, parser.should_upgrade())
        self.parsing = exchange
        if not exchange.requestComplete:
            # A body follows: from now on the timer watches for it stalling.
            self._rearm()
            self._rate_since, self._rate_bytes = self._since, 0
        if self.current is None:
            self.current = exchange
            # _beginResponse(exchange), without the call: this runs per request.
            self._chunked = False
            self._body_bytes = 0
            self._close_after = self.draining or not exchange.keep_alive
            exchange.start()
        else:
            self.queue.append(exchange)
            self.gate.pause("pipeline")

    def on_body(self, body: bytes) -> None:
        if self.closing:
            return
        self._rearm()
        self._rate_bytes += len(body)
        self.parsing.requestBodyData(body)

    def on_message_complete(self) -> None:
        if self.closing:
            return
        ex = self.parsing
        self.parsing = None
        if not self.parser.should_keep_alive():
            # The last request this connection carries: it closes after its answer.
            self._input_done = True
        if self.parser.should_upgrade():
            # llhttp stops here for Upgrade and CONNECT, before any body:
            # _upgradeRequested decides what the following bytes are.
            self._upgrade_exchange = ex
            return
        if ex is not None:
            ex.requestBodyEnd()

    # -- requests ---------------------------------------------------------------------------

    def _beginResponse(self, exchange: Any) -> None:
        """Reset the response state for the exchange now at the head of the line (also inline in on_headers_complete)."""
        self._chunked = False
        self._body_bytes = 0
        self._close_after = self.draining or not exchange.keep_alive

    def exchangeDone(self, exchange: Any) -> None:
        if exchange is not self.current:
            return
        if exchange.status == 101:
            # A tunnel starts: its line is written when it closes, with its sizes and duration.
            self._tunnelled = exchange
        elif self.factory.events.wanted:
            # The bus straight away (factory.exchange_finished, one call less: this runs per request).
            factory = self.factory
            factory.events.request_finished(self.client_ip, exchange, self._body_bytes, factory.clock.seconds())
        self.current = None
        if self.disconnected:
            return
        if self._close_after:
            self._close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self.gate.resume("pipeline")
            self.current = nxt
            self._beginResponse(nxt)
            nxt.start()
        elif self.parsing is None and self.tunnel is None:
            self._idle_limit = self.factory.limits.idle_timeout
            self._since = self.factory.clock.seconds()  # _rearm(), without the call: this runs per request

    def _upgradeRequested(self, leftover: bytes) -> None:
        """
        The parser stopped after the head of a request with C{Upgrade} (or
        CONNECT).  For a protocol switch we tunnel (WebSocket), the bytes
        after it wait until the origin says whether it switches; otherwise
        what follows is the request's body, if it declared one, and then the
        next request.
        """
        ex = self._upgrade_exchange
        self._upgrade_exchange = None
        if isinstance(ex, ProxyExchange) and ex.upgrade:
            ex.requestBodyEnd()
            self._upgrade_pending = True
            self._leftover = leftover
            self.gate.pause("upgrade")
            return
        self.parser = httptools.HttpRequestParser(self)
        if isinstance(ex, ProxyExchange) and ex.body != "none":
            if ex.body == "chunked":
                self._reject(501, "Not Implemented: Upgrade with a chunked request body")
                return
            self._raw_body = ex
            self._raw_remaining = ex.request.content_length or 0
        elif ex is not None:
            ex.requestBodyEnd()
        if self._raw_remaining == 0 and self._raw_body is not None:
            self._raw_body, raw = None, self._raw_body
            raw.requestBodyEnd()
        if leftover:
            self.dataReceived(leftover)

    def _rawBodyData(self, data: bytes) -> bytes:
        """A body the parser did not read (after an Upgrade it does not act on)."""
        take = data[: self._raw_remaining]
        self._raw_remaining -= len(take)
        ex = self._raw_body
        try:
            ex.requestBodyData(take)
        except _Reject as e:
            self._raw_remaining = 0
            self._reject(e.status, e.message)
            return b""
        if self._raw_remaining == 0:
            self._raw_body = None
            ex.requestBodyEnd()
        return data[len(take) :]

    def _resumeAfterUpgradeRefused(self) -> None:
        """The origin answered normally: go back to parsing HTTP."""
        self._upgrade_pending = False
        self.parser = httptools.HttpRequestParser(self)
        self.gate.resume("upgrade")
        leftover, self._leftover = self._leftover, b""
        if leftover:
            self.dataReceived(leftover)

    # -- IDownstream ------------------------------------------------------------------------

    def writeInterim(self, status: int, reason: bytes, headers: Headers) -> None:
        if self.http_version_of_current() == b"1.0" or self.disconnected:
            return
        self.write(b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason or REASONS.get(status, b""), serialize(headers)))

    def http_version_of_current(self) -> bytes:
        current = self.current
        return current.http_version if current is not None else b"1.1"

    def writeHead(self, status: int, reason: bytes, headers: Headers, content_length: int | None, has_body: bool) -> None:
        if self.disconnected:
            return
        ex = self.current
        block = headers if type(headers) is bytes else serialize(headers)
        framing = b""
        if content_length is not None and (has_body or status != 204):
            framing = b"Content-Length: %d\r\n" % content_length
        elif has_body:
            if ex.http_version == b"1.1":
                framing = b"Transfer-Encoding: chunked\r\n"
                self._chunked = True
            else:
                self._close_after = True
        connection = b""
        if not ex.keep_alive:
            self._close_after = True  # the exchange decided so after it began (a refusal mid-body)
        if status == 101:
            pass
        elif self._close_after:
            connection = b"Connection: close\r\n"
        elif ex.http_version == b"1.0":
            connection = b"Connection: keep-alive\r\n"
        # Held back until the first body bytes or the end of this read from
        # the origin, so that a small response leaves in one send.
        self._head = b"HTTP/1.1 %d %s\r\n%s%s%s\r\n" % (status, reason or REASONS.get(status, b"Unknown"), block,
                                                        framing, connection)

    def flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if not self.disconnected:
                self.write(head)

    def writeBody(self, data: bytes) -> None:
        if self.disconnected:
            return
        self._body_bytes += len(data)
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        self.write(data)

    def finishBody(self, trailers: Headers) -> None:
        end = b""
        if self._chunked:
            end = b"0\r\n%s\r\n" % serialize(trailers_for_client(trailers)) if trailers else b"0\r\n\r\n"
        head = self._head
        if head is not None:
            self._head = None
            end = head + end
        if end and not self.disconnected:
            self.write(end)
        if self._upgrade_pending and isinstance(self.current, ProxyExchange) and self.current.upgrade:
            self._resumeAfterUpgradeRefused()

    def failResponse(self, status: int, message: str, extra: Headers = (), page: Any = None) -> None:
        ex = self.current
        self.flush()
        if ex is not None and ex.headSent:
            # Too late for a status: cut the connection so the client sees truncation.
            self._close_after = True
            if not self.disconnected:
                self.transport.abortConnection()
            return
        self.writeLocal(status, message, self._close_after or self._upgrade_pending, extra, page)

    def writeLocal(self, status: int, message: str, close: bool, extra: Headers = (), page: Any = None) -> None:
        """
        An answer of the proxy's own: C{page} is the route's error page for
        it, if it has one, else the listener's global one is looked up.
        """
        factory = self.factory
        hsts = factory.hsts
        if hsts and not any(name == b"Strict-Transport-Security" for name, _ in extra):
            extra = (*extra, *hsts)
        if close:
            self._close_after = True
        if self.disconnected:
            return
        if page is None:
            page = factory.error_pages.get(status)
        data = error_response(status, message, self._close_after, extra, factory.server_header,
                              http_date(factory.clock), page)
        self._body_bytes += len(page.body) if page is not None else len(error_body(status, message))
        self.write(data)

    # -- for a twisted.web resource answering on this connection (http/local.py) -------------

    def closeAfterResponse(self) -> None:
        """The response being written ends the connection (its length is unknown, or the request asked)."""
        self._close_after = True

    @property
    def closesAfterResponse(self) -> bool:
        return self._close_after

    def writeResponseHead(self, data: bytes) -> None:
        """A response head already serialized (not counted in the access log's body bytes)."""
        if not self.disconnected:
            self.write(data)

    def writeResponseBody(self, data: bytes) -> None:
        if not self.disconnected:
            self._body_bytes += len(data)
            self.write(data)

    def registerUpstream(self, conn: Any) -> None:
        if conn.gate is not None:
            self.flow.attach(conn.gate)

    def unregisterUpstream(self, conn: Any) -> None:
        if conn.gate is not None:
            self.flow.detach(conn.gate)

    def tunnelClosed(self, tunnel: Any) -> None:
        """The tunnel after a 101 ended: log its exchange with the bytes each way."""
        exchange, self._tunnelled = self._tunnelled, None
        if exchange is not None:
            self.factory.exchange_finished(self, exchange, tunnel.to_client, tunnel.from_client)

    def startTunnel(self, conn: Any, leftover: bytes) -> None:
        from .tunnel import Tunnel

        tunnel = Tunnel(self, conn)
        self._upgrade_pending = False
        self.gate.resume("upgrade")
        data, self._leftover = self._leftover, b""
        self._stopTimer()
        tunnel.start(data, leftover)


def own_host(transport: Any) -> bytes:
    """A Host for a request that sent none (HTTP/1.0): this listener's address."""
    host = transport.getHost()
    address = ip_of(host)
    if not address:
        return b"localhost"
    if ":" in address:
        address = f"[{address}]"
    return f"{address}:{host.port}".encode("ascii")


def client_address(transport: Any) -> str:
    """The client's IP address as C{getPeer()} gives it now, or C{"unknown"} (unix sockets)."""
    return ip_of(transport.getPeer()) or "unknown"


def forwarding_info(factory: Any, transport: Any, ip: str) -> ForwardingInfo:
    """
    What this client connection tells origins: address, scheme, trust, TLS
    client subject.  Without a client certificate it depends on the address
    alone: the listener's own for that address (L{HTTPProxyFactory.forwarding_for}).
    """
    subject = client_subject(transport) if factory.scheme == "https" else None
    if subject is None:
        return factory.forwarding_for(ip)  # type: ignore[no-any-return]
    return ForwardingInfo(ip, factory.scheme, is_trusted(ip, factory.trusted_proxies), factory.via, subject)


def _tunnelled_upgrade(headers: Headers) -> bool:
    """Whether an Upgrade is one we tunnel: anything but h2c (HTTP/2 is ours to speak, over TLS)."""
    for name, value in headers:
        if name.lower() == b"upgrade":
            return value.strip().lower() != b"h2c"
    return False


@implementer(IListenerFactory)
class HTTPProxyFactory(Factory):
    """
    The factory of one HTTP listener.  Holds what every connection needs,
    read once per connection or request from the current L{ProxyRuntime}.
    """

    protocol = HTTPServerConnection  # type: ignore[assignment]
    noisy = False

    def __init__(self, runtime: Any, clock: IReactorTime, scheme: str = "http", listen: Any = None) -> None:
        self.clock = clock
        self.scheme = scheme
        self.connections: set[HTTPServerConnection] = set()
        self.first_deadlines = FirstDeadlines(clock, HTTPServerConnection._timedOut)
        """The first deadline of each new HTTP/1.1 connection, on one timer (L{FirstDeadlines})."""
        from ..config import DEFAULT_MAX_CONNECTIONS
        from ..connection_limit import ConnectionLimit

        self.connection_limit = ConnectionLimit(clock, listen.endpoint if listen is not None else "http",
                                                listen.max_connections if listen is not None else DEFAULT_MAX_CONNECTIONS)
        """C{max_connections}: TLS handshakes in progress count too."""
        self._alpn_switch: Any = None
        """Over TLS, what a new connection starts as (imported once, here: h2 imports this module)."""
        if scheme == "https":
            from .h2 import ALPNSwitch

            self._alpn_switch = ALPNSwitch
        self._listen(listen)
        self.set_runtime(runtime)

    def _listen(self, listen: Any) -> None:
        """This listener's own settings from its C{[[listen]]}."""
        self.listen_endpoint: str = listen.endpoint if listen is not None else ""
        """As events name the listener."""
        self.redirect_https: int | None = listen.redirect_https if listen is not None else None
        hsts = listen.hsts if listen is not None and self.scheme == "https" else None
        self.hsts: tuple[tuple[bytes, bytes], ...] = (
            ((b"Strict-Transport-Security", hsts.encode("ascii")),) if hsts else ()
        )
        if listen is not None:
            self.connection_limit.limit = listen.max_connections

    def set_runtime(self, runtime: Any, listen: Any = None) -> None:
        """
        Take a new configuration (a reload): new connections, and the next
        request of each open connection, use it; requests in flight finish
        with the runtime they started with.  C{listen}: this listener's new
        C{[[listen]]} (C{redirect_https}, C{hsts}, C{max_connections}).
        """
        if listen is not None:
            self._listen(listen)
        self.runtime = runtime
        self.limits = runtime.config.limits
        server = runtime.config.server
        self.trusted_proxies = server.trusted_proxies
        self.via = server.via.encode("ascii")
        self.server_header = server.server_header.encode("ascii")
        self.events: EventBus = runtime.events
        self.error_pages = runtime.config.error_pages
        self._chains: dict[ProxyRoute, FilterChain] = {}
        """Each route's filter chain on this listener, made on its first request."""
        self._forwarding: dict[str, ForwardingInfo] = {}
        """L{forwarding_for}'s, by client address (the trusted proxies and C{via} are the runtime's)."""

    def forwarding_for(self, ip: str) -> ForwardingInfo:
        """
        What a connection from C{ip} without a client certificate tells
        origins, one for all of them: a client that connects for every
        request would otherwise check its address against the trusted proxies
        and serialize its forwarding headers anew each time (L{ForwardingInfo}
        keeps them for the last host).  At most L{FORWARDING_CACHE} addresses.
        """
        info = self._forwarding.get(ip)
        if info is None:
            if len(self._forwarding) >= FORWARDING_CACHE:
                self._forwarding.clear()
            info = self._forwarding[ip] = ForwardingInfo(ip, self.scheme, is_trusted(ip, self.trusted_proxies),
                                                         self.via)
        return info

    # -- IListenerFactory: what a graceful stop does to this listener's connections ---------

    def open_connections(self) -> list[Any]:
        return list(self.connection_limit.open)

    def connection_counts(self) -> ConnectionCounts:
        limit = self.connection_limit
        tunnels = sum(1 for conn in limit.open if isinstance(conn, HTTPServerConnection) and conn.tunnel is not None)
        return ConnectionCounts(limit.accepted, limit.rejected, tunnels)

    def drain(self) -> None:
        for conn in list(self.connection_limit.open):
            conn.drain()

    def cut(self, why: str) -> None:
        for conn in list(self.connection_limit.open):
            if conn.transport is not None:
                conn.transport.abortConnection()

    def watch(self, callback: Callable[[], None] | None) -> None:
        self.connection_limit.on_close = callback

    def buildProtocol(self, addr: Any) -> Any:
        rejected = self.connection_limit.full(addr)
        if rejected is not None:
            if self.events.wanted:
                from ..events import ConnectionRefused

                self.events.publish(ConnectionRefused(self.listen_endpoint, ip_of(addr) or "unknown",
                                                      "max_connections", f"max_connections {self.connection_limit.limit}"))
            return rejected
        if self._alpn_switch is not None:
            # After the TLS handshake, ALPN decides: HTTP/2 or an HTTP/1.1 connection.
            return self.connection_limit.track(self._alpn_switch(self, None))
        return self.connection_limit.track(self.build_http1())

    def build_http1(self) -> HTTPServerConnection:
        conn = HTTPServerConnection(self)
        conn.factory = self
        return conn

    def handle(
        self,
        conn: Any,
        method: bytes,
        url: bytes,
        http_version: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        upgrade: bool,
        sizes_checked: bool = True,
    ) -> Any:
        """
        Turn a parsed request head into the exchange that will answer it:
        HTTP/1.1 and HTTP/2 both come through here, and the embedded path
        reads its requests with the same L{read_request_head}.

        @param sizes_checked: the front end bounded the head while reading it (HTTP/1.1).
        """
        runtime = self.runtime
        started = self.clock.seconds() if self.events.wanted else None
        try:
            request = read_request_head(method, url, http_version, headers, self.limits, keep_alive, sizes_checked)
        except _Reject as e:
            return self._refuse(conn, e.status, e.message, keep_alive and not e.close, started=started)
        challenges = runtime.acme_challenges
        if challenges is not None and self.scheme == "http" and challenges.http01:
            answer = challenges.http01_answer(request.path)
            if answer is not None:
                return ChallengeAnswer(conn, answer, keep_alive, request, started)
        if self.redirect_https is not None:
            return self._redirect(conn, request, keep_alive)
        resource, _ = runtime.router.resolve(request.host, request.path)
        if not isinstance(resource, ProxyRoute):
            if isinstance(resource, ErrorPage):
                return self._refuse(conn, resource.code, resource.message, keep_alive, request, started)
            return runtime.local_exchange(conn, resource, request, started)
        if upgrade and (request.body != "none" or not _tunnelled_upgrade(headers)):
            upgrade = False  # h2c, or a body: forwarded as a plain request without Upgrade
        request.upgrade = upgrade
        request.route = resource
        if request.host is None:
            request.headers = [*request.headers, (b"Host", own_host(conn.transport))]
        chain = self._chains.get(resource)
        if chain is None:
            chain = self._chains[resource] = self._chain_for(resource)
        return ProxyExchange(conn, self.clock, resource.plan, request, conn.info, chain, started)

    def forget_chains(self) -> None:
        """Routes' filters changed (an application added one): chains are made anew on the next request."""
        self._chains = {}

    def _chain_for(self, route: ProxyRoute) -> FilterChain:
        """The route's filters, after this listener's own (HSTS over TLS: the route's value, else the listener's)."""
        hsts = self.hsts
        if self.scheme == "https" and route.config.hsts:
            hsts = ((b"Strict-Transport-Security", route.config.hsts.encode("ascii")),)
        listener = FilterChain(response=(ResponseHeaders(hsts),)) if hsts else EMPTY_CHAIN
        return listener + route.plan.chain

    def _redirect(self, conn: Any, request: ProxyRequest, keep_alive: bool) -> LocalResponse:
        """A plain listener that sends everyone to https (308 keeps the method and body)."""
        from ..routing import host_of

        path, query = request.path, request.query
        name = host_of(request.host)
        if not name:
            return self._refuse(conn, 400, "Bad Request: a Host header is needed for the https redirect", False)
        port = self.redirect_https
        authority = name if port == 443 else b"%s:%d" % (name, port)
        location = b"https://" + authority + path
        if query:
            location += b"?" + query
        return LocalResponse(conn, 308, "Permanent Redirect: " + location.decode("latin-1"), close=not keep_alive,
                             extra=((b"Location", location),), request=request)

    def _refuse(self, conn: Any, status: int, message: str, keep_alive: bool, request: ProxyRequest | None = None,
                started: float | None = None) -> LocalResponse:
        return LocalResponse(conn, status, message, close=not keep_alive or status == 400, request=request,
                             started_at=started)

    def tls_handshake_completed(self, alpn: bytes | None) -> None:
        """A client's TLS handshake on this listener succeeded (either TLS transport): tell the observers."""
        events = self.events
        if events.wanted:
            from ..events import TLSHandshakeCompleted

            events.publish(TLSHandshakeCompleted(self.listen_endpoint, alpn.decode("ascii", "replace") if alpn else "-"))

    def tls_handshake_failed(self, peer: Any, reason: str) -> None:
        """A client's TLS handshake on this listener failed (Twisted's TLS; the ssl transport reports its own)."""
        events = self.events
        if events.wanted:
            from ..events import TLSHandshakeFailed

            events.publish(TLSHandshakeFailed(self.listen_endpoint, ip_of(peer) or "unknown", reason))

    def exchange_finished(self, conn: Any, exchange: Any, body_bytes: int, received_bytes: int | None = None) -> None:
        """
        An exchange on one of this listener's connections ended: tell the
        observers (the access log, metrics).  Building the event costs, so
        it is built only when someone listens.
        """
        events = self.events
        if events.wanted:
            events.request_finished(conn.client_ip, exchange, body_bytes, self.clock.seconds(), received_bytes)
