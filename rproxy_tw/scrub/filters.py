"""
The scrubbing steps as request filters of the pipeline, so that HTTP/1.1,
HTTP/2 and the embedded path all run them: IP policy (403), rate limit
(429), the WAF (403 in block mode, with an incident id), the 404-burst
behaviour rule, and the cap on requests in flight (503).  Each is a thin
shell over the pure pieces of this package; every refusal goes through
L{Refusals}: one log line and one L{RequestRefused} event.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from ..events import RequestRefused
from ..logs import observer as log_observer
from ..pipeline import DownstreamWrapper, IRequestFilter, IResponseFilter, LocalAnswer, request_id
from .ippolicy import IPPolicy
from .ratelimit import RateDecision, RatePolicy, client_address, client_key, rate_limit_headers
from .waf import RequestView, RuleSet

__all__ = [
    "BurstTracker",
    "InFlightCap",
    "IPPolicyFilter",
    "RateLimitFilter",
    "Refusals",
    "WafFilter",
    "request_view",
]

_TEXT = (b"Content-Type", b"text/plain; charset=utf-8")


class Refusals:
    """
    Where every refusal is told: one log line (at most C{LINES_PER_SECOND}
    a second for each reason, then a count of those not written, so that a
    flood does not become a log flood) and a L{RequestRefused} event that
    metrics count by reason.
    """

    LINES_PER_SECOND = 20
    _log = Logger(observer=log_observer)

    def __init__(self, clock: Any, events: Any) -> None:
        self.clock = clock
        self.events = events
        self._second: dict[str, tuple[int, int]] = {}
        """Per reason: (the second, lines written in it)."""
        self._unlogged: collections.Counter[str] = collections.Counter()

    def _mayLog(self, reason: str) -> bool:
        now = int(self.clock.seconds())
        second, lines = self._second.get(reason, (now, 0))
        if second != now:
            skipped = self._unlogged.pop(reason, 0)
            if skipped:
                self._log.warn("{count} more {reason} refusal(s) not logged", count=skipped, reason=reason)
            second, lines = now, 0
        if lines >= self.LINES_PER_SECOND:
            self._unlogged[reason] += 1
            self._second[reason] = (second, lines)
            return False
        self._second[reason] = (second, lines + 1)
        return True

    def refused(self, exchange: Any, reason: str, rule: str, status: int, client: str, blocked: bool = True,
                score: int = 0, detail: str = "") -> bytes:
        """Log and publish one refusal (or, not C{blocked}, a detection); the incident id."""
        request = exchange.request
        incident = request_id(exchange)
        if self._mayLog(reason):
            self._log.warn(
                "{verdict} {method} {target} from {client} on route {route}: {reason} rule {rule}{detail}"
                " -> {status} incident {incident}",
                verdict="refused" if blocked else "detected (not blocked)",
                method=request.method.decode("latin-1"), target=request.target[:200].decode("latin-1"),
                client=client, route=exchange.route_name, reason=reason, rule=rule,
                detail=f" ({detail})" if detail else "", status=status if blocked else "origin",
                incident=incident.decode("ascii"),
            )
        events = self.events
        if events.wanted:
            events.publish(RequestRefused(reason, rule, client, status if blocked else 0, exchange.route_name,
                                          request.method, request.target, incident, blocked, score))
        return incident

    def slow_body(self, exchange: Any, client: str, min_body_rate: int) -> None:
        """
        A request body that came slower than C{min_body_rate} (HTTP/1.1 and
        HTTP/2 alike): told like any refusal, on a request that may not have
        reached a route yet (no exchange).
        """
        rule = f"min_body_rate {min_body_rate}"
        if exchange is not None and exchange.request is not None:
            self.refused(exchange, "slow_body", rule, 408, client)
            return
        if self._mayLog("slow_body"):
            self._log.warn("refused a request body from {client}: slow_body rule {rule} -> 408",
                           client=client, rule=rule)
        if self.events.wanted:
            self.events.publish(RequestRefused("slow_body", rule, client, 408))


def _client(exchange: Any, trusted: Sequence[Any]) -> str:
    return client_address(exchange.info, exchange.request.headers, trusted)


@implementer(IRequestFilter)
class IPPolicyFilter:
    """C{[waf] deny}/C{allow} (and a route's own) for requests: the listeners refuse at connect where they can."""

    def __init__(self, policy: IPPolicy, trusted: Sequence[Any], refusals: Refusals) -> None:
        self.policy = policy
        self.trusted = trusted
        self.refusals = refusals

    def filterRequest(self, request: Any, exchange: Any) -> LocalAnswer | None:
        client = _client(exchange, self.trusted)
        why = self.policy.refusal(client)
        if why is None:
            return None
        self.refusals.refused(exchange, "ip_policy", why, 403, client)
        return LocalAnswer(403, b"Forbidden: your address may not use this service\n", (_TEXT,))


@implementer(IRequestFilter)
class RateLimitFilter:
    """C{[rate_limit]} (or a route's own): 429 with C{Retry-After} and the RateLimit fields when a key's budget is spent."""

    def __init__(self, policy: RatePolicy, store: Any, key: str, trusted: Sequence[Any], ipv6_prefix: int,
                 clock: Any, refusals: Refusals) -> None:
        self.policy = policy
        self.store = store
        self.header = key[7:].lower().encode("ascii") if key.startswith("header:") else None
        self.trusted = trusted
        self.ipv6_prefix = ipv6_prefix
        self.clock = clock
        self.refusals = refusals

    def key(self, request: Any, exchange: Any) -> str:
        header = self.header
        if header is not None:
            for name, value in request.headers:
                if name.lower() == header:
                    return "h:" + value.decode("latin-1")
            # Without the header, the client's address is the key: a missing header is no way around the limit.
        return client_key(_client(exchange, self.trusted), self.ipv6_prefix)

    def filterRequest(self, request: Any, exchange: Any) -> Any:
        decision = self.store.take(self.key(request, exchange), self.policy, self.clock.seconds())
        if isinstance(decision, Deferred):
            return decision.addCallback(self._decided, exchange)
        return self._decided(decision, exchange)

    def _decided(self, decision: RateDecision, exchange: Any) -> LocalAnswer | None:
        if decision.allowed:
            return None
        retry = max(1, math.ceil(decision.retry_after))
        self.refusals.refused(exchange, "rate_limit", self.policy.name, 429, _client(exchange, self.trusted))
        headers = ((b"Retry-After", b"%d" % retry), *rate_limit_headers(self.policy, decision), _TEXT)
        return LocalAnswer(429, b"Too Many Requests: slow down and try again in %d s\n" % retry, headers)


_INSPECTED_TYPES = ("application/x-www-form-urlencoded", "application/json", "text/", "application/xml",
                    "multipart/form-data", "application/graphql")


def _inspectable(request: Any) -> bool:
    """Whether a body is text the rules can read (a form, JSON, XML, text), not an image or an archive."""
    for name, value in request.headers:
        if len(name) == 12 and name.lower() == b"content-type":
            kind = value.decode("latin-1").strip().lower()
            return kind.startswith(_INSPECTED_TYPES) or "+json" in kind or "+xml" in kind
    return True


def request_view(request: Any, body: bytes | None = None) -> RequestView:
    """The request as the rules see it: its target as the client sent it (before dot segments were resolved)."""
    target = request.target
    if target[:1] != b"/" and b"://" in target:
        rest = target.split(b"://", 1)[1]
        slash = rest.find(b"/")
        target = rest[slash:] if slash != -1 else b"/"
    target = target.split(b"#", 1)[0]
    path, _, query = target.partition(b"?")
    return RequestView(request.method, path, query, request.headers, body)


class BurstTracker:
    """
    The behaviour rules (C{[[burst]]}): answers with a status such as 404
    counted per client in fixed windows, and the clients blocked for a
    while.  Both tables are bounded (least recently seen forgotten first).
    """

    def __init__(self, clock: Any, max_clients: int = 50_000) -> None:
        self.clock = clock
        self.max_clients = max_clients
        self.counts: collections.OrderedDict[tuple[str, str], tuple[float, int]] = collections.OrderedDict()
        self.blocked: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()

    def blocked_by(self, client: str) -> str | None:
        entry = self.blocked.get(client)
        if entry is None:
            return None
        until, rule = entry
        if self.clock.seconds() >= until:
            del self.blocked[client]
            return None
        return rule

    def answered(self, client: str, status: int, bursts: Sequence[Any]) -> None:
        now = self.clock.seconds()
        for burst in bursts:
            if status not in burst.statuses:
                continue
            slot = (burst.id, client)
            start, count = self.counts.get(slot, (now, 0))
            if now - start >= burst.per:
                start, count = now, 0
            count += 1
            self.counts[slot] = (start, count)
            self.counts.move_to_end(slot)
            if len(self.counts) > self.max_clients:
                self.counts.popitem(last=False)
            if count > burst.count:
                self.blocked[client] = (now + burst.block_for, burst.id)
                self.blocked.move_to_end(client)
                if len(self.blocked) > self.max_clients:
                    self.blocked.popitem(last=False)


@implementer(IRequestFilter, IResponseFilter)
class WafFilter:
    """
    The rules of C{[waf]} on one route: anomaly score against the
    threshold; C{block} answers 403 with an incident id, C{detect} logs
    and lets the request through.  Bodies (form, JSON, text) are read up
    to C{body_limit} bytes before the origin is contacted.
    """

    def __init__(self, rules: RuleSet, mode: str, threshold: int, body_limit: int,
                 exclude: Sequence[tuple[str, str]], route_exclude: Sequence[str], trusted: Sequence[Any],
                 bursts: BurstTracker, refusals: Refusals) -> None:
        self.rules = rules
        self.block = mode == "block"
        self.threshold = threshold
        self.body_limit = body_limit if rules.inspects_body else 0
        self.exclude = tuple((rule, prefix.encode("utf-8")) for rule, prefix in exclude)
        self.route_exclude = frozenset(route_exclude)
        self.trusted = trusted
        self.bursts = bursts
        self.burst_statuses = frozenset(s for burst in rules.bursts for s in burst.statuses)
        self.refusals = refusals

    def _skip(self, path: bytes) -> frozenset[str]:
        skip = self.route_exclude
        for rule, prefix in self.exclude:
            if path.startswith(prefix):
                skip = skip | {rule}
        return skip

    def filterRequest(self, request: Any, exchange: Any) -> Any:
        if self.rules.bursts:
            client = _client(exchange, self.trusted)
            rule = self.bursts.blocked_by(client)
            if rule is not None and self.block:
                incident = self.refusals.refused(exchange, "bad_behaviour", rule, 403, client)
                return self._forbidden(incident)
        if self.body_limit and request.body != "none" and _inspectable(request):
            return exchange.inspectBody(self.body_limit).addCallback(self._judge, request, exchange)
        return self._judge(None, request, exchange)

    def _judge(self, body: bytes | None, request: Any, exchange: Any) -> LocalAnswer | None:
        view = request_view(request, body)
        skip = self._skip(request.path) if (self.exclude or self.route_exclude) else frozenset()
        verdict = self.rules.evaluate(view, skip, self.threshold if self.block else None)
        if verdict.score < self.threshold:
            return None
        first_rule, value = verdict.matched[0]
        detail = f"score {verdict.score}, matched {value[:80]!r}"
        client = _client(exchange, self.trusted)
        incident = self.refusals.refused(exchange, "waf", verdict.rule_ids(), 403, client, blocked=self.block,
                                         score=verdict.score, detail=detail)
        if not self.block:
            return None
        return self._forbidden(incident)

    @staticmethod
    def _forbidden(incident: bytes) -> LocalAnswer:
        return LocalAnswer(403, b"Forbidden: this request was refused by the web application firewall.\n"
                                b"Incident id: %s\n" % incident, (_TEXT,))

    def wrap(self, exchange: Any, downstream: Any) -> Any:
        if not self.rules.bursts:
            return downstream
        return _CountStatus(downstream, self, exchange)


class _CountStatus(DownstreamWrapper):
    """Tells the burst tracker the status each response of the route starts with."""

    def __init__(self, inner: Any, waf: WafFilter, exchange: Any) -> None:
        super().__init__(inner)
        self.waf = waf
        self.exchange = exchange
        # The headers pass untouched: the exchange may hand over its serialized block (the fast path).
        self.wants_block = inner.wants_block

    def _count(self, status: int) -> None:
        waf = self.waf
        if status in waf.burst_statuses:
            waf.bursts.answered(_client(self.exchange, waf.trusted), status, waf.rules.bursts)

    def writeHead(self, status: int, reason: bytes, headers: Any, content_length: int | None,
                  has_body: bool) -> None:
        self._count(status)
        self.inner.writeHead(status, reason, headers, content_length, has_body)

    def failResponse(self, status: int, message: str, extra: Any = (), page: Any = None) -> None:
        self._count(status)
        self.inner.failResponse(status, message, extra, page)


@implementer(IRequestFilter, IResponseFilter)
class InFlightCap:
    """
    C{[limits] max_requests_in_flight}, over every route: past it, an
    immediate 503 with C{Retry-After} instead of a queue that grows without
    bound.  A request counts from its admission to its exchange's end (or
    its client leaving: such exchanges are swept when the cap is reached).
    """

    SWEEP_EVERY = 0.05

    def __init__(self, limit: int, clock: Any, refusals: Refusals) -> None:
        self.limit = limit
        self.clock = clock
        self.refusals = refusals
        self.admitted: set[Any] = set()
        self._swept_at = -math.inf

    def filterRequest(self, request: Any, exchange: Any) -> LocalAnswer | None:
        admitted = self.admitted
        if len(admitted) >= self.limit:
            now = self.clock.seconds()
            if now - self._swept_at >= self.SWEEP_EVERY:
                self._swept_at = now
                admitted -= {ex for ex in admitted if ex.finished}
            if len(admitted) >= self.limit:
                self.refusals.refused(exchange, "overload", "max_requests_in_flight", 503, exchange.info.client_ip)
                return LocalAnswer(503, b"Service Unavailable: too many requests in progress, try again shortly\n",
                                   ((b"Retry-After", b"1"), _TEXT))
        admitted.add(exchange)
        return None

    def wrap(self, exchange: Any, downstream: Any) -> Any:
        return _Release(downstream, self.admitted)


class _Release(DownstreamWrapper):
    def __init__(self, inner: Any, admitted: set[Any]) -> None:
        super().__init__(inner)
        self.admitted = admitted
        self.wants_block = inner.wants_block  # headers pass untouched

    def exchangeDone(self, exchange: Any) -> None:
        self.admitted.discard(exchange)
        self.inner.exchangeDone(exchange)
