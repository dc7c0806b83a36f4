"""
Refusals at connect, before a byte is read (before TLS too): the IP policy
of C{[waf]}, and the per-address limits of C{[limits]} (connections open
at once, new connections a second).  One guard per service, kept across
reloads (the counts of open connections must survive a new config); every
listener's factory asks it first.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.logger import Logger

from ..events import ConnectionRefused
from ..headers import is_trusted
from ..logs import observer as log_observer
from ..transport import ip_of
from .ippolicy import IPPolicy
from .ratelimit import MemoryRateLimitStore, RatePolicy, client_key

__all__ = ["ConnectionGuard"]


class ConnectionGuard:
    """
    @ivar open: connections open per client address (only addresses with
        at least one: the table is bounded by the listeners' connections).
    @ivar refused: connections refused, by reason.
    """

    _log = Logger(observer=log_observer)

    def __init__(self, clock: Any, events: Any) -> None:
        self.clock = clock
        self.events = events
        self.policy = IPPolicy()
        self.trusted: tuple[Any, ...] = ()
        self.per_ip = 0
        self.rate: RatePolicy | None = None
        self.rates = MemoryRateLimitStore(max_keys=100_000)
        self.open: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self._logged_at = -1.0
        self._unlogged: collections.Counter[str] = collections.Counter()
        self.active = False
        """Whether any check is configured (read for every new connection; set by L{configure})."""

    def configure(self, config: Any) -> None:
        """Take a (new) config's IP lists and per-address limits."""
        waf, limits = config.waf, config.limits
        self.policy = IPPolicy.of(waf.deny, waf.allow) if waf is not None else IPPolicy()
        self.trusted = tuple(config.server.trusted_proxies)
        self.per_ip = limits.max_connections_per_ip
        rate = limits.connection_rate_per_ip
        self.rate = RatePolicy(rate, 1.0, limits.connection_burst_per_ip or rate, "connections") if rate else None
        self.active = bool(self.policy or self.per_ip or self.rate)

    def refusal(self, ip: str) -> tuple[str, str] | None:
        """(reason, rule) when a connection from C{ip} is to be closed at once, else None (and it is counted)."""
        if self.policy:
            why = self.policy.refusal(ip)
            if why is not None:
                return "ip_policy", why
        if self.per_ip and self.open.get(ip, 0) >= self.per_ip:
            return "connections_per_ip", f"max_connections_per_ip {self.per_ip}"
        if self.rate is not None:
            decision = self.rates.take(client_key(ip), self.rate, self.clock.seconds())
            if not decision.allowed:
                return "connection_rate", f"connection_rate_per_ip {self.rate.requests}"
        return None

    def admit(self, listener: str, addr: Any, build: Any) -> Any:
        """
        The protocol for a new connection from C{addr}: C{build()}'s, or
        None, which makes the listening port close the socket at once.
        """
        ip = ip_of(addr)
        if not ip or (self.trusted and is_trusted(ip, self.trusted)):
            # A trusted proxy speaks for many clients: they are judged per request, by X-Forwarded-For.
            return build()
        refusal = self.refusal(ip)
        if refusal is not None:
            self._refused(listener, ip, *refusal)
            return None
        protocol = build()
        if protocol is None or not self.per_ip:
            return protocol
        return self._track(protocol, ip)

    def _track(self, protocol: Any, ip: str) -> Any:
        self.open[ip] += 1
        lost = protocol.connectionLost
        counted = [True]

        def connectionLost(reason: Any = None) -> None:
            if counted:
                counted.clear()
                left = self.open[ip] - 1
                if left > 0:
                    self.open[ip] = left
                else:
                    del self.open[ip]
            lost(reason)

        protocol.connectionLost = connectionLost
        return protocol

    def _refused(self, listener: str, ip: str, reason: str, rule: str) -> None:
        self.refused[reason] += 1
        self._unlogged[reason] += 1
        now = self.clock.seconds()
        # One line a second at most: a flood of connections must not become a flood of log lines.
        if now - self._logged_at >= 1.0:
            self._logged_at = now
            counts = ", ".join(f"{n} {why}" for why, n in sorted(self._unlogged.items()))
            self._unlogged.clear()
            self._log.warn("listener {listener}: refused connection(s) at connect: {counts} "
                           "(last from {client}: {reason} {rule})",
                           listener=listener, counts=counts, client=ip, reason=reason, rule=rule)
        if self.events.wanted:
            self.events.publish(ConnectionRefused(listener, ip, reason, rule))
