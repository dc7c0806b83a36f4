"""
Balancing rules: which backend, among those in rotation, serves a request.

Every rule is an L{IBalancer} and pure policy: it gets the candidates already
filtered by L{BackendPool.candidates} (healthy, not draining, backups only when
no primary is left), the client address and the raw request headers, and gives
back one backend.  It never sees a socket or a clock, so it can be tested by the
thousand.  All rules weigh backends by C{Backend.effective_weight}, which the
health monitor lowers during slow start.

Hashing (C{hash:...} keys and sticky-cookie values) uses BLAKE2b, never
Python's C{hash()}: the salted builtin would send the same client to a
different backend after every restart and on every node of a cluster.

Rules (the C{balance} key of C{[pool.NAME]}):
  - C{round_robin}: smooth weighted round robin (L{RoundRobinBalancer}).
  - C{least_conn}: fewest in-flight requests per unit of weight; ties are
    broken by smooth weighted round robin, so an idle pool still honours weights.
  - C{random2}: power of two choices: two weighted random draws, the less
    loaded (in-flight per weight) wins.
  - C{hash:client_ip}, C{hash:header:NAME}: a consistent-hash ring with
    virtual nodes in proportion to weight, so that a backend leaving moves only
    the keys it owned (about 1/N of them).
  - C{cookie:NAME}: sticky sessions; see L{CookieBalancer}.
"""

from __future__ import annotations

import bisect
import hashlib
import random as _random
from typing import Callable, Sequence

from zope.interface import implementer

from .pool import Backend, Headers, IBalancer, IStickyBalancer, RoundRobinBalancer

__all__ = [
    "IStickyBalancer",
    "RoundRobinBalancer",
    "LeastConnBalancer",
    "Random2Balancer",
    "HashBalancer",
    "CookieBalancer",
    "balancer_for",
    "stable_hash",
]


def stable_hash(data: bytes) -> int:
    """
    A 64-bit hash that is the same in every process and on every machine, so
    that hash-based and sticky choices survive restarts and agree across a
    cluster of proxies.
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _load(backend: Backend) -> float:
    """In-flight requests per unit of weight: what least_conn and random2 compare."""
    return backend.inflight / max(backend.effective_weight, 1e-9)


def _header_value(headers: Headers, name: bytes) -> bytes | None:
    """
    The value of header C{name} (lower case), matched case-insensitively over
    the raw pairs; repeated headers are joined with C{", "} as RFC 9110 allows,
    so that one client's key does not depend on which copy came first.
    """
    values = [v.strip() for k, v in headers if k.lower() == name]
    if not values:
        return None
    return b", ".join(values)


@implementer(IBalancer)
class LeastConnBalancer:
    """
    Weighted least connections: the backend with the fewest in-flight requests
    per unit of weight.  Ties (the common case at low load, where everyone has
    zero) go to smooth weighted round robin among the tied backends, so that
    light traffic still spreads by weight instead of piling onto the first.
    """

    def __init__(self) -> None:
        self._tiebreak = RoundRobinBalancer()

    def pick(self, candidates: Sequence[Backend], client_ip: str, headers: Headers) -> Backend | None:
        if len(candidates) == 1:
            return candidates[0]
        best = min(_load(b) for b in candidates)
        tied = [b for b in candidates if _load(b) == best]
        return self._tiebreak.pick(tied, client_ip, headers)


@implementer(IBalancer)
class Random2Balancer:
    """
    Power of two choices: draw two different backends at random in
    proportion to their weight and keep the one with less load (in-flight per
    weight); on a tie the first draw wins.  Idle, the result is exactly weight-proportional;
    loaded, it steers away from busy backends without any shared counter,
    which is why it copes well with several proxies in front of one pool.

    @param random: the source of randomness; inject a seeded
        C{random.Random} for reproducible tests.
    """

    def __init__(self, random: _random.Random | None = None) -> None:
        self._random = random if random is not None else _random.Random()

    def pick(self, candidates: Sequence[Backend], client_ip: str, headers: Headers) -> Backend | None:
        if len(candidates) == 1:
            return candidates[0]
        # Two distinct draws: with replacement, a pool of two would hand a
        # busy backend one pick in four just by drawing it twice.
        first = self._draw(candidates)
        second = self._draw([b for b in candidates if b is not first])
        return second if _load(second) < _load(first) else first

    def _draw(self, candidates: Sequence[Backend]) -> Backend:
        return self._random.choices(candidates, weights=[b.effective_weight for b in candidates])[0]


POINTS_PER_WEIGHT = 160
"""Virtual nodes per unit of weight on the hash ring (as ketama does)."""


class _Ring:
    """
    A consistent-hash ring over one list of candidates.  Each backend's points
    depend only on its own name and weight, never on the others', which is what
    makes a departure move only the departed backend's keys.
    """

    def __init__(self, members: Sequence[tuple[str, int]]) -> None:
        points: list[tuple[int, int]] = []
        for index, (name, count) in enumerate(members):
            prefix = name.encode("utf-8") + b"#"
            points.extend((stable_hash(prefix + str(i).encode("ascii")), index) for i in range(count))
        # Sorting on (hash, index) keeps the rare collision deterministic.
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = [i for _, i in points]

    def owner(self, key: bytes) -> int:
        """Index in the member list of the backend that owns C{key}."""
        i = bisect.bisect_right(self._hashes, stable_hash(key))
        if i == len(self._hashes):
            i = 0
        return self._owners[i]


@implementer(IBalancer)
class HashBalancer:
    """
    Consistent hashing on the client address or on one request header.

    The ring is built for the candidate set at hand and cached by the
    candidates' names and point counts, so that it is rebuilt only when a
    backend leaves, returns or changes weight (slow start moves keys onto a
    returning backend gradually, as its points grow).

    @param header: the header to hash (any case), or L{None} for the client
        address; a request without the header is hashed on its address.
    """

    _CACHE_SIZE = 16

    def __init__(self, header: str | None = None) -> None:
        self.header = header.lower().encode("ascii") if header else None
        self._rings: dict[tuple[tuple[str, int], ...], _Ring] = {}

    def key(self, client_ip: str, headers: Headers) -> bytes:
        """The bytes hashed for a request."""
        if self.header is not None:
            value = _header_value(headers, self.header)
            if value:
                return b"h:" + value
        return b"ip:" + client_ip.encode("utf-8")

    def _ring(self, candidates: Sequence[Backend]) -> _Ring:
        members = tuple((b.name, max(1, round(POINTS_PER_WEIGHT * b.effective_weight))) for b in candidates)
        ring = self._rings.get(members)
        if ring is None:
            ring = _Ring(members)
            if len(self._rings) >= self._CACHE_SIZE:
                # Drop the oldest: candidate sets come and go with health changes.
                del self._rings[next(iter(self._rings))]
            self._rings[members] = ring
        return ring

    def pick(self, candidates: Sequence[Backend], client_ip: str, headers: Headers) -> Backend | None:
        if len(candidates) == 1:
            return candidates[0]
        return candidates[self._ring(candidates).owner(self.key(client_ip, headers))]


@implementer(IStickyBalancer)
class CookieBalancer:
    """
    Sticky sessions: a request whose cookie C{cookie_name} names a backend
    among the candidates goes there; any other request (no cookie, a cookie
    for a backend that is down, draining or gone) goes to C{fallback} (smooth
    weighted round robin by default), and the HTTP layer then sets the cookie
    for the backend that served it (see L{needs_cookie}).

    The cookie value is a hash of the backend's endpoint string: stable across
    restarts and across proxies sharing a config, and it does not reveal the
    backend's address.
    """

    def __init__(self, cookie_name: str, fallback: IBalancer | None = None) -> None:
        self.cookie_name = cookie_name
        self._name = cookie_name.encode("ascii")
        self._fallback = fallback if fallback is not None else RoundRobinBalancer()

    def cookie_value(self, backend: Backend) -> str:
        return hashlib.blake2b(backend.name.encode("utf-8"), digest_size=8).hexdigest()

    def requested(self, headers: Headers) -> str | None:
        """The value of our cookie in the request's C{Cookie} header(s), if any."""
        for k, v in headers:
            if k.lower() != b"cookie":
                continue
            for part in v.split(b";"):
                name, eq, value = part.strip().partition(b"=")
                if eq and name.strip() == self._name:
                    return value.strip().strip(b'"').decode("ascii", "replace")
        return None

    def pick(self, candidates: Sequence[Backend], client_ip: str, headers: Headers) -> Backend | None:
        wanted = self.requested(headers)
        if wanted is not None:
            for b in candidates:
                if self.cookie_value(b) == wanted:
                    return b
        return self._fallback.pick(candidates, client_ip, headers)

    def needs_cookie(self, headers: Headers, backend: Backend) -> bool:
        return self.requested(headers) != self.cookie_value(backend)

    def set_cookie_header(self, backend: Backend, secure: bool = False) -> bytes:
        # A session cookie (no Max-Age): stickiness should not outlive the
        # browser session, and a stale pin falls back cleanly anyway.
        value = f"{self.cookie_name}={self.cookie_value(backend)}; Path=/; HttpOnly; SameSite=Lax"
        if secure:
            value += "; Secure"
        return value.encode("ascii")


def balancer_for(rule: str, random: _random.Random | None = None) -> IBalancer:
    """
    Build the balancer for a pool's C{balance} rule (already validated by
    L{rproxy_tw.config}).

    @param random: randomness for C{random2}; a fresh C{random.Random} if L{None}.
    @raise ValueError: for a rule this module does not know.
    """
    simple: dict[str, Callable[[], IBalancer]] = {
        "round_robin": RoundRobinBalancer,
        "least_conn": LeastConnBalancer,
        "random2": lambda: Random2Balancer(random),
        "hash:client_ip": HashBalancer,
    }
    if rule in simple:
        return simple[rule]()
    if rule.startswith("hash:header:") and rule != "hash:header:":
        return HashBalancer(header=rule[len("hash:header:") :])
    if rule.startswith("cookie:") and rule != "cookie:":
        return CookieBalancer(rule[len("cookie:") :])
    raise ValueError(f"unknown balancing rule {rule!r}")
