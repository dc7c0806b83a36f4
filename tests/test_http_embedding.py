"""
Embedding: the proxy as an IService inside another application's
MultiService, its Resource tree mounted in the application's own Site, and
the application's resources mounted in the proxy's tree.
"""

from __future__ import annotations

import pytest_twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from zope.interface.verify import verifyObject

import rproxy_tw
from rproxy_tw import ProxyService, parse_config, service_from_file

from .conftest import free_port, proxy_config, request, web_client

inline = pytest_twisted.inlineCallbacks


class Echo(Resource):
    isLeaf = True

    def render(self, req):
        body = req.content.read()
        req.setHeader(b"content-type", b"text/plain")
        req.responseHeaders.addRawHeader(b"Set-Cookie", b"a=1")
        req.responseHeaders.addRawHeader(b"Set-Cookie", b"b=2")
        xff = req.getHeader(b"x-forwarded-for") or b"-"
        return b"%s %s xff=%s body=%s" % (req.method, req.uri, xff, body)


@inline
def listening_port(service):
    """The port a StreamServerEndpointService listens on, once it does."""
    port = yield service._waitingForPort
    return port.getHost().port


def test_public_api():
    for name in ("ProxyService", "ProxyConfig", "ConfigError", "load_config", "parse_config", "quick_config",
                 "service_from_file", "HostRouter"):
        assert name in rproxy_tw.__all__
        assert hasattr(rproxy_tw, name)


def test_proxy_service_is_an_iservice_and_starts_nothing_when_built():
    svc = ProxyService(parse_config(proxy_config("tcp:127.0.0.1:1")), reactor)
    verifyObject(IService, svc)
    assert not svc.running


@inline
def test_proxy_in_app_multiservice_and_mounted_in_app_site(net):
    origin_site = yield net.web_origin(Echo())
    app = MultiService()
    proxy = ProxyService(parse_config(proxy_config(origin_site.backend)), reactor)
    proxy.setServiceParent(app)
    # The application's own Site: its pages, and the proxy mounted under /proxy.
    root = Resource()
    root.putChild(b"hello", Data(b"app page", "text/plain"))
    root.putChild(b"proxy", proxy.resource)
    site = Site(root)
    site.displayTracebacks = False
    app_listener = StreamServerEndpointService(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), site)
    app_listener.setServiceParent(app)
    app.startService()
    try:
        app_port = yield listening_port(app_listener)
        [proxy_listener] = [s for s in proxy if isinstance(s, StreamServerEndpointService)]
        proxy_port = yield listening_port(proxy_listener)
        http = web_client()
        base = f"http://127.0.0.1:{app_port}"

        r = yield http.get(base + "/hello")
        assert r.code == 200 and (yield r.content()) == b"app page"

        r = yield http.get(base + "/proxy/x/y?z=1")
        assert r.code == 200
        assert (yield r.content()) == b"GET /x/y?z=1 xff=127.0.0.1 body="
        assert r.headers.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]
        assert b"TwistedWeb" not in b"".join(r.headers.getRawHeaders(b"server", []))

        r = yield http.post(base + "/proxy/upload", data=b"x" * 100000)
        assert r.code == 200
        assert (yield r.content()) == b"POST /upload xff=127.0.0.1 body=" + b"x" * 100000

        # The proxy's own listener serves the same routes at the same time.
        r = yield http.get(f"http://127.0.0.1:{proxy_port}/direct")
        assert r.code == 200 and (yield r.content()) == b"GET /direct xff=127.0.0.1 body="
    finally:
        yield app.stopService()
        for pool in proxy.runtime.pools.values():
            for backend in pool.backends:
                for conn in list(backend.idle):
                    conn.abort()
    assert not proxy.running


@inline
def test_dead_origin_through_app_site_is_502_plain(net, no_traceback):
    proxy = ProxyService(parse_config(proxy_config(f"tcp:127.0.0.1:{free_port()}")), reactor)
    root = Resource()
    root.putChild(b"proxy", proxy.resource)
    site = Site(root)
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    net.ports.append(port)
    r = yield web_client().get(f"http://127.0.0.1:{port.getHost().port}/proxy/x")
    assert r.code == 502
    body = yield r.content()
    assert len(body) < 200
    no_traceback(body)


@inline
def test_app_resource_mounted_in_proxy_tree_served_by_proxy_listener(net):
    origin = yield net.origin()
    status = Resource()
    status.putChild(b"", Data(b"status ok", "text/plain"))
    status.putChild(b"detail", Data(b"all fine", "text/plain"))

    class Form(Resource):
        isLeaf = True

        def render_POST(self, req):
            return b"form got " + req.content.read()

    proxy = yield net.proxy(proxy_config(origin.backend),
                            mounts=[("/status", Data(b"status ok", "text/plain")), ("/app/detail", status),
                                    ("/form", Form())])
    client = yield net.client(proxy.port)
    client.send(request(target=b"/status") + request(target=b"/proxied")
                + request(b"POST", b"/form", body=b"a=1&b=2") + request(target=b"/status"))
    resps = yield client.until_responses([b"GET", b"GET", b"POST", b"GET"])
    assert resps[0].status == 200 and resps[0].body == b"status ok"
    assert resps[0].header(b"server") == [b"rproxy"]
    assert resps[1].body == b"GET /proxied\n"
    assert resps[2].status == 200 and resps[2].body == b"form got a=1&b=2"
    assert resps[3].body == b"status ok"
    # Only the proxied request reached the origin.
    assert [r.target for r in origin.requests] == [b"/proxied"]


@inline
def test_mount_after_start_is_served(net):
    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(target=b"/late"))
    yield client.until_responses([b"GET"])
    proxy.service.mount("/late", Data(b"mounted late", "text/plain"))
    client.send(request(target=b"/late"))
    first, second = yield client.until_responses([b"GET", b"GET"])
    assert first.body == b"GET /late\n"
    assert second.body == b"mounted late"


def test_service_from_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[listen]]\nendpoint = "tcp:0:interface=127.0.0.1"\n[[route]]\npath = "/"\npool = "p"\n'
                    '[pool.p]\nbackends = ["tcp:127.0.0.1:1"]\n[server]\naccess_log = "off"\n')
    svc = service_from_file(str(path), reactor)
    assert isinstance(svc, ProxyService)
    assert svc.config.source == str(path)


@inline
def test_embedded_routes_match_the_normalised_path(net):
    """Mounted in the application's Site, a route holds as on rproxy's own listeners: no walking out with '..'."""
    api = yield net.origin()
    rest = yield net.origin()
    proxy = ProxyService(parse_config(proxy_config(
        routes=[{"path": "/api/", "pool": "api"}, {"path": "/", "pool": "rest"}],
        pools={"api": {"backends": [api.backend]}, "rest": {"backends": [rest.backend]}},
    )), reactor)
    root = Resource()
    root.putChild(b"proxy", proxy.resource)
    site = Site(root)
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    net.ports.append(port)
    proxy.startService()
    net.services.append(proxy)
    client = yield net.client(port.getHost().port)
    client.send(request(b"GET", b"/proxy/api/%2e%2e/x") + request(b"GET", b"/proxy/api/./v1/../users")
                + request(b"GET", b"/proxy/../../etc/passwd"))
    first, second, third = yield client.until_responses([b"GET", b"GET", b"GET"])
    assert (first.status, second.status) == (200, 200)
    assert [r.target for r in rest.requests] == [b"/x"]
    assert [r.target for r in api.requests] == [b"/api/users"]
    assert third.status in (400, 404)
