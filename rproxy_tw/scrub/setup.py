"""
What one configuration's scrubbing is made of, built once per runtime:
the shared pieces (the rate-limit store, the burst tracker, the in-flight
cap, the refusal log) and, per route, the filters in the order they run.
A reload builds a new one from the old: the state that must outlive a
config (rate-limit TATs, blocked clients, requests in flight) is carried.
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, RateLimitConfig, RouteWafConfig
from .filters import BurstTracker, InFlightCap, IPPolicyFilter, RateLimitFilter, Refusals, WafFilter
from .ippolicy import IPPolicy
from .ratelimit import IRateLimitStore, MemoryRateLimitStore, RatePolicy
from .waf import RuleError, RuleSet, load_rules

__all__ = ["Scrubbing"]


class Scrubbing:
    def __init__(self, config: Any, clock: Any, events: Any, previous: Scrubbing | None = None,
                 store: IRateLimitStore | None = None) -> None:
        self.config = config
        self.clock = clock
        self.refusals = Refusals(clock, events)
        self.trusted = config.server.trusted_proxies
        rate = config.rate_limit
        max_keys = rate.max_keys if rate is not None else 100_000
        if store is not None:
            self.store = store
        elif previous is not None and isinstance(previous.store, MemoryRateLimitStore):
            self.store = previous.store
            self.store.max_keys = max_keys
        else:
            self.store = MemoryRateLimitStore(max_keys)
        self.bursts = previous.bursts if previous is not None else BurstTracker(clock)
        self.rules: RuleSet | None = None
        waf = config.waf
        if waf is not None and (waf.mode != "off" or any(isinstance(r.waf, RouteWafConfig) and r.waf.mode not in (None, "off")
                                                          for r in config.routes)):
            try:
                self.rules = load_rules(waf.rules)
            except RuleError as e:
                raise ConfigError(config.source, "waf.rules", str(e)) from None
        limit = config.limits.max_requests_in_flight
        self.in_flight: InFlightCap | None = None
        if limit:
            carried = previous.in_flight if previous is not None else None
            self.in_flight = InFlightCap(limit, clock, self.refusals)
            if carried is not None:
                self.in_flight.admitted = carried.admitted

    def filters_for(self, route: Any, name: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """The request and response filters of C{route}, in order: IP policy, rate limit, WAF, in-flight cap."""
        config = self.config
        request: list[Any] = []
        response: list[Any] = []
        waf = config.waf
        route_waf = route.waf if isinstance(route.waf, RouteWafConfig) else RouteWafConfig()
        if waf is not None and route.waf is not False:
            deny = tuple(waf.deny) + tuple(route_waf.deny)
            allow = tuple(route_waf.allow) or tuple(waf.allow)
            if deny or allow:
                request.append(IPPolicyFilter(IPPolicy(deny, allow), self.trusted, self.refusals))
        rate: RateLimitConfig | None = config.rate_limit if route.rate_limit is None else route.rate_limit or None
        if rate is not None:
            policy_name = "default" if route.rate_limit is None else f"route {name}"
            policy = RatePolicy(rate.requests, rate.per, rate.burst, policy_name)
            request.append(RateLimitFilter(policy, self.store, rate.key, self.trusted, rate.ipv6_prefix, self.clock,
                                           self.refusals))
        if waf is not None and route.waf is not False and self.rules is not None:
            mode = route_waf.mode or waf.mode
            if mode != "off":
                step = WafFilter(self.rules, mode, waf.threshold, waf.body_limit, waf.exclude,
                                 route_waf.exclude, self.trusted, self.bursts, self.refusals)
                request.append(step)
                if self.rules.bursts:
                    response.append(step)
        if self.in_flight is not None:
            request.append(self.in_flight)
            response.append(self.in_flight)
        return tuple(request), tuple(response)
