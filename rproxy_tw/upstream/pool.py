"""
Backend pools: the runtime state of each backend and the choice of one for a
request or a connection.

A L{BackendPool} is shared by the HTTP and TCP front ends.  It knows which
backends are in rotation (healthy, not draining; backups only when no primary
is), asks its balancer for one, and keeps per-backend state that the health
monitor, metrics and a status page read.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from ..config import BackendConfig, PoolConfig
from ..logs import observer as log_observer

__all__ = ["Backend", "BackendPool", "IBackendPool", "IBalancer", "RoundRobinBalancer"]

Headers = Sequence[tuple[bytes, bytes]]


@attrs.define(eq=False)
class Backend:
    """
    One backend of a pool and what is known of it right now.

    Mutable on purpose: health checks, passive failure detection and
    in-flight counting all update it in place, and everything that reads it
    (balancers, metrics, status page) sees the same object.

    C{healthy} is C{not active_down and ejected_until is None}: the health
    module keeps the two verdicts apart so that neither can bring back a
    backend the other holds out (see L{rproxy_tw.upstream.health}).
    """

    config: BackendConfig
    pool_name: str
    endpoint: IStreamClientEndpoint
    healthy: bool = True
    draining: bool = False
    since: float = 0.0
    last_error: str | None = None
    inflight: int = 0
    total: int = 0
    failures: int = 0
    effective_weight: float = 0.0
    """The weight balancers use (lower than C{config.weight} during slow start)."""
    current_weight: float = 0.0
    """Smooth weighted round robin's running score."""
    last_warned: float = -1e9
    """When a failure of this backend was last logged (failures are logged at most once a second)."""
    unwarned: int = 0
    """Failures since then that were not logged."""
    idle: list = attrs.field(factory=list)
    """Idle keep-alive connections to this backend, most recently used last."""
    active_down: bool = False
    """The active health monitor's verdict: C{fall} probes failed and C{rise} have not yet passed."""
    ejected_until: float | None = None
    """When passive health (outlier detection) returns it, or L{None} if not ejected."""

    name: str = attrs.field(init=False)
    """The backend's endpoint (backends a reload keeps are matched by it, so it never changes)."""

    def __attrs_post_init__(self) -> None:
        self.name = self.config.endpoint  # an attribute, not a property: every finished request's event reads it
        self.draining = self.config.drain
        self.effective_weight = float(self.config.weight)

    @property
    def in_rotation(self) -> bool:
        return self.healthy and not self.draining

    def __repr__(self) -> str:
        return f"<Backend {self.pool_name}/{self.config.endpoint} healthy={self.healthy} inflight={self.inflight}>"


class IBalancer(Interface):
    """A balancing rule: picks one backend among those in rotation."""

    def pick(candidates: Sequence[Backend], client_ip: str, headers: Headers) -> Backend | None:
        """
        Choose one of C{candidates} (never empty) for a request from
        C{client_ip} with request C{headers} (raw, as received; empty for TCP).
        """


class IStickyBalancer(IBalancer):
    """
    A balancer that pins a client to a backend with a cookie.  The HTTP layer
    asks it, after picking, whether to send C{Set-Cookie} with the response.
    """

    cookie_name = Attribute("The cookie's name (C{str}), from C{cookie:NAME}.")

    def cookie_value(backend: Backend) -> str:
        """A stable opaque id of C{backend}, safe to put in a cookie."""

    def needs_cookie(headers: Headers, backend: Backend) -> bool:
        """Whether a response to a request with C{headers} served by C{backend} should set the cookie."""

    def set_cookie_header(backend: Backend, secure: bool = False) -> bytes:
        """The C{Set-Cookie} header value that pins the client to C{backend}."""


class IBackendPool(Interface):
    name = Attribute("The pool's name in the config.")
    backends = Attribute("All L{Backend}s, primaries and backups.")

    def pick(client_ip: str, headers: Headers = (), exclude: Iterable[Backend] = ()) -> Backend | None:
        """The backend to use, or L{None} when none is in rotation."""


@implementer(IBalancer)
class RoundRobinBalancer:
    """
    Smooth weighted round robin, as nginx does it: each pick adds every
    candidate's weight to its score, takes the highest, and subtracts the total
    from the winner, which interleaves heavy and light backends evenly.
    """

    def pick(self, candidates: Sequence[Backend], client_ip: str, headers: Headers) -> Backend | None:
        if len(candidates) == 1:
            return candidates[0]
        total = 0.0
        best = None
        for b in candidates:
            b.current_weight += b.effective_weight
            total += b.effective_weight
            if best is None or b.current_weight > best.current_weight:
                best = b
        assert best is not None
        best.current_weight -= total
        return best


BalancerFactory = Callable[[str], IBalancer]


def default_balancer_factory(rule: str) -> IBalancer:
    """Build the balancer for a pool's C{balance} rule."""
    from .balancing import balancer_for

    return balancer_for(rule)


@implementer(IBackendPool)
class BackendPool:
    """The backends of one C{[pool.NAME]} and the rule that chooses among them."""

    _log = Logger(observer=log_observer)

    def __init__(
        self,
        config: PoolConfig,
        clock: IReactorTime,
        endpoint_for: Callable[[str], IStreamClientEndpoint],
        balancer_factory: BalancerFactory = default_balancer_factory,
        reuse: Mapping[str, Backend] | None = None,
        events: Any = None,
    ) -> None:
        """
        @param reuse: backends of the pool this one replaces (a reload), by
            endpoint string: a backend listed in both is the same L{Backend}
            object, with its health, counters and idle connections.  Nothing
            of it changes until L{take_over}.
        @param events: the L{rproxy_tw.events.EventBus} told when a backend
            enters or leaves rotation.
        """
        self.events = events
        self.config = config
        self.name = config.name
        self.clock = clock
        now = clock.seconds()
        reuse = reuse or {}
        self.backends: list[Backend] = [
            reuse[bc.endpoint] if bc.endpoint in reuse
            else Backend(config=bc, pool_name=config.name, endpoint=endpoint_for(bc.endpoint), since=now)
            for bc in config.backends
        ]
        self._configs = [(b, bc) for b, bc in zip(self.backends, config.backends) if b.config is not bc]
        self.balancer = balancer_factory(config.balance)
        self.sticky = IStickyBalancer.providedBy(self.balancer)
        """Whether responses may need the balancer's Set-Cookie."""

    def take_over(self) -> None:
        """
        This pool replaces the one whose backends it reuses: give them their
        new settings.  A changed C{weight} applies at once (a slow-start ramp
        in progress ends), a changed C{drain} does; one set through
        L{set_draining} stays as the operator put it.
        """
        configs, self._configs = self._configs, []
        for backend, bc in configs:
            old = backend.config
            backend.config = bc
            if bc.drain != old.drain:
                backend.draining = bc.drain
            if bc.weight != old.weight:
                backend.effective_weight = float(bc.weight)
                backend.current_weight = 0.0

    def candidates(self, exclude: Iterable[Backend] = ()) -> list[Backend]:
        """Backends in rotation: healthy primaries, or healthy backups when no primary is."""
        excluded = set(exclude) if exclude else ()
        primaries = [b for b in self.backends if not b.config.backup and b.in_rotation and b not in excluded]
        if primaries:
            return primaries
        return [b for b in self.backends if b.config.backup and b.in_rotation and b not in excluded]

    def pick(self, client_ip: str, headers: Headers = (), exclude: Iterable[Backend] = ()) -> Backend | None:
        backends = self.backends
        if len(backends) == 1 and not exclude:
            only = backends[0]
            return only if only.healthy and not only.draining else None
        candidates = self.candidates(exclude)
        if not candidates:
            return None
        return self.balancer.pick(candidates, client_ip, headers)

    def backend(self, endpoint: str) -> Backend:
        """The backend whose endpoint string is C{endpoint}."""
        for b in self.backends:
            if b.config.endpoint == endpoint:
                return b
        raise KeyError(endpoint)

    def mark_down(self, backend: Backend, why: str) -> None:
        backend.last_error = why
        if backend.healthy:
            backend.healthy = False
            backend.since = self.clock.seconds()
            self._log.warn("backend {backend} of pool {pool} down: {why}", backend=backend.name, pool=self.name, why=why)
            self._changed(backend, why)

    def mark_up(self, backend: Backend) -> None:
        if not backend.healthy:
            backend.healthy = True
            backend.since = self.clock.seconds()
            self._log.info("backend {backend} of pool {pool} up", backend=backend.name, pool=self.name)
            self._changed(backend, "up")

    def set_draining(self, endpoint: str, draining: bool = True) -> Backend:
        """
        Put a backend into drain (no new requests or connections; those in
        flight finish) or take it out again.
        """
        backend = self.backend(endpoint)
        if backend.draining != draining:
            backend.draining = draining
            self._log.info(
                "backend {backend} of pool {pool} {state}",
                backend=backend.name,
                pool=self.name,
                state="draining" if draining else "back in rotation",
            )
            self._changed(backend, "draining" if draining else "drain ended")
        return backend

    def _changed(self, backend: Backend, reason: str) -> None:
        events = self.events
        if events is not None and events.wanted:
            from ..events import BackendStateChanged

            events.publish(BackendStateChanged(self.name, backend.name, backend.in_rotation, reason))
