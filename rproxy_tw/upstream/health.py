"""
Backend health: active probes on a timer, and passive outlier detection from
live traffic.

Two verdicts, one rotation
==========================
Active and passive health each keep their own verdict on the L{Backend}:

  - C{backend.active_down}: set by L{HealthMonitor} after C{fall} failed probes
    in a row, cleared after C{rise} successes in a row.
  - C{backend.ejected_until}: set by L{PassiveHealth} when live traffic fails
    too often, cleared when the back-off period ends (a timer on the clock).

A backend is in rotation (C{backend.healthy}) only when neither says down.
Whichever clears its verdict last puts the backend back (L{BackendPool.mark_up},
then the slow-start ramp); clearing one verdict never overrides the other.
So a backend ejected for failing requests stays out for its whole back-off
even if probes of C{/healthz} keep passing (probes can pass while real traffic
fails), and an ejection that ends while probes still fail does not bring a dead
backend back.  Both go through L{BackendPool.mark_down}, which logs
C{backend {b} of pool {p} down: {why}} once, when the backend leaves rotation.

Under the supervisor (C{[server] workers = N}) the active verdict is decided
once for the group: the supervisor runs the L{HealthMonitor}s and each worker
applies the verdicts it is sent through a L{FollowedHealth} per pool, exactly
as it would its own; passive health stays each worker's own.

Scheduling and time
===================
Every timer is on the injected C{IReactorTime}: probe schedules, probe
timeouts, ejection back-offs and the slow-start ramp; tests drive them with
C{task.Clock}.  Each backend's probes start at a random offset in
C{[0, interval)} and then repeat every C{interval} +/- 10%, so that pools and
backends do not probe in lockstep.  A probe still running when the next is due
is not doubled: that turn is skipped, and the C{timeout} (which cancels the
probe's Deferred) bounds how long that can last.
"""

from __future__ import annotations

import random as _random
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, Callable, Union

import attrs
from hyperlink import URL
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import Interface, implementer

from ..config import HealthConfig, PassiveHealthConfig
from ..logs import observer as log_observer
from .pool import Backend, BackendPool

__all__ = [
    "FAILURE_KINDS",
    "FollowedHealth",
    "HTTPProbe",
    "HealthMonitor",
    "IProbe",
    "PassiveHealth",
    "ProbeFailed",
    "SlowStart",
    "TCPProbe",
    "VerdictBoard",
    "Verdicts",
    "monitor_for",
    "probe_for",
    "verdicts_of",
]


# ---------------------------------------------------------------------------
# Probes


class IProbe(Interface):
    """One kind of health check."""

    def probe(backend: Backend) -> Deferred[None]:
        """
        Check C{backend} once.

        @return: a Deferred that fires with L{None} when the backend is
            healthy and fails with the reason when it is not.  The monitor
            cancels it when the probe times out, so it should support
            cancellation (stop connecting, close the connection).
        """

    def forget(backend: Backend) -> None:
        """C{backend} left its pool: drop whatever was kept to probe it."""


ProbeLike = Union[IProbe, Callable[[Backend], "Deferred[None]"]]


class ProbeFailed(Exception):
    """The backend answered, but not as a healthy backend would; C{str()} says how."""


@implementer(IProbe)
class TCPProbe:
    """Healthy when a connection to the backend's endpoint opens; it is closed at once."""

    def probe(self, backend: Backend) -> Deferred[None]:
        d = connectProtocol(backend.endpoint, Protocol())

        def connected(protocol: Protocol) -> None:
            assert protocol.transport is not None
            protocol.transport.loseConnection()

        return d.addCallback(connected)

    def forget(self, backend: Backend) -> None:
        """Nothing is kept per backend: each probe opens a connection of its own."""


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """Connects as C{endpoint} does, with a quiet factory: a probe every few seconds must not log "Starting factory" each time."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: Any) -> Deferred[Any]:  # noqa: N803 - the interface's name
        protocolFactory.noisy = False
        return self._endpoint.connect(protocolFactory)


@implementer(IAgentEndpointFactory)
class _FixedEndpoint:
    """Sends every request of an Agent through one backend's own endpoint (unix:, tls:..., as configured)."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = _QuietEndpoint(endpoint)

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self._endpoint


class _BodyReader(Protocol):
    """
    Reads at most C{limit} bytes of a response body, stopping early once
    C{needle} is seen; C{done} fires with whether it was.  Bounded so that a
    health path that streams or is huge cannot hold a probe open.
    """

    def __init__(self, needle: bytes | None, limit: int) -> None:
        self.done: Deferred[bool] = Deferred(lambda d: self._stop())
        self._needle = needle
        self._limit = limit
        self._seen = 0
        self._tail = b""

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        data = data[: self._limit - self._seen]  # the needle must be within the limit
        self._seen += len(data)
        if self._needle is not None:
            window = self._tail + data
            if self._needle in window:
                self._finish(True)
                return
            keep = len(self._needle) - 1
            self._tail = window[-keep:] if keep else b""
        if self._seen >= self._limit:
            self._finish(False)

    def _finish(self, found: bool) -> None:
        self.done.callback(found)
        self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(False)
        else:
            self.done.errback(reason)


def _split_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split a client endpoint string into kind, positional and keyword
    arguments, honouring backslash escapes (C{tcp:host=\\:\\:1:port=80}).
    """
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            kwargs[key] = value
        else:
            args.append(part)
    return parts[0], args, kwargs


def _host_port(description: str) -> tuple[str, str, int] | None:
    """C{(kind, host, port)} of a C{tcp:} or C{tls:} endpoint string, else L{None}."""
    kind, args, kwargs = _split_endpoint(description)
    if kind not in ("tcp", "tls"):
        return None
    host = kwargs.get("host", args[0] if args else None)
    port = kwargs.get("port", args[1] if len(args) > 1 else None)
    if not host or not port or not port.isdigit():
        return None
    return kind, host, int(port)


def _no_cookie_jar() -> CookieJar:
    """Health checks must not pick up cookies and send them back (a sticky origin would pin them)."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


@implementer(IProbe)
class HTTPProbe:
    """
    An HTTP request to the backend (C{method} C{path}, optional C{Host});
    healthy when the status is in C{expect_status} and, if C{expect_body} is
    set, the body contains it.  Redirects are not followed: a 302 to a login
    page is an answer to judge, not a hop to take.

    C{tcp:HOST:PORT} backends are probed at C{http://HOST:PORT} through
    C{client} (treq's L{HTTPClient}, or a stub in tests).  Every other endpoint
    (C{tls:}, C{unix:}...) is probed through its own endpoint object with
    L{Agent.usingEndpointFactory}, so the probe uses exactly the transport,
    trust roots and SNI that traffic does; C{tls:} gets an C{https} URL, so the
    default C{Host} is right.

    @param reactor: used by the Agents built here (connect, timers); needs
        C{IReactorTCP} and C{IReactorTime}.
    @param client: a treq-like client for C{tcp:} backends; by default a treq
        L{HTTPClient} over a non-persistent Agent.
    @param endpoint_client: builds the client for one backend's endpoint.
    """

    BODY_LIMIT = 65536
    """Bytes of body read at most, looking for C{expect_body}."""

    def __init__(
        self,
        config: HealthConfig,
        reactor: IReactorTCP,
        client: Any = None,
        endpoint_client: Callable[[IStreamClientEndpoint], Any] | None = None,
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._client = client
        self._endpoint_client = endpoint_client if endpoint_client is not None else self._agent_client
        self._endpoint_clients: dict[Backend, Any] = {}
        self._needle = config.expect_body.encode("utf-8") if config.expect_body else None

    def _agent_client(self, endpoint: IStreamClientEndpoint) -> HTTPClient:
        pool = HTTPConnectionPool(self._reactor, persistent=False)
        agent = Agent.usingEndpointFactory(self._reactor, _FixedEndpoint(endpoint), pool=pool)
        return HTTPClient(agent, cookiejar=_no_cookie_jar())

    def target(self, backend: Backend) -> tuple[Any, str]:
        """The client to use and the URL to ask for C{backend}."""
        parsed = _host_port(backend.config.endpoint)
        if parsed is not None and parsed[0] == "tcp" and self._client is not None:
            _, host, port = parsed
            return self._client, URL(scheme="http", host=host, port=port).to_text() + self.config.path
        # Through the backend's own endpoint: a refused tcp: port fails at once
        # (a hostname lookup path would add 0.3 s), and tls:/unix: keep their options.
        client = self._endpoint_clients.get(backend)
        if client is None:
            client = self._endpoint_clients[backend] = self._endpoint_client(backend.endpoint)
        if parsed is not None:
            kind, host, port = parsed
            base = URL(scheme="http" if kind == "tcp" else "https", host=host, port=port)
        else:
            base = URL(scheme="http", host=self.config.host or "localhost")
        return client, base.to_text() + self.config.path

    def probe(self, backend: Backend) -> Deferred[None]:
        client, url = self.target(backend)
        headers = {"Host": [self.config.host]} if self.config.host else None
        d = client.request(
            self.config.method,
            url,
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
            reactor=self._reactor,
        )
        return d.addCallback(self._check)

    def _check(self, response: IResponse) -> Deferred[None]:
        reader = _BodyReader(self._needle, self.BODY_LIMIT)
        response.deliverBody(reader)
        return reader.done.addCallback(self._judge, response.code)

    def forget(self, backend: Backend) -> None:
        self._endpoint_clients.pop(backend, None)

    def _judge(self, found: bool, code: int) -> None:
        low, high = self.config.expect_status
        if not low <= code <= high:
            raise ProbeFailed(f"HTTP status {code}, expected {low}-{high}")
        if self._needle is not None and not found:
            raise ProbeFailed(f"response body does not contain {self.config.expect_body!r}")


def probe_for(config: HealthConfig, reactor: IReactorTCP, client: Any = None) -> IProbe:
    """The probe a C{[pool.NAME.health]} section asks for."""
    if config.type == "tcp":
        return TCPProbe()
    return HTTPProbe(config, reactor, client=client)


def _describe(failure: Failure) -> str:
    """One line saying why a probe failed, for the log and the status page."""
    if failure.check(ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed) and failure.value.reasons:
        # These wrap the real cause in a list of Failures.
        return _describe(failure.value.reasons[0])
    if failure.check(ProbeFailed):
        return failure.getErrorMessage()
    name = failure.type.__name__ if failure.type is not None else "error"
    message = failure.getErrorMessage()
    return f"{name}: {message}" if message and message != name else name


# ---------------------------------------------------------------------------
# Slow start and the return to rotation


class SlowStart:
    """
    Ramps a returning backend's C{effective_weight} linearly from a tenth of
    its configured weight to all of it over C{duration} seconds, so that a
    backend with cold caches or a fresh JIT is not handed its full share at
    once.  A zero duration gives the full weight at once.
    """

    STEPS = 20
    """Weight updates per ramp (each at least 0.1 s apart)."""

    FLOOR = 0.1
    """The share of its weight a backend starts its ramp with."""

    def __init__(self, clock: IReactorTime, duration: float) -> None:
        self._clock = clock
        self.duration = duration
        self._ramps: dict[Backend, IDelayedCall] = {}

    def begin(self, backend: Backend) -> None:
        self.cancel(backend)
        full = float(backend.config.weight)
        if self.duration <= 0:
            backend.effective_weight = full
            return
        start = self._clock.seconds()
        step = max(self.duration / self.STEPS, 0.1)

        def tick() -> None:
            self._ramps.pop(backend, None)
            if not backend.healthy:
                # It left again; its next return starts a new ramp.
                return
            elapsed = self._clock.seconds() - start
            if elapsed >= self.duration - 1e-9:
                backend.effective_weight = full
                return
            backend.effective_weight = full * (self.FLOOR + (1 - self.FLOOR) * elapsed / self.duration)
            self._ramps[backend] = self._clock.callLater(min(step, self.duration - elapsed), tick)

        backend.effective_weight = full * self.FLOOR
        self._ramps[backend] = self._clock.callLater(step, tick)

    def cancel(self, backend: Backend) -> None:
        """Stop ramping C{backend} (it left rotation), leaving its weight as it is."""
        call = self._ramps.pop(backend, None)
        if call is not None and call.active():
            call.cancel()

    def stop(self) -> None:
        """Stop every ramp and give each backend its full weight (the service is stopping)."""
        ramps, self._ramps = self._ramps, {}
        for backend, call in ramps.items():
            if call.active():
                call.cancel()
            backend.effective_weight = float(backend.config.weight)


def _return_to_rotation(pool: BackendPool, backend: Backend, slow_start: SlowStart) -> None:
    """Put C{backend} back only if neither active nor passive health holds it out."""
    if backend.active_down or backend.ejected_until is not None or backend.healthy:
        return
    pool.mark_up(backend)
    slow_start.begin(backend)


# ---------------------------------------------------------------------------
# Active health


def _hold_down(pool: BackendPool, backend: Backend, slow_start: SlowStart, why: str) -> None:
    """Active health's verdict turns to down: out of rotation (the pool logs and publishes it once)."""
    backend.active_down = True
    slow_start.cancel(backend)
    pool.mark_down(backend, why)


def _release(pool: BackendPool, backend: Backend, slow_start: SlowStart) -> None:
    """Active health's verdict turns to up: back in rotation unless passive health still holds it out."""
    backend.active_down = False
    _return_to_rotation(pool, backend, slow_start)


@attrs.define(eq=False)
class _ProbeState:
    timer: IDelayedCall | None = None
    running: Deferred[None] | None = None
    successes: int = 0
    failures: int = 0
    skipped: int = 0


class HealthMonitor(Service):
    """
    Probes every backend of one pool on a jittered timer and moves backends
    out of rotation after C{fall} failures in a row and back after C{rise}
    successes in a row (see the module docstring for how this combines with
    passive health).

    @param probe: an L{IProbe}, or a callable taking a L{Backend} and
        returning a Deferred (see L{IProbe.probe}).
    @param random: the jitter's source; inject a seeded C{random.Random} in tests.
    """

    _log = Logger(observer=log_observer)

    JITTER = 0.1
    """Each interval is stretched or shrunk by up to this share."""

    def __init__(
        self,
        pool: BackendPool,
        config: HealthConfig,
        clock: IReactorTime,
        probe: ProbeLike,
        random: _random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self.name = f"health:{pool.name}"
        self._clock = clock
        self._prober: IProbe | None = probe if IProbe.providedBy(probe) else None  # type: ignore[assignment]
        self._probe: Callable[[Backend], Deferred[None]] = probe.probe if IProbe.providedBy(probe) else probe  # type: ignore[union-attr,assignment]
        self._random = random if random is not None else _random.Random()
        self.slow_start = SlowStart(clock, config.slow_start)
        self._states: dict[Backend, _ProbeState] = {}

    def startService(self) -> None:
        super().startService()
        for backend in self.pool.backends:
            state = self._states[backend] = _ProbeState()
            state.timer = self._clock.callLater(self._random.random() * self.config.interval, self._due, backend)

    def stopService(self) -> None:
        """Cancel every timer and in-flight probe; their outcome no longer changes any state."""
        super().stopService()
        states, self._states = self._states, {}
        for state in states.values():
            if state.timer is not None and state.timer.active():
                state.timer.cancel()
            if state.running is not None:
                state.running.cancel()
        self.slow_start.stop()

    def adopt(self, pool: BackendPool) -> None:
        """
        A reload kept this pool's health check as it was: go on probing the
        backends of C{pool} (the new pool object), keeping the probe state of
        those that stay; removed backends stop being probed, added ones start
        at a random offset.
        """
        self.pool = pool
        if not self.running:
            return
        keep = set(pool.backends)
        for backend in [b for b in self._states if b not in keep]:
            state = self._states.pop(backend)
            if state.timer is not None and state.timer.active():
                state.timer.cancel()
            if state.running is not None:
                state.running.cancel()
            self.slow_start.cancel(backend)
            if self._prober is not None:
                self._prober.forget(backend)
        for backend in pool.backends:
            if backend not in self._states:
                state = self._states[backend] = _ProbeState()
                state.timer = self._clock.callLater(self._random.random() * self.config.interval, self._due, backend)

    def skipped(self, backend: Backend) -> int:
        """How many turns were skipped because the previous probe of C{backend} was still running."""
        state = self._states.get(backend)
        return state.skipped if state is not None else 0

    def _next_delay(self) -> float:
        return self.config.interval * (1 + self._random.uniform(-self.JITTER, self.JITTER))

    def _due(self, backend: Backend) -> None:
        state = self._states.get(backend)
        if state is None:
            return
        state.timer = self._clock.callLater(self._next_delay(), self._due, backend)
        if state.running is not None:
            state.skipped += 1
            self._log.debug(
                "health check of backend {backend} of pool {pool} still running; skipping a turn",
                backend=backend.name,
                pool=self.pool.name,
            )
            return
        self._start(backend, state)

    def _start(self, backend: Backend, state: _ProbeState) -> None:
        timed_out = False
        d = maybeDeferred(self._probe, backend)
        state.running = d

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timeout = self._clock.callLater(self.config.timeout, expire)

        def finished(result: object) -> None:
            if timeout.active():
                timeout.cancel()
            if self._states.get(backend) is not state:
                return  # stopped (or restarted) meanwhile
            state.running = None
            if isinstance(result, Failure):
                why = f"health check timed out after {self.config.timeout:g}s" if timed_out else _describe(result)
                self._failed(backend, state, why)
            else:
                self._succeeded(backend, state)

        d.addBoth(finished)

    def _failed(self, backend: Backend, state: _ProbeState, why: str) -> None:
        state.successes = 0
        state.failures += 1
        backend.last_error = why
        if not backend.active_down and state.failures >= self.config.fall:
            _hold_down(self.pool, backend, self.slow_start, why)
        elif not backend.active_down:
            # Failures short of `fall` are worth a line; a backend already down is not
            # re-announced every interval.
            self._log.debug(
                "health check of backend {backend} of pool {pool} failed ({failures} in a row): {why}",
                backend=backend.name,
                pool=self.pool.name,
                failures=state.failures,
                why=why,
            )

    def _succeeded(self, backend: Backend, state: _ProbeState) -> None:
        state.failures = 0
        state.successes += 1
        if backend.active_down and state.successes >= self.config.rise:
            _release(self.pool, backend, self.slow_start)


def monitor_for(
    pool: BackendPool,
    reactor: IReactorTCP,
    client: Any = None,
    random: _random.Random | None = None,
) -> HealthMonitor | None:
    """
    The health monitor a pool's config asks for, or L{None} when it has no
    C{[pool.NAME.health]} section.  C{reactor} is both the clock and what
    probes connect with.
    """
    config = pool.config.health
    if config is None:
        return None
    return HealthMonitor(pool, config, reactor, probe_for(config, reactor, client), random=random)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Active health decided by another process


Verdicts = dict[str, dict[str, str]]
"""The backends active health holds down: pool name -> backend endpoint -> why."""


def verdicts_of(pools: Any) -> Verdicts:
    """What the monitors of C{pools} (L{BackendPool}s) hold down now, with each backend's last error."""
    return {pool.name: down for pool in pools
            if (down := {b.name: b.last_error or "down" for b in pool.backends if b.active_down})}


class VerdictBoard:
    """
    Active health verdicts a process is given instead of probing itself: a
    worker under the supervisor, whose monitors probe once for the whole group
    (L{rproxy_tw.workers}).  It keeps the latest table and applies it to the
    pools of its L{FollowedHealth} services, when the table changes and when a
    reload brings new pools, so a backend the group holds down is down in
    every pool of this process, whatever the order of reload and verdict.

    L{follower_for} takes the place of L{monitor_for}.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.down: Verdicts = {}
        self._followers: list[FollowedHealth] = []

    def follower_for(self, pool: BackendPool, reactor: Any = None) -> FollowedHealth | None:
        """The follower of a pool with a C{[pool.NAME.health]} section, or L{None}."""
        config = pool.config.health
        if config is None:
            return None
        return FollowedHealth(self, pool, config, self.clock)

    def update(self, down: Verdicts) -> None:
        """The group's verdicts now: applied to every running follower's pool."""
        self.down = down
        for follower in list(self._followers):
            follower.apply()


class FollowedHealth(Service):
    """
    Active health of one pool as a L{VerdictBoard} says: a backend on the
    board is held down as if this process's own monitor had seen C{fall}
    probes fail (same log line, same event, passive health unchanged), and
    one that leaves the board comes back through the slow-start ramp.
    """

    def __init__(self, board: VerdictBoard, pool: BackendPool, config: HealthConfig, clock: IReactorTime) -> None:
        self.board = board
        self.pool = pool
        self.config = config
        self.name = f"health:{pool.name}"
        self.slow_start = SlowStart(clock, config.slow_start)

    def startService(self) -> None:
        super().startService()
        self.board._followers.append(self)
        self.apply()

    def stopService(self) -> None:
        super().stopService()
        if self in self.board._followers:
            self.board._followers.remove(self)
        self.slow_start.stop()

    def adopt(self, pool: BackendPool) -> None:
        """A reload kept this pool's health check: follow the board on C{pool} (the new pool object)."""
        self.pool = pool
        if self.running:
            self.apply()

    def apply(self) -> None:
        down = self.board.down.get(self.pool.name, {})
        for backend in self.pool.backends:
            why = down.get(backend.name)
            if why is not None and not backend.active_down:
                _hold_down(self.pool, backend, self.slow_start, why)
            elif why is None and backend.active_down:
                _release(self.pool, backend, self.slow_start)


# ---------------------------------------------------------------------------
# Passive health


FAILURE_KINDS = ("connect", "reset", "timeout", "5xx")
"""What the front ends report: connect refused/failed, connection reset mid-exchange, response timeout, a 5xx answer."""


class PassiveHealth(Service):
    """
    Outlier detection for one pool, fed by the front ends as requests and
    connections finish: C{consecutive_failures} failures in a row eject a
    backend for a back-off (C{base_ejection}, doubling on each repeat up to
    C{max_ejection}, starting over after C{max_ejection} seconds without an
    ejection) without waiting for the next probe.

    Ejection is refused when it would leave more than C{max_ejection_share} of
    the pool's backends out of rotation for health reasons; backends that
    active health already holds out count too, so passive heuristics can never
    finish off a pool that real failures have already thinned (a pool of one is
    never ejected).

    Reports work whether or not the service is running; stopping it cancels
    the back-off timers and returns the ejected backends (unless active health
    holds them out).

    @param slow_start: seconds of weight ramp when an ejection ends (pass the
        pool's C{health.slow_start} to match the active monitor).
    """

    _log = Logger(observer=log_observer)

    def __init__(
        self,
        pool: BackendPool,
        clock: IReactorTime,
        config: PassiveHealthConfig = PassiveHealthConfig(),
        slow_start: float = 0.0,
    ) -> None:
        self.pool = pool
        self.config = config
        self.name = f"passive:{pool.name}"
        self._clock = clock
        self.slow_start = SlowStart(clock, slow_start)
        self._failures: dict[Backend, int] = {}
        self._strikes: dict[Backend, int] = {}
        self._returned_at: dict[Backend, float] = {}
        self._timers: dict[Backend, IDelayedCall] = {}
        self._refusal_logged: set[Backend] = set()

    def adopt(self, pool: BackendPool, config: PassiveHealthConfig, slow_start: float) -> None:
        """
        A reload kept passive health on for this pool: watch C{pool} (the new
        pool object) with C{config}, keeping the streaks, strikes and
        ejections of the backends that stay (an ejected one stays out for
        the rest of its back-off).  Removed backends are forgotten.
        """
        self.pool = pool
        self.config = config
        self.slow_start.duration = slow_start
        keep = set(pool.backends)
        for table in (self._failures, self._strikes, self._returned_at):
            for backend in [b for b in table if b not in keep]:
                del table[backend]
        self._refusal_logged &= keep
        for backend in [b for b in self._timers if b not in keep]:
            call = self._timers.pop(backend)
            if call.active():
                call.cancel()
            self.slow_start.cancel(backend)

    def report_success(self, backend: Backend) -> None:
        """A request or connection to C{backend} completed normally: its failure streak ends."""
        self._failures.pop(backend, None)
        self._refusal_logged.discard(backend)

    def report_failure(self, backend: Backend, kind: str) -> bool:
        """
        A request or connection to C{backend} failed.

        @param kind: one of L{FAILURE_KINDS}.
        @return: whether this report ejected the backend.
        @raise ValueError: for an unknown C{kind}.
        """
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}, expected one of {', '.join(FAILURE_KINDS)}")
        if not self.config.enabled or (kind == "5xx" and not self.config.count_5xx):
            return False
        if not backend.healthy:
            # Already out (ejected, or active health says down): late reports
            # from requests that were in flight say nothing new.
            return False
        failures = self._failures[backend] = self._failures.get(backend, 0) + 1
        if failures < self.config.consecutive_failures:
            return False
        if not self._may_eject():
            if backend not in self._refusal_logged:
                self._refusal_logged.add(backend)
                self._log.warn(
                    "backend {backend} of pool {pool} not ejected after {failures} failures: "
                    "max_ejection_share {share} of the pool is already out",
                    backend=backend.name,
                    pool=self.pool.name,
                    failures=failures,
                    share=self.config.max_ejection_share,
                )
            return False
        self._eject(backend, kind, failures)
        return True

    def _strikes_now(self, backend: Backend) -> int:
        """Earlier ejections that still count: none once it has stayed in for C{max_ejection} seconds."""
        returned = self._returned_at.get(backend)
        if returned is not None and self._clock.seconds() - returned >= self.config.max_ejection:
            return 0
        return self._strikes.get(backend, 0)

    def ejection_period(self, backend: Backend) -> float:
        """How long C{backend} would be ejected for if it were ejected now."""
        return min(self.config.base_ejection * 2 ** self._strikes_now(backend), self.config.max_ejection)

    def _may_eject(self) -> bool:
        total = len(self.pool.backends)
        out = sum(1 for b in self.pool.backends if not b.healthy)
        return out + 1 <= self.config.max_ejection_share * total + 1e-9

    def _eject(self, backend: Backend, kind: str, failures: int) -> None:
        period = self.ejection_period(backend)
        # Capped: past the cap the period is max_ejection anyway, and 2 ** n stays a float.
        self._strikes[backend] = min(self._strikes_now(backend) + 1, 64)
        self._failures.pop(backend, None)
        self._refusal_logged.discard(backend)
        backend.ejected_until = self._clock.seconds() + period
        self.slow_start.cancel(backend)
        self.pool.mark_down(
            backend, f"ejected for {period:g}s after {failures} failures in a row (last: {kind})"
        )
        self._timers[backend] = self._clock.callLater(period, self._return, backend)

    def _return(self, backend: Backend) -> None:
        self._timers.pop(backend, None)
        backend.ejected_until = None
        self._returned_at[backend] = self._clock.seconds()
        _return_to_rotation(self.pool, backend, self.slow_start)

    def stopService(self) -> None:
        super().stopService()
        timers, self._timers = self._timers, {}
        for backend, call in timers.items():
            if call.active():
                call.cancel()
            backend.ejected_until = None
            _return_to_rotation(self.pool, backend, self.slow_start)
        self.slow_start.stop()
