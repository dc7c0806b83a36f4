"""
One request through the proxy: choose a backend, get a connection, stream
the request body up and the response down, and turn every failure into a
clear answer (502, 503, 504) or, once the response has started, a cut
connection the client can see.

The exchange does not know what kind of client it serves: it talks to a
L{IDownstream} (rproxy's own HTTP/1.1 connection, or a twisted.web request
when the proxy is mounted in someone else's C{Site}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferTimeoutError, succeed
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from ..headers import (
    ForwardingInfo,
    Header,
    connection_tokens,
    http_date,
    request_head_block,
    response_added_lines,
    response_head_block,
    response_headers_for_client,
)
from ..logs import observer as log_observer
from ..transport.flow import GateProducer
from .upstream import BadResponse, ConnectTimeout, UpstreamConnection

if TYPE_CHECKING:
    from ..upstream.pool import Backend

__all__ = ["IDownstream", "IExchange", "ProxyExchange", "ExchangeSettings", "RequestRejected"]

Headers = Sequence[tuple[bytes, bytes]]

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

CLIENT_STALLS = frozenset({"client", "h2-window"})
"""
Reasons an origin connection's L{ReadGate} is paused that are the client's
doing: its TCP buffer is full, or (HTTP/2) it grants the stream no window.
A deadline that passes while one holds is the client's stall, never the
backend's failure.
"""


class IDownstream(Interface):
    """Where an exchange's response goes and where its request body comes from."""

    gate = Attribute("The L{ReadGate} of the client's transport (pauses the request body).")
    wants_block = Attribute("Whether L{writeHead} may be given the headers already serialized (bytes).")
    http_version = Attribute("The client's HTTP version, C{b'1.1'} or C{b'1.0'}.")

    def writeInterim(status: int, reason: bytes, headers: Headers) -> None:
        """Relay a 1xx response."""

    def writeHead(status: int, reason: bytes, headers: Headers, content_length: int | None, has_body: bool) -> None:
        """Start the response; C{has_body} with no length means the length is unknown."""

    def writeBody(data: bytes) -> None:
        """More of the response body."""

    def flush() -> None:
        """Send anything held back (a response head waiting for its body)."""

    def finishBody(trailers: Headers) -> None:
        """The response is complete."""

    def failResponse(status: int, message: str, extra: Headers = (), page: Any = None) -> None:
        """
        Answer with an error if nothing was written yet, else cut the
        connection.  C{page} is the route's error page for C{status}, if it
        has one (an L{rproxy_tw.config.ErrorPageConfig}).
        """

    def exchangeDone(exchange: Any) -> None:
        """The exchange is over (response finished or failed)."""

    def registerUpstream(conn: UpstreamConnection) -> None:
        """Let the client's write buffer pause reading from C{conn}."""

    def unregisterUpstream(conn: UpstreamConnection) -> None:
        """Undo L{registerUpstream}."""

    def startTunnel(conn: UpstreamConnection, leftover: bytes) -> None:
        """After a 101: relay raw bytes both ways."""


class IExchange(Interface):
    """
    One request on a client connection, whoever answers it: the proxy's
    exchange with an origin, the proxy itself (a refusal), or an
    application's resource mounted in the proxy's tree.
    """

    request = Attribute("The L{rproxy_tw.http.request.ProxyRequest}, or None for a head that could not be read.")
    status = Attribute("The status answered so far (0 before the head is sent).")
    headSent = Attribute("Whether the response head has gone to the client.")
    finished = Attribute("Whether the exchange is over.")
    requestComplete = Attribute("Whether the whole request body has been read.")
    keep_alive = Attribute("Whether the connection may carry another request after this one.")
    upgrade = Attribute("Whether the request asks for a protocol switch the proxy tunnels (WebSocket).")
    http_version = Attribute("The client's HTTP version.")
    started_at = Attribute("When the head was read (only kept while events are observed), or None.")
    backend = Attribute("The backend that answered, or None.")
    pool = Attribute("The pool of the route, or None.")
    route_name = Attribute("The route's name for logs and events, or None.")
    head_at = Attribute("When the origin's response head arrived (kept only while events are observed), or None.")
    attempts = Attribute("Backends tried (0: none; more than 1: retried).")
    body_seen = Attribute("Request body bytes read from the client.")

    def start() -> None:
        """Begin answering (in turn: pipelined requests wait for the ones before)."""

    def requestBodyData(data: bytes) -> None:
        """More of the request body.  @raise RequestRejected: over a limit."""

    def requestBodyEnd() -> None:
        """The request body is complete."""

    def cancel() -> None:
        """The client went away: stop, and free what the exchange holds."""


class RequestRejected(Exception):
    """
    Raised while reading a request: answer C{status}, then close the
    connection unless C{close} is false (the request was read whole, so the
    next one can follow).
    """

    def __init__(self, status: int, message: str, close: bool = True) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.close = close


class ResponseDiscarded(Exception):
    """Raised from a parser callback when a response is dropped for a retry."""


CLIENT_HEADS_ENTRIES = 256
CLIENT_HEADS_BYTES = 2048
"""
Origin response heads remembered per pool with what the client is sent
(L{ExchangeSettings.client_headers}), and the largest remembered (bytes of
names and values): at most half a megabyte per pool.
"""


class ExchangeSettings:
    """Per-pool settings an exchange needs, precomputed once per config."""

    __slots__ = (
        "via",
        "server_header",
        "response_added",
        "response_timeout",
        "idle_timeout",
        "retries",
        "retry_on_status",
        "replay_buffer",
        "budget",
        "passive",
        "_client_heads",
    )

    def __init__(
        self,
        via: bytes,
        server_header: bytes,
        response_timeout: float,
        idle_timeout: float,
        retries: int,
        retry_on_status: Sequence[int] = (),
        replay_buffer: int = 65536,
        budget: Any = None,
        passive: Any = None,
    ):
        self.via = via
        self.server_header = server_header
        self.response_added = response_added_lines(via, server_header)
        self.response_timeout = response_timeout
        self.idle_timeout = idle_timeout
        self.retries = retries
        self.retry_on_status = frozenset(retry_on_status)
        self.replay_buffer = replay_buffer
        self.budget = budget
        self.passive = passive
        self._client_heads: dict[tuple[Header, ...], tuple[Header, ...]] = {}

    def client_headers(self, headers: Headers, clock: Any) -> list[Header]:
        """
        C{response_headers_for_client(headers, via, server_header, clock=clock)}
        (no upgrade), remembered per origin head: an origin's heads repeat (the
        same fields, the date of this second), and a client that takes them
        field by field (HTTP/2, a response filter) need not have every one
        rewritten again.  Only heads whose C{Date} is the origin's are kept
        (one added from C{clock} would go stale), at most
        L{CLIENT_HEADS_ENTRIES} of them, each of at most L{CLIENT_HEADS_BYTES}
        (the memory starts over when full).
        """
        key = tuple(headers)
        out = self._client_heads.get(key)
        if out is None:
            made = response_headers_for_client(headers, self.via, self.server_header, clock=clock)
            if any(n.lower() == b"date" for n, _ in headers) and b"date" not in connection_tokens(headers) \
                    and sum(len(n) + len(v) for n, v in headers) <= CLIENT_HEADS_BYTES:
                heads = self._client_heads
                if len(heads) >= CLIENT_HEADS_ENTRIES:
                    heads.clear()
                heads[key] = tuple(made)
            return made
        return list(out)


@implementer(IExchange)
class ProxyExchange:
    """A request being proxied to one pool."""

    _log = Logger(observer=log_observer)

    # One is made per request: slots make that cheaper, and catch misspelt attributes.
    __slots__ = (
        "downstream", "clock", "plan", "pool", "connector", "settings", "request", "method", "info", "body",
        "upgrade", "conn", "backend", "pending", "requestComplete", "requestSent", "bodyStarted",
        "headSent", "finished", "status", "tried", "attempts", "_connecting", "_producer", "_chunked_up",
        "body_limit", "body_seen", "replayable", "replay", "replay_bytes", "head", "http_version", "chain",
        "started_at", "_waiting", "route_name", "keep_alive", "head_at", "_source", "_inspect",
        "__weakref__",
    )

    def __init__(
        self,
        downstream: Any,
        clock: Any,
        plan: Any,
        request: Any,
        info: ForwardingInfo,
        chain: Any = None,
        started_at: float | None = None,
    ) -> None:
        """
        @param plan: the route's L{rproxy_tw.pipeline.RoutePlan} (pool, connector, settings).
        @param request: the L{rproxy_tw.http.request.ProxyRequest}; request
            filters may still rewrite it, since it is serialised for the
            origin only once they have all passed it.
        @param chain: the route's L{rproxy_tw.pipeline.FilterChain} on this listener.
        """
        self.clock = clock
        self.plan = plan
        self.pool = plan.pool
        self.connector = plan.connector
        self.settings = settings = plan.settings
        self.route_name = plan.name
        self.request = request
        self.keep_alive = request.keep_alive
        self.method = method = request.method
        self.http_version = request.http_version
        self.info = info
        self.body = body = request.body  # "none" | "length" | "chunked"
        self.upgrade = upgrade = request.upgrade
        self.chain = chain
        self.downstream = chain.wrap(self, downstream) if chain is not None and chain.response else downstream
        self.conn: UpstreamConnection | None = None
        self.backend: Backend | None = None
        self.pending: list[bytes] | None = None
        self.requestComplete = body == "none"
        self.requestSent = False
        self.bodyStarted = False
        self.headSent = False
        self.finished = False
        self.status = 0
        self.tried: list[Backend] = []
        self.attempts = 0
        self._connecting: Any = None
        self._producer: GateProducer | None = None
        self._chunked_up = body == "chunked"
        self._waiting: Any = None
        self._source: Any = None
        self._inspect: _BodyInspection | None = None
        self.body_limit = request.body_limit
        self.body_seen = 0
        self.replayable = (method in IDEMPOTENT or plan.retry_non_idempotent) and not upgrade
        self.replay: list[bytes] | None = [] if self.replayable and body != "none" else None
        self.replay_bytes = 0
        self.head = b""
        self.started_at = started_at
        self.head_at: float | None = None
        """When the origin's response head arrived (kept only while events are observed)."""
        if settings.budget is not None:
            settings.budget.deposit()

    # -- starting ---------------------------------------------------------------------------

    def start(self) -> None:
        """Run the route's request filters, then send the request to a backend."""
        chain = self.chain
        if chain is not None and chain.request:
            self._filter(0)
        else:
            self._pick()

    def _filter(self, index: int) -> None:
        filters = self.chain.request
        while index < len(filters):
            result = filters[index].filterRequest(self.request, self)
            index += 1
            if result is None:
                continue
            if isinstance(result, Deferred):
                self._await(result, index)
            else:
                self._answer(result)
            return
        self._pick()

    def inspectBody(self, limit: int) -> Deferred[bytes]:
        """
        For a request filter (from C{filterRequest}): the first C{limit}
        bytes of the request body, or all of it when it is shorter, once
        they have arrived.  Until the filters have all decided, nothing is
        sent to the origin (no backend is even picked); the client's body is
        read until C{limit} bytes are held, then reading pauses, so at most
        C{limit} bytes and one read are kept.  Return a Deferred chained on
        this one from C{filterRequest}: the wait has the route's
        C{response_timeout} as its deadline.
        """
        if self.body == "none" or limit <= 0 or self.finished:
            return succeed(b"")
        inspection = self._inspect = _BodyInspection(limit)
        pending = self.pending
        request = self.request
        if pending is None and any(len(n) == 6 and n.lower() == b"expect" for n, _ in request.headers):
            # The client waits for a 100 before it sends the body the filter waits for: answer it
            # here (the origin, contacted later, gets no Expect and so sends no second 100).
            request.headers = [(n, v) for n, v in request.headers if n.lower() != b"expect"]
            self.downstream.writeInterim(100, b"Continue", ())
        if pending:
            for data in pending:
                if inspection.feed(data):
                    break
        if self.requestComplete or inspection.full:
            return self._inspected()
        if pending is not None:
            self.downstream.gate.resume("connecting")  # read on, up to the limit
        return inspection.deferred

    def _inspected(self) -> Deferred[bytes]:
        """The body is in hand up to the limit (or complete): hold the rest back and let the filter judge."""
        inspection, self._inspect = self._inspect, None
        assert inspection is not None
        if self.pending is not None and not self.requestComplete:
            self.downstream.gate.pause("connecting")
        d = inspection.deferred
        d.callback(b"".join(inspection.held))
        return d

    def _await(self, waiting: Deferred[Any], index: int) -> None:
        """A filter answers later: the client's body waits, and so does the filter, up to response_timeout."""
        self._waiting = waiting
        gate = self.downstream.gate
        if self._inspect is None:
            gate.pause("filter")
        waiting.addTimeout(self.settings.response_timeout, self.clock)

        def decided(result: Any) -> None:
            self._waiting = None
            gate.resume("filter")
            if self.finished:
                return
            if result is None:
                self._filter(index)
            else:
                self._answer(result)

        def failed(failure: Failure) -> None:
            self._waiting = None
            gate.resume("filter")
            if self.finished or failure.check(CancelledError):
                return
            if self._inspect is not None and failure.check(DeferTimeoutError):
                # The body a filter waits to read came too slowly: the client's doing.
                self._inspect = None
                self._giveUp(408, "Request Timeout: the request body came too slowly")
                return
            self._log.failure("request filter failed for {method} {target}", failure,
                              method=self.method.decode("latin-1"), target=self.request.target.decode("latin-1"))
            self._giveUp(500, "Internal Server Error")

        waiting.addCallbacks(decided, failed)

    def _answer(self, answer: Any) -> None:
        """A request filter answered for the origin (a refusal, a redirect, a cached response)."""
        self.status = answer.status
        self.headSent = True
        if not self.requestComplete and answer.status >= 400:
            # A refusal while the body still comes: the connection closes after the answer,
            # rather than reading (and throwing away) what may be a very long body.
            self.keep_alive = False
        has_body = self.method != b"HEAD" and answer.status not in (204, 304) and answer.status >= 200
        headers = answer.headers
        if type(headers) is not bytes:  # a serialized head (a stored response's) goes as it is
            headers = list(headers)
        if not answer.complete_headers:
            server = self.settings.server_header
            if server:
                headers.append((b"Server", server))
            headers.append((b"Date", http_date(self.clock)))
        downstream = self.downstream
        source = answer.source
        if source is not None:
            downstream.writeHead(answer.status, answer.reason, headers, answer.content_length, has_body)
            if has_body:
                self._source = source
                source.streamTo(downstream, self._streamed)
                return
            downstream.finishBody(())
            self._finish(True)
            return
        length = answer.content_length
        if length is None and answer.status != 304:  # a 304's Content-Length would describe the stored body
            length = len(answer.body)
        downstream.writeHead(answer.status, answer.reason, headers, length, has_body)
        if has_body and answer.body:
            downstream.writeBody(answer.body)
        downstream.finishBody(())
        self._finish(True)

    def _streamed(self, failure: Failure | None) -> None:
        """A streamed local answer (a stored response) is written, or its source failed."""
        self._source = None
        if self.finished:
            return
        if failure is None:
            self.downstream.finishBody(())
            self._finish(True)
            return
        self._log.failure("stored body failed for {target}", failure, target=self.request.target.decode("latin-1"))
        self._giveUp(502, "Bad Gateway: the stored response could not be read")

    def _serialize(self) -> bytes:
        """
        The request head for the origin, made once every request filter has
        passed the request (they may rewrite it), when the first connection
        to a backend is in hand.
        """
        request = self.request
        if request.asterisk:
            target = b"*"
        elif request.query or self.plan.route.strip_prefix:
            target = self.plan.route.upstream_target(request.path, 0, request.query)
        else:
            target = request.path  # what upstream_target gives for it
        block = request_head_block(request.headers, self.info, self.upgrade, self.http_version)
        body = self.body
        if body == "length":
            block += b"Content-Length: %d\r\n" % request.content_length
        elif body == "chunked":
            block += b"Transfer-Encoding: chunked\r\n"
        head = self.head = b"%s %s HTTP/1.1\r\n%s\r\n" % (self.method, target, block)
        return head

    def _pick(self) -> None:
        backend = self.pool.pick(self.info.client_ip, self.request.headers, self.tried)
        if backend is None:
            if self.tried:
                self._giveUp(502, "Bad Gateway: no backend could be reached")
            else:
                self._giveUp(503, "Service Unavailable: no healthy backend", ((b"Retry-After", b"5"),))
            return
        self.backend = backend
        self.tried.append(backend)
        self.attempts += 1
        conn = self.connector.idle(backend, self.replayable)
        if conn is not None:
            self._begin(conn)
            return
        self._connect(backend)

    def _connect(self, backend: Backend) -> None:
        d = self.connector.connect(backend)
        self._connecting = d
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, conn: UpstreamConnection) -> None:
        self._connecting = None
        if self.finished:
            self.connector.release(conn, True)
            return
        self._begin(conn)

    def _connectFailed(self, failure: Failure) -> None:
        self._connecting = None
        if self.finished:
            return
        backend = self.backend
        why = failure.getErrorMessage() or failure.type.__name__
        if backend is not None and self._mayWarn(backend):
            self._log.warn(
                "connect to backend {backend} of pool {pool} failed: {why} ({more} more not logged)",
                backend=backend.name,
                pool=self.pool.name,
                why=why,
                more=backend.unwarned,
            )
            backend.unwarned = 0
        if backend is not None:
            backend.last_error = why
            backend.failures += 1
            self._report(backend, "timeout" if failure.check(ConnectTimeout) else "connect")
        # Nothing was sent: any method may try another backend.
        if self._mayRetry(replay_needed=False):
            self._pick()
            return
        if failure.check(ConnectTimeout):
            self._giveUp(504, "Gateway Timeout: the backend did not accept the connection in time")
        else:
            self._giveUp(502, "Bad Gateway: the backend could not be reached")

    def _begin(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        backend = conn.backend
        backend.inflight += 1
        backend.total += 1
        conn.send(self, self.head or self._serialize(), self.method == b"HEAD")
        self.downstream.registerUpstream(conn)
        if not self.requestComplete:
            self._producer = GateProducer(self.downstream.gate, "upstream")
            conn.transport.registerProducer(self._producer, True)
        pending = self.pending
        if pending is not None:
            self.pending = None
            self.downstream.gate.resume("connecting")
            for data in pending:
                self._sendBody(data)
        if self.requestComplete:
            self._requestDone()

    # -- request body -----------------------------------------------------------------------

    def requestBodyData(self, data: bytes) -> None:
        self.body_seen += len(data)
        if self.body_limit and self.body_seen > self.body_limit:
            raise RequestRejected(413, "Content Too Large")
        if self.finished:
            return
        conn = self.conn
        if conn is None:
            inspection = self._inspect
            if self.pending is None:
                self.pending = []
                if inspection is None:
                    self.downstream.gate.pause("connecting")
            self.pending.append(data)
            if inspection is not None and inspection.feed(data):
                self._inspected()
            return
        self._sendBody(data)

    def _keep(self, data: bytes) -> None:
        """Keep body bytes for a replay while they fit in the replay buffer."""
        replay = self.replay
        if replay is not None:
            self.replay_bytes += len(data)
            if self.replay_bytes > self.settings.replay_buffer:
                self.replay = None
            else:
                replay.append(data)

    def _sendBody(self, data: bytes) -> None:
        self._keep(data)
        self.bodyStarted = True
        if self._chunked_up:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.conn.write(data)  # type: ignore[union-attr]

    def requestBodyEnd(self) -> None:
        if self.requestComplete:
            return
        self.requestComplete = True
        if self._inspect is not None and not self.finished:
            self._inspected()
            return
        if self.conn is not None and not self.finished:
            self._requestDone()

    def _requestDone(self) -> None:
        conn = self.conn
        assert conn is not None
        if self._chunked_up:
            conn.write(b"0\r\n\r\n")
        if self._producer is not None:
            self._dropBodyProducer(conn)
        self.requestSent = True
        if not self.headSent:
            conn.sent_at = self.clock.seconds()  # the response is due from now

    # -- response ---------------------------------------------------------------------------

    def responseInterim(self, status: int, reason: bytes, headers: Headers) -> None:
        self.downstream.writeInterim(status, reason, headers)

    def responseHead(self, status: int, reason: bytes, headers: Headers, content_length: int | None, chunked: bool) -> None:
        if status == 101 and not self.upgrade:
            raise BadResponse("101 Switching Protocols to a request that asked for no upgrade")
        if status >= 500:
            conn = self.conn
            if conn is not None:
                self._report(conn.backend, "5xx")
            if status in self.settings.retry_on_status and self._mayRetry(replay_needed=True):
                self._log.info(
                    "backend {backend} of pool {pool} answered {status}: trying another",
                    backend=conn.backend.name if conn else "?",
                    pool=self.pool.name,
                    status=status,
                )
                self._retryElsewhere(conn)
                raise ResponseDiscarded()
        self.status = status
        self.headSent = True
        if self.started_at is not None:
            self.head_at = self.clock.seconds()
        s = self.settings
        upgrade = status == 101 and self.upgrade
        has_body = not (self.method == b"HEAD" or status in (204, 304) or status < 200)
        if status == 204:
            content_length = None
        downstream = self.downstream
        if downstream.wants_block and not upgrade:
            block = response_head_block(headers, s.response_added, self.clock)
            if block is not None:
                downstream.writeHead(status, reason, block, content_length, has_body)
                return
        if upgrade:
            out = response_headers_for_client(headers, s.via, s.server_header, b"1.1", keep_upgrade=True,
                                              clock=self.clock)
        else:
            out = s.client_headers(headers, self.clock)
        downstream.writeHead(status, reason, out, content_length, has_body)

    def responseBody(self, data: bytes) -> None:
        self.downstream.writeBody(data)

    def responseEnd(self, trailers: Headers) -> None:
        if self.finished:
            return
        backend = self.backend
        if backend is not None and self.status < 500:
            passive = self.settings.passive
            if passive is not None:
                passive.report_success(backend)
        self.downstream.finishBody(trailers)
        self._finish(True)

    def upstreamUpgraded(self, conn: UpstreamConnection, leftover: bytes) -> None:
        """The origin agreed to switch protocols: from now on, relay bytes."""
        if not self.upgrade:
            self.upstreamBroken(conn, BadResponse("101 Switching Protocols without an Upgrade request"))
            return
        conn.exchange = None
        self.downstream.unregisterUpstream(conn)
        self._finish(False, tunnel=True)
        self.downstream.startTunnel(conn, leftover)

    # -- failures ---------------------------------------------------------------------------

    def upstreamLost(self, conn: UpstreamConnection, reason: Failure | None) -> None:
        """The connection closed before the response ended."""
        if self.finished:
            return
        why = reason.getErrorMessage() if reason is not None else "connection lost"
        if isinstance(reason, Failure) and reason.check(ConnectionDone):
            why = "connection closed by backend"
        if (
            self.replayable
            and not conn.received
            and conn.requests > 1
            and not self.bodyStarted
            and self.pending is None
            and not self.headSent
        ):
            # A kept-alive connection the origin had closed as we reused it:
            # nothing reached the origin's application, so sending again is safe.
            self._detach(conn)
            self._connect(conn.backend)
            return
        self._report(conn.backend, "reset")
        if not self.headSent and self._mayRetry(replay_needed=True):
            self._log.warn(
                "backend {backend} of pool {pool} failed during {method} request: {why}; trying another",
                backend=conn.backend.name,
                pool=self.pool.name,
                method=self.method.decode("latin-1"),
                why=why,
            )
            self._retryElsewhere(conn)
            return
        self._upstreamFailed(conn, why, _tls_refusal(reason))

    def upstreamBroken(self, conn: UpstreamConnection, why: BaseException) -> None:
        """The origin's response was malformed."""
        if self.finished:
            return
        if not self.headSent and self._mayRetry(replay_needed=True):
            self._retryElsewhere(conn)
            return
        self._upstreamFailed(conn, f"malformed response: {why}")

    def _upstreamFailed(self, conn: UpstreamConnection, why: str, tls_refused: bool = False) -> None:
        backend = conn.backend
        backend.last_error = why
        backend.failures += 1
        self._log.warn(
            "backend {backend} of pool {pool} failed during {method} request: {why}",
            backend=backend.name,
            pool=self.pool.name,
            method=self.method.decode("latin-1"),
            why=why,
        )
        self._detach(conn)
        conn.abort()
        if tls_refused:
            self._giveUp(502, "Bad Gateway: TLS with the backend failed (its certificate, name or TLS settings)")
        else:
            self._giveUp(502, "Bad Gateway: the backend's response was broken or cut short")

    def _timedOut(self) -> None:
        """The connection's deadline passed while this exchange held it."""
        if self.finished:
            return
        conn = self.conn
        why = "no response in time" if not self.headSent else "response stalled"
        gate = conn.gate if conn is not None else None
        if self.headSent and gate is not None and not CLIENT_STALLS.isdisjoint(gate.reasons):
            # We stopped reading because the client stopped reading: not the backend's fault.
            self.clientStalled()
            return
        if conn is not None:
            conn.backend.last_error = why
            self._log.warn(
                "backend {backend} of pool {pool}: {why}", backend=conn.backend.name, pool=self.pool.name, why=why
            )
            self._report(conn.backend, "timeout")
            if not self.headSent and self._mayRetry(replay_needed=True):
                self._retryElsewhere(conn)
                return
            self._detach(conn)
            conn.abort()
        self._giveUp(504, "Gateway Timeout: the backend did not answer in time")

    def clientStalled(self) -> None:
        """
        The client stopped taking the response (its TCP buffer, or its HTTP/2
        window, stayed shut past a deadline): end it, and close the origin's
        connection without reporting the backend to passive health.
        """
        if self.finished:
            return
        self._log.info("client {client} stopped reading; closing", client=self.info.client_ip)
        conn = self.conn
        if conn is not None:
            self._detach(conn)
            conn.abort()
        self._giveUp(504, "Gateway Timeout")

    def _mayWarn(self, backend: Backend) -> bool:
        """At most one warning a second per backend: an outage must not flood the log."""
        now = self.clock.seconds()
        if now - backend.last_warned >= 1.0:
            backend.last_warned = now
            return True
        backend.unwarned += 1
        return False

    def _report(self, backend: Backend, kind: str) -> None:
        passive = self.settings.passive
        if passive is not None:
            passive.report_failure(backend, kind)

    def _mayRetry(self, replay_needed: bool) -> bool:
        """
        Whether another backend may be tried: within the per-request cap and
        the pool's budget, and, once anything was sent, only for a request
        that is safe to replay and whose body is still all in hand.
        """
        if self.finished or self.attempts > self.settings.retries:
            return False
        if replay_needed:
            if not self.replayable:
                return False
            if self.body != "none" and self.replay is None:
                return False
        if not self.pool.pick(self.info.client_ip, self.request.headers, self.tried):
            return False
        if not replay_needed:
            # Nothing reached the failed backend: trying another adds no load anywhere.
            return True
        budget = self.settings.budget
        return budget is None or budget.withdraw()

    def _retryElsewhere(self, conn: UpstreamConnection | None) -> None:
        """Drop the failed attempt and send the request again to another backend."""
        if conn is not None:
            self._detach(conn)
            conn.abort()
        self.requestSent = False
        self.bodyStarted = False
        replay = self.replay
        if replay:
            if self.pending is None:
                self.downstream.gate.pause("connecting")
            self.pending = list(replay)
            self.replay = []
            self.replay_bytes = 0
        self._pick()

    def _detach(self, conn: UpstreamConnection) -> None:
        if conn.exchange is self:
            conn.exchange = None
        if self.conn is conn:
            self.conn = None
            conn.backend.inflight -= 1
            self.downstream.unregisterUpstream(conn)
            self._dropBodyProducer(conn)

    def _dropBodyProducer(self, conn: UpstreamConnection) -> None:
        """The request body no longer flows to C{conn}: stop it pausing the client."""
        if self._producer is not None:
            if conn.connected:
                conn.transport.unregisterProducer()
            self.downstream.gate.resume("upstream")
            self._producer = None

    def _giveUp(self, status: int, message: str, extra: Headers = ()) -> None:
        if self.finished:
            return
        if not self.headSent:
            self.status = status
        self.downstream.failResponse(status, message, extra, self.plan.error_pages.get(status))
        self._finish(False)

    def _finish(self, ok: bool, tunnel: bool = False) -> None:
        self.finished = True
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.backend.inflight -= 1
            if not tunnel:
                self.downstream.unregisterUpstream(conn)
            if self._producer is not None:
                self._dropBodyProducer(conn)
            if not ok and not tunnel and conn.exchange is self:
                conn.exchange = None
                conn.abort()
        if self.pending is not None:
            self.pending = None
            self.downstream.gate.resume("connecting")
        self.downstream.exchangeDone(self)

    def cancel(self) -> None:
        """The client went away: stop everything and free the upstream connection."""
        if self.finished:
            return
        self.finished = True
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        self._inspect = None
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if self._source is not None:
            source, self._source = self._source, None
            source.stopStreaming()
        if self.chain is not None and self.chain.response:
            from ..pipeline import DownstreamWrapper

            if isinstance(self.downstream, DownstreamWrapper):
                self.downstream.exchangeCancelled(self)
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.backend.inflight -= 1
            if conn.exchange is self:
                conn.exchange = None
            conn.abort()


class _BodyInspection:
    """The first bytes of a request body, held for a request filter (L{ProxyExchange.inspectBody})."""

    __slots__ = ("limit", "held", "size", "deferred")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: list[bytes] = []
        self.size = 0
        self.deferred: Deferred[bytes] = Deferred()

    @property
    def full(self) -> bool:
        return self.size >= self.limit

    def feed(self, data: bytes) -> bool:
        """Keep what fits of C{data}; whether the limit is reached."""
        room = self.limit - self.size
        if room > 0:
            piece = data if len(data) <= room else data[:room]
            self.held.append(piece)
            self.size += len(piece)
        return self.size >= self.limit


def _tls_refusal(reason: Failure | None) -> bool:
    """Whether a lost origin connection is TLS refusing the origin (or the origin refusing us)."""
    if reason is None:
        return False
    try:
        from OpenSSL.SSL import Error as OpenSSLError
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - both come with the TLS dependencies
        return False
    return reason.check(OpenSSLError, VerificationError) is not None
