"""
The shared cache in the request pipeline: one object that is both a
request filter (answers from the store, or lets the request go to the
origin with validators added) and a response filter (tees what the origin
sends into the store as it streams to the client, merges a 304, serves a
stale response when the origin fails and may).

Decisions come from L{rproxy_tw.cache.rules}; this module does the I/O.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..http.exchange import IDownstream
from ..events import CacheEvicted, CacheHit, CacheMiss, CacheStored
from ..logs import observer as log_observer
from ..pipeline import DownstreamWrapper, IRequestFilter, IResponseFilter, LocalAnswer
from . import rules
from .rules import StoredResponse

__all__ = ["HTTPCache"]

Header = tuple[bytes, bytes]
Headers = Sequence[Header]

CACHE_STATUS = b"Cache-Status"

UNCACHEABLE_SECONDS = 30.0
"""How long a URL whose answer could not be stored is fetched without collapsing (others would only queue)."""
UNCACHEABLE_KEPT = 4096
"""At most this many such URLs are remembered (bounded: the oldest are forgotten all at once)."""


@attrs.frozen
class _Plan:
    """How to answer a request from a stored response."""

    status: int
    reason: bytes
    headers: list[Header]
    body: bool
    first: int = 0
    last: int | None = None
    length: int = 0


class _Fill:
    """A response on its way from the origin that others with the same key wait for (request collapsing)."""

    __slots__ = ("owner", "started", "waiters")

    def __init__(self, owner: Any, started: float) -> None:
        self.owner = owner
        self.started = started
        self.waiters: list[Deferred[bool]] = []


@implementer(IRequestFilter, IResponseFilter)
class HTTPCache:
    """
    A shared HTTP cache (RFC 9111) over an L{rproxy_tw.cache.store.ICacheStore}.

    L{purge} is the call for the admin API: it removes one URL, or every
    URL under a prefix that ends with C{*}.
    """

    _log = Logger(observer=log_observer)

    def __init__(self, store: Any, clock: Any, events: Any = None, max_object_bytes: int = 10485760,
                 name: str = "rproxy", collapse_timeout: float = 5.0, fill_budget: int | None = None) -> None:
        self.store = store
        self.clock = clock
        self.events = events
        self.max_object_bytes = max_object_bytes
        self.name = name
        self.name_bytes = name.encode("ascii")
        self.collapse_timeout = collapse_timeout
        self._fills: dict[str, _Fill] = {}
        self.fill_budget = fill_budget if fill_budget is not None else store.max_bytes
        self.filling_bytes = 0
        """Bytes of responses being stored right now: past fill_budget, a response streams on unstored."""
        self._uncacheable: dict[str, float] = {}
        """URL -> until when its misses go to the origin side by side (its last answer was not storable)."""
        store.on_evict = self._evicted

    # -- the admin API ----------------------------------------------------------------------

    def purge(self, url_or_prefix: str) -> int:
        """
        Remove the stored responses of one URL (C{http://host/path?query}),
        or of every URL starting with a prefix written with a final C{*}.
        A URL without a scheme (C{host/path}) means both http and https.
        @return: how many stored responses were removed.
        """
        targets = [url_or_prefix] if "://" in url_or_prefix else \
            ["http://" + url_or_prefix, "https://" + url_or_prefix]
        removed = 0
        for target in targets:
            if target.endswith("*"):
                removed += self.store.purge(_lower_authority(target[:-1]))
            else:
                removed += self.store.remove(_lower_authority(target), "purged")
        return removed

    # -- events -----------------------------------------------------------------------------

    def _publish(self, event: Any) -> None:
        events = self.events
        if events is not None and events.wanted:
            events.publish(event)

    def _evicted(self, response: StoredResponse, reason: str) -> None:
        self._publish(CacheEvicted(response.key, response.body_size, reason))

    # -- IResponseFilter --------------------------------------------------------------------

    def wrap(self, exchange: Any, downstream: Any) -> Any:
        return _CacheDownstream(self, exchange, downstream)

    def _state(self, exchange: Any) -> _CacheDownstream | None:
        """This cache's wrapper among the exchange's response filters (a short walk: a route has a few)."""
        downstream = exchange.downstream
        while isinstance(downstream, DownstreamWrapper):
            if type(downstream) is _CacheDownstream and downstream.cache is self:
                return downstream
            downstream = downstream.inner
        return None

    # -- IRequestFilter ---------------------------------------------------------------------

    def filterRequest(self, request: Any, exchange: Any) -> LocalAnswer | Deferred[Any] | None:
        state = self._state(exchange)
        if state is None:
            return None  # this exchange's chain does not carry the cache's response side
        now = self.clock.seconds()
        key = rules.cache_key(exchange.info.proto, request.host, request.path, request.query)
        state.key = key
        state.client_headers = request.headers
        state.request_time = now
        method = request.method
        if method == b"PURGE":
            return self._purgeRequest(request, exchange, key)
        if state.background is not None:
            state.mode = "revalidate"
            state.stale = state.background
            state.fwd = "stale"
            return None
        if method not in (b"GET", b"HEAD"):
            state.mode = "unsafe" if method not in rules.SAFE_METHODS else "bypass"
            state.fwd = "method"
            self._publish(CacheMiss(exchange.route_name, key, "method"))
            return None
        return self._lookup(request, exchange, state, now, waited=False)

    def _lookup(self, request: Any, exchange: Any, state: _CacheDownstream, now: float,
                waited: bool) -> LocalAnswer | Deferred[Any] | None:
        key = state.key
        headers = request.headers
        stored, fwd = self._find(key, headers)
        plain = state.plain = rules.plain_request(headers)
        request_cc = rules.NO_DIRECTIVES if plain else rules.cache_control(headers)
        if stored is not None and b"no-store" in request_cc:
            # Nothing of this request or its answer is to be kept: the stored one is not used either.
            stored, fwd = None, "request"
        if stored is not None:
            decision = rules.reuse(stored, headers, now, request_cc)
            if decision == rules.SERVE:
                answer = self._answer(state, exchange, stored, now, "hit", collapsed=waited)
                if answer is not None:
                    return answer
            elif decision == rules.SERVE_STALE_REVALIDATE:
                answer = self._answer(state, exchange, stored, now, "stale", collapsed=waited,
                                      detail="stale-while-revalidate")
                if answer is not None:
                    self._revalidateInBackground(request, exchange, stored)
                    return answer
            else:
                fwd = "request" if rules.request_no_cache(headers) else "stale"
        if b"only-if-cached" in request_cc:
            state.mode = "hit"
            return LocalAnswer(504, b"Gateway Timeout: not in the cache (only-if-cached)\n",
                               ((b"Content-Type", b"text/plain; charset=utf-8"),
                                (CACHE_STATUS, rules.cache_status(self.name, fwd=fwd, detail="only-if-cached"))))
        collapsible = request.method == b"GET" and (plain or (
            not rules.has_conditions(headers) and b"no-store" not in request_cc
            and rules.first_value(headers, b"range") is None))
        if collapsible and self._uncacheable:
            until = self._uncacheable.get(key)
            if until is not None:
                if now < until:
                    collapsible = False
                else:
                    del self._uncacheable[key]
        if collapsible and not waited:
            fill = self._fills.get(key)
            if fill is not None and now - fill.started < self.collapse_timeout:
                return self._wait(fill, request, exchange, state, now)
        state.fwd = fwd
        if stored is not None:
            state.mode = "revalidate"
            state.stale = stored
            request.headers = _with_validators(headers, stored)
        else:
            state.mode = "miss"
        if collapsible:
            fill = self._fills.get(key)
            if fill is None or now - fill.started >= self.collapse_timeout:
                # Ours is the fetch others wait for (in place of one that began too long ago).
                state.fill = self._fills[key] = _Fill(state, now)
        self._publish(CacheMiss(exchange.route_name, key, fwd))
        return None

    def _find(self, key: str, headers: Headers) -> tuple[StoredResponse | None, str]:
        variants = self.store.variants(key)
        if not variants:
            return None, "uri-miss"
        best = None
        for variant in variants:
            if rules.variant_matches(variant, headers) and (best is None or _recency(variant) >= _recency(best)):
                best = variant
        if best is None:
            return None, "vary-miss"
        return best, "miss"

    def _wait(self, fill: _Fill, request: Any, exchange: Any, state: _CacheDownstream, now: float) -> Deferred[Any]:
        """Wait for the response another request is fetching, at most until collapse_timeout after it began."""
        waiter: Deferred[bool] = Deferred()
        fill.waiters.append(waiter)
        # Within the exchange's own deadline for a filter (response_timeout), which would end it with an error.
        bound = min(self.collapse_timeout, exchange.settings.response_timeout / 2)
        timer = self.clock.callLater(max(fill.started + bound - now, 0), _fire, waiter, False)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        def woken(stored: bool) -> LocalAnswer | None:
            when = self.clock.seconds()
            state.request_time = when
            if stored:
                found = self._lookup(request, exchange, state, when, waited=True)
                assert not isinstance(found, Deferred)
                return found
            # The response was not stored (or too slow): go to the origin now, without waiting again.
            state.mode = "miss"
            state.fwd = "uri-miss"
            self._publish(CacheMiss(exchange.route_name, state.key, "uri-miss"))
            return None

        waiter.addBoth(stop_timer)
        waiter.addCallback(woken)
        return waiter

    def _passing(self, key: str, now: float) -> None:
        """A fetch others could have waited for brought an answer that cannot be stored."""
        uncacheable = self._uncacheable
        if len(uncacheable) >= UNCACHEABLE_KEPT:
            uncacheable.clear()
        uncacheable[key] = now + UNCACHEABLE_SECONDS

    def _release(self, fill: _Fill, stored: bool) -> None:
        if self._fills.get(fill.owner.key) is fill:
            del self._fills[fill.owner.key]
        waiters, fill.waiters = fill.waiters, []
        for waiter in waiters:
            _fire(waiter, stored)

    # -- answering from the store -----------------------------------------------------------

    def plan(self, stored: StoredResponse, method: bytes, headers: Headers, now: float, member: bytes,
             plain: bool | None = None) -> _Plan:
        """What to answer a request from C{stored}: 304 for the client's own met conditions, 206/416 for a range, else it."""
        age = rules.current_age(stored, now)
        if plain is None:
            plain = rules.plain_request(headers)
        if not plain and rules.evaluate_conditions(stored, method, headers):
            out = rules.with_age(rules.not_modified_headers(stored), age)
            out.append((CACHE_STATUS, member))
            return _Plan(304, b"Not Modified", out, False)
        out = [*stored.served_headers, (b"Age", b"%d" % int(max(age, 0))), (CACHE_STATUS, member)]
        size = stored.body_size
        if not plain and method == b"GET" and rules.first_value(headers, b"range") is not None:
            wanted = rules.byte_range(headers, stored)
            if wanted is not None:
                # A Content-Range stored with a 200 meant nothing; the one added here does.
                out = [(n, v) for n, v in out if n.lower() != b"content-range"]
            if wanted == "unsatisfiable":
                out = [(n, v) for n, v in out if n.lower() not in (b"content-type", b"content-encoding")]
                out.append((b"Content-Range", b"bytes */%d" % size))
                return _Plan(416, b"Range Not Satisfiable", out, False)
            if isinstance(wanted, tuple):
                first, last = wanted
                out.append((b"Content-Range", b"bytes %d-%d/%d" % (first, last, size)))
                return _Plan(206, b"Partial Content", out, True, first, last, last - first + 1)
        return _Plan(stored.status, stored.reason, out, method != b"HEAD", 0, None, size)

    def _answer(self, state: _CacheDownstream, exchange: Any, stored: StoredResponse, now: float, kind: str,
                collapsed: bool = False, detail: str | None = None) -> LocalAnswer | None:
        """A hit as the exchange's local answer, its body streamed from the store; None if the body is gone."""
        age = rules.current_age(stored, now)
        ttl = stored.lifetime - age
        if not collapsed and detail is None:
            member = b"%s; hit; ttl=%d" % (self.name_bytes, ttl)
        else:
            member = rules.cache_status(self.name, hit=True, ttl=ttl, collapsed=collapsed, detail=detail)
        request = exchange.request
        if state.plain and request.method == b"GET" and stored.status == 200:
            # The usual hit: no conditions, no range; one piece in memory goes with the head.
            whole = self.store.inline_body(stored)
            if whole is not None:
                state.mode = "hit"
                if self.events is not None and self.events.wanted:
                    self._publish(CacheHit(exchange.route_name, stored.key, len(whole), kind))
                inner = state.inner
                if exchange.downstream is state and inner.wants_block and not isinstance(inner, DownstreamWrapper):
                    # Nothing between us and the client looks at headers one by one: the stored
                    # ones go serialized once, with this hit's Age and Cache-Status after them.
                    head: Any = b"%sAge: %d\r\nCache-Status: %s\r\n" % (stored.served_block, max(age, 0), member)
                else:
                    head = (*stored.served_headers, (b"Age", b"%d" % max(age, 0)), (CACHE_STATUS, member))
                return LocalAnswer(200, whole, head, stored.reason, complete_headers=True)
        plan = self.plan(stored, request.method, request.headers, now, member, state.plain)
        source = None
        if plan.body and plan.length:
            source = self.store.body(stored, plan.first, plan.last)
            if source is None:
                return None
        state.mode = "hit"
        self._publish(CacheHit(exchange.route_name, stored.key, plan.length if plan.body else 0, kind))
        if source is None:
            return LocalAnswer(plan.status, b"", tuple(plan.headers), plan.reason,
                               content_length=None if plan.status == 304 else plan.length, complete_headers=True)
        return LocalAnswer(plan.status, b"", tuple(plan.headers), plan.reason, source=source,
                           content_length=plan.length, complete_headers=True)

    # -- background revalidation (stale-while-revalidate) -----------------------------------

    def _revalidateInBackground(self, request: Any, exchange: Any, stored: StoredResponse) -> None:
        key = stored.key
        if key in self._fills:
            return
        from ..http.exchange import ProxyExchange
        from ..http.request import ProxyRequest
        from ..pipeline import FilterChain

        headers = [(n, v) for n, v in request.headers
                   if n.lower() not in (b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since",
                                        b"if-range", b"range", b"cache-control", b"pragma")]
        headers += rules.validators(stored)
        again = ProxyRequest(b"GET", request.target, request.path, request.query, request.host, headers, b"1.1",
                             "none", None)
        again.route = request.route
        chain = exchange.chain
        filters = chain.request
        index = filters.index(self) if self in filters else 0
        background = ProxyExchange(_NullDownstream(), self.clock, exchange.plan, again, exchange.info,
                                   FilterChain(filters[index:], chain.response))
        state = self._state(background)
        if state is None:
            return
        state.background = stored
        state.fill = self._fills[key] = _Fill(state, self.clock.seconds())
        background.start()

    # -- PURGE ------------------------------------------------------------------------------

    def _purgeRequest(self, request: Any, exchange: Any, key: str) -> LocalAnswer:
        state = self._state(exchange)
        if state is not None:
            state.mode = "hit"
        text = (("text/plain; charset=utf-8"),)
        if not exchange.info.trusted:
            return LocalAnswer(403, b"Forbidden: PURGE is accepted from trusted addresses only\n",
                               ((b"Content-Type", text[0].encode()),))
        target = key.partition("://")[2]
        removed = self.purge(target)
        status = 200 if removed else 404
        return LocalAnswer(status, b"purged %d\n" % removed, ((b"Content-Type", text[0].encode()),))


def _fire(waiter: Deferred[bool], stored: bool) -> None:
    if not waiter.called:
        waiter.callback(stored)


def _recency(stored: StoredResponse) -> float:
    date = rules.parse_http_date(stored.header(b"date"))
    return date if date is not None else stored.response_time


def _lower_authority(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{authority.lower()}{slash}{path}"


def _with_validators(headers: Headers, stored: StoredResponse) -> list[Header]:
    """
    The request to revalidate with (RFC 9111 4.3.1): the stored
    validators, or, when the client sent If-None-Match of its own, its
    tags and ours together.
    """
    if not rules.has_conditions(headers):
        return [*headers, *rules.validators(stored)]
    etag = stored.etag
    tags = rules.list_values(headers, b"if-none-match")
    if etag and tags and b"*" not in tags and not any(rules.weak_match(t, etag) for t in tags):
        out = [(n, v) for n, v in headers if n.lower() != b"if-none-match"]
        out.append((b"If-None-Match", b", ".join([*tags, etag])))
        return out
    return list(headers)


class _CacheDownstream(DownstreamWrapper):
    """One exchange's side of the cache: Cache-Status, the tee into the store, 304 merging, stale on error."""

    # Per-exchange state, as class-level defaults: one is made per request on a cached route,
    # and most requests (hits) change only a few of these.
    key = ""
    mode: str | None = None
    """None (not looked at), "hit", "miss", "revalidate", "unsafe", "bypass"."""
    fwd = "uri-miss"
    plain = True
    stale: StoredResponse | None = None
    background: StoredResponse | None = None
    client_headers: Headers = ()
    request_time = 0.0
    fill: _Fill | None = None
    filling: tuple[int, bytes, tuple[Header, ...]] | None = None
    chunks: list[bytes] = []  # replaced, never appended to, until a fill begins (writeHead)
    size = 0
    expected: int | None = None
    swallow = False
    """The origin's response is not what the client gets (a stored one is): drop it."""
    streaming: Any = None
    finish_held = False
    done_held = False

    def __init__(self, cache: HTTPCache, exchange: Any, inner: Any) -> None:
        self.inner = inner
        self.cache = cache
        self.exchange = exchange

    def _member(self, status: int | None, stored: bool) -> bytes:
        return rules.cache_status(self.cache.name, fwd=self.fwd,
                                  fwd_status=status if self.mode == "revalidate" else None, stored=stored)

    def writeHead(self, status: int, reason: bytes, headers: Headers, content_length: int | None,
                  has_body: bool) -> None:
        mode = self.mode
        if mode is None or mode == "hit":
            self.inner.writeHead(status, reason, headers, content_length, has_body)
            return
        cache = self.cache
        now = cache.clock.seconds()
        exchange = self.exchange
        method = exchange.request.method
        if mode == "unsafe":
            for key in rules.invalidated_uris(method, status, self.key, headers):
                cache.store.remove(key)
            self.inner.writeHead(status, reason, [*headers, (CACHE_STATUS, self._member(None, False))],
                                 content_length, has_body)
            return
        if mode == "bypass":
            self.inner.writeHead(status, reason, [*headers, (CACHE_STATUS, self._member(None, False))],
                                 content_length, has_body)
            return
        stale = self.stale
        if mode == "revalidate" and stale is not None:
            if status == 304 and rules.matches_304(stale, headers):
                updated = rules.merge_304(stale, headers, self.request_time, now)
                cache.store.update(stale, updated)
                self._release(True)
                member = rules.cache_status(cache.name, fwd="stale", fwd_status=304,
                                            ttl=rules.freshness(updated, now).ttl)
                if self._serveStored(updated, now, member, "revalidated"):
                    return
            elif status == 304 and not rules.has_conditions(self.client_headers):
                # The 304 answers the validator we sent but names another (RFC 9111 4.3.4): it
                # selects no stored response, so it updates none; yet it is no answer to a
                # client that asked nothing conditional.  The origin did confirm the validator we
                # sent, so the stored response goes out as it is, left stale (nginx and Varnish
                # serve it too, and refresh it besides).
                self._release(False)
                member = rules.cache_status(cache.name, fwd="stale", fwd_status=304, detail="validator-mismatch")
                if self._serveStored(stale, now, member, "revalidated"):
                    return
            elif status == 200 and method == b"HEAD" and rules.head_updates(stale, headers, content_length):
                cache.store.update(stale, rules.merge_304(stale, headers, self.request_time, now))
            elif status >= 500 and rules.may_serve_on_error(stale, self.client_headers, now):
                member = rules.cache_status(cache.name, hit=True, fwd="stale", fwd_status=status,
                                            ttl=rules.freshness(stale, now).ttl, detail="stale-if-error")
                self._release(False)
                if self._serveStored(stale, now, member, "stale"):
                    return
        store = False
        if method == b"GET" and mode in ("miss", "revalidate"):
            store = (rules.storable(method, status, self.client_headers, headers)
                     and (content_length is None or content_length <= cache.max_object_bytes))
        vary = rules.vary_fields(headers) if store else None
        if vary is None:
            store = False  # Vary: * never matches a later request (RFC 9111 4.1): keeping it would only cost room
        if store:
            self.filling = (status, reason, rules.stored_headers(headers))
            self.vary = vary
            self.chunks = []
            self.size = 0
            self.expected = content_length if has_body else 0
            self.response_time = now
        else:
            if self.fill is not None:
                cache._passing(self.key, now)
            self._release(False)
        self.inner.writeHead(status, reason, [*headers, (CACHE_STATUS, self._member(status, store))],
                             content_length, has_body)

    def writeBody(self, data: bytes) -> None:
        if self.swallow:
            return
        if self.filling is not None:
            size = len(data)
            self.size += size
            cache = self.cache
            if self.size > cache.max_object_bytes or cache.filling_bytes + size > cache.fill_budget:
                self._abandon()
            else:
                cache.filling_bytes += size
                self.chunks.append(data)
        self.inner.writeBody(data)

    def _drop_fill(self) -> None:
        """Forget the body being stored, and give back its share of the fill budget."""
        self.cache.filling_bytes -= sum(len(c) for c in self.chunks)
        self.filling = None
        self.chunks = []

    def _abandon(self) -> None:
        self._drop_fill()
        self._release(False)

    def exchangeCancelled(self, exchange: Any) -> None:
        if self.filling is not None:
            self._drop_fill()
        self._release(False)
        super().exchangeCancelled(exchange)

    def finishBody(self, trailers: Headers) -> None:
        if self.swallow:
            if self.streaming is not None:
                self.finish_held = True
            else:
                self.inner.finishBody(())
            return
        filling = self.filling
        if filling is not None:
            self.filling = None
            status, reason, headers = filling
            complete = self.expected is None or self.size == self.expected
            stored = False
            if complete:
                vary = self.vary
                response = StoredResponse(
                    key=self.key,
                    variant=rules.variant_key(vary, self.client_headers) if vary is not None else (),
                    vary=vary,
                    status=status,
                    reason=reason,
                    headers=headers,
                    request_time=self.request_time,
                    response_time=self.response_time,
                    body_size=self.size,
                )
                cache = self.cache
                stored = cache.store.put(response, self.chunks)
                if stored:
                    cache._publish(CacheStored(self.exchange.route_name, self.key, self.size))
            self._drop_fill()
            self.inner.finishBody(trailers)
            self._release(stored)
            return
        self.inner.finishBody(trailers)

    def failResponse(self, status: int, message: str, extra: Headers = (), page: Any = None) -> None:
        if self.swallow:
            return
        if self.filling is not None:
            self._drop_fill()
        stale = self.stale
        exchange = self.exchange
        if self.mode == "revalidate" and stale is not None and not exchange.headSent:
            now = self.cache.clock.seconds()
            on_error = rules.may_serve_on_error(stale, self.client_headers, now)
            if on_error or (status in (502, 504) and rules.may_serve_disconnected(stale)):
                member = rules.cache_status(self.cache.name, hit=True, fwd="stale",
                                            ttl=rules.freshness(stale, now).ttl,
                                            detail="stale-if-error" if on_error else "origin-unreachable")
                self._release(False)
                if self._serveStored(stale, now, member, "stale"):
                    self.finish_held = self.streaming is not None
                    if not self.finish_held:
                        self.inner.finishBody(())
                    return
            elif not rules.may_serve_stale(stale) and status == 502:
                status, message = 504, "Gateway Timeout: the origin is unreachable and the stored response must be revalidated"
        self._release(False)
        if self.mode not in (None, "hit"):
            extra = (*extra, (CACHE_STATUS, self._member(None, False)))
        self.inner.failResponse(status, message, extra, page)

    def exchangeDone(self, exchange: Any) -> None:
        if self.filling is not None:
            self._drop_fill()
        self._release(False)
        if self.streaming is not None:
            self.done_held = True
            return
        self.inner.exchangeDone(exchange)

    # -- a stored response in place of the origin's -----------------------------------------

    def _serveStored(self, stored: StoredResponse, now: float, member: bytes, kind: str) -> bool:
        exchange = self.exchange
        request = exchange.request
        cache = self.cache
        plan = cache.plan(stored, request.method, self.client_headers, now, member)
        source = None
        if plan.body and plan.length:
            source = cache.store.body(stored, plan.first, plan.last)
            if source is None:
                return False
        self.swallow = True
        exchange.status = plan.status
        self.inner.writeHead(plan.status, plan.reason, plan.headers, plan.length if plan.status != 304 else None,
                             plan.body)
        cache._publish(CacheHit(exchange.route_name, stored.key, plan.length if plan.body else 0, kind))
        if source is not None:
            self.streaming = source
            source.streamTo(self.inner, self._storedDone)
        return True

    def _storedDone(self, failure: Failure | None) -> None:
        self.streaming = None
        if failure is not None:
            self.cache._log.failure("stored body failed", failure)
            self.inner.failResponse(502, "Bad Gateway")
        elif self.finish_held:
            self.inner.finishBody(())
        self.finish_held = False
        if self.done_held:
            self.done_held = False
            self.inner.exchangeDone(self.exchange)

    def _release(self, stored: bool) -> None:
        fill = self.fill
        if fill is not None:
            self.fill = None
            self.cache._release(fill, stored)


@implementer(IDownstream)
class _NullDownstream:
    """Where a background revalidation's response goes: nowhere (the cache's wrapper stored it on the way)."""

    wants_block = False
    http_version = b"1.1"

    def __init__(self) -> None:
        from ..transport.flow import ReadGate

        self.gate = ReadGate(self)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def writeInterim(self, status: int, reason: bytes, headers: Headers) -> None:
        pass

    def writeHead(self, status: int, reason: bytes, headers: Headers, content_length: int | None,
                  has_body: bool) -> None:
        pass

    def writeBody(self, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def finishBody(self, trailers: Headers) -> None:
        pass

    def failResponse(self, status: int, message: str, extra: Headers = (), page: Any = None) -> None:
        pass

    def exchangeDone(self, exchange: Any) -> None:
        pass

    def registerUpstream(self, conn: Any) -> None:
        pass

    def unregisterUpstream(self, conn: Any) -> None:
        pass

    def startTunnel(self, conn: Any, leftover: bytes) -> None:
        conn.abort()
