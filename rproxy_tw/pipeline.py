"""
The request pipeline: per route, an ordered chain of request filters and
response filters around every proxied exchange, on HTTP/1.1, HTTP/2 and
the embedded path alike.

A request filter sees the L{ProxyRequest} before anything is sent to the
origin, and may let it pass (returning None, perhaps after rewriting it),
answer it locally (returning a L{LocalAnswer}), or answer later (returning
a Deferred of either; reading from the client pauses meanwhile, and the
wait has a deadline).  A response filter wraps the exchange's downstream:
it sees the response head and each body piece as they stream past, and
passes them on (changed or not) without holding the body back.

What is built in: header rules (set, add, remove, on the request and on the
response), HSTS and the sticky-session cookie.  Scrubbing, the cache,
compression and metrics plug in here.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer

from .http.exchange import IDownstream

__all__ = [
    "DownstreamWrapper",
    "FilterChain",
    "HeaderRules",
    "IRequestFilter",
    "IResponseFilter",
    "LocalAnswer",
    "ResponseHeaders",
    "RoutePlan",
    "StickyCookie",
]

Headers = Sequence[tuple[bytes, bytes]]


@attrs.frozen
class LocalAnswer:
    """A response a request filter makes instead of the origin."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] | bytes = ()
    """The fields; or, with C{complete_headers}, already serialized for a client connection that C{wants_block}."""
    reason: bytes = b""
    source: Any = None
    """
    An L{rproxy_tw.cache.store.IBodySource} streaming the body (a stored
    response), in place of C{body}; C{content_length} then gives its length.
    """
    content_length: int | None = None
    complete_headers: bool = False
    """The headers are a whole response's (a stored one, with its own Date): nothing is added."""


class IRequestFilter(Interface):
    """A step a request passes before the origin is contacted."""

    def filterRequest(request: Any, exchange: Any) -> LocalAnswer | Deferred[Any] | None:
        """
        Look at (and perhaps rewrite) C{request}, a
        L{rproxy_tw.http.request.ProxyRequest}.

        @return: None to pass it on, a L{LocalAnswer} to answer it here, or a
            Deferred firing with either (the client's body waits meanwhile).
        """


class IResponseFilter(Interface):
    """A step every response of a route streams through on its way to the client."""

    def wrap(exchange: Any, downstream: IDownstream) -> IDownstream:
        """The downstream the exchange should write to: usually a L{DownstreamWrapper} around C{downstream}."""


@implementer(IDownstream)
class DownstreamWrapper:
    """
    Passes everything to the downstream it wraps.  A response filter
    subclasses it and overrides what it changes (usually L{writeHead}, or
    L{writeBody} and L{finishBody} to transform the body as it streams).
    """

    wants_block = False
    """A wrapper looks at headers one by one: never handed a serialized block."""

    def __init__(self, inner: IDownstream) -> None:
        self.inner = inner

    @property
    def gate(self) -> Any:
        return self.inner.gate

    @property
    def http_version(self) -> bytes:
        return self.inner.http_version  # type: ignore[no-any-return]

    def writeInterim(self, status: int, reason: bytes, headers: Headers) -> None:
        self.inner.writeInterim(status, reason, headers)

    def writeHead(self, status: int, reason: bytes, headers: Headers, content_length: int | None,
                  has_body: bool) -> None:
        self.inner.writeHead(status, reason, headers, content_length, has_body)

    def writeBody(self, data: bytes) -> None:
        self.inner.writeBody(data)

    def flush(self) -> None:
        self.inner.flush()

    def finishBody(self, trailers: Headers) -> None:
        self.inner.finishBody(trailers)

    def failResponse(self, status: int, message: str, extra: Headers = (), page: Any = None) -> None:
        self.inner.failResponse(status, message, extra, page)

    def exchangeDone(self, exchange: Any) -> None:
        self.inner.exchangeDone(exchange)

    def registerUpstream(self, conn: Any) -> None:
        self.inner.registerUpstream(conn)

    def unregisterUpstream(self, conn: Any) -> None:
        self.inner.unregisterUpstream(conn)

    def startTunnel(self, conn: Any, leftover: bytes) -> None:
        self.inner.startTunnel(conn, leftover)

    def exchangeCancelled(self, exchange: Any) -> None:
        """
        The client left before the response ended: nothing more will be
        written.  A filter holding something for the exchange (the cache,
        a body being stored) lets it go here.
        """
        inner = self.inner
        if isinstance(inner, DownstreamWrapper):
            inner.exchangeCancelled(exchange)


@attrs.frozen
class FilterChain:
    """The filters of one route (on one listener), in order."""

    request: tuple[Any, ...] = ()
    response: tuple[Any, ...] = ()

    def wrap(self, exchange: Any, downstream: IDownstream) -> IDownstream:
        """The downstream the exchange writes to: the first response filter is the outermost."""
        for response_filter in reversed(self.response):
            downstream = response_filter.wrap(exchange, downstream)
        return downstream

    def __add__(self, other: FilterChain) -> FilterChain:
        return FilterChain(self.request + other.request, self.response + other.response)

    def __bool__(self) -> bool:
        return bool(self.request or self.response)


EMPTY_CHAIN = FilterChain()


@attrs.frozen
class RoutePlan:
    """
    What a runtime prepared for one route: the objects an exchange needs,
    found once per config instead of by name per request.
    """

    route: Any
    """The L{rproxy_tw.routing.ProxyRoute}."""
    name: str
    """How logs and events name the route: C{host/path} or C{*/path}."""
    pool: Any
    connector: Any
    settings: Any
    chain: FilterChain
    """The route's own filters (header rules, sticky cookie); listeners add theirs (HSTS)."""
    retry_non_idempotent: bool = False
    error_pages: Any = attrs.field(factory=dict)
    """Pages for the proxy's own 4xx/5xx answers on this route, by status (the global ones, overridden by the route's)."""


# ---------------------------------------------------------------------------
# Header rules


@attrs.frozen
class HeaderValue:
    """
    A header value from a rule: literal text with C{$client_ip},
    C{$request_id}, C{$route}, C{$host} and C{$scheme} put in per request.
    """

    parts: tuple[tuple[bool, bytes], ...]
    """(is a variable, text) pairs."""

    @classmethod
    def parse(cls, text: str) -> HeaderValue:
        parts: list[tuple[bool, bytes]] = []
        rest = text
        while rest:
            at = rest.find("$")
            if at == -1:
                parts.append((False, rest.encode("latin-1")))
                break
            if at:
                parts.append((False, rest[:at].encode("latin-1")))
            name = ""
            for c in rest[at + 1 :]:
                if not (c.isalnum() or c == "_"):
                    break
                name += c
            if name not in VARIABLES:
                raise ValueError(f"unknown variable ${name} (known: {', '.join('$' + v for v in sorted(VARIABLES))})")
            parts.append((True, name.encode("ascii")))
            rest = rest[at + 1 + len(name) :]
        return cls(tuple(parts))

    @property
    def constant(self) -> bytes | None:
        if all(not is_var for is_var, _ in self.parts):
            return b"".join(text for _, text in self.parts)
        return None

    @property
    def uses_request_id(self) -> bool:
        return any(is_var and text == b"request_id" for is_var, text in self.parts)

    def render(self, exchange: Any) -> bytes:
        out = []
        for is_var, text in self.parts:
            out.append(VARIABLES[text.decode("ascii")](exchange) if is_var else text)
        return b"".join(out)


def request_id(exchange: Any) -> bytes:
    """The request's id: the one already given it, or a new random one (128 bits, hex)."""
    request = exchange.request
    if request.request_id is None:
        request.request_id = os.urandom(16).hex().encode("ascii")
    return request.request_id  # type: ignore[no-any-return]


VARIABLES: dict[str, Callable[[Any], bytes]] = {
    "client_ip": lambda ex: ex.info.client_ip.encode("ascii", "replace"),
    "request_id": request_id,
    "route": lambda ex: ex.route_name.encode("utf-8"),
    "host": lambda ex: ex.request.host or b"",
    "scheme": lambda ex: ex.info.proto.encode("ascii"),
}


@attrs.frozen
class HeaderRuleSet:
    """One side's rules, applied in this order: remove, then set (replace), then add."""

    remove: frozenset[bytes] = frozenset()
    """Lower-cased names."""
    set: tuple[tuple[bytes, HeaderValue], ...] = ()
    add: tuple[tuple[bytes, HeaderValue], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.remove or self.set or self.add)

    def apply(self, headers: Headers, exchange: Any) -> list[tuple[bytes, bytes]]:
        drop = self.remove | {name.lower() for name, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in drop] if drop else list(headers)
        for name, value in self.set:
            out.append((name, value.render(exchange)))
        for name, value in self.add:
            out.append((name, value.render(exchange)))
        return out


def header_rule_set(config: Any) -> HeaderRuleSet:
    """The rules of a L{rproxy_tw.config.HeaderRulesConfig}, ready to apply."""
    return HeaderRuleSet(
        remove=frozenset(name.lower().encode("ascii") for name in config.remove),
        set=tuple((name.encode("ascii"), HeaderValue.parse(value)) for name, value in config.set),
        add=tuple((name.encode("ascii"), HeaderValue.parse(value)) for name, value in config.add),
    )


@implementer(IRequestFilter, IResponseFilter)
class HeaderRules:
    """Per-route C{request_headers} and C{response_headers} rules."""

    def __init__(self, request: HeaderRuleSet, response: HeaderRuleSet) -> None:
        self.request = request
        self.response = response

    def filterRequest(self, request: Any, exchange: Any) -> None:
        if self.request:
            request.headers = self.request.apply(request.headers, exchange)
        return None

    def wrap(self, exchange: Any, downstream: IDownstream) -> IDownstream:
        if not self.response:
            return downstream
        return _RewriteResponseHeaders(downstream, lambda headers: self.response.apply(headers, exchange))


class _RewriteResponseHeaders(DownstreamWrapper):
    def __init__(self, inner: IDownstream, rewrite: Callable[[Headers], list[tuple[bytes, bytes]]]) -> None:
        super().__init__(inner)
        self.rewrite = rewrite

    def writeHead(self, status: int, reason: bytes, headers: Headers, content_length: int | None,
                  has_body: bool) -> None:
        self.inner.writeHead(status, reason, self.rewrite(headers), content_length, has_body)

    def failResponse(self, status: int, message: str, extra: Headers = (), page: Any = None) -> None:
        self.inner.failResponse(status, message, self.rewrite(extra), page)


# ---------------------------------------------------------------------------
# Policies that were written into each front end before


@implementer(IResponseFilter)
class ResponseHeaders:
    """Fixed headers added to every response, the proxy's own answers included (HSTS)."""

    def __init__(self, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        self.headers = headers

    def wrap(self, exchange: Any, downstream: IDownstream) -> IDownstream:
        return _AddResponseHeaders(downstream, self.headers)


class _AddResponseHeaders(DownstreamWrapper):
    def __init__(self, inner: IDownstream, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        super().__init__(inner)
        self.headers = headers

    def writeHead(self, status: int, reason: bytes, headers: Headers, content_length: int | None,
                  has_body: bool) -> None:
        self.inner.writeHead(status, reason, [*headers, *self.headers], content_length, has_body)

    def failResponse(self, status: int, message: str, extra: Headers = (), page: Any = None) -> None:
        self.inner.failResponse(status, message, (*extra, *self.headers), page)


@implementer(IResponseFilter)
class StickyCookie:
    """The C{cookie:NAME} balancer's Set-Cookie, when the client is not stuck to the backend that answered."""

    def __init__(self, balancer: Any) -> None:
        self.balancer = balancer

    def wrap(self, exchange: Any, downstream: IDownstream) -> IDownstream:
        return _StickyCookie(downstream, self.balancer, exchange)


class _StickyCookie(DownstreamWrapper):
    def __init__(self, inner: IDownstream, balancer: Any, exchange: Any) -> None:
        super().__init__(inner)
        self.balancer = balancer
        self.exchange = exchange

    def writeHead(self, status: int, reason: bytes, headers: Headers, content_length: int | None,
                  has_body: bool) -> None:
        exchange = self.exchange
        backend = exchange.backend
        if backend is not None and self.balancer.needs_cookie(exchange.request.headers, backend):
            secure = exchange.info.proto == "https"
            headers = [*headers, (b"Set-Cookie", self.balancer.set_cookie_header(backend, secure=secure))]
        self.inner.writeHead(status, reason, headers, content_length, has_body)
