"""
Balancing rules: each rule's distribution, weights, backups, consistent
hashing's bounded key movement, and sticky cookies.  Pure logic, no reactor:
the pool gets a L{Clock} and dummy endpoints.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from rproxy_tw.config import BackendConfig, PoolConfig
from rproxy_tw.upstream.balancing import (
    CookieBalancer,
    HashBalancer,
    IStickyBalancer,
    LeastConnBalancer,
    Random2Balancer,
    RoundRobinBalancer,
    balancer_for,
    stable_hash,
)
from rproxy_tw.upstream.pool import Backend, BackendPool, IBalancer

RULES = ["round_robin", "least_conn", "random2", "hash:client_ip", "hash:header:X-User", "cookie:srv"]


def make_pool(weights: Sequence[int], balance: str = "round_robin", backups: Sequence[int] = (), seed: int = 1) -> BackendPool:
    """A pool of backends tcp:10.0.0.N:80 with the given weights; a seeded random2."""
    configs = [BackendConfig(endpoint=f"tcp:10.0.0.{i + 1}:80", weight=w) for i, w in enumerate(weights)]
    configs += [
        BackendConfig(endpoint=f"tcp:10.0.1.{i + 1}:80", weight=w, backup=True) for i, w in enumerate(backups)
    ]
    pool = BackendPool(
        PoolConfig(name="web", backends=tuple(configs), balance=balance),
        Clock(),
        lambda description: object(),  # balancers never touch endpoints
        balancer_factory=lambda rule: balancer_for(rule, random=random.Random(seed)),
    )
    return pool


def shares(pool: BackendPool, picks: Sequence[Backend]) -> list[float]:
    counts = Counter(picks)
    return [counts[b] / len(picks) for b in pool.backends]


def ip(i: int) -> str:
    return f"198.51.{i // 256}.{i % 256}"


KEYS = [ip(i) for i in range(10_000)]


# ---------------------------------------------------------------------------
# Construction


@pytest.mark.parametrize(
    "rule, kind",
    [
        ("round_robin", RoundRobinBalancer),
        ("least_conn", LeastConnBalancer),
        ("random2", Random2Balancer),
        ("hash:client_ip", HashBalancer),
        ("hash:header:X-User", HashBalancer),
        ("cookie:srv", CookieBalancer),
    ],
)
def test_balancer_for_every_rule(rule: str, kind: type) -> None:
    balancer = balancer_for(rule)
    assert isinstance(balancer, kind)
    assert verifyObject(IBalancer, balancer)


def test_balancer_for_details() -> None:
    header = balancer_for("hash:header:X-User")
    assert isinstance(header, HashBalancer) and header.header == b"x-user"
    cookie = balancer_for("cookie:srv")
    assert verifyObject(IStickyBalancer, cookie)
    assert cookie.cookie_name == "srv"
    for bad in ("nope", "hash:header:", "cookie:", "hash:"):
        with pytest.raises(ValueError):
            balancer_for(bad)


def test_pool_uses_balancing_module() -> None:
    """pool.default_balancer_factory finds balancer_for."""
    pool = BackendPool(
        PoolConfig(name="p", backends=(BackendConfig("tcp:10.0.0.1:80"),), balance="least_conn"),
        Clock(),
        lambda d: object(),
    )
    assert isinstance(pool.balancer, LeastConnBalancer)


def test_stable_hash_is_not_salted() -> None:
    """
    A golden value: hash keys and cookie values must map the same way in
    every process, on every node and after upgrades.
    """
    assert stable_hash(b"rproxy") == 0xFD5A39E06B289253
    pool = make_pool([1], "cookie:srv")
    assert pool.balancer.cookie_value(pool.backends[0]) == "9d48dd6dc5c3042f"


# ---------------------------------------------------------------------------
# Weights, effective weights and backups, for every rule


@pytest.mark.parametrize("rule", RULES)
def test_weights_respected(rule: str) -> None:
    """Idle backends (no in-flight requests) share picks by weight 1:2:3 within 3 points."""
    pool = make_pool([1, 2, 3], rule)
    picks = [pool.pick(KEYS[i]) for i in range(6000)]
    for got, want in zip(shares(pool, picks), [1 / 6, 2 / 6, 3 / 6]):
        assert abs(got - want) < 0.03, (rule, shares(pool, picks))


@pytest.mark.parametrize("rule", RULES)
def test_effective_weight_not_config_weight(rule: str) -> None:
    """
    Balancers read effective_weight (lowered in slow start), not the
    configured weight.  Within 3 points, or 7 for the hash ring, whose 40
    points for a weight of 0.25 place less evenly than counters do.
    """
    pool = make_pool([1, 1], rule)
    pool.backends[0].effective_weight = 0.25
    picks = [pool.pick(KEYS[i]) for i in range(5000)]
    tolerance = 0.07 if rule.startswith("hash:") else 0.03
    assert abs(shares(pool, picks)[0] - 0.2) < tolerance, (rule, shares(pool, picks))


@pytest.mark.parametrize("rule", RULES)
def test_backups_only_without_primaries(rule: str) -> None:
    pool = make_pool([1, 1], rule, backups=[1])
    primaries, backup = pool.backends[:2], pool.backends[2]
    assert all(pool.pick(KEYS[i]) is not backup for i in range(300))
    pool.mark_down(primaries[0], "test")
    assert all(pool.pick(KEYS[i]) is primaries[1] for i in range(300))
    pool.mark_down(primaries[1], "test")
    assert all(pool.pick(KEYS[i]) is backup for i in range(300))
    pool.mark_down(backup, "test")
    assert pool.pick(KEYS[0]) is None


# ---------------------------------------------------------------------------
# round_robin


def test_round_robin_is_smooth_and_exact() -> None:
    """Weights 1:2:3: every window of 6 picks has exactly 1, 2 and 3 of each."""
    pool = make_pool([1, 2, 3])
    picks = [pool.pick("x") for _ in range(600)]
    for start in range(0, 600, 6):
        window = Counter(picks[start : start + 6])
        assert [window[b] for b in pool.backends] == [1, 2, 3]
    # Smooth: the heaviest is never picked three times in a row.
    assert all(not (picks[i] is picks[i + 1] is picks[i + 2]) for i in range(598))


# ---------------------------------------------------------------------------
# least_conn


def test_least_conn_picks_least_loaded_per_weight() -> None:
    pool = make_pool([1, 1, 3], "least_conn")
    a, b, c = pool.backends
    a.inflight, b.inflight, c.inflight = 2, 3, 5  # loads 2, 3, 1.67
    assert pool.pick("x") is c
    c.inflight = 9  # load 3
    assert pool.pick("x") is a


def test_least_conn_fills_by_weight() -> None:
    """600 requests that never finish spread exactly 100/200/300 over weights 1:2:3."""
    pool = make_pool([1, 2, 3], "least_conn")
    for _ in range(600):
        pool.pick("x").inflight += 1
    assert [b.inflight for b in pool.backends] == [100, 200, 300]


def test_least_conn_avoids_slow_backend() -> None:
    """
    A backend that answers three times slower holds its requests longer, so
    it gets fewer new ones: under 25% of 3000 picks where round robin would
    give it a third.
    """
    rng = random.Random(7)
    pool = make_pool([1, 1, 1], "least_conn")
    slow = pool.backends[0]
    open_requests: list[Backend] = []
    picks = []
    for _ in range(3000):
        b = pool.pick("x")
        b.inflight += 1
        open_requests.append(b)
        picks.append(b)
        for r in list(open_requests):
            if rng.random() < (0.1 if r is slow else 0.3):
                r.inflight -= 1
                open_requests.remove(r)
    assert shares(pool, picks)[0] < 0.25


# ---------------------------------------------------------------------------
# random2


def test_random2_idle_distribution() -> None:
    """30 000 idle picks over weights 1:2:3: each share within 1.5 points (about 5 sigma)."""
    pool = make_pool([1, 2, 3], "random2", seed=3)
    picks = [pool.pick("x") for _ in range(30_000)]
    for got, want in zip(shares(pool, picks), [1 / 6, 2 / 6, 3 / 6]):
        assert abs(got - want) < 0.015


def test_random2_is_reproducible_with_injected_random() -> None:
    one, two = make_pool([1, 1, 1], "random2", seed=5), make_pool([1, 1, 1], "random2", seed=5)
    assert [one.backends.index(one.pick("x")) for _ in range(200)] == [
        two.backends.index(two.pick("x")) for _ in range(200)
    ]


def test_random2_never_picks_the_busier_of_two() -> None:
    """Two distinct draws: of two backends the busy one is never chosen."""
    pool = make_pool([1, 1], "random2")
    busy, idle = pool.backends
    busy.inflight = 10
    assert all(pool.pick("x") is idle for _ in range(500))


def test_random2_fills_by_weight() -> None:
    """600 requests that never finish land within 5% of 150:450 over weights 1:3."""
    pool = make_pool([1, 3], "random2")
    for _ in range(600):
        pool.pick("x").inflight += 1
    light, heavy = (b.inflight for b in pool.backends)
    assert abs(light - 150) <= 30 and light + heavy == 600


# ---------------------------------------------------------------------------
# Consistent hashing


def test_hash_is_sticky_per_client() -> None:
    pool = make_pool([1, 1, 1, 1], "hash:client_ip")
    for key in KEYS[:100]:
        first = pool.pick(key)
        assert all(pool.pick(key) is first for _ in range(5))


def test_hash_even_distribution() -> None:
    """10 000 client addresses over 4 equal backends: each within 4 points of 25%."""
    pool = make_pool([1, 1, 1, 1], "hash:client_ip")
    for got in shares(pool, [pool.pick(k) for k in KEYS]):
        assert abs(got - 0.25) < 0.04


@pytest.mark.parametrize("n", [3, 5, 8])
def test_hash_removal_moves_about_one_nth(n: int) -> None:
    """
    When one of N backends leaves, only its own keys move: at most 1/N + 3
    points of 10 000 keys, and never a key that another backend owned.
    """
    pool = make_pool([1] * n, "hash:client_ip")
    before = {k: pool.pick(k) for k in KEYS}
    for gone in (pool.backends[0], pool.backends[-1]):
        after = {k: pool.pick(k, exclude=[gone]) for k in KEYS}
        moved = [k for k in KEYS if after[k] is not before[k]]
        assert all(before[k] is gone for k in moved)
        assert len(moved) / len(KEYS) <= 1 / n + 0.03


def test_hash_return_restores_mapping() -> None:
    """A backend that leaves and comes back gets exactly its old keys back."""
    pool = make_pool([1, 1, 1], "hash:client_ip")
    before = [pool.pick(k) for k in KEYS[:2000]]
    pool.mark_down(pool.backends[1], "test")
    [pool.pick(k) for k in KEYS[:2000]]
    pool.mark_up(pool.backends[1])
    assert [pool.pick(k) for k in KEYS[:2000]] == before


@settings(derandomize=True, max_examples=30, deadline=None)
@given(weights=st.lists(st.integers(1, 4), min_size=2, max_size=9), data=st.data())
def test_hash_removal_property(weights: list[int], data: st.DataObject) -> None:
    """For any weights and any departing backend, only the departed backend's keys move."""
    pool = make_pool(weights, "hash:client_ip")
    gone = pool.backends[data.draw(st.integers(0, len(weights) - 1))]
    keys = KEYS[:1500]
    before = {k: pool.pick(k) for k in keys}
    moved = [k for k in keys if pool.pick(k, exclude=[gone]) is not before[k]]
    assert all(before[k] is gone for k in moved)
    assert len(moved) / len(keys) <= gone.config.weight / sum(weights) + 0.06


def test_hash_header_case_insensitive_and_fallback() -> None:
    pool = make_pool([1, 1, 1, 1, 1], "hash:header:X-User")
    by_ip = make_pool([1, 1, 1, 1, 1], "hash:client_ip")
    # The header decides, whatever the client address.
    for user in (b"alice", b"bob", b"carol"):
        chosen = {pool.pick(ip(i), [(b"x-USER", user)]) for i in range(50)}
        assert len(chosen) == 1
        assert pool.pick("203.0.113.9", [(b"X-User", user)]) in chosen
    # Spread over users.
    users = Counter(pool.pick("x", [(b"X-User", f"user{i}".encode())]) for i in range(2000))
    assert len(users) == 5
    # Without the header (or empty), the client address decides, as hash:client_ip would.
    for i in range(200):
        expected = by_ip.backends.index(by_ip.pick(ip(i)))
        assert pool.backends.index(pool.pick(ip(i), [(b"Other", b"x")])) == expected
        assert pool.backends.index(pool.pick(ip(i), [(b"X-User", b"")])) == expected


# ---------------------------------------------------------------------------
# Sticky cookies


def cookie_pair(set_cookie: bytes) -> bytes:
    """What a browser sends back for a Set-Cookie value."""
    return set_cookie.split(b";")[0]


def test_cookie_round_trip() -> None:
    pool = make_pool([1, 1, 1], "cookie:srv")
    sticky = pool.balancer
    first = pool.pick("192.0.2.1")
    assert sticky.needs_cookie((), first)
    header = sticky.set_cookie_header(first)
    assert header.startswith(b"srv=" + sticky.cookie_value(first).encode("ascii") + b"; Path=/; HttpOnly")
    assert sticky.set_cookie_header(first, secure=True).endswith(b"; Secure")
    request = [(b"Host", b"www"), (b"Cookie", b"theme=dark; " + cookie_pair(header) + b"; lang=en")]
    assert all(pool.pick("192.0.2.1", request) is first for _ in range(50))
    assert not sticky.needs_cookie(request, first)
    # Header name in any case, cookie in a second Cookie header (as HTTP/2 sends them).
    split = [(b"COOKIE", b"a=1"), (b"cookie", cookie_pair(header))]
    assert all(pool.pick("192.0.2.7", split) is first for _ in range(10))


def test_cookie_without_cookie_falls_back_to_round_robin() -> None:
    pool = make_pool([1, 1, 1], "cookie:srv")
    picks = [pool.pick("x", [(b"Cookie", b"srv=garbage")]) for _ in range(300)]
    assert shares(pool, picks) == [pytest.approx(1 / 3)] * 3


def test_cookie_naming_dead_backend_falls_back() -> None:
    pool = make_pool([1, 1, 1], "cookie:srv")
    sticky = pool.balancer
    pinned = pool.backends[1]
    request = [(b"Cookie", cookie_pair(sticky.set_cookie_header(pinned)))]
    assert pool.pick("x", request) is pinned
    pool.mark_down(pinned, "connection refused")
    others = {pool.pick("x", request) for _ in range(20)}
    assert pinned not in others and len(others) == 2
    chosen = pool.pick("x", request)
    assert sticky.needs_cookie(request, chosen)  # the HTTP layer re-pins the client
    # Draining counts as gone for new requests too.
    pool.mark_up(pinned)
    pool.set_draining(pinned.name)
    assert pool.pick("x", request) is not pinned


def test_cookie_values_are_opaque_and_distinct() -> None:
    pool = make_pool([1] * 20, "cookie:srv")
    values = [pool.balancer.cookie_value(b) for b in pool.backends]
    assert len(set(values)) == 20
    assert all("10.0" not in v and len(v) == 16 for v in values)
