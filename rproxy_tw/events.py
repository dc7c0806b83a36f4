"""
What happened, as values: a request finished, a tunnel or a TCP session
closed, a backend changed state, a TLS handshake failed, a reload was
applied or refused, an ACME certificate changed or could not be had.

Why events rather than counters: the access log, and the metrics and
status page to come, all want the same facts; each front end (HTTP/1.1,
HTTP/2, the embedded path, raw TCP) publishes them once to an L{EventBus},
and every observer sees the same thing whatever path the traffic took.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import attrs
from twisted.logger import Logger
from zope.interface import Interface, implementer

from .logs import observer as log_observer

__all__ = [
    "BackendStateChanged",
    "CacheEvicted",
    "CacheHit",
    "CacheMiss",
    "CacheStored",
    "CertificateChanged",
    "CertificateFailed",
    "ConnectionRefused",
    "EventBus",
    "IEventObserver",
    "IRequestObserver",
    "ReloadApplied",
    "ReloadRefused",
    "RequestFinished",
    "RequestRefused",
    "TCPSessionClosed",
    "TLSHandshakeCompleted",
    "TLSHandshakeFailed",
    "request_event",
]


class IEventObserver(Interface):
    """Something that wants to hear what the proxy did (the access log, metrics)."""

    def observe(event: Any) -> None:
        """
        One event (L{RequestFinished}, L{TCPSessionClosed}, ...).  Called on
        the reactor thread; must not block, and must not raise (a failure is
        logged and the other observers still hear the event).
        """


class IRequestObserver(IEventObserver):
    """
    An observer with a handler of its own for L{RequestFinished}, the event
    every request makes: the bus calls it directly, without C{observe}'s
    dispatch on the event's type (a Python call costs about 800
    instructions, a fifth of what the metrics observer does per request).
    """

    def observe_request(event: tuple[Any, ...]) -> None:
        """
        One finished request (C{observe}'s rules: must not block, must not
        raise), as an exact C{tuple} of L{RequestFinished}'s fields in their
        order (or a L{RequestFinished}, which is one too): read by position,
        or named with L{request_event}.  A plain tuple costs a third of what
        a C{NamedTuple} instance does to build and free, and C{itemgetter}
        reads it on its fast path (callgrind, bench/README.md).
        """


class RequestFinished(NamedTuple):
    """
    An HTTP exchange ended: answered, refused, failed, or, for a tunnel, closed.

    An immutable value like the other events, as a C{NamedTuple} rather than
    an attrs frozen class: one is built per request, and a frozen attrs
    class sets each of its fields through C{object.__setattr__} (12 us here
    against under 1 us for a tuple: measured, bench/README.md).  The
    L{IRequestObserver}s (the access log, metrics) are handed its fields as a
    plain tuple in this order, cheaper still, and name them with
    L{request_event} where they read by name.
    """

    client: str
    method: bytes
    target: bytes
    """As the client sent it."""
    http_version: bytes
    host: bytes | None
    status: int
    """What the client was answered; 499 when it left before its answer was complete."""
    bytes_sent: int
    """Body bytes sent to the client (for a tunnel: every byte the origin sent through it)."""
    started: float | None
    finished: float
    route: str | None = None
    pool: str | None = None
    backend: str | None = None
    request_headers: Any = ()
    """
    The request's header fields as the origin got them, (name, value) pairs:
    the request's own list, not a copy (nothing changes it once the exchange
    is over), so that building the event does not search it.
    """
    bytes_received: int | None = None
    """For a tunnel (a WebSocket after its 101): the bytes the client sent through it."""
    tunnel: bool = False
    request_id: bytes | None = None
    upstream_time: float | None = None
    """Seconds from the request head to the origin's response head (None: no origin answered)."""
    attempts: int = 0
    """Backends tried (more than 1: retried)."""
    request_bytes: int = 0
    """Request body bytes read from the client."""

    @property
    def duration(self) -> float | None:
        return None if self.started is None else self.finished - self.started

    def header(self, lower_name: bytes) -> bytes | None:
        """The last value of a request header (its name in lower case), or None."""
        size = len(lower_name)
        found = None
        for name, value in self.request_headers:
            if len(name) == size and name.lower() == lower_name:
                found = value
        return found

    @property
    def user_agent(self) -> bytes | None:
        return self.header(b"user-agent")

    @property
    def referer(self) -> bytes | None:
        return self.header(b"referer")


_tuple_new = tuple.__new__


def request_event(fields: tuple[Any, ...]) -> RequestFinished:
    """The L{RequestFinished} of the fields an L{IRequestObserver} gets: its names, for readers that want them."""
    return _tuple_new(RequestFinished, fields)


@attrs.frozen(slots=True)
class TCPSessionClosed:
    """A raw TCP relay ended."""

    listener: str
    client: str
    backend: str | None
    bytes_from_client: int
    bytes_to_client: int
    started: float
    finished: float
    reason: str


@attrs.frozen(slots=True)
class BackendStateChanged:
    """A backend entered or left rotation (health checks, outlier detection, drain)."""

    pool: str
    backend: str
    in_rotation: bool
    reason: str


@attrs.frozen(slots=True)
class TLSHandshakeFailed:
    listener: str
    client: str
    reason: str


@attrs.frozen(slots=True)
class TLSHandshakeCompleted:
    """A client's TLS handshake on an HTTP listener succeeded (metrics count them by listener and ALPN)."""

    listener: str
    alpn: str
    """The protocol ALPN chose (C{"h2"}, C{"http/1.1"}), or C{"-"} for none."""


@attrs.frozen(slots=True)
class ReloadApplied:
    source: str
    summary: str


@attrs.frozen(slots=True)
class ReloadRefused:
    source: str
    error: str


@attrs.frozen(slots=True)
class CertificateChanged:
    """An ACME certificate was issued, renewed or picked up from the storage folder (L{rproxy_tw.acme})."""

    name: str
    how: str
    """C{"issued"}, C{"renewed"} or C{"picked up"}."""
    not_after: float
    next_attempt: float


@attrs.frozen(slots=True)
class CertificateFailed:
    """Getting an ACME certificate failed; the certificate serving (if any) keeps serving."""

    name: str
    error: str
    failures: int
    """In a row."""
    rate_limited: bool
    next_attempt: float


class _NoRequest:
    """What an event says of an exchange whose request head could not be read (a 400, a 414)."""

    __slots__ = ()
    method = target = b"-"
    http_version = b"1.1"
    host = request_id = None
    headers = ()


_NO_REQUEST = _NoRequest()


class EventBus:
    """
    Hands each event to every observer.  Front ends ask L{wanted} first, so
    that with no observer (access log off, no metrics) no event is even
    built on the per-request path.
    """

    _log = Logger(observer=log_observer)

    def __init__(self) -> None:
        self._observers: list[IEventObserver] = []
        self._on_request: tuple[Any, ...] = ()
        """The L{IRequestObserver}s' C{observe_request}, worked out once per subscription: they get the fields."""
        self._on_request_named: tuple[Any, ...] = ()
        """The other observers' C{observe}: they get a L{RequestFinished}, built only when there is one."""
        self._on_other: tuple[Any, ...] = ()
        self.wanted = False

    def subscribe(self, observer: IEventObserver) -> None:
        self._observers.append(observer)
        self._subscribed()

    def unsubscribe(self, observer: IEventObserver) -> None:
        try:
            self._observers.remove(observer)
        except ValueError:
            pass
        self._subscribed()

    def _subscribed(self) -> None:
        self.wanted = bool(self._observers)
        self._on_request = tuple(o.observe_request for o in self._observers if IRequestObserver.providedBy(o))
        self._on_request_named = tuple(o.observe for o in self._observers if not IRequestObserver.providedBy(o))
        self._on_other = tuple(o.observe for o in self._observers)

    def publish(self, event: Any) -> None:
        self._hand_out(self._on_request + self._on_request_named if type(event) is RequestFinished
                       else self._on_other, event)

    def _hand_out(self, handles: tuple[Any, ...], event: Any) -> None:
        for handle in handles:
            try:
                handle(event)
            except Exception:  # noqa: BLE001 - one bad observer must not stop the others or the request
                self._log.failure("event observer {observer} failed on {event}", observer=handle, event=event)

    def request_finished(self, client: str, exchange: Any, bytes_sent: int, now: float,
                         bytes_received: int | None = None) -> None:
        """
        Publish the event of an exchange that ended (any
        L{rproxy_tw.http.exchange.IExchange}: proxied, answered by the proxy,
        or by an application's resource).  Built and handed out in one call:
        it runs once per request, and a Python call costs more here than
        building the tuple does (callgrind, bench/README.md).
        """
        request = exchange.request or _NO_REQUEST
        backend = exchange.backend
        pool = exchange.pool
        started = exchange.started_at
        head_at = exchange.head_at  # only taken when started_at was
        # An exact tuple in RequestFinished's order: a NamedTuple instance (tuple.__new__ on the subclass)
        # cost 1.5k instructions more to build and free, per request (bench/README.md).
        fields = (
            client, request.method, request.target, request.http_version, request.host, exchange.status or 0,
            bytes_sent, started, now,
            exchange.route_name, pool.name if pool is not None else None, backend.name if backend is not None else None,
            request.headers, bytes_received, bytes_received is not None, request.request_id,
            head_at - started if head_at is not None else None,
            exchange.attempts, exchange.body_seen,
        )
        for handle in self._on_request:  # _hand_out's loop, inline: one call less per request
            try:
                handle(fields)
            except Exception:  # noqa: BLE001 - one bad observer must not stop the others or the request
                self._log.failure("event observer {observer} failed on {event}", observer=handle, event=fields)
        if self._on_request_named:
            self._hand_out(self._on_request_named, _tuple_new(RequestFinished, fields))


@implementer(IEventObserver)
class EventRecorder:
    """Keeps every event (for tests and for embedding applications that poll)."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def observe(self, event: Any) -> None:
        self.events.append(event)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


# ---------------------------------------------------------------------------
# The shared HTTP cache (rproxy_tw/cache/)


@attrs.frozen(slots=True)
class CacheHit:
    """A response served from the cache: fresh, stale (stale-while-revalidate, stale-if-error, max-stale), or revalidated (304)."""

    route: str | None
    key: str
    bytes: int
    """Body bytes served from the store."""
    kind: str = "hit"
    """C{"hit"}, C{"stale"} or C{"revalidated"}."""


@attrs.frozen(slots=True)
class CacheMiss:
    """A request on a cached route went to the origin."""

    route: str | None
    key: str
    reason: str
    """Cache-Status's fwd: C{"uri-miss"}, C{"vary-miss"}, C{"stale"}, C{"request"}, C{"method"}."""


@attrs.frozen(slots=True)
class CacheStored:
    route: str | None
    key: str
    bytes: int


@attrs.frozen(slots=True)
class CacheEvicted:
    """A stored response left the cache: C{"lru"} (room), C{"invalidated"} (an unsafe method), C{"purged"}."""

    key: str
    bytes: int
    reason: str


# ---------------------------------------------------------------------------
# Scrubbing (rproxy_tw/scrub/)


@attrs.frozen(slots=True)
class RequestRefused:
    """
    A request the proxy's scrubbing refused before the origin (or, with
    C{blocked} false, flagged in C{detect} mode and let through).  Metrics
    count these by C{reason}; the request's own L{RequestFinished} follows.
    """

    reason: str
    """C{"ip_policy"}, C{"rate_limit"}, C{"waf"}, C{"bad_behaviour"}, C{"overload"}, C{"slow_body"}."""
    rule: str
    """What decided: rule ids (C{"942100,942110"}), the CIDR, the policy name."""
    client: str
    status: int
    """What the client was answered (0 when C{blocked} is false)."""
    route: str | None = None
    method: bytes = b""
    target: bytes = b""
    request_id: bytes | None = None
    """The incident id the 403 page and the log line give."""
    blocked: bool = True
    score: int = 0


@attrs.frozen(slots=True)
class ConnectionRefused:
    """A connection closed at once, before any byte was read (IP policy, per-address limits)."""

    listener: str
    client: str
    reason: str
    """C{"ip_policy"}, C{"connections_per_ip"}, C{"connection_rate"}."""
    rule: str = ""
