"""
Active and passive health, driven by L{Clock}: fake probes whose Deferreds
the tests fire by hand; HTTPProbe against treq's in-memory StubTreq, and once
against a real origin on 127.0.0.1.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import attrs
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from rproxy_tw.config import BackendConfig, HealthConfig, PassiveHealthConfig, PoolConfig
from rproxy_tw.upstream.health import (
    HealthMonitor,
    HTTPProbe,
    IProbe,
    PassiveHealth,
    ProbeFailed,
    TCPProbe,
    monitor_for,
)
from rproxy_tw.upstream.pool import Backend, BackendPool


def make_pool(
    n: int = 1, weights: Sequence[int] | None = None, health: HealthConfig | None = None, clock: Clock | None = None
) -> BackendPool:
    weights = weights or [1] * n
    configs = tuple(BackendConfig(endpoint=f"tcp:127.0.0.1:{8001 + i}", weight=w) for i, w in enumerate(weights))
    return BackendPool(
        PoolConfig(name="web", backends=configs, health=health),
        clock or Clock(),
        lambda description: object(),
    )


@implementer(IProbe)
class FakeProbe:
    """Hands out one Deferred per probe; the test fires them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Backend, Deferred[None]]] = []
        self.cancelled: list[Backend] = []
        self.forgotten: list[Backend] = []

    def probe(self, backend: Backend) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda d: self.cancelled.append(backend))
        self.calls.append((backend, d))
        return d

    def forget(self, backend: Backend) -> None:
        self.forgotten.append(backend)

    def pending(self) -> list[Deferred[None]]:
        return [d for _, d in self.calls if not d.called]

    def succeed_last(self) -> None:
        self.calls[-1][1].callback(None)

    def fail_last(self, why: str = "HTTP status 503, expected 200-399") -> None:
        self.calls[-1][1].errback(ProbeFailed(why))


@attrs.define
class Setup:
    clock: Clock
    pool: BackendPool
    probe: FakeProbe
    monitor: HealthMonitor

    @property
    def backend(self) -> Backend:
        return self.pool.backends[0]

    def next_probe(self) -> None:
        """Advance the clock, timer by timer, until the next probe starts."""
        count = len(self.probe.calls)
        for _ in range(1000):
            due = min(call.getTime() for call in self.clock.getDelayedCalls())
            self.clock.advance(due - self.clock.seconds())
            if len(self.probe.calls) > count:
                return
        raise AssertionError("no probe was started")


def monitored(n: int = 1, weights: Sequence[int] | None = None, **health: Any) -> Setup:
    config = HealthConfig(**{"interval": 2.0, "timeout": 1.0, "rise": 2, "fall": 2, **health})
    clock = Clock()
    pool = make_pool(n, weights, config, clock)
    probe = FakeProbe()
    monitor = HealthMonitor(pool, config, clock, probe, random=random.Random(42))
    monitor.startService()
    return Setup(clock, pool, probe, monitor)


def down_events(events: Sequence[dict]) -> list[dict]:
    return [e for e in events if "down:" in e.get("log_format", "")]


# ---------------------------------------------------------------------------
# Scheduling


def test_first_probes_jittered_within_one_interval() -> None:
    """First probes land at random offsets in [0, interval): backends and pools do not probe in lockstep."""
    starts: list[float] = []
    for seed in range(30):
        config = HealthConfig(interval=2.0)
        clock = Clock()
        monitor = HealthMonitor(make_pool(5, health=config, clock=clock), config, clock, FakeProbe(), random.Random(seed))
        monitor.startService()
        starts += [call.getTime() for call in clock.getDelayedCalls()]
    assert len(starts) == 150
    assert all(0 <= t < 2.0 for t in starts)
    assert len(set(starts)) == 150
    assert min(starts) < 0.2 and max(starts) > 1.8


def test_intervals_jittered_ten_percent() -> None:
    """Between probes: interval +/- 10%, and not a constant."""
    times: list[float] = []
    config = HealthConfig(interval=2.0, timeout=1.0)
    clock = Clock()
    pool = make_pool(1, health=config, clock=clock)

    def probe(backend: Backend) -> Deferred[None]:
        times.append(clock.seconds())
        return succeed(None)

    HealthMonitor(pool, config, clock, probe, random.Random(1)).startService()
    clock.pump([0.01] * 50_000)  # 500 s
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) > 200
    assert all(1.8 - 0.011 <= g <= 2.2 + 0.011 for g in gaps)  # 0.01 s clock steps
    assert max(gaps) - min(gaps) > 0.2


def test_no_overlapping_probes() -> None:
    """A probe still running when the next is due is not doubled; the turn is skipped."""
    s = monitored(interval=1.0, timeout=10.0)
    s.next_probe()
    s.clock.pump([0.1] * 55)  # five more turns come due while the first probe hangs
    assert len(s.probe.calls) == 1
    assert s.monitor.skipped(s.backend) >= 4
    s.probe.succeed_last()
    s.next_probe()
    assert len(s.probe.calls) == 2


def test_probe_timeout_cancels_and_counts_as_failure() -> None:
    s = monitored(interval=5.0, timeout=1.0, fall=1)
    s.next_probe()
    with capturedLogs() as events:
        s.clock.advance(0.999)
        assert s.probe.cancelled == [] and s.backend.healthy
        s.clock.advance(0.002)
    assert s.probe.cancelled == [s.backend]
    assert not s.backend.healthy and s.backend.active_down
    assert s.backend.last_error == "health check timed out after 1s"
    assert len(down_events(events)) == 1


def test_finished_probe_leaves_no_timeout_behind() -> None:
    s = monitored(interval=5.0, timeout=1.0)
    s.next_probe()
    s.probe.succeed_last()
    assert len(s.clock.getDelayedCalls()) == 1  # only the next probe


def test_backends_a_reload_removes_are_forgotten_by_the_probe_and_probed_no_more() -> None:
    s = monitored(n=2)
    gone, stays = s.pool.backends
    kept = BackendPool(
        PoolConfig(name="web", backends=(stays.config,), health=s.monitor.config), s.clock, lambda description: object(),
    )
    kept.backends = [stays]
    s.monitor.adopt(kept)
    assert s.probe.forgotten == [gone]
    s.clock.advance(10.0)
    assert {backend for backend, _ in s.probe.calls} == {stays}


def test_stop_cancels_everything_without_verdicts() -> None:
    s = monitored(n=3, fall=1)
    s.next_probe()
    s.monitor.stopService()
    assert s.clock.getDelayedCalls() == []
    assert s.probe.cancelled  # the running probe was cancelled...
    assert all(b.healthy for b in s.pool.backends)  # ...and that is no failure
    s.clock.advance(100)
    assert len(s.probe.calls) == 1


# ---------------------------------------------------------------------------
# Rise and fall


def test_fall_then_rise() -> None:
    s = monitored(rise=3, fall=2)
    with capturedLogs() as events:
        s.next_probe()
        s.probe.fail_last()
        assert s.backend.healthy  # one failure is not enough
        s.next_probe()
        s.probe.fail_last("connection refused")
        assert not s.backend.healthy and s.backend.active_down
        assert s.backend.last_error == "connection refused"
        assert s.backend.since == s.clock.seconds()
        s.next_probe()
        s.probe.fail_last()  # still down: no second log line
    assert [e["why"] for e in down_events(events)] == ["connection refused"]
    assert s.pool.pick("x") is None

    for _ in range(2):
        s.next_probe()
        s.probe.succeed_last()
    s.next_probe()
    s.probe.fail_last()  # a failure resets the rise count
    for _ in range(2):
        s.next_probe()
        s.probe.succeed_last()
    assert not s.backend.healthy
    s.next_probe()
    s.probe.succeed_last()
    assert s.backend.healthy and not s.backend.active_down
    assert s.pool.pick("x") is s.backend


def test_alternating_results_never_trip() -> None:
    s = monitored(rise=2, fall=2)
    for i in range(20):
        s.next_probe()
        if i % 2:
            s.probe.succeed_last()
        else:
            s.probe.fail_last()
        assert s.backend.healthy


def test_synchronous_probe_failure() -> None:
    """A probe that raises instead of returning a Deferred is a failed probe, not a crash."""
    config = HealthConfig(interval=1.0, fall=1)
    clock = Clock()
    pool = make_pool(1, health=config, clock=clock)

    def probe(backend: Backend) -> Deferred[None]:
        raise ConnectionRefusedError("nope")

    HealthMonitor(pool, config, clock, probe, random.Random(0)).startService()
    clock.advance(1.0)
    assert not pool.backends[0].healthy
    assert "ConnectionRefusedError" in (pool.backends[0].last_error or "")


# ---------------------------------------------------------------------------
# Slow start


def test_slow_start_ramp() -> None:
    """Back after a failure, the weight goes from a tenth to all of it, linearly over slow_start seconds."""
    s = monitored(weights=[10], rise=1, fall=1, slow_start=10.0, interval=100.0)
    s.next_probe()
    s.probe.fail_last()
    s.next_probe()
    s.probe.succeed_last()
    assert s.backend.healthy
    start = s.clock.seconds()
    seen = []
    while s.clock.seconds() - start < 12:
        seen.append((s.clock.seconds() - start, s.backend.effective_weight))
        s.clock.advance(0.25)
    assert seen[0] == (0, 1.0)
    for elapsed, weight in seen:
        ideal = 10 * min(1.0, 0.1 + 0.9 * elapsed / 10)
        # Updated every 0.5 s: never ahead of the line, at most one step behind.
        assert ideal - 0.9 * 0.5 - 1e-9 <= weight <= ideal + 1e-9
    assert [w for _, w in seen] == sorted(w for _, w in seen)
    assert s.backend.effective_weight == 10.0


def test_slow_start_interrupted_by_failure_restarts() -> None:
    s = monitored(weights=[10], rise=1, fall=1, slow_start=10.0, interval=100.0)
    s.next_probe()
    s.probe.fail_last()
    s.next_probe()
    s.probe.succeed_last()
    s.clock.advance(5)
    s.next_probe()
    s.probe.fail_last()
    s.next_probe()
    s.probe.succeed_last()
    assert s.backend.effective_weight == 1.0


def test_no_slow_start_means_full_weight() -> None:
    s = monitored(weights=[4], rise=1, fall=1)
    s.next_probe()
    s.probe.fail_last()
    s.next_probe()
    s.probe.succeed_last()
    assert s.backend.effective_weight == 4.0


# ---------------------------------------------------------------------------
# Probes


class Health(Resource):
    """An origin's /healthz: answers status and body as set, records what it was asked."""

    isLeaf = True

    def __init__(self, status: int = 200, body: bytes = b"ok", headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self.status, self.body, self.headers = status, body, headers or {}
        self.seen: list[tuple[bytes, bytes, bytes | None]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method, request.uri, request.getHeader(b"host")))
        request.setResponseCode(self.status)
        for k, v in self.headers.items():
            request.setHeader(k, v)
        return self.body


def run_probe(probe: HTTPProbe, stub: StubTreq, backend: Backend) -> Failure | None:
    results: list[Any] = []
    probe.probe(backend).addBoth(results.append)
    stub.flush()
    assert len(results) == 1
    return results[0]


def http_probe(resource: Health, **config: Any) -> tuple[HTTPProbe, StubTreq, Backend]:
    stub = StubTreq(resource)
    cfg = HealthConfig(**{"path": "/healthz", **config})
    probe = HTTPProbe(cfg, Clock(), client=stub)  # type: ignore[arg-type]
    return probe, stub, make_pool(1).backends[0]


def test_http_probe_request_shape() -> None:
    origin = Health()
    probe, stub, backend = http_probe(origin, method="HEAD", host="health.internal", path="/healthz?deep=1")
    assert verifyObject(IProbe, probe)
    assert run_probe(probe, stub, backend) is None
    assert origin.seen == [(b"HEAD", b"/healthz?deep=1", b"health.internal")]
    origin.seen.clear()
    probe, stub, backend = http_probe(origin)
    run_probe(probe, stub, backend)
    assert origin.seen == [(b"GET", b"/healthz", b"127.0.0.1:8001")]


@pytest.mark.parametrize(
    "status, expect, ok",
    [(200, (200, 399), True), (399, (200, 399), True), (503, (200, 399), False), (204, (204, 204), True), (200, (204, 204), False)],
)
def test_http_probe_status_range(status: int, expect: tuple[int, int], ok: bool) -> None:
    probe, stub, backend = http_probe(Health(status=status, body=b""), expect_status=expect)
    result = run_probe(probe, stub, backend)
    if ok:
        assert result is None
    else:
        assert isinstance(result, Failure) and result.check(ProbeFailed)
        assert str(result.value) == f"HTTP status {status}, expected {expect[0]}-{expect[1]}"


def test_http_probe_body_match() -> None:
    probe, stub, backend = http_probe(Health(body=b'{"db": "up", "cache": "up"}'), expect_body='"db": "up"')
    assert run_probe(probe, stub, backend) is None
    probe, stub, backend = http_probe(Health(body=b'{"db": "down"}'), expect_body='"db": "up"')
    result = run_probe(probe, stub, backend)
    assert isinstance(result, Failure) and "does not contain" in str(result.value)


def test_http_probe_body_match_is_bounded() -> None:
    """The needle past the first BODY_LIMIT bytes does not count: a probe never reads a huge page."""
    probe, stub, backend = http_probe(Health(body=b"x" * 70_000 + b"READY"), expect_body="READY")
    assert isinstance(run_probe(probe, stub, backend), Failure)


def test_http_probe_does_not_follow_redirects() -> None:
    origin = Health(status=302, body=b"", headers={b"location": b"/login"})
    probe, stub, backend = http_probe(origin, expect_status=(200, 299))
    assert isinstance(run_probe(probe, stub, backend), Failure)
    assert len(origin.seen) == 1


def test_http_probe_targets() -> None:
    """tcp: backends go through the client by URL; others through their own endpoint object."""
    via_endpoint: list[object] = []
    probe = HTTPProbe(HealthConfig(path="/h"), Clock(), client="shared", endpoint_client=lambda e: via_endpoint.append(e) or "own")  # type: ignore[arg-type]

    def backend(endpoint: str) -> Backend:
        return Backend(config=BackendConfig(endpoint=endpoint), pool_name="web", endpoint=f"<{endpoint}>")  # type: ignore[arg-type]

    assert probe.target(backend("tcp:10.0.0.5:8001")) == ("shared", "http://10.0.0.5:8001/h")
    assert probe.target(backend("tcp:host=app.internal:port=80:timeout=3")) == ("shared", "http://app.internal/h")
    assert probe.target(backend("tcp:host=\\:\\:1:port=8080")) == ("shared", "http://[::1]:8080/h")
    assert probe.target(backend("tls:api.internal:8443:trustRoots=ca")) == ("own", "https://api.internal:8443/h")
    assert probe.target(backend("unix:/run/app.sock")) == ("own", "http://localhost/h")
    assert via_endpoint == ["<tls:api.internal:8443:trustRoots=ca>", "<unix:/run/app.sock>"]
    unix = backend("unix:/run/app.sock")
    probe.target(unix)
    assert len(via_endpoint) == 3  # one client per backend, kept...
    probe.target(unix)
    assert len(via_endpoint) == 3
    probe.forget(unix)  # ...until the backend leaves its pool
    probe.target(unix)
    assert len(via_endpoint) == 4


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.transports: list[StringTransport] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse:
            return fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)


def test_tcp_probe() -> None:
    probe = TCPProbe()
    assert verifyObject(IProbe, probe)
    up = FakeEndpoint()
    results: list[Any] = []
    probe.probe(Backend(config=BackendConfig("tcp:127.0.0.1:1"), pool_name="p", endpoint=up)).addBoth(results.append)
    assert results == [None]
    assert up.transports[0].disconnecting  # closed at once
    probe.probe(Backend(config=BackendConfig("tcp:127.0.0.1:1"), pool_name="p", endpoint=FakeEndpoint(refuse=True))).addBoth(results.append)
    assert isinstance(results[1], Failure) and results[1].check(ConnectionRefusedError)


def test_monitor_for() -> None:
    assert monitor_for(make_pool(1), Clock()) is None  # type: ignore[arg-type]
    pool = make_pool(2, health=HealthConfig(type="tcp"))
    monitor = monitor_for(pool, Clock(), random=random.Random(0))  # type: ignore[arg-type]
    assert monitor is not None and monitor.pool is pool and monitor.name == "health:web"


@pytest_twisted.inlineCallbacks
def test_http_probe_against_real_origin() -> Any:
    """One real round trip: the probe's own client, through the backend's endpoint, to a twisted.web origin on 127.0.0.1."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString
    from twisted.web.server import Site

    origin = Resource()
    origin.putChild(b"healthz", Health(body=b"READY"))
    origin.putChild(b"broken", Health(status=500))
    port = reactor.listenTCP(0, Site(origin), interface="127.0.0.1")
    try:
        endpoint = f"tcp:127.0.0.1:{port.getHost().port}"
        backend = Backend(config=BackendConfig(endpoint), pool_name="p", endpoint=clientFromString(reactor, endpoint))
        with capturedLogs() as events:
            yield HTTPProbe(HealthConfig(path="/healthz", expect_body="READY"), reactor).probe(backend)
        assert not [e for e in events if "Starting factory" in str(e.get("log_format"))]  # a probe every few seconds is quiet
        with pytest.raises(ProbeFailed):
            yield HTTPProbe(HealthConfig(path="/broken"), reactor).probe(backend)
    finally:
        yield port.stopListening()


class Hang(Resource):
    """Never answers; tells the test when the request arrived and when the client went away."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.arrived: Deferred[None] = Deferred()
        self.gone: Deferred[None] = Deferred()

    def render(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        request.notifyFinish().addErrback(lambda f: self.gone.callback(None))
        self.arrived.callback(None)
        return NOT_DONE_YET


@pytest_twisted.inlineCallbacks
def test_http_probe_cancel_closes_connection() -> Any:
    """The monitor's timeout cancels the probe; the connection to the origin must go with it."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString
    from twisted.web.server import Site

    hang = Hang()
    port = reactor.listenTCP(0, Site(hang), interface="127.0.0.1")
    try:
        endpoint = f"tcp:127.0.0.1:{port.getHost().port}"
        backend = Backend(config=BackendConfig(endpoint), pool_name="p", endpoint=clientFromString(reactor, endpoint))
        d = HTTPProbe(HealthConfig(path="/slow"), reactor).probe(backend)
        yield hang.arrived
        d.cancel()
        with pytest.raises(ResponseNeverReceived) as caught:
            yield d
        assert caught.value.reasons[0].check(CancelledError)
        yield hang.gone
    finally:
        yield port.stopListening()


# ---------------------------------------------------------------------------
# Passive health


def passive(n: int = 4, **config: Any) -> tuple[Clock, BackendPool, PassiveHealth]:
    clock = Clock()
    pool = make_pool(n, clock=clock)
    return clock, pool, PassiveHealth(pool, clock, PassiveHealthConfig(**config))


def fail_n(health: PassiveHealth, backend: Backend, n: int, kind: str = "connect") -> list[bool]:
    return [health.report_failure(backend, kind) for _ in range(n)]


def test_consecutive_failures_eject() -> None:
    clock, pool, health = passive()
    b = pool.backends[0]
    with capturedLogs() as events:
        assert fail_n(health, b, 5) == [False] * 4 + [True]
    assert not b.healthy and b.ejected_until == 10.0 and not b.active_down
    assert [e["why"] for e in down_events(events)] == ["ejected for 10s after 5 failures in a row (last: connect)"]
    assert b not in [pool.pick(str(i)) for i in range(30)]
    assert fail_n(health, b, 10, "reset") == [False] * 10  # reports while out change nothing
    clock.advance(9.9)
    assert not b.healthy
    clock.advance(0.1)
    assert b.healthy and b.ejected_until is None


def test_success_resets_the_streak() -> None:
    clock, pool, health = passive()
    b = pool.backends[0]
    fail_n(health, b, 4)
    health.report_success(b)
    assert fail_n(health, b, 4, "reset") == [False] * 4
    assert b.healthy


def test_5xx_counts_only_when_configured() -> None:
    _, pool, health = passive()
    assert fail_n(health, pool.backends[0], 20, "5xx") == [False] * 20
    assert pool.backends[0].healthy
    _, pool, health = passive(count_5xx=True, consecutive_failures=3)
    assert fail_n(health, pool.backends[0], 3, "5xx") == [False, False, True]
    with pytest.raises(ValueError):
        health.report_failure(pool.backends[1], "teapot")


def test_ejection_back_off_doubles_up_to_max() -> None:
    clock, pool, health = passive()
    b = pool.backends[0]
    periods = []
    for _ in range(8):
        fail_n(health, b, 5)
        assert b.ejected_until is not None
        periods.append(b.ejected_until - clock.seconds())
        clock.advance(periods[-1])
        assert b.healthy
    assert periods == [10, 20, 40, 80, 160, 300, 300, 300]


def test_back_off_starts_over_after_quiet_period() -> None:
    clock, pool, health = passive()
    b = pool.backends[0]
    for _ in range(3):
        fail_n(health, b, 5)
        clock.advance(100)
    assert health.ejection_period(b) == 80
    clock.advance(300)  # max_ejection seconds back in rotation without trouble
    assert health.ejection_period(b) == 10
    fail_n(health, b, 5)
    assert b.ejected_until == clock.seconds() + 10


def test_max_ejection_share() -> None:
    clock, pool, health = passive(n=4, max_ejection_share=0.5)
    a, b, c, d = pool.backends
    assert fail_n(health, a, 5)[-1] and fail_n(health, b, 5)[-1]
    with capturedLogs() as events:
        assert fail_n(health, c, 8) == [False] * 8
    assert c.healthy
    assert len([e for e in events if "not ejected" in e.get("log_format", "")]) == 1
    clock.advance(10)  # a and b return
    assert health.report_failure(c, "connect")  # the streak was kept: ejected at once
    assert not c.healthy


def test_share_counts_backends_active_health_holds_out() -> None:
    _, pool, health = passive(n=4)
    a, b, c, _ = pool.backends
    a.active_down = True
    pool.mark_down(a, "probe failed")
    assert fail_n(health, b, 5)[-1]
    assert not fail_n(health, c, 5)[-1]


def test_pool_of_one_is_never_ejected() -> None:
    _, pool, health = passive(n=1)
    assert not any(fail_n(health, pool.backends[0], 50))
    assert pool.backends[0].healthy


# ---------------------------------------------------------------------------
# Active and passive together


def auto_monitored(n: int, **health: Any) -> tuple[Clock, BackendPool, dict[str, bool]]:
    """A monitor whose probes answer at once, as C{verdicts[endpoint]} says."""
    config = HealthConfig(**{"interval": 1.0, "timeout": 0.5, "rise": 2, "fall": 1, **health})
    clock = Clock()
    pool = make_pool(n, weights=[2] * n, health=config, clock=clock)
    verdicts = {b.name: True for b in pool.backends}

    def probe(backend: Backend) -> Deferred[None]:
        return succeed(None) if verdicts[backend.name] else fail(ProbeFailed("HTTP status 503, expected 200-399"))

    HealthMonitor(pool, config, clock, probe, random.Random(3)).startService()
    return clock, pool, verdicts


def test_ejection_outlasts_passing_probes() -> None:
    """Probes passing do not cut an ejection short: live traffic failed, and /healthz may lie."""
    clock, pool, _ = auto_monitored(2)
    b = pool.backends[0]
    fail_n(PassiveHealth(pool, clock), b, 5)
    clock.pump([0.1] * 99)
    assert not b.healthy and not b.active_down
    clock.advance(10.0 - clock.seconds())
    assert b.healthy


def test_ejection_end_does_not_revive_a_dead_backend() -> None:
    clock, pool, verdicts = auto_monitored(2, slow_start=4.0)
    b = pool.backends[0]
    verdicts[b.name] = False
    fail_n(PassiveHealth(pool, clock, slow_start=4.0), b, 5)
    clock.pump([0.1] * 105)  # the ejection has ended; probes have failed all along
    assert b.active_down and b.ejected_until is None and not b.healthy
    verdicts[b.name] = True
    clock.pump([0.1] * 10)
    assert not b.healthy  # one success; rise = 2
    clock.pump([0.1] * 15)
    assert b.healthy
    assert b.effective_weight < 2  # ramping up from a tenth
    clock.pump([0.1] * 45)
    assert b.effective_weight == 2.0


def test_passive_stop_returns_ejected_backends() -> None:
    clock, pool, health = passive()
    a, b = pool.backends[:2]
    fail_n(health, a, 5)
    fail_n(health, b, 5)
    b.active_down = True
    health.stopService()
    assert clock.getDelayedCalls() == []
    assert a.healthy and a.ejected_until is None
    assert not b.healthy  # active health still holds it out
