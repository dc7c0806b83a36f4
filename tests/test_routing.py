"""
Unit tests of routing (rproxy_tw.routing): the Resource tree that picks a
route by host, then by longest path prefix, walked with the light request
the proxy's own listeners use and, through C{StubTreq}, by twisted.web.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.web.resource import Resource
from twisted.web.static import Data

from rproxy_tw.config import RouteConfig
from rproxy_tw.http.target import normalize_path
from rproxy_tw.routing import ErrorPage, HostRouter, ProxyRoute, build_router, host_of, resolve


def router(*routes: tuple[str | None, str, str] | tuple[str | None, str, str, bool]) -> HostRouter:
    """Routes as (host, path, pool[, strip_prefix])."""
    return build_router([RouteConfig(pool=r[2], host=r[0], path=r[1], strip_prefix=bool(r[3:] and r[3]))
                         for r in routes])


def pool_for(root, host: bytes | None, path: bytes):
    resource, _ = resolve(root, host, path)
    if isinstance(resource, ProxyRoute):
        return resource.pool_name
    return getattr(resource, "code", resource)


def target_for(root, host: bytes | None, path: bytes, query: bytes = b"") -> bytes:
    resource, req = resolve(root, host, path)
    assert isinstance(resource, ProxyRoute), resource
    return resource.upstream_target(path, len(req.prepath), query)


# ---------------------------------------------------------------------------
# host_of


@pytest.mark.parametrize(
    "header,expected",
    [
        (b"example.com", b"example.com"),
        (b"Example.COM", b"example.com"),
        (b"example.com:8080", b"example.com"),
        (b"example.com.", b"example.com"),
        (b"EXAMPLE.com.:443", b"example.com"),
        (b" example.com ", b"example.com"),
        (b"[::1]:8080", b"[::1]"),
        (b"[2001:DB8::1]", b"[2001:db8::1]"),
        (b"127.0.0.1:80", b"127.0.0.1"),
        (b"", b""),
        (None, b""),
    ],
)
def test_host_of(header, expected):
    assert host_of(header) == expected


# ---------------------------------------------------------------------------
# Virtual hosts


VHOSTS = router(
    ("www.example.com", "/", "www"),
    ("*.example.com", "/", "wild"),
    ("api.example.com", "/", "api"),
    (None, "/", "default"),
)


@pytest.mark.parametrize(
    "host,expected",
    [
        (b"www.example.com", "www"),
        (b"WWW.Example.com:8443", "www"),
        (b"api.example.com", "api"),
        (b"shop.example.com", "wild"),
        (b"shop.example.com.", "wild"),
        (b"a.b.example.com", "default"),  # the wildcard matches one label only
        (b"example.com", "default"),
        (b"other.test", "default"),
        (None, "default"),
    ],
)
def test_virtual_hosts_exact_then_wildcard_then_default(host, expected):
    assert pool_for(VHOSTS, host, b"/x") == expected


def test_unknown_host_without_default_is_421():
    root = router(("www.example.com", "/", "www"), ("*.example.org", "/", "org"))
    assert pool_for(root, b"www.example.com", b"/") == "www"
    assert pool_for(root, b"a.example.org", b"/") == "org"
    assert pool_for(root, b"example.net", b"/") == 421
    assert pool_for(root, None, b"/") == 421
    assert pool_for(root, b"example.org", b"/") == 421


def test_host_without_matching_path_is_404_not_default():
    root = router(("www.example.com", "/app/", "www"), (None, "/", "default"))
    assert pool_for(root, b"www.example.com", b"/app/x") == "www"
    # An exact host owns its paths: the default host's routes do not apply to it.
    assert pool_for(root, b"www.example.com", b"/other") == 404


# ---------------------------------------------------------------------------
# Paths


PATHS = router(
    (None, "/", "root"),
    (None, "/api", "api"),
    (None, "/api/v2/", "v2"),
    (None, "/static/", "static"),
)


@pytest.mark.parametrize(
    "path,expected",
    [
        (b"/", "root"),
        (b"/index.html", "root"),
        (b"/api", "api"),
        (b"/api/users", "api"),
        (b"/apiv2", "api"),  # string prefixes, as nginx's location /api
        (b"/api/v2", "v2"),  # /api/v2/ also matches its own name without the slash
        (b"/api/v2/users", "v2"),
        (b"/api/v3/users", "api"),
        (b"/static/css/a.css", "static"),
        (b"/static", "static"),
        (b"/staticfiles", "root"),
    ],
)
def test_longest_prefix_wins(path, expected):
    assert pool_for(PATHS, b"any.host", path) == expected


def test_no_route_is_404():
    root = router((None, "/api/", "api"))
    assert pool_for(root, b"a", b"/api/x") == "api"
    assert pool_for(root, b"a", b"/") == 404
    assert pool_for(root, b"a", b"/ap") == 404


def test_upstream_target_keeps_path_without_strip_prefix():
    root = router((None, "/api/", "api"))
    assert target_for(root, b"a", b"/api/users/1", b"x=1&y=%20") == b"/api/users/1?x=1&y=%20"
    assert target_for(root, b"a", b"/api/a%2Fb//c") == b"/api/a%2Fb//c"


@pytest.mark.parametrize(
    "prefix,path,expected",
    [
        ("/api/", b"/api/users", b"/users"),
        ("/api/", b"/api/", b"/"),
        ("/api/", b"/api", b"/"),
        ("/api/", b"/api/a%2Fb", b"/a%2Fb"),
        ("/api", b"/api/users", b"/users"),
        ("/api/v2/", b"/api/v2/x/y", b"/x/y"),
        ("/", b"/x", b"/x"),
    ],
)
def test_strip_prefix(prefix, path, expected):
    root = router((None, prefix, "p", True))
    assert target_for(root, b"a", path) == expected
    assert target_for(root, b"a", path, b"q=1") == expected + b"?q=1"


def test_upstream_target_below_a_mount_point():
    """Mounted at /proxy in another Site, the segments above the mount are not sent to the origin."""
    route = ProxyRoute(RouteConfig(pool="p", path="/"))
    assert route.upstream_target(b"/proxy/x/y", 1) == b"/x/y"
    assert route.upstream_target(b"/proxy", 1) == b"/"
    strip = ProxyRoute(RouteConfig(pool="p", path="/api/", strip_prefix=True))
    assert strip.upstream_target(b"/proxy/api/x", 1, b"a=b") == b"/x?a=b"


# ---------------------------------------------------------------------------
# Application resources mounted in the tree


def test_app_resource_mounted_with_children():
    root = router((None, "/", "web"))
    status = Resource()
    status.putChild(b"health", Data(b"ok", "text/plain"))
    root.mount("/status", status)
    resource, _ = resolve(root, b"a", b"/status/health")
    assert isinstance(resource, Data)
    assert pool_for(root, b"a", b"/statusfoo") in ("web", 404)
    assert pool_for(root, b"a", b"/other") == "web"


def test_app_resource_mounted_for_one_host():
    root = router((None, "/", "web"))
    root.mount("/admin", Data(b"admin", "text/plain"), host="admin.example.com")
    resource, _ = resolve(root, b"admin.example.com", b"/admin")
    assert isinstance(resource, Data)
    assert pool_for(root, b"www.example.com", b"/admin") == "web"


# ---------------------------------------------------------------------------
# The same tree rendered by twisted.web


@pytest_twisted.inlineCallbacks
def test_error_pages_through_twisted_web():
    root = router(("www.example.com", "/app/", "www"))
    root.mount("/hello", Data(b"hi", "text/plain"), host="www.example.com")
    stub = StubTreq(root)
    r = yield stub.get("http://www.example.com/nowhere")
    assert r.code == 404
    body = yield r.content()
    assert body.startswith(b"Not Found") and b"Traceback" not in body
    r = yield stub.get("http://other.example/app/")
    assert r.code == 421
    assert (yield r.content()).startswith(b"Misdirected")
    r = yield stub.get("http://www.example.com/hello")
    assert r.code == 200 and (yield r.content()) == b"hi"


@pytest_twisted.inlineCallbacks
def test_unstarted_proxy_route_through_twisted_web_is_502():
    stub = StubTreq(router((None, "/", "p")))
    r = yield stub.get("http://a/x")
    assert r.code == 502
    assert b"Traceback" not in (yield r.content())


def test_error_page_is_plain_text():
    class Req:
        def __init__(self):
            self.code, self.headers = None, {}

        def setResponseCode(self, code):
            self.code = code

        def setHeader(self, n, v):
            self.headers[n] = v

    req = Req()
    body = ErrorPage(404, "Not Found: no route").render(req)
    assert req.code == 404 and body == b"Not Found: no route\n"
    assert req.headers[b"content-type"].startswith(b"text/plain")


# ---------------------------------------------------------------------------
# Longest prefix, for any set of prefixes


_segment = st.text("abc", min_size=1, max_size=3)
_prefix = st.lists(_segment, min_size=0, max_size=3).flatmap(
    lambda segs: st.sampled_from(["/" + "/".join(segs), "/" + "/".join(segs) + "/"] if segs else ["/"]))
# Routing sees paths after normalize_path (the front ends normalise before resolving).
_path = st.lists(st.text("abc", min_size=0, max_size=3), min_size=1, max_size=4).map(
    lambda s: normalize_path(("/" + "/".join(s)).encode()).decode())


def _expected(prefixes: list[str], path: str) -> str | None:
    matching = [p for p in prefixes if path.startswith(p) or (p.endswith("/") and path == p[:-1])]
    return max(matching, key=len) if matching else None


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.lists(_prefix, min_size=1, max_size=6, unique=True), _path)
def test_longest_prefix_for_any_routes(prefixes, path):
    root = build_router([RouteConfig(pool=p, path=p) for p in prefixes])
    want = _expected(prefixes, path)
    got = pool_for(root, b"h", path.encode())
    assert got == (want if want is not None else 404)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.lists(_prefix, min_size=1, max_size=6, unique=True), _path, st.text("xyz=&", max_size=5))
def test_strip_prefix_for_any_routes(prefixes, path, query):
    root = build_router([RouteConfig(pool=p, path=p, strip_prefix=True) for p in prefixes])
    want = _expected(prefixes, path)
    if want is None:
        return
    target = target_for(root, b"h", path.encode(), query.encode())
    rest = path[len(want.rstrip("/")):]
    expected = (rest if rest.startswith("/") else "/" + rest) + ("?" + query if query else "")
    assert target == expected.encode()
    assert target.startswith(b"/")
