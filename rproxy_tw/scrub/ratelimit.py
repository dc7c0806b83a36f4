"""
Rate limiting: GCRA (a token bucket kept as one number per client) over an
injected clock, behind a store interface so that a shared store (Redis) can
take the table's place without the filter changing.

GCRA keeps, per key, the "theoretical arrival time" (TAT) of the next
request at the sustained rate; a request is allowed while TAT is less than
C{burst} emission intervals ahead of now.  One float per key, no timer.
"""

from __future__ import annotations

import collections
import ipaddress
import math
from typing import Any, NamedTuple, Sequence

import attrs
from zope.interface import Interface, implementer

__all__ = [
    "IRateLimitStore",
    "MemoryRateLimitStore",
    "RateDecision",
    "RatePolicy",
    "client_address",
    "client_key",
    "rate_limit_headers",
]


@attrs.frozen
class RatePolicy:
    """C{requests} per C{per} seconds, with up to C{burst} at once."""

    requests: int
    per: float
    burst: int
    name: str = "default"
    interval: float = attrs.field(init=False, eq=False)
    """Seconds one request's token takes to come back."""
    capacity: int = attrs.field(init=False, eq=False)
    """Requests allowed at once: C{burst}, or C{requests} when it is 0."""
    tolerance: float = attrs.field(init=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "interval", self.per / self.requests)
        object.__setattr__(self, "capacity", self.burst or self.requests)
        object.__setattr__(self, "tolerance", self.capacity * self.interval)


class RateDecision(NamedTuple):
    """(A tuple: one is made per request.)"""

    allowed: bool
    remaining: int
    """Requests that may still be made at once."""
    reset: float
    """Seconds until the bucket is full again."""
    retry_after: float
    """When refused: seconds until one request is allowed again (0 when allowed)."""


class IRateLimitStore(Interface):
    """Where the per-key state of rate limits lives (process memory; later a shared store)."""

    def take(key: str, policy: RatePolicy, now: float) -> Any:
        """
        Count one request of C{key} against C{policy}.

        @return: a L{RateDecision}, or a Deferred firing with one (a remote store).
        """


def gcra(tat: float | None, policy: RatePolicy, now: float) -> tuple[RateDecision, float | None]:
    """
    One GCRA step, pure: the decision for a request at C{now} given the
    key's stored TAT, and the TAT to store (None: leave it as it was).
    """
    interval = policy.interval
    tolerance = policy.tolerance
    start = now if tat is None or tat < now else tat
    new_tat = start + interval
    allow_at = new_tat - tolerance
    if now < allow_at - 1e-9:
        remaining = 0
        return RateDecision(False, remaining, max(0.0, start - now), allow_at - now), None
    remaining = int((now - allow_at) / interval + 1e-9)
    return RateDecision(True, min(remaining, policy.capacity - 1), new_tat - now, 0.0), new_tat


@implementer(IRateLimitStore)
class MemoryRateLimitStore:
    """
    The TATs of this process, in a table bounded to C{max_keys} entries:
    the least recently seen key is forgotten first, so a flood of distinct
    addresses costs a bounded amount of memory (a forgotten key starts again
    with a full bucket, which only errs towards letting traffic through).
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._tats: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._tats)

    def take(self, key: str, policy: RatePolicy, now: float) -> RateDecision:
        slot = (policy.name, key)
        tats = self._tats
        tat = tats.get(slot)
        decision, new_tat = gcra(tat, policy, now)
        if new_tat is not None:
            tats[slot] = new_tat
            if tat is not None:
                tats.move_to_end(slot)
            elif len(tats) > self.max_keys:
                tats.popitem(last=False)
        return decision


def _addresses(value: bytes) -> list[bytes]:
    return [part.strip() for part in value.split(b",") if part.strip()]


def client_address(info: Any, headers: Sequence[tuple[bytes, bytes]], trusted: Sequence[Any]) -> str:
    """
    The client's address as seen through trusted proxies only: the peer's,
    unless the peer is a trusted proxy, in which case the right-most
    C{X-Forwarded-For} address that is not itself a trusted proxy (a client
    can write anything to the left of what its first trusted proxy adds).
    """
    ip: str = info.client_ip
    if not info.trusted:
        return ip
    chain: list[bytes] = []
    for name, value in headers:
        if len(name) == 15 and name.lower() == b"x-forwarded-for":
            chain += _addresses(value)
    from ..headers import is_trusted

    for candidate in reversed(chain):
        text = candidate.decode("latin-1")
        try:
            ipaddress.ip_address(text)
        except ValueError:
            return ip  # a garbled chain: trust none of it
        if not is_trusted(text, trusted):
            return text
        ip = text
    return ip


def client_key(ip: str, v6_prefix: int = 64) -> str:
    """
    The rate-limit key of an address: IPv4 as it is, IPv6 grouped by its
    C{/v6_prefix} (one subscriber usually holds a whole /64).
    """
    if ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((addr, v6_prefix), strict=False))


def rate_limit_headers(policy: RatePolicy, decision: RateDecision) -> tuple[tuple[bytes, bytes], ...]:
    """
    C{RateLimit-Policy} and C{RateLimit} as draft-ietf-httpapi-ratelimit-headers
    (-10) writes them: the quota C{q} over the window C{w} seconds, and the
    remaining C{r} with C{t} seconds until the quota is whole again.
    """
    window = max(1, math.ceil(policy.capacity * policy.interval))
    name = policy.name.encode("ascii", "replace")
    return (
        (b"RateLimit-Policy", b'"%s";q=%d;w=%d' % (name, policy.capacity, window)),
        (b"RateLimit", b'"%s";r=%d;t=%d' % (name, decision.remaining, math.ceil(decision.reset))),
    )
