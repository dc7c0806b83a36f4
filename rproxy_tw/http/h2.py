"""
HTTP/2 on TLS listeners: each stream is a request proxied to an HTTP/1.1
origin through the same L{HTTPProxyFactory.handle} as HTTP/1.1, so routing,
header rewriting and limits are the same.

Why not twisted.web's C{H2Connection}: it hands twisted.web a C{Request}
that reads the whole body before C{render()}.  Here a stream is an
L{IDownstream}: the request body streams to the origin as DATA frames
arrive, the response streams back, and HTTP/2 flow control is the
backpressure both ways:

  - upload: a stream's L{ReadGate} (paused by the exchange while the origin
    is slow or not connected yet) stops acknowledging received DATA, so the
    client's stream window closes; resuming acknowledges what was held.
  - download: when a stream's send window is empty, reading from its origin
    connection pauses until a WINDOW_UPDATE; when the client's TCP buffer
    is full, every stream's origin pauses.

L{ALPNSwitch} picks HTTP/2 or HTTP/1.1 once the TLS handshake says which
one the client chose.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any, Sequence

from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..headers import trailers_for_client
from ..logs import observer as log_observer
from ..tls import negotiated_protocol
from .exchange import IDownstream, ProxyExchange, RequestRejected
from .h2frames import ErrorCode
from .h2session import (
    CONNECTION_SPECIFIC,
    ConnectionTerminated,
    DataReceived,
    H2Session,
    ProtocolError,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from .hpack_out import NEVER_INDEXED, ResponseEncoder, encode_fields
from ..transport import ITimedHandshake
from ..transport.fastwrite import no_delay
from ..transport.flow import ReadGate
from .server import LocalResponse, client_address, forwarding_info, http_date

__all__ = ["ALPNSwitch", "H2ServerConnection", "H2Stream"]

Headers = Sequence[tuple[bytes, bytes]]

MAX_CONCURRENT_STREAMS = 100
STREAM_WINDOW = 256 * 1024
"""Bytes of request body a client may send on a stream before we acknowledge them."""
CONNECTION_WINDOW = MAX_CONCURRENT_STREAMS * STREAM_WINDOW
"""Large enough that one stalled upload never blocks the connection's other streams."""

NOT_FORWARDED = CONNECTION_SPECIFIC | {b"te"}
"""Connection-specific fields (RFC 9113 8.2.2): an origin's never reach an HTTP/2 client."""

RESET_ALLOWANCE = 2 * MAX_CONCURRENT_STREAMS
"""Client stream resets tolerated before the reset-to-request ratio is checked."""

_WINDOW = "h2-window"
"""
The reason a stream's origin is paused while its send window is empty; one
of the exchange's C{CLIENT_STALLS}: a deadline passing while it holds is the
client's stall, not the backend's.
"""

CONTROL_ALLOWANCE = 10_000
"""
Frames that cost us work and give the client nothing (PING, SETTINGS,
WINDOW_UPDATE, PRIORITY, RST_STREAM, CONTINUATION, DATA without payload or
END_STREAM, HEADERS that open no request, unknown types) a connection may
send beyond L{CONTROL_PER_USEFUL} per useful frame, before it is told
ENHANCE_YOUR_CALM and disconnected (the CVE-2019-9512/9515 floods and
their kin).  10000 PINGs is 170 kB.
"""

CONTROL_PER_USEFUL = 2
"""
Such frames allowed per useful one: HEADERS opening a request, DATA with
payload either way (a client acknowledging each DATA frame we send, on the
stream and on the connection, is two WINDOW_UPDATEs).
"""

OUTPUT_BOUND = 1024 * 1024
"""
Bytes written for a client while its transport already holds a full buffer
(it paused us: the client is not reading).  Reading from the client stops
as soon as it pauses us, so only what was already received adds to it;
past this bound the client is told ENHANCE_YOUR_CALM and disconnected,
as nginx cuts a client that floods it without reading the answers.
"""


class _StreamFlow:
    """
    What a stream's L{ReadGate} pauses: not a socket but the acknowledgement
    of received DATA, which is what lets the client send more.

    It holds its stream by a weak reference: the stream holds the gate, which
    holds this, and a strong reference would make every stream a reference
    cycle, freed only by the garbage collector (six objects a request).
    """

    __slots__ = ("stream",)

    def __init__(self, stream: H2Stream) -> None:
        self.stream = weakref.ref(stream)

    def pauseProducing(self) -> None:
        stream = self.stream()
        if stream is not None:
            stream.reading = False

    def resumeProducing(self) -> None:
        stream = self.stream()
        if stream is None:
            return
        stream.reading = True
        held, stream.unacknowledged = stream.unacknowledged, 0
        if held:
            # Called from the origin's side (its buffer drained): nothing else
            # will send the WINDOW_UPDATE, so send it now.
            stream.conn.acknowledge(stream.stream_id, held)
            stream.conn.transmit_soon()


@implementer(IDownstream)
class H2Stream:
    """One request/response on an HTTP/2 connection, as an exchange's downstream."""

    http_version = b"2"
    keep_alive = True
    wants_block = False

    def __init__(self, conn: H2ServerConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.factory = conn.factory
        self.info = conn.info
        self.client_ip = conn.client_ip
        self.transport = conn.transport
        self.gate = ReadGate(_StreamFlow(self))
        self.reading = True
        self.unacknowledged = 0
        self.exchange: Any = None
        self.request_ended = False
        self.head: bytes | None = None
        """The response head, HPACK-encoded, until it goes with the first body bytes or the end."""
        self.head_sent = False
        self.response_ended = False
        self.reset = False
        self.pending: deque[bytes] = deque()
        self.pending_end: list[tuple[bytes, bytes]] | None = None
        self.upstream_gate: ReadGate | None = None
        self.body_bytes = 0
        self.sent_bytes = 0
        self._stall_mark = 0
        self._stall_timer: Any = None
        self.received_bytes = 0
        self._rate_timer: Any = None
        self._rate_mark = 0

    @property
    def disconnected(self) -> bool:
        return self.reset or self.conn.disconnected or self.conn.closing

    # -- request side -----------------------------------------------------------------------

    def data(self, data: bytes, flow_controlled_length: int) -> None:
        self.received_bytes += len(data)
        if self.reading:
            self.conn.acknowledge(self.stream_id, flow_controlled_length)
        else:
            self.unacknowledged += flow_controlled_length
        exchange = self.exchange
        if exchange is None or self.response_ended:
            return
        try:
            exchange.requestBodyData(data)
        except RequestRejected as e:
            self._reject(e.status, e.message)

    def ended(self) -> None:
        self.request_ended = True
        self._stopRateTimer()
        if self.exchange is not None:
            self.exchange.requestBodyEnd()

    def _reject(self, status: int, message: str) -> None:
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            exchange.cancel()
        if exchange is not None and not exchange.headSent:
            exchange.status = status
        self.failResponse(status, message)
        self.exchangeDone(exchange)

    def cancelled(self) -> None:
        """The client reset the stream, or the connection is gone: stop the exchange too."""
        self._abandon()
        exchange = self.exchange
        if exchange is not None and not exchange.finished:
            exchange.cancel()

    def _abandon(self) -> None:
        """Nothing more goes to the client on this stream."""
        self._stopRateTimer()
        self.reset = True
        self.pending.clear()
        self._release_upstream()
        self.conn.stream_done(self)

    # -- a body that trickles (C{[limits] min_body_rate}) -------------------------------------

    def watchBodyRate(self) -> None:
        """The request has a body: check every C{body_rate_window} that it comes fast enough."""
        limits = self.factory.limits
        if limits.min_body_rate and not self.request_ended:
            self._rate_mark = self.received_bytes
            self._rate_timer = self.factory.clock.callLater(limits.body_rate_window, self._rateCheck)

    def _rateCheck(self) -> None:
        self._rate_timer = None
        if self.request_ended or self.disconnected:
            return
        exchange = self.exchange
        if exchange is None or exchange.finished:
            return
        limits = self.factory.limits
        if self.reading and not self.gate.paused and \
                self.received_bytes - self._rate_mark < limits.min_body_rate * limits.body_rate_window:
            self.factory.runtime.scrubbing.refusals.slow_body(exchange, self.client_ip, limits.min_body_rate)
            self._reject(408, "Request Timeout: the request body came too slowly")
            return
        self.watchBodyRate()

    def _stopRateTimer(self) -> None:
        timer, self._rate_timer = self._rate_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- a client that grants no window -----------------------------------------------------

    def _watchStall(self) -> None:
        """
        The send window just shut: from now on, a whole C{idle_timeout}
        without a byte sent on this stream is the client's stall.
        """
        if self._stall_timer is None:
            self._stall_mark = self.sent_bytes
            self._stall_timer = self.factory.clock.callLater(self.factory.limits.idle_timeout, self._stallCheck)

    def _stallCheck(self) -> None:
        self._stall_timer = None
        if self.disconnected or self not in self.conn.blocked:
            return
        if self.sent_bytes != self._stall_mark:
            self._watchStall()  # it moved: watch the next period
            return
        self._stalled()

    def _stopStallTimer(self) -> None:
        timer, self._stall_timer = self._stall_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _stalled(self) -> None:
        """
        The client left this stream's window shut for C{idle_timeout}:
        reset the stream, and end its exchange as the client's stall (the
        origin's connection is closed, the backend not blamed).
        """
        exchange = self.exchange
        conn = self.conn
        conn.reset_stream(self.stream_id, ErrorCode.CANCEL)
        self._abandon()
        conn.transmit()
        if isinstance(exchange, ProxyExchange) and not exchange.finished:
            exchange.clientStalled()  # logs it, and ends the exchange (access log)
        else:
            conn._log.info("client {client} stopped reading: no window for HTTP/2 stream {stream} in {seconds}s; "
                           "resetting it", client=self.client_ip, stream=self.stream_id,
                           seconds=self.factory.limits.idle_timeout)

    # -- IDownstream ------------------------------------------------------------------------

    def writeInterim(self, status: int, reason: bytes, headers: Headers) -> None:
        if status == 101 or self.disconnected:
            return
        fields = [(b":status", b"%d" % status), *_h2_fields(headers)]
        self.conn.send_block(self.stream_id, encode_fields(fields), False)
        self.conn.transmit_soon()  # a client may wait for it (100 Continue) before it sends the body

    def writeHead(self, status: int, reason: bytes, headers: Headers, content_length: int | None, has_body: bool) -> None:
        if content_length is not None and not has_body and status == 204:
            content_length = None
        # Held until the first body bytes or the end, as HTTP/1.1 does, so that
        # a small response leaves in one write.
        self.head = response_block(status, headers, content_length)

    def flush(self) -> None:
        if self._send_head():
            self.conn.transmit_soon()

    def _send_head(self) -> bool:
        head = self.head
        if head is None or self.disconnected:
            return False
        self.head = None
        self.head_sent = True
        self.conn.send_block(self.stream_id, head, False)
        return True

    def writeBody(self, data: bytes) -> None:
        if self.disconnected or not data:
            return
        self._send_head()
        self.body_bytes += len(data)
        self.pending.append(data)
        # DATA frames are made at the end of the reactor turn (see
        # H2ServerConnection.transmit_soon): a body that ends in this turn
        # carries END_STREAM on its last DATA frame, and every stream answered
        # in this turn leaves in one write.
        self.conn.pump_soon(self)

    def finishBody(self, trailers: Headers) -> None:
        if self.disconnected:
            return
        self._send_head()
        self.pending_end = _h2_fields(trailers_for_client(trailers)) if trailers else []
        self.conn.pump_soon(self)

    def pump(self) -> None:
        """Send what the stream's and the connection's windows allow; pause the origin when they are shut."""
        if self.disconnected:
            return
        conn = self.conn
        session = conn.session
        sid = self.stream_id
        pending = self.pending
        end = self.pending_end
        ended = False
        try:
            while pending:
                window = session.window(sid)
                if window <= 0:
                    if self.upstream_gate is not None:
                        self.upstream_gate.pause(_WINDOW)
                    conn.blocked.add(self)
                    self._watchStall()
                    return
                chunk = pending[0]
                if len(chunk) <= window:
                    pending.popleft()
                else:
                    pending[0] = chunk[window:]
                    chunk = chunk[:window]
                # The last chunk of a body without trailers ends the stream itself.
                ended = not pending and end is not None and not end and not self.response_ended
                session.send_data(sid, chunk, end=ended)
                self.sent_bytes += len(chunk)
            conn.blocked.discard(self)
            if self.upstream_gate is not None:
                self.upstream_gate.resume(_WINDOW)
                if pending:
                    # The resume wrote more at once (a stored body does) and that pump
                    # found the window shut again: the stream must not end before it is sent.
                    return
            end = self.pending_end
            if end is not None and not self.response_ended:
                self.response_ended = True
                if not ended:
                    if end:
                        session.send_headers(sid, end, end=True)  # trailers
                    else:
                        session.send_data(sid, b"", end=True)  # no body, or its last DATA went out in an earlier turn
                self._response_complete()
        except ProtocolError:
            # The stream or the connection closed under us (StreamClosedError
            # is one): nothing more can go out on it.
            self.cancelled()

    def _response_complete(self) -> None:
        """The response went out whole; a client still uploading is told to stop (RFC 9113 8.1)."""
        if not self.request_ended:
            self.conn.reset_stream(self.stream_id, ErrorCode.NO_ERROR)
            self.reset = True
        self.conn.stream_done(self)

    def failResponse(self, status: int, message: str, extra: Headers = (), page: Any = None) -> None:
        if self.disconnected:
            return
        if self.head_sent:
            # Too late for a status: reset the stream so the client sees truncation.
            self.conn.reset_stream(self.stream_id, ErrorCode.INTERNAL_ERROR)
            self._abandon()
            self.conn.transmit()
            return
        self.writeLocal(status, message, False, extra, page)

    def writeLocal(self, status: int, message: str, close: bool = False, extra: Headers = (),
                   page: Any = None) -> None:
        """A response made by the proxy itself (errors, refusals), or its configured error page."""
        if self.disconnected:
            return
        if page is None:
            page = self.factory.error_pages.get(status)
        if page is not None:
            body, content_type = page.body, page.content_type.encode("ascii")
        else:
            body, content_type = (message + "\n").encode("utf-8"), b"text/plain; charset=utf-8"
        fields = [(b":status", b"%d" % status), (b"content-type", content_type),
                  (b"content-length", b"%d" % len(body)), (b"date", http_date(self.factory.clock))]
        server = self.factory.server_header
        if server:
            fields.append((b"server", server.strip()))
        fields += _h2_fields(extra)
        self.head = encode_fields(fields)
        self.body_bytes = 0
        self.writeBody(body)
        self.finishBody(())

    def exchangeDone(self, exchange: Any) -> None:
        if exchange is not None:
            self.factory.exchange_finished(self, exchange, self.body_bytes)
        if exchange is self.exchange:
            self.exchange = None

    def registerUpstream(self, conn: Any) -> None:
        gate = conn.gate
        self.upstream_gate = gate
        if gate is None:
            return
        if self.conn.producer_paused:
            gate.pause("client")
        if self in self.conn.blocked:
            gate.pause(_WINDOW)

    def unregisterUpstream(self, conn: Any) -> None:
        gate = conn.gate
        if gate is not None:
            gate.resume("client")
            gate.resume(_WINDOW)
        if self.upstream_gate is gate:
            self.upstream_gate = None

    def _release_upstream(self) -> None:
        gate, self.upstream_gate = self.upstream_gate, None
        if gate is not None:
            gate.resume("client")
            gate.resume(_WINDOW)

    def startTunnel(self, conn: Any, leftover: bytes) -> None:
        # Never asked for: HTTP/2 requests are handed over with upgrade=False.
        conn.abort()
        self.failResponse(502, "Bad Gateway: protocol upgrades are not proxied over HTTP/2")


def _h2_fields(headers: Headers) -> list[tuple[bytes, bytes]]:
    """
    Response fields for HTTP/2: lower-case names, no connection-specific
    fields, no pseudo-header, values without surrounding whitespace.  What
    a strict client checks (tests/test_h2_outbound.py holds them to it).
    """
    out = []
    for name, value in headers:
        lname = name.lower()
        if lname not in NOT_FORWARDED and lname[:1] != b":":
            out.append((lname, value.strip()))
    return out


HEAD_CACHE_ENTRIES = 512
HEAD_CACHE_BYTES = 1024
"""
Response heads remembered (process-wide) with their encoded blocks, and the
largest block remembered.  An origin's heads repeat (the same fields, the
date of this second), so most heads are encoded once: the cache starts over
when full, and a head with credentials (L{NEVER_INDEXED}) is never kept.
"""

_head_blocks: dict[tuple[Any, ...], bytes] = {}


def response_block(status: int, headers: Headers, content_length: int | None) -> bytes:
    """
    A response head's fields for HTTP/2 (L{_h2_fields}, C{:status} first and
    C{content-length} last), HPACK-encoded (L{encode_fields}): looked up by
    everything it is made of, so a head that differs in any byte is a new
    entry, never an old one's block.
    """
    try:
        key = (status, content_length, *headers)
        block = _head_blocks.get(key)
    except TypeError:  # a filter's headers that are not tuples of bytes
        key = None
        block = None
    if block is not None:
        return block
    fields = [(b":status", b"%d" % status), *_h2_fields(headers)]
    if content_length is not None:
        fields.append((b"content-length", b"%d" % content_length))
    block = encode_fields(fields)
    if key is not None and len(block) <= HEAD_CACHE_BYTES and all(name not in NEVER_INDEXED for name, _ in fields):
        if len(_head_blocks) >= HEAD_CACHE_ENTRIES:
            _head_blocks.clear()
        _head_blocks[key] = block
    return block


@implementer(IPushProducer)
class H2ServerConnection(Protocol):
    """One client connection speaking HTTP/2 (after ALPN chose C{h2})."""

    _log = Logger(observer=log_observer)

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.session: H2Session = None  # type: ignore[assignment]  # made when the limits are known
        self.streams: dict[int, H2Stream] = {}
        self.blocked: set[H2Stream] = set()
        self.producer_paused = False
        self.disconnected = False
        self.requests = 0
        self.resets = 0
        self._timer: Any = None
        self._idle_since = 0.0
        """When the last stream ended (or the connection started): the idle timeout counts from there."""
        self._close_timer: Any = None
        self.closing = False
        self.calmed = False
        self.unsent = 0
        self._dirty: dict[H2Stream, None] = {}
        """Streams with body or an end to frame at the end of this turn, in order."""
        self._turn_call: Any = None

    # -- connection -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        transport = self.transport
        ip = client_address(transport)
        self.client_ip = ip
        self.info = forwarding_info(f, transport, ip)
        limits = f.limits
        self.session = H2Session(
            ResponseEncoder(),
            max_concurrent_streams=MAX_CONCURRENT_STREAMS,
            stream_window=STREAM_WINDOW,
            connection_window=CONNECTION_WINDOW,
            max_header_list_size=limits.max_header_bytes + limits.max_request_line,
            flood_allowance=CONTROL_ALLOWANCE,
            per_useful=CONTROL_PER_USEFUL,
        )
        self.session.initiate()
        transport.registerProducer(self, True)
        no_delay(transport)
        f.connections.add(self)
        self.transmit()
        self._idle()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.disconnected = True
        self.factory.connections.discard(self)
        self._stopTimer()
        turn, self._turn_call = self._turn_call, None
        if turn is not None and turn.active():
            turn.cancel()
        self._dirty = {}
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.cancelled()
        self.blocked.clear()

    def _idle(self) -> None:
        """
        No open stream: close after the idle timeout, as HTTP/1.1 keep-alive
        does.  The timer is not stopped by a request and started again after
        it (a timer made and cancelled per request, for a client that sends
        one at a time): it looks, when it fires, at when the connection last
        went idle.
        """
        if self.disconnected or self.closing:
            return
        self._idle_since = self.factory.clock.seconds()
        if self._timer is None:
            self._timer = self.factory.clock.callLater(self.factory.limits.idle_timeout, self._timedOut)

    def _stopTimer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timedOut(self) -> None:
        self._timer = None
        if self.disconnected or self.closing:
            return
        clock = self.factory.clock
        idle_timeout = self.factory.limits.idle_timeout
        if self.streams:
            # Busy: the idle time starts when the last stream ends; look again then at the latest.
            self._timer = clock.callLater(idle_timeout, self._timedOut)
            return
        left = self._idle_since + idle_timeout - clock.seconds()
        if left > 0:
            self._timer = clock.callLater(left, self._timedOut)
            return
        self.session.close(ErrorCode.NO_ERROR)
        self._close()

    def _close(self) -> None:
        """
        Send what the session has queued (a GOAWAY), then close once it is written.
        A peer that stops reading would hold the close open for good: it is
        cut after C{idle_timeout}, as HTTP/1.1's close is.

        The session sends nothing more once the connection is closed, so the streams
        still open end now: their exchanges are cancelled (an origin that
        answers later finds its connection closed, and is not blamed).
        """
        self.transmit()
        if not self.disconnected and not self.closing:
            self.closing = True
            self._stopTimer()
            streams, self.streams = self.streams, {}
            for stream in streams.values():
                stream.cancelled()
            self.blocked.clear()
            # TLS waits for a registered producer to go before it shuts down.
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            self._close_timer = self.factory.clock.callLater(self.factory.limits.idle_timeout, self._forceClose)

    def _forceClose(self) -> None:
        self._close_timer = None
        if not self.disconnected:
            self.transport.abortConnection()

    def pump_soon(self, stream: H2Stream) -> None:
        """C{stream} has body or its end to send: frame it at the end of this turn."""
        self._dirty[stream] = None
        if self._turn_call is None:
            self._turn_call = self.factory.clock.callLater(0, self._end_of_turn)

    def transmit_soon(self) -> None:
        """
        Write what the session holds at the end of this reactor turn, with whatever
        else this turn adds: one write (and one TLS record) per connection and
        turn, not one per frame.  (C{callLater(0)} runs once the reactor has
        handled this turn's I/O, before it waits again.)  The bytes wait in
        the session's buffer until then: at most what this turn read from the client
        and the origins.
        """
        if self._turn_call is None:
            self._turn_call = self.factory.clock.callLater(0, self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._turn_call = None
        self.transmit()

    def transmit(self) -> None:
        """Frame the pending bodies, and write what the session holds now."""
        dirty = self._dirty
        if dirty:
            self._dirty = {}
            for stream in dirty:
                stream.pump()
        data = self.session.data_to_send()
        if data and not self.disconnected:
            if self.producer_paused:
                # The client is not reading: what we write now waits in memory.
                self.unsent += len(data)
                if self.unsent > OUTPUT_BOUND and not self.closing:
                    self.transport.write(data)
                    self._calm(f"does not read its answers ({self.unsent} bytes queued)")
                    return
            self.transport.write(data)

    def _calm(self, why: str) -> None:
        """Tell a client that costs us work for nothing ENHANCE_YOUR_CALM, and disconnect it."""
        if self.calmed:
            return
        self.calmed = True
        self._log.warn("HTTP/2 client {client} {why}: disconnecting", client=self.client_ip, why=why)
        self.session.close(ErrorCode.ENHANCE_YOUR_CALM)
        self._close()

    # -- IPushProducer: the client's TCP buffer ----------------------------------------------

    def pauseProducing(self) -> None:
        """
        The client's buffer is full: stop its origins, and stop reading it
        (each frame it sends may need an answer that would only queue up).
        """
        self.producer_paused = True
        self.unsent = 0
        if not self.closing:
            self.transport.pauseProducing()
        for stream in self.streams.values():
            if stream.upstream_gate is not None:
                stream.upstream_gate.pause("client")

    def resumeProducing(self) -> None:
        self.producer_paused = False
        self.unsent = 0
        if not self.closing and not self.disconnected:
            self.transport.resumeProducing()
        for stream in list(self.streams.values()):
            if stream.upstream_gate is not None:
                stream.upstream_gate.resume("client")

    def stopProducing(self) -> None:
        pass

    # -- frames in --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return  # a GOAWAY went out: what follows would only be answered with errors
        try:
            events = self.session.receive(data)
        except ProtocolError as e:
            # A GOAWAY is queued; RFC 9113 allows a connection error for a malformed request.
            if e.code == ErrorCode.ENHANCE_YOUR_CALM and not self.calmed:
                self.calmed = True
                self._log.warn("HTTP/2 client {client} {why}: disconnecting", client=self.client_ip, why=str(e))
            else:
                self._log.info("HTTP/2 protocol error from {client}: {why}", client=self.client_ip, why=str(e))
            self._close()
            return
        for event in events:
            if isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.data(event.data, event.flow_controlled_length)
                else:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, RequestReceived):
                self._request(event.stream_id, event.headers, event.ended)
            elif isinstance(event, StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.ended()
            elif isinstance(event, WindowUpdated):
                self._windowOpened(event.stream_id)
            elif isinstance(event, StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.cancelled()
                    if event.remote and self._resetFlood():
                        return
            elif isinstance(event, ConnectionTerminated):
                self._close()
                return
        self.transmit_soon()

    def _resetFlood(self) -> bool:
        """
        Requests the client cancels still cost the origin a connection
        attempt ("rapid reset", CVE-2023-44487): a client that resets most of
        what it asks for is told to calm down and disconnected.
        """
        self.resets += 1
        if self.resets > RESET_ALLOWANCE and self.resets * 2 > self.requests:
            self._log.warn("HTTP/2 client {client} reset {resets} of {requests} streams: disconnecting",
                           client=self.client_ip, resets=self.resets, requests=self.requests)
            self.session.close(ErrorCode.ENHANCE_YOUR_CALM)
            self._close()
            return True
        return False

    def _windowOpened(self, stream_id: int) -> None:
        if stream_id == 0:
            for stream in list(self.blocked):
                stream.pump()
        else:
            stream = self.streams.get(stream_id)
            if stream is not None and stream in self.blocked:
                stream.pump()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if size and not self.disconnected and not self.closing:
            self.session.acknowledge(stream_id, size)

    def _request(self, stream_id: int, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.requests += 1
        stream = H2Stream(self, stream_id)
        self.streams[stream_id] = stream
        stream.request_ended = ended
        method = path = authority = None
        headers: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        host = None
        length = False
        for name, value in fields:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"cookie":
                cookies.append(value)
            elif name == b"host":
                host = value
            else:
                if name == b"content-length":
                    length = True
                headers.append((name, value))
        if authority is not None and host is not None and host.lower() != authority.lower():
            return self._answer(stream, 400, "Bad Request: Host and :authority differ")
        host = authority if authority is not None else host
        if host is None:
            return self._answer(stream, 400, "Bad Request: missing :authority")
        head = [(b"host", host)]
        if cookies:
            head.append((b"cookie", b"; ".join(cookies)))
        head += headers
        if not ended and not length:
            # Length unknown until END_STREAM: the origin gets it chunked.
            head.append((b"transfer-encoding", b"chunked"))
        try:
            # The session insists on :method and :path; an empty one is refused by read_request_head, which
            # also checks the sizes (414, 431) and everything else, as for HTTP/1.1.
            exchange = self.factory.handle(stream, method or b"", path or b"", b"2", head, True, False,
                                           sizes_checked=False)
        except Exception:  # noqa: BLE001 - a bug must cost one stream, not the connection
            self._log.failure("HTTP/2 request handling failed")
            return self._answer(stream, 500, "Internal Server Error")
        if isinstance(exchange, LocalResponse):
            # A refusal made by handle(): it writes itself through writeLocal.
            stream.exchange = exchange
            exchange.start()
            return
        if not isinstance(exchange, ProxyExchange):
            # A twisted.web resource of the proxy's own: it writes HTTP/1.1
            # bytes, so ask the client to retry this request over HTTP/1.1.
            self.streams.pop(stream_id, None)
            self.reset_stream(stream_id, ErrorCode.HTTP_1_1_REQUIRED)
            self._maybeIdle()
            return
        stream.exchange = exchange
        exchange.start()
        if ended and not exchange.finished:
            exchange.requestBodyEnd()
        elif not ended:
            stream.watchBodyRate()

    def _answer(self, stream: H2Stream, status: int, message: str) -> None:
        response = LocalResponse(stream, status, message)  # type: ignore[arg-type]
        stream.exchange = response
        response.start()

    # -- frames out -------------------------------------------------------------------------

    def send_block(self, stream_id: int, encoded: bytes, end: bool) -> None:
        """A header block, its fields already encoded (L{encode_fields})."""
        try:
            self.session.send_block(stream_id, encoded, end)
        except ProtocolError:
            # The stream was reset, or the connection closed (after a GOAWAY):
            # the response has nowhere to go.
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.cancelled()

    def reset_stream(self, stream_id: int, code: ErrorCode) -> None:
        self.session.reset_stream(stream_id, code)

    def stream_done(self, stream: H2Stream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        self.blocked.discard(stream)
        stream._stopStallTimer()
        self._maybeIdle()

    def _maybeIdle(self) -> None:
        if not self.streams:
            if self.draining:
                self._close()
            else:
                self._idle()

    draining = False
    """A graceful stop sent GOAWAY: the connection closes when its last stream ends."""

    def drain(self) -> None:
        """
        A graceful stop (RFC 9113 6.8): GOAWAY with NO_ERROR and the last
        stream taken, so the client opens no more; the streams open finish,
        then the connection closes.
        """
        if self.disconnected or self.closing:
            return
        if not self.draining:
            self.draining = True
            self.session.drain()
            self.transmit()
        if not self.streams:
            self._close()


@implementer(IHandshakeListener)
class ALPNSwitch(Protocol):
    """
    The protocol of a TLS HTTP listener until the handshake is over: then
    the connection goes to L{H2ServerConnection} if ALPN chose C{h2}, else to
    the factory's HTTP/1.1 protocol.  A handshake that takes longer than the
    header timeout is cut, as a slow request head would be.
    """

    def __init__(self, factory: Any, http1: Any) -> None:
        self.factory = factory
        self.http1 = http1
        self.protocol: Any = None
        self._timer: Any = None

    def connectionMade(self) -> None:
        if ITimedHandshake.providedBy(self.transport) and self.transport.times_handshake:
            return  # the ssl transport cuts a slow handshake itself, on the timer it has anyway
        self._timer = self.factory.clock.callLater(self.factory.limits.header_timeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        if self.protocol is None:
            self.transport.abortConnection()

    def drain(self) -> None:
        """A graceful stop: no request yet (a handshake, or no byte since) closes now; else the protocol drains."""
        if self.protocol is None:
            self.transport.loseConnection()
        else:
            self.protocol.drain()

    def handshakeCompleted(self) -> None:
        if self.protocol is not None:
            return
        alpn = negotiated_protocol(self.transport)
        self.factory.tls_handshake_completed(alpn)
        if alpn == b"h2":
            # HTTP/2 speaks first (its SETTINGS preface): start it now.
            self._start(H2ServerConnection(self.factory))
        # HTTP/1.1 waits for its first bytes: many TLS connections (pre-connects,
        # probes, handshake benchmarks) close without a request, and building the
        # connection for them was measurable per-handshake latency.

    def _start(self, protocol: Any) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.http1 = None
        protocol.factory = self.factory
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self.protocol is None:
            if negotiated_protocol(self.transport) == b"h2":
                self._start(H2ServerConnection(self.factory))
            else:
                self._start(self.http1 if self.http1 is not None else self.factory.build_http1())
        self.protocol.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.protocol is not None:
            self.protocol.connectionLost(reason)
        elif reason is not None and _pyopenssl_error(reason):
            # Twisted's TLS (mutual-TLS listeners) reports a failed handshake
            # only here; the ssl transport tells its factory itself.
            self.factory.tls_handshake_failed(self.transport.getPeer(), reason.getErrorMessage())


def _pyopenssl_error(reason: Failure) -> bool:
    from OpenSSL.SSL import Error

    return reason.check(Error) is not None
