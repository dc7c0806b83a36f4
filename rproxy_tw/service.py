"""
The proxy as a Twisted service tree, built from a L{ProxyConfig} and an
injected reactor.

L{ProxyRuntime} is everything derived from one config (pools, connection
pools, the Resource tree, settings); listeners read it per connection and per
request, so a reload can build a new runtime and swap it in.
L{ProxyService} is the C{MultiService} an application adds to its own
service tree, or that C{twistd rproxy} runs.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from .accesslog import make_access_log
from .config import ConfigError, ProxyConfig, load_config, not_enforced_warnings
from .headers import ForwardingInfo, is_trusted
from .http.exchange import ExchangeSettings, IDownstream, ProxyExchange, RequestRejected
from .http.request import read_request_head
from .http.local import LocalResourceExchange
from .http.server import HTTPProxyFactory, http_date
from .http.upstream import UpstreamConnector
from .listener import IListenerFactory
from .logs import observer as log_observer, set_level as set_log_level
from .events import EventBus, ReloadApplied, ReloadRefused
from .pipeline import (
    FilterChain,
    HeaderRules,
    IRequestFilter,
    IResponseFilter,
    RoutePlan,
    StickyCookie,
    header_rule_set,
)
from .request_id import RequestIdFilter
from .routing import ErrorPage, HostRouter, ProxyRoute, build_router
from .scrub.connections import ConnectionGuard
from .scrub.setup import Scrubbing
from .tls import ICertificateReload
from .transport import ip_of
from .endpoint_string import behind_proxy_header
from .transport.proxy_header import HEADER_TIMEOUT, ProxyHeaderEndpoint
from .transport.tcp_server import server_endpoint
from .upstream.health import FollowedHealth, HealthMonitor, PassiveHealth, monitor_for
from .upstream.pool import BackendPool
from .upstream.retry import RetryBudget

__all__ = ["ListenError", "ProxyRuntime", "ProxyService", "ReloadSummary", "service_from_file"]


class ProxyRuntime:
    """
    Everything one configuration gives: pools, connectors, routes, settings.

    A reload builds a new runtime from the new config and the one serving
    (C{previous}): a backend that stays (same pool, same endpoint string, the
    pool's TLS client settings unchanged) is the same L{Backend} object, with
    its health, counters and idle connections; a pool whose health check is
    unchanged keeps its monitor, one with passive health keeps it.  Nothing
    of C{previous} changes until L{commit}, so a reload refused after this
    leaves it serving as it was.  Exchanges in flight hold the pools,
    connectors and settings they started with.
    """

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any,
        endpoint_for: Callable[[str], Any] | None = None,
        access_log: Any = "config",
        previous: ProxyRuntime | None = None,
        active_health: Callable[[BackendPool, Any], Any] = monitor_for,
    ) -> None:
        """
        @param active_health: the service that gives a pool with a C{[health]}
            section its active verdicts (L{monitor_for}: this process probes;
            a worker under the supervisor follows the group's verdicts).
        """
        self.config = config
        self.reactor = reactor
        self.endpoint_for = endpoint_for
        self.acme_challenges: Any = previous.acme_challenges if previous is not None else None
        """The ACME challenges pending (L{rproxy_tw.acme.ChallengeResponder}) when a TLS profile uses C{acme}."""
        self.events = previous.events if previous is not None else EventBus()
        """
        What happened (requests, tunnels, backends, reloads...): the access
        log observes it, and so can an application.  One bus for the
        service's whole life: its observers stay subscribed across reloads.
        """
        old_pools = previous.pools if previous is not None else {}
        self.pools: dict[str, BackendPool] = {}
        for name, pc in config.pools.items():
            old = old_pools.get(name)
            reuse = {b.config.endpoint: b for b in old.backends} if old is not None and \
                _same_endpoints(old.config, pc) else None
            self.pools[name] = BackendPool(pc, reactor, endpoint_for or _endpoint_factory(reactor, pc, name),
                                           reuse=reuse, events=self.events)
        self.connectors: dict[str, UpstreamConnector] = {
            name: UpstreamConnector(reactor, pc.keepalive, pc.keepalive_timeout, pc.connect_timeout,
                                    span=min(pc.keepalive_timeout, pc.response_timeout, pc.idle_timeout),
                                    limits=config.limits)
            for name, pc in config.pools.items()
        }
        via = config.server.via.encode("ascii")
        server_header = config.server.server_header.encode("ascii")
        self.passive: dict[str, PassiveHealth] = {}
        self.monitors: dict[str, HealthMonitor | FollowedHealth] = {}
        self._adopt: list[Callable[[], None]] = []
        """What L{commit} does to carried-over monitors and passive health."""
        for name, pc in config.pools.items():
            pool = self.pools[name]
            slow_start = pc.health.slow_start if pc.health else 0.0
            if pc.passive.enabled:
                passive_config = pc.passive
                carried = previous.passive.get(name) if previous is not None else None
                if carried is not None:
                    self.passive[name] = carried
                    self._adopt.append(lambda p=carried, pool=pool, c=passive_config, s=slow_start:
                                       p.adopt(pool, c, s))
                else:
                    self.passive[name] = PassiveHealth(pool, reactor, passive_config, slow_start=slow_start)
            old_monitor = previous.monitors.get(name) if previous is not None else None
            if old_monitor is not None and old_monitor.config == pc.health:
                self.monitors[name] = old_monitor
                self._adopt.append(lambda m=old_monitor, pool=pool: m.adopt(pool))
            else:
                monitor = active_health(pool, reactor)
                if monitor is not None:
                    self.monitors[name] = monitor
        self.exchange_settings: dict[str, ExchangeSettings] = {
            name: ExchangeSettings(
                via,
                server_header,
                pc.response_timeout,
                pc.idle_timeout,
                pc.retries,
                pc.retry_on_status,
                pc.replay_buffer,
                RetryBudget(reactor, pc.retry_budget),
                self.passive.get(name),
            )
            for name, pc in config.pools.items()
        }
        header = config.server.request_id_header
        self.request_ids = RequestIdFilter(header) if header else None
        """The first request filter of every route: gives each request its id (L{rproxy_tw.request_id})."""
        self.cache = _shared_cache(config, reactor, self.events, previous)
        """The shared HTTP cache of the routes with C{cache = true} (an L{rproxy_tw.cache.HTTPCache}), or None."""
        self.scrubbing = Scrubbing(config, reactor, self.events, previous.scrubbing if previous is not None else None)
        """IP policy, rate limits, the WAF and the in-flight cap: filters put first on every route."""
        self.router: HostRouter = build_router(config.routes, self.render_route)
        for route in self.router.routes():
            if isinstance(route, ProxyRoute):
                route.plan = self._plan(route)
        self.site = Site(self.router)
        self.site.displayTracebacks = False
        if access_log == "config":
            server, old_server = config.server, previous.config.server if previous is not None else None
            if old_server is not None and (server.access_log, server.access_log_format) == \
                    (old_server.access_log, old_server.access_log_format):
                access_log = previous.access_log  # type: ignore[union-attr]
            else:
                try:
                    access_log = make_access_log(reactor, server.access_log, server.access_log_format)
                except OSError as e:
                    raise ConfigError(config.source, "server.access_log",
                                      f"cannot open {server.access_log!r}: {e.strerror or e}") from None
        self.access_log = access_log
        if previous is None and access_log is not None:
            self.events.subscribe(access_log)

    def add_filter(self, step: Any, host: str | None = None, path: str | None = None) -> None:
        """Append C{step} to the filter chain of every route, or of the route with this host and path."""
        added = FilterChain(
            request=(step,) if IRequestFilter.providedBy(step) else (),
            response=(step,) if IResponseFilter.providedBy(step) else (),
        )
        if not added:
            raise TypeError(f"{step!r} provides neither IRequestFilter nor IResponseFilter")
        for route in self.router.routes():
            if not isinstance(route, ProxyRoute) or route.plan is None:
                continue
            if (host is not None and route.config.host != host) or (path is not None and route.config.path != path):
                continue
            chain = route.plan.chain
            if self.cache is not None and chain.request[-1:] == (self.cache,):
                # The cache answers hits without going further: it stays the last request filter.
                chain = FilterChain(chain.request[:-1], chain.response) + added + FilterChain((self.cache,))
            else:
                chain = chain + added
            route.plan = attrs.evolve(route.plan, chain=chain)

    def _plan(self, route: ProxyRoute) -> RoutePlan:
        """What an exchange on C{route} needs, found once: its pool's objects and its own filters."""
        rc = route.config
        pool = self.pools[rc.pool]
        rules = HeaderRules(header_rule_set(rc.request_headers), header_rule_set(rc.response_headers))
        # Request ids first (every answer, a refusal too, carries one), then scrubbing: it judges
        # the request as the client sent it, before any rule rewrites it.
        request_filters, response_filters = self.scrubbing.filters_for(rc, f"{rc.host or '*'}{rc.path}")
        if self.request_ids is not None:
            request_filters = (self.request_ids, *request_filters)
        if rules.request:
            request_filters += (rules,)
        if pool.sticky:
            response_filters += (StickyCookie(pool.balancer),)
        if rules.response:
            response_filters += (rules,)
        # The first response filter sees the origin's response first: compress, then store the
        # compressed variant, then the per-client steps (sticky cookie, header rules) on every answer.
        closest: tuple[Any, ...] = ()
        compress = rc.compress if rc.compress is not None else self.config.cache.compress
        if compress:
            from .compress import Compression

            closest += (Compression(compress),)
        if rc.cache and self.cache is not None:
            closest += (self.cache,)
            request_filters += (self.cache,)
        response_filters = closest + response_filters
        return RoutePlan(
            route=route,
            name=f"{rc.host or '*'}{rc.path}",
            pool=pool,
            connector=self.connectors[rc.pool],
            settings=self.exchange_settings[rc.pool],
            chain=FilterChain(request_filters, response_filters),
            retry_non_idempotent=rc.retry_non_idempotent,
            error_pages={**self.config.error_pages, **rc.error_pages},
        )

    def commit(self, previous: ProxyRuntime | None) -> None:
        """
        This runtime replaces C{previous}: reused backends take their new
        settings, carried monitors and passive health watch the new pools,
        and idle connections to backends that are gone are closed (requests
        in flight to them finish).
        """
        for pool in self.pools.values():
            pool.take_over()
        adopt, self._adopt = self._adopt, []
        for step in adopt:
            step()
        if previous is None:
            return
        if previous.access_log is not self.access_log:
            if previous.access_log is not None:
                self.events.unsubscribe(previous.access_log)
                previous.access_log.close()
            if self.access_log is not None:
                self.events.subscribe(self.access_log)
        kept = {b for pool in self.pools.values() for b in pool.backends}
        for pool in previous.pools.values():
            for backend in pool.backends:
                if backend not in kept:
                    for conn in list(backend.idle):
                        conn.close()
                    backend.idle.clear()

    def mount(self, path: str, resource: IResource, host: str | None = None) -> None:
        """Serve an application's own resource at C{path} (for C{host}, or any)."""
        self.router.mount(path, resource, host)

    def local_exchange(self, conn: Any, resource: Any, request: Any, started: float | None) -> LocalResourceExchange:
        return LocalResourceExchange(conn, self.site, request, started)

    def sweep_idle(self) -> None:
        """Close kept-alive backend connections idle for too long."""
        for name, connector in self.connectors.items():
            connector.sweep(self.pools[name].backends)

    # -- the twisted.web path: a ProxyRoute rendered inside someone else's Site -------------

    def render_route(self, route: ProxyRoute, request: Any) -> Any:
        """
        Proxy a request that twisted.web has already read (body spooled to
        C{request.content}).  Slower than rproxy's own listeners, but the
        same request checks and limits (L{read_request_head}), routing,
        filters, headers, pools, failure answers and events.
        """
        started = self.reactor.seconds() if self.events.wanted else None
        downstream = _WebRequestDownstream(request, self)
        raw_headers = [(n, v) for n, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
        peer = request.getClientAddress()
        ip = ip_of(peer) or "unknown"
        downstream.client_ip = ip
        server = self.config.server
        info = ForwardingInfo(ip, "https" if request.isSecure() else "http", is_trusted(ip, server.trusted_proxies),
                              server.via.encode("ascii"))
        content = request.content
        length = 0
        if content is not None:
            content.seek(0, 2)
            length = content.tell()
            content.seek(0)
        version = request.clientproto.partition(b"/")[2] or b"1.1"
        try:
            head = read_request_head(request.method, request.uri, version, raw_headers, self.config.limits)
            max_body = self.config.limits.max_body_bytes
            if max_body and length > max_body:
                raise RequestRejected(413, "Content Too Large")
        except RequestRejected as e:
            return ErrorPage(e.status, e.message).render(request)
        # twisted.web has read the body whole (and undone its chunking): it goes on with its length.
        head.headers = [(n, v) for n, v in head.headers if n.lower() not in (b"content-length", b"transfer-encoding")]
        head.body = "length" if length or head.body != "none" else "none"
        head.content_length = length
        head.body_limit = 0
        head.route = route
        depth = len(request.prepath)
        if depth:
            # Filters and the origin see the path inside the proxy's tree, as on rproxy's own listeners.
            head.path = b"/" + b"/".join(head.path[1:].split(b"/")[depth:])
        exchange = ProxyExchange(downstream, self.reactor, route.plan, head, info, route.plan.chain, started)
        downstream.exchange = exchange
        request.notifyFinish().addErrback(lambda _: exchange.cancel())
        exchange.start()
        if head.body != "none" and content is not None:
            while not exchange.finished:
                chunk = content.read(65536)
                if not chunk:
                    break
                exchange.requestBodyData(chunk)
            exchange.requestBodyEnd()
        return NOT_DONE_YET


def _shared_cache(config: ProxyConfig, reactor: Any, events: Any, previous: ProxyRuntime | None) -> Any:
    """The cache for C{config}: the one serving, when C{[cache]} did not change (a reload keeps what is stored)."""
    if not any(route.cache for route in config.routes):
        return None
    if previous is not None and previous.cache is not None and previous.config.cache == config.cache and \
            previous.config.server.via == config.server.via:
        return previous.cache
    from .cache import build_cache

    return build_cache(config.cache, reactor, events, name=config.server.via)


def _same_endpoints(old: Any, new: Any) -> bool:
    """Whether a pool's backend endpoint objects stay valid: its TLS client settings are the same."""
    return (old.ca, old.client_cert, old.client_key) == (new.ca, new.client_cert, new.client_key)


def _endpoint_factory(reactor: Any, pool: Any, name: str) -> Callable[[str], Any]:
    """
    Client endpoints for a pool's backends: endpoint strings as Twisted parses
    them, except that C{tls:HOST:PORT} backends of a pool with C{ca} or
    C{client_cert} verify against that CA file and present that certificate.
    """
    if pool.ca is None and pool.client_cert is None:
        return lambda description: clientFromString(reactor, description)

    def endpoint_for(description: str) -> Any:
        parts = description.split(":")
        if parts[0] != "tls" or len(parts) < 3:
            return clientFromString(reactor, description)
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        from .tls import client_tls_options

        host, port = parts[1], int(parts[2])
        options = client_tls_options(host, pool.ca, pool.client_cert, pool.client_key, now=reactor.seconds(),
                                     pool=name)
        return wrapClientTLS(options, HostnameEndpoint(reactor, host, port))

    return endpoint_for


class _NullGate:
    """The request body is already read: there is nothing to pause."""

    paused = False

    def pause(self, reason: str) -> None:
        pass

    def resume(self, reason: str) -> None:
        pass


@implementer(IDownstream)
class _WebRequestDownstream:
    """An exchange's response written to a twisted.web Request."""

    http_version = b"1.1"
    wants_block = False

    def __init__(self, request: Any, runtime: ProxyRuntime) -> None:
        self.request = request
        self.runtime = runtime
        self.clock = runtime.reactor
        self.gate = _NullGate()
        self.gone = False
        self.client_ip = "unknown"
        self.body_bytes = 0
        self.exchange: Any = None
        """The exchange writing here, until its event is published."""
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, result: Any) -> None:
        self.gone = True
        exchange = self.exchange
        if isinstance(result, Failure) and exchange is not None and not exchange.finished:
            # The client went away before its answer was complete: 499, as on rproxy's own listeners.
            if not exchange.headSent:
                exchange.status = 499
            self._published(exchange)

    def writeInterim(self, status: int, reason: bytes, headers: Any) -> None:
        pass

    def writeHead(self, status: int, reason: bytes, headers: Any, content_length: int | None, has_body: bool) -> None:
        if self.gone:
            return
        request = self.request
        request.setResponseCode(status, reason or None)
        response_headers = request.responseHeaders
        response_headers.removeHeader(b"server")
        # twisted.web set a Date of its own: one Date only, the origin's when it sent one (RFC 9110 6.6.1).
        response_headers.removeHeader(b"date")
        for name, value in headers:
            response_headers.addRawHeader(name, value)
        if not response_headers.hasHeader(b"date"):
            response_headers.setRawHeaders(b"date", [http_date(self.clock)])
        if content_length is not None:
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % content_length])

    def writeBody(self, data: bytes) -> None:
        if not self.gone:
            self.body_bytes += len(data)
            self.request.write(data)

    def flush(self) -> None:
        pass

    def finishBody(self, trailers: Any) -> None:
        if not self.gone:
            if self.request.producer is not None:
                self.request.unregisterProducer()
            self.request.finish()

    def failResponse(self, status: int, message: str, extra: Any = (), page: Any = None) -> None:
        if self.gone:
            return
        request = self.request
        if request.startedWriting:
            request.loseConnection()
            return
        if request.producer is not None:
            request.unregisterProducer()
        request.setResponseCode(status)
        if page is not None:
            content_type, body = page.content_type.encode("ascii"), page.body
        else:
            content_type, body = b"text/plain; charset=utf-8", (message + "\n").encode("utf-8")
        request.responseHeaders.setRawHeaders(b"content-type", [content_type])
        request.responseHeaders.setRawHeaders(b"date", [http_date(self.clock)])
        for name, value in extra:
            request.responseHeaders.addRawHeader(name, value)
        self.body_bytes += len(body)
        request.write(body)
        request.finish()

    def exchangeDone(self, exchange: Any) -> None:
        self._published(exchange)

    def _published(self, exchange: Any) -> None:
        self.exchange = None
        events = self.runtime.events
        if events.wanted:
            events.request_finished(self.client_ip, exchange, self.body_bytes, self.clock.seconds())

    def registerUpstream(self, conn: Any) -> None:
        from .transport.flow import GateProducer

        if not self.gone:
            self.request.registerProducer(GateProducer(conn.gate, "client"), True)

    def unregisterUpstream(self, conn: Any) -> None:
        if not self.gone and self.request.producer is not None:
            self.request.unregisterProducer()
        if conn.gate is not None:
            conn.gate.resume("client")

    def startTunnel(self, conn: Any, leftover: bytes) -> None:
        conn.abort()
        self.failResponse(502, "Bad Gateway: protocol upgrades are not proxied through an embedding Site")


class _CurrentTree(Resource):
    """
    What an application mounts in its own C{Site}: the routes of the
    configuration the service runs now.  A reload builds a new router; an
    application's C{Site} keeps this one, which asks for the current router
    on every request.
    """

    def __init__(self, service: ProxyService) -> None:
        super().__init__()
        self.service = service

    def getChildWithDefault(self, path: bytes, request: Any) -> IResource:
        return self.service.runtime.router.getChildWithDefault(path, request)  # type: ignore[no-any-return]

    def render(self, request: Any) -> Any:
        return self.service.runtime.router.render(request)


class ListenError(Exception):
    """
    A listener could not listen (port in use, no permission, no such
    folder).  C{str()} is one line naming the listener and the reason:
    C{listen[1]: cannot listen (Address already in use): tcp:8080}.
    """

    # Public as rproxy_tw.ListenError; the short name also leaves room for the
    # line in the 100 bytes twistd passes from a failed daemon to its parent.
    __module__ = "rproxy_tw"


class _Listener(StreamServerEndpointService):
    """One C{[[listen]]}: a failure to listen is a L{ListenError} with one line, not a traceback."""

    _log = Logger(observer=log_observer)
    label = "listen"
    """C{listen[INDEX] ENDPOINT}, for the error line (not a service name: a reload renumbers listeners)."""

    def privilegedStartService(self) -> None:
        if self._waitingForPort is not None:
            return  # a listener a reload added listens before it joins the service
        try:
            super().privilegedStartService()
        except Exception as e:  # noqa: BLE001 - whatever the endpoint raised, one line says it
            error = getattr(e, "socketError", None) or e
            why = getattr(error, "strerror", None) or str(error) or type(error).__name__
            # The reason before the endpoint: twistd hands a failed daemon's parent only the
            # first 100 bytes or so of the error, and the reason is what the operator needs.
            name, _, endpoint = self.label.partition(" ")
            line = f"{name}: cannot listen ({why}): {endpoint}"
            # error, not critical: before logging starts Twisted copies critical events to stderr,
            # where the twistd plugin writes the line itself.
            self._log.error("{line}", line=line)
            raise ListenError(line) from None
        self._waitingForPort.addCallback(self._listening)

    _port: Any = None

    def _listening(self, port: Any) -> Any:
        # Kept here: whoever waits on _waitingForPort may take its result (an
        # inlineCallbacks yield leaves None), and stopService must still find the port.
        self._port = port
        return port

    def stopService(self) -> Deferred[None]:
        port, self._port = self._port, None
        d = super().stopService()
        if port is None:
            return d
        return d.addCallback(lambda _: None if port.disconnecting else port.stopListening())


class _ListenerFactory(Factory):
    """
    What a listening port builds connections with: the listener's current
    factory, which a reload may replace while the port (and its socket) stays.
    """

    noisy = False

    def __init__(self, current: Any, guard: ConnectionGuard | None = None, listener: str = "") -> None:
        self.current = current
        self.guard = guard
        self.listener = listener
        self._started = False

    def doStart(self) -> None:
        self._started = True
        self.current.doStart()

    def doStop(self) -> None:
        self._started = False
        self.current.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        guard = self.guard
        if guard is not None and guard.active:
            # Refused here, the socket closes before a byte is read: before TLS, on any listener.
            return guard.admit(self.listener, addr, lambda: self.current.buildProtocol(addr))
        return self.current.buildProtocol(addr)

    def logPrefix(self) -> str:
        return self.current.logPrefix()  # type: ignore[no-any-return]

    def swap(self, factory: Any) -> None:
        old, self.current = self.current, factory
        if self._started:
            factory.doStart()
            old.doStop()


@attrs.define(eq=False)
class _Slot:
    """One listener: its config, its factories (C{outer} is C{inner} or TLS around it) and its port's service."""

    listen: Any
    inner: Any
    outer: Any
    switch: _ListenerFactory
    service: _Listener


class _GracefulStop:
    """
    Stopping without cutting work in flight: every HTTP connection is asked
    to drain (idle ones close, busy ones after their response, HTTP/2 says
    GOAWAY), tunnels and TCP sessions go on; when the last connection ends,
    or C{timeout} seconds have passed, or L{cut} is called, C{done} fires,
    what remains having been cut.
    """

    TICK = 0.5
    """Seconds between asking again (a connection whose upgrade was refused is idle only later)."""

    _log = Logger(observer=log_observer)

    def __init__(self, clock: Any, factories: list[IListenerFactory], timeout: float) -> None:
        self.clock = clock
        self.factories = factories
        self.timeout = timeout
        self.done: Deferred[None] = Deferred()
        self.cut_connections = 0
        """How many connections the deadline (or a second signal) cut."""
        self.ended = False
        """Every connection finished, or what remained was cut."""
        self._deadline: Any = None
        self._tick: Any = None

    def open(self) -> int:
        return sum(len(f.open_connections()) for f in self.factories)

    def start(self) -> Deferred[None]:
        count = self.open()
        if not count:
            self.ended = True
            self.done.callback(None)
            return self.done
        self._log.info("stopping: waiting up to {timeout}s for {count} connection(s) to finish their work",
                       timeout=self.timeout, count=count)
        for factory in self.factories:
            factory.watch(self._check)
        self._deadline = self.clock.callLater(self.timeout, self.cut, f"shutdown_timeout {self.timeout:g}s passed")
        self._again()
        return self.done

    def _again(self) -> None:
        self._tick = None
        for factory in self.factories:
            factory.drain()
        if not self._check():
            self._tick = self.clock.callLater(self.TICK, self._again)

    def _check(self) -> bool:
        if self.ended:
            return True
        if self.open():
            return False
        self._log.info("stopped: every connection finished")
        self._finish()
        return True

    def cut(self, why: str) -> None:
        """Close what is still open now."""
        if self.done.called or self.ended:
            return
        count = self.open()
        self.cut_connections = count
        self._log.warn("stopping: {why}: cutting {count} connection(s)", why=why, count=count)
        for factory in self.factories:
            factory.cut(why)
        # Done a turn later, once the aborts have been processed: the reactor's own
        # shutdown would otherwise close origin connections first, and an exchange
        # could still answer its aborted client (a 502 after the cut).
        self._finish(later=True)

    def _finish(self, later: bool = False) -> None:
        self.ended = True
        for call in (self._deadline, self._tick):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._tick = None
        for factory in self.factories:
            factory.watch(None)
        if later:
            self._deadline = self.clock.callLater(0, self.done.callback, None)
        else:
            self.done.callback(None)


@attrs.frozen
class ReloadSummary:
    """What a reload changed; C{str()} is its log line."""

    routes: tuple[int, int]
    routes_changed: bool
    pools: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    """Added, removed, changed."""
    listeners: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    tls: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    other: tuple[str, ...]
    """Other sections that changed: C{limits}, C{server}."""

    def __str__(self) -> str:
        parts = []
        if self.routes_changed:
            parts.append(f"routes {self.routes[0]} -> {self.routes[1]}")
        for label, (added, removed, changed) in (("pools", self.pools), ("listeners", self.listeners),
                                                 ("tls", self.tls)):
            items = [f"+{n}" for n in added] + [f"-{n}" for n in removed] + [f"~{n}" for n in changed]
            if items:
                parts.append(f"{label} {' '.join(items)}")
        parts += [f"{name} changed" for name in self.other]
        return "reload: " + (", ".join(parts) if parts else "no changes")


def _diff(old: Any, new: Any) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    return (tuple(k for k in new if k not in old), tuple(k for k in old if k not in new),
            tuple(k for k in new if k in old and new[k] != old[k]))


def _listener_names(listen: Any) -> list[str]:
    """
    The listeners' names, in order: the endpoint string, numbered when
    written again ("tcp:0:... #2").  A reload pairs an old listener with the
    new one of the same name (two "tcp:0" listeners are two sockets), and its
    summary names them so.
    """
    seen: dict[str, int] = {}
    names = []
    for l in listen:
        count = seen[l.endpoint] = seen.get(l.endpoint, 0) + 1
        names.append(l.endpoint if count == 1 else f"{l.endpoint} #{count}")
    return names


def summarize(old: ProxyConfig, new: ProxyConfig) -> ReloadSummary:
    """What changes from C{old} to C{new}."""
    other = tuple(name for name in ("limits", "server", "rate_limit", "waf") if getattr(old, name) != getattr(new, name))
    return ReloadSummary(
        (len(old.routes), len(new.routes)), old.routes != new.routes,
        _diff(old.pools, new.pools),
        _diff(dict(zip(_listener_names(old.listen), old.listen)), dict(zip(_listener_names(new.listen), new.listen))),
        _diff(old.tls, new.tls),
        other,
    )


class ProxyService(MultiService):
    """
    rproxy as an C{IService}: the listeners of a config, with their pools
    and routes.  Add it to an application's C{MultiService}, or mount
    L{resource} in the application's own C{Site}.

    L{reload} applies a new config to the running service; L{stopService}
    stops gracefully (see docs/config.md, "Reload and stop").
    """

    _log = Logger(observer=log_observer)

    def __init__(self, config: ProxyConfig, reactor: Any, endpoint_for: Callable[[str], Any] | None = None,
                 listen_endpoint_for: Callable[[str], Any] | None = None,
                 active_health: Callable[[BackendPool, Any], Any] = monitor_for) -> None:
        """
        @param endpoint_for: the client endpoint of a backend's endpoint string (default: Twisted's parser).
        @param listen_endpoint_for: the server endpoint of a listener's endpoint string (default:
            L{server_endpoint}: C{tcp} on our own port, the rest through Twisted's parser; a worker under the
            supervisor adopts the sockets it was given).
        @param active_health: what gives each pool its active health verdicts (default: this process's own
            monitors; a worker under the supervisor follows the group's, L{rproxy_tw.upstream.health.VerdictBoard}).
        """
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.endpoint_for = endpoint_for
        self.active_health = active_health
        self.listen_endpoint_for = listen_endpoint_for or (lambda description: server_endpoint(reactor, description))
        set_log_level(config.server.log_level)
        self.runtime = ProxyRuntime(config, reactor, endpoint_for, active_health=active_health)
        self.guard = ConnectionGuard(reactor, self.runtime.events)
        """Refusals at connect on every listener (IP policy, per-address limits), before TLS."""
        self.guard.configure(config)
        self.load_config: Callable[[], ProxyConfig] | None = lambda: load_config(self.config.source)
        """What L{reload_file} reads: the config file again (C{twistd rproxy} adds its command-line overrides)."""
        self._mounts: list[tuple[str, IResource, str | None]] = []
        self._filters: list[tuple[Any, str | None, str | None]] = []
        """Filters an application added with L{add_filter}: every reload's runtime gets them too."""
        self._resource = _CurrentTree(self)
        self._slots: list[_Slot] = []
        self._retired: list[IListenerFactory] = []
        """Factories of listeners a reload removed or replaced, while they still have connections."""
        """Factories a reload took off a port: their connections finish, and a stop waits for them."""
        self._stopping: _GracefulStop | None = None
        self.acme: Any = None
        """The L{rproxy_tw.acme.AcmeManager} once a TLS profile uses C{acme} (its C{renew()} forces a renewal)."""
        self._configure_acme(config, self.runtime)
        for index, listen in enumerate(config.listen):
            slot = self._slot(listen, index, self.runtime, config)
            slot.service.setServiceParent(self)
            self._slots.append(slot)
        TimerService(5.0, self._sweep_idle).setServiceParent(self)
        for monitor in self.runtime.monitors.values():
            monitor.setServiceParent(self)
        for passive in self.runtime.passive.values():
            passive.setServiceParent(self)
        if config.demo_origin is not None:
            from .demo import demo_origin_service

            demo_origin_service(reactor, config.demo_origin).setServiceParent(self)
        self.admin: Any = None
        """The admin view (L{rproxy_tw.admin.LocalSource}: metrics, status) when C{[admin]} is set."""
        self.admin_listener: _Listener | None = None
        if config.admin is not None:
            self._start_admin(config.admin.endpoint)
        for line in not_enforced_warnings(config):
            self._log.warn("{warning}", warning=line)
        from .workers import worker_count

        if worker_count(config.server.workers) > 1:
            self._log.warn("server.workers = {workers!r}: workers are started by twistd rproxy's supervisor; "
                           "this service is one process", workers=config.server.workers)

    def _start_admin(self, endpoint: str) -> None:
        """The admin listener (metrics, JSON API, status page) and the observer that counts for it."""
        from .admin.api import admin_site

        site, self.admin = admin_site(self)
        self.runtime.events.subscribe(self.admin.counters)
        service = _Listener(serverFromString(self.reactor, endpoint), site)
        service._raiseSynchronously = True
        service.label = f"admin {endpoint}"
        service.setServiceParent(self)
        self.admin_listener = service

    @property
    def factories(self) -> list[Any]:
        """Each listener's factory (TLS around the HTTP or TCP one when it has a profile), in config order."""
        return [slot.outer for slot in self._slots]

    def listener_factories(self) -> list[IListenerFactory]:
        """Each listener's own factory (HTTP or raw TCP), inside any TLS."""
        return [slot.inner for slot in self._slots]

    @property
    def listeners(self) -> list[StreamServerEndpointService]:
        return [slot.service for slot in self._slots]

    def _sweep_idle(self) -> None:
        self.runtime.sweep_idle()

    # -- building listeners ----------------------------------------------------------------

    def _tls_profile(self, listen: Any, index: int, config: ProxyConfig) -> Any:
        profile = config.tls.get(listen.tls) if listen.tls else None
        if profile is not None and not profile.certificates and not profile.acme:
            raise ConfigError(config.source, f"listen[{index}].tls",
                              f"{listen.endpoint!r} cannot start: [tls.{listen.tls}] has no certificates")
        return profile

    def _configure_acme(self, config: ProxyConfig, runtime: ProxyRuntime) -> None:
        """
        Certificates from the C{[acme]} CA for the profiles with C{acme}: the
        manager is made with the first such config and takes each later one.
        @raise ConfigError: the storage folder cannot be used.
        """
        if self.acme is None and not any(profile.acme for profile in config.tls.values()):
            return
        try:
            if self.acme is None:
                from .acme import AcmeManager

                self.acme = AcmeManager(self.reactor, config, events=runtime.events)
                self.acme.setServiceParent(self)
            else:
                self.acme.configure(config)
        except OSError as e:
            raise ConfigError(config.source, "acme.storage", f"cannot use {e.filename or ''}: {e.strerror or e}") \
                from None
        runtime.acme_challenges = self.acme.responder

    def _inner_factory(self, listen: Any, runtime: ProxyRuntime, config: ProxyConfig) -> Any:
        if listen.protocol == "http":
            return HTTPProxyFactory(runtime, self.reactor, scheme="https" if listen.tls else "http", listen=listen)
        try:
            from .tcp.relay import TCPProxyFactory
        except ImportError:
            raise ConfigError(config.source, "listen.protocol", "tcp listeners are not available yet") from None
        return TCPProxyFactory(self.reactor, runtime.pools[listen.pool], listen, config.pools[listen.pool],
                               passive=runtime.passive.get(listen.pool))

    def _outer_factory(self, listen: Any, profile: Any, inner: Any) -> Any:
        if profile is None:
            return inner
        from .tls import tls_server_factory

        options = {"acme": self.acme} if profile.acme and self.acme is not None else {}
        http = listen.protocol == "http"
        return tls_server_factory(self.reactor, profile, inner, http=http, events=self.runtime.events,
                                  listener=listen.endpoint,
                                  handshake_timeout=inner.limits.header_timeout if http else None, **options)

    def _slot(self, listen: Any, index: int, runtime: ProxyRuntime, config: ProxyConfig) -> _Slot:
        profile = self._tls_profile(listen, index, config)
        inner = self._inner_factory(listen, runtime, config)
        outer = self._outer_factory(listen, profile, inner)
        # Behind a PROXY-protocol balancer (haproxy:) the guard judges the client the header names.
        switch = _ListenerFactory(outer, self.guard, listen.endpoint)
        proxied, description = behind_proxy_header(listen.endpoint)
        endpoint = self.listen_endpoint_for(description)
        if proxied:
            timeout = inner.limits.header_timeout if listen.protocol == "http" else HEADER_TIMEOUT
            endpoint = ProxyHeaderEndpoint(endpoint, self.reactor, timeout)
        service = _Listener(endpoint, switch)
        service._raiseSynchronously = True
        service.label = f"listen[{index}] {listen.endpoint}"
        return _Slot(listen, inner, outer, switch, service)

    def _factory_for(self, listen: Any, index: int = 0) -> Any:
        """The factory C{listen} gets with the current runtime (TLS around it when it has a profile)."""
        profile = self._tls_profile(listen, index, self.config)
        return self._outer_factory(listen, profile, self._inner_factory(listen, self.runtime, self.config))

    def listening(self) -> Deferred[list[Any]]:
        """
        After C{startService}: a Deferred firing with the C{IListeningPort} of
        every listener, in config order (useful with C{tcp:0} endpoints).
        """
        return gatherResults([svc._waitingForPort for svc in self.listeners], consumeErrors=True)

    # -- reload ----------------------------------------------------------------------------

    def reload(self, config: ProxyConfig) -> ReloadSummary:
        """See L{_reload}; a refused reload also leaves the ACME names as they were."""
        old_config = self.config
        try:
            return self._reload(config)
        except (ConfigError, ListenError):
            if self.acme is not None and self.config is old_config:
                self.acme.configure(old_config)
            raise

    def _reload(self, config: ProxyConfig) -> ReloadSummary:
        """
        Apply C{config} to the running service: routes, pools, balancing,
        health checks, limits, TLS profiles, header rules and listeners.
        Requests, tunnels and TCP sessions open finish with what they started
        with; backends that stay keep their health, counters and idle
        connections; unchanged listeners keep their sockets.

        Everything that can fail (certificates, keys, CA files, opening added
        listeners) is done before anything changes: on failure nothing has.

        @return: what changed; its C{str()} is the line logged.
        @raise ConfigError: a file the config names cannot be used.
        @raise ListenError: an added listener cannot listen.
        """
        if self._stopping is not None:
            raise ConfigError(config.source, "", "not reloaded: the service is stopping")
        old_config, old_runtime = self.config, self.runtime
        summary = summarize(old_config, config)
        runtime = ProxyRuntime(config, self.reactor, self.endpoint_for, previous=old_runtime,
                               active_health=self.active_health)
        self._configure_acme(config, runtime)
        for path, resource, host in self._mounts:
            runtime.mount(path, resource, host)
        for step, host, path in self._filters:
            runtime.add_filter(step, host, path)
        unmatched = dict(zip(_listener_names([slot.listen for slot in self._slots]), self._slots))
        plan: list[tuple[str, _Slot, Any, int, Any, Any]] = []
        for index, (name, listen) in enumerate(zip(_listener_names(config.listen), config.listen)):
            slot = unmatched.pop(name, None)
            profile = self._tls_profile(listen, index, config)
            if slot is None:
                plan.append(("add", self._slot(listen, index, runtime, config), listen, index, None, None))
            elif (slot.listen.protocol, slot.listen.tls is None) != (listen.protocol, listen.tls is None):
                # Another kind of listener on the same endpoint: new factories behind the same port.
                inner = self._inner_factory(listen, runtime, config)
                plan.append(("replace", slot, listen, index, inner, self._outer_factory(listen, profile, inner)))
            elif profile is not None and profile != old_config.tls.get(slot.listen.tls):
                plan.append(("tls", slot, listen, index, slot.inner, self._outer_factory(listen, profile, slot.inner)))
            else:
                plan.append(("keep", slot, listen, index, None, None))
        opened: list[_Slot] = []
        if self.running:
            try:
                for step, slot, *_ in plan:
                    if step == "add":
                        slot.service.privilegedStartService()
                        opened.append(slot)
            except ListenError:
                for slot in opened:
                    slot.service.stopService()
                raise
        # Nothing below fails: the new config takes over.
        self.config, self.runtime = config, runtime
        runtime.commit(old_runtime)
        self.guard.configure(config)
        set_log_level(config.server.log_level)
        self._retired = [f for f in self._retired if f.open_connections()]
        for slot in unmatched.values():
            slot.service.disownServiceParent()
            slot.inner.drain()
            self._retired.append(slot.inner)
        slots = []
        for step, slot, listen, index, inner, outer in plan:
            if step == "add":
                slot.service.setServiceParent(self)
            elif step == "replace":
                self._retired.append(slot.inner)
                slot.switch.swap(outer)
                slot.inner, slot.outer = inner, outer
            else:
                slot.inner.set_runtime(runtime, listen)
                if step == "tls":
                    slot.switch.swap(outer)
                    slot.outer = outer
                elif ICertificateReload.providedBy(slot.outer):
                    slot.outer.reload()  # the same profile: its files may have been renewed
            slot.listen = listen
            slot.service.label = f"listen[{index}] {listen.endpoint}"
            slots.append(slot)
        self._slots = slots
        old_services = {*old_runtime.monitors.values(), *old_runtime.passive.values()}
        new_services = {*runtime.monitors.values(), *runtime.passive.values()}
        for service in old_services - new_services:
            service.disownServiceParent()
        for service in new_services - old_services:
            service.setServiceParent(self)
        if config.admin_endpoint != old_config.admin_endpoint:
            self._log.warn("reload: [admin] endpoint {old} -> {new} takes effect at the next restart",
                           old=old_config.admin_endpoint, new=config.admin_endpoint)
        old_warnings = set(not_enforced_warnings(old_config))
        for line in not_enforced_warnings(config):
            if line not in old_warnings:
                self._log.warn("{warning}", warning=line)
        self._log.info("{summary}", summary=str(summary))
        runtime.events.publish(ReloadApplied(config.source, str(summary)))
        return summary

    def reload_file(self) -> ReloadSummary | None:
        """
        Re-read the config file and apply it (SIGHUP).  A file that cannot
        be used is refused with one line in the log, and the running config
        keeps serving.

        @return: what changed, or L{None} when refused.
        """
        if self.load_config is None:
            self._log.info("reload: started without a config file; nothing to re-read")
            return None
        try:
            return self.reload(self.load_config())
        except (ConfigError, ListenError) as e:
            self._log.error("reload refused, still serving the previous configuration: {error}", error=str(e))
            self.runtime.events.publish(ReloadRefused(self.config.source, str(e)))
        except Exception:  # noqa: BLE001 - a bug must not take the running proxy down
            self._log.failure("reload failed, still serving the previous configuration")
        return None

    def reload_tls(self) -> None:
        """Re-read every TLS listener's certificate and key files; bad files keep the old ones."""
        for factory in self.factories:
            if ICertificateReload.providedBy(factory):
                factory.reload()

    # -- stop ------------------------------------------------------------------------------

    def startService(self) -> None:
        self._stopping = None
        super().startService()

    def stopService(self) -> Deferred[None]:
        """
        Stop gracefully: stop listening, let requests, downloads, tunnels and
        TCP sessions in flight finish (idle kept-alive connections close at
        once, busy ones after their response, HTTP/2 ones after a GOAWAY) for
        up to C{[server] shutdown_timeout} seconds, then cut what remains.
        Fires when done; C{twistd} waits for it before exiting.
        """
        d = super().stopService()
        stop = self._stopping = _GracefulStop(self.reactor, [*self.listener_factories(), *self._retired],
                                              self.config.server.shutdown_timeout)
        drained = stop.start()

        def flushed(result: Any) -> Any:
            # Every line of the requests that finished while draining, before the process exits.
            if self.runtime.access_log is not None:
                self.runtime.access_log.flush()
            return result

        return d.addBoth(lambda result: drained.addCallback(lambda _: flushed(result)))

    def reopen_logs(self) -> None:
        """Open the access log file again (SIGUSR1, after logrotate moved it); lines waiting are written first."""
        access_log = self.runtime.access_log
        if access_log is not None:
            access_log.reopen()
            self._log.info("access log reopened")

    def abort_connections(self, why: str = "stopping at once") -> None:
        """Cut every connection now (a second SIGTERM), whether or not a graceful stop is waiting."""
        if self._stopping is not None and not self._stopping.ended:
            self._stopping.cut(why)
            return
        for factory in [*self.listener_factories(), *self._retired]:
            factory.cut(why)

    # -- for an embedding application ------------------------------------------------------

    @property
    def resource(self) -> IResource:
        """
        The proxy's Resource tree, to mount in another application's C{Site}:
        it stays the same object across reloads and always serves the routes
        of the configuration in force.
        """
        return self._resource

    def mount(self, path: str, resource: IResource, host: str | None = None) -> None:
        """Serve an application's own resource at C{path} on the proxy's listeners (kept across reloads)."""
        self._mounts.append((path, resource, host))
        self.runtime.mount(path, resource, host)

    def add_filter(self, step: Any, host: str | None = None, path: str | None = None) -> None:
        """
        Put an application's own filter in the pipeline of every route (or of
        the routes with this C{host} and C{path}), after the route's own
        filters: C{step} provides L{IRequestFilter}, L{IResponseFilter}, or both.
        """
        self.runtime.add_filter(step, host, path)
        self._filters.append((step, host, path))
        for slot in self._slots:
            if isinstance(slot.inner, HTTPProxyFactory):
                slot.inner.forget_chains()

    @property
    def cache(self) -> Any:
        """The shared HTTP cache (L{rproxy_tw.cache.HTTPCache}: C{purge(url_or_prefix)}), or None when no route caches."""
        return self.runtime.cache

    def pool(self, name: str) -> BackendPool:
        return self.runtime.pools[name]

    def set_draining(self, pool: str, endpoint: str, draining: bool = True) -> None:
        """Stop (or resume) sending new requests to one backend; requests in flight finish."""
        self.runtime.pools[pool].set_draining(endpoint, draining)


def service_from_file(path: str, reactor: Any) -> ProxyService:
    """Build the service from a TOML file.  @raise ConfigError: if the file is not usable."""
    return ProxyService(load_config(path), reactor)
