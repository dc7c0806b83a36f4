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
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
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
from .logs import observer as log_observer, set_level as set_log_level
from .events import EventBus, request_finished
from .pipeline import (
    FilterChain,
    HeaderRules,
    IRequestFilter,
    IResponseFilter,
    RoutePlan,
    StickyCookie,
    header_rule_set,
)
from .routing import ErrorPage, HostRouter, ProxyRoute, build_router
from .upstream.health import HealthMonitor, PassiveConfig, PassiveHealth, monitor_for
from .upstream.pool import BackendPool
from .upstream.retry import RetryBudget

__all__ = ["ListenError", "ProxyRuntime", "ProxyService", "service_from_file"]


class ProxyRuntime:
    """Everything one configuration gives: pools, connectors, routes, settings."""

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any,
        endpoint_for: Callable[[str], Any] | None = None,
        access_log: Any = "config",
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.pools: dict[str, BackendPool] = {
            name: BackendPool(pc, reactor, endpoint_for or _endpoint_factory(reactor, pc, name))
            for name, pc in config.pools.items()
        }
        self.connectors: dict[str, UpstreamConnector] = {
            name: UpstreamConnector(reactor, pc.keepalive, pc.keepalive_timeout, pc.connect_timeout,
                                    span=min(pc.keepalive_timeout, pc.response_timeout, pc.idle_timeout),
                                    limits=config.limits)
            for name, pc in config.pools.items()
        }
        via = config.server.via.encode("ascii")
        server_header = config.server.server_header.encode("ascii")
        self.passive: dict[str, PassiveHealth] = {}
        self.monitors: dict[str, HealthMonitor] = {}
        for name, pc in config.pools.items():
            if pc.passive.enabled:
                self.passive[name] = PassiveHealth(
                    self.pools[name],
                    reactor,
                    PassiveConfig(**attrs.asdict(pc.passive, recurse=False)),
                    slow_start=pc.health.slow_start if pc.health else 0.0,
                )
            monitor = monitor_for(self.pools[name], reactor)
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
        self.router: HostRouter = build_router(config.routes, self.render_route)
        for route in self.router.routes():
            if isinstance(route, ProxyRoute):
                route.plan = self._plan(route)
        self.site = Site(self.router)
        self.site.displayTracebacks = False
        self.events = EventBus()
        """What happened (requests, tunnels...): the access log observes it, and so can an application."""
        if access_log == "config":
            access_log = make_access_log(reactor, config.server.access_log, config.server.access_log_format)
        self.access_log = access_log
        if access_log is not None:
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
            route.plan = attrs.evolve(route.plan, chain=route.plan.chain + added)

    def _plan(self, route: ProxyRoute) -> RoutePlan:
        """What an exchange on C{route} needs, found once: its pool's objects and its own filters."""
        rc = route.config
        pool = self.pools[rc.pool]
        rules = HeaderRules(header_rule_set(rc.request_headers), header_rule_set(rc.response_headers))
        request_filters: tuple[Any, ...] = (rules,) if rules.request else ()
        response_filters: tuple[Any, ...] = (StickyCookie(pool.balancer),) if pool.sticky else ()
        if rules.response:
            response_filters += (rules,)
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
        ip = getattr(peer, "host", None) or "unknown"
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
            events.publish(request_finished(self.client_ip, exchange, self.body_bytes, self.clock.seconds()))

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


class ListenError(Exception):
    """
    A listener could not listen (port in use, no permission, no such
    folder).  C{str()} is one line naming the listener and the reason:
    C{listen[1] tcp:8080: cannot listen: Address already in use}.
    """

    # Public as rproxy_tw.ListenError; the short name also leaves room for the
    # line in the 100 bytes twistd passes from a failed daemon to its parent.
    __module__ = "rproxy_tw"


class _Listener(StreamServerEndpointService):
    """One C{[[listen]]}: a failure to listen is a L{ListenError} with one line, not a traceback."""

    _log = Logger(observer=log_observer)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:  # noqa: BLE001 - whatever the endpoint raised, one line says it
            error = getattr(e, "socketError", None) or e
            why = getattr(error, "strerror", None) or str(error) or type(error).__name__
            line = f"{self.name}: cannot listen: {why}"
            # error, not critical: before logging starts Twisted copies critical events to stderr,
            # where the twistd plugin writes the line itself.
            self._log.error("{line}", line=line)
            raise ListenError(line) from None


class ProxyService(MultiService):
    """
    rproxy as an C{IService}: the listeners of a config, with their pools
    and routes.  Add it to an application's C{MultiService}, or mount
    L{resource} in the application's own C{Site}.
    """

    _log = Logger(observer=log_observer)

    def __init__(self, config: ProxyConfig, reactor: Any, endpoint_for: Callable[[str], Any] | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        set_log_level(config.server.log_level)
        self.runtime = ProxyRuntime(config, reactor, endpoint_for)
        self.factories: list[Any] = []
        self.listeners: list[StreamServerEndpointService] = []
        for index, listen in enumerate(config.listen):
            factory = self._factory_for(listen, index)
            self.factories.append(factory)
            endpoint = serverFromString(reactor, listen.endpoint)
            service = _Listener(endpoint, factory)
            service._raiseSynchronously = True
            service.setName(f"listen[{index}] {listen.endpoint}")
            service.setServiceParent(self)
            self.listeners.append(service)
        TimerService(5.0, self.runtime.sweep_idle).setServiceParent(self)
        for monitor in self.runtime.monitors.values():
            monitor.setServiceParent(self)
        for passive in self.runtime.passive.values():
            passive.setServiceParent(self)
        if config.demo_origin is not None:
            from .demo import demo_origin_service

            demo_origin_service(reactor, config.demo_origin).setServiceParent(self)
        for line in not_enforced_warnings(config):
            self._log.warn("{warning}", warning=line)

    def _factory_for(self, listen: Any, index: int = 0) -> Any:
        reactor = self.reactor
        tls_profile = self.config.tls.get(listen.tls) if listen.tls else None
        if tls_profile is not None and not tls_profile.certificates:
            raise ConfigError(self.config.source, f"listen[{index}].tls",
                              f"{listen.endpoint!r} cannot start: [tls.{listen.tls}] has no certificates "
                              "until ACME is built")
        if listen.protocol == "http":
            factory: Any = HTTPProxyFactory(self.runtime, reactor, scheme="https" if tls_profile else "http",
                                            listen=listen)
        else:
            try:
                from .tcp.relay import TCPProxyFactory
            except ImportError:
                raise ConfigError(self.config.source, "listen.protocol", "tcp listeners are not available yet") from None
            pool = self.runtime.pools[listen.pool]
            factory = TCPProxyFactory(reactor, pool, listen, self.config.pools[listen.pool],
                                      passive=self.runtime.passive.get(listen.pool))
        if tls_profile is not None:
            from .tls import tls_server_factory

            factory = tls_server_factory(reactor, tls_profile, factory, http=listen.protocol == "http")
        return factory

    def listening(self) -> Deferred[list[Any]]:
        """
        After C{startService}: a Deferred firing with the C{IListeningPort} of
        every listener, in config order (useful with C{tcp:0} endpoints).
        """
        return gatherResults([svc._waitingForPort for svc in self.listeners], consumeErrors=True)

    def stopService(self) -> Deferred[None]:
        """Stop listening, then close the connections still open (an embedding app expects a clean stop)."""
        d = super().stopService()

        def close_connections(result: Any) -> Any:
            for factory in self.factories:
                inner = getattr(factory, "wrappedFactory", factory)
                abort = getattr(inner, "abortAll", None)
                if abort is not None:
                    abort()
                for conn in list(getattr(inner, "connections", ())):
                    transport = getattr(conn, "transport", None)
                    if transport is not None:
                        transport.loseConnection()
            return result

        return d.addBoth(close_connections)

    def reload_tls(self) -> None:
        """Re-read every TLS listener's certificate and key files (on SIGHUP); bad files keep the old ones."""
        for factory in self.factories:
            reload = getattr(factory, "reload", None)
            if reload is not None:
                reload()

    @property
    def resource(self) -> HostRouter:
        """The proxy's Resource tree, to mount in another application's C{Site}."""
        return self.runtime.router

    def mount(self, path: str, resource: IResource, host: str | None = None) -> None:
        """Serve an application's own resource at C{path} on the proxy's listeners."""
        self.runtime.mount(path, resource, host)

    def add_filter(self, step: Any, host: str | None = None, path: str | None = None) -> None:
        """
        Put an application's own filter in the pipeline of every route (or of
        the routes with this C{host} and C{path}), after the route's own
        filters: C{step} provides L{IRequestFilter}, L{IResponseFilter}, or both.
        """
        self.runtime.add_filter(step, host, path)
        for factory in self.factories:
            inner = getattr(factory, "wrappedFactory", factory)
            forget = getattr(inner, "forget_chains", None)
            if forget is not None:
                forget()

    def pool(self, name: str) -> BackendPool:
        return self.runtime.pools[name]

    def set_draining(self, pool: str, endpoint: str, draining: bool = True) -> None:
        """Stop (or resume) sending new requests to one backend; requests in flight finish."""
        self.runtime.pools[pool].set_draining(endpoint, draining)


def service_from_file(path: str, reactor: Any) -> ProxyService:
    """Build the service from a TOML file.  @raise ConfigError: if the file is not usable."""
    return ProxyService(load_config(path), reactor)
