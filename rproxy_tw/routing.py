"""
HTTP routing as a twisted.web Resource tree: host first, then the longest
path prefix.

The tree is ordinary twisted.web: an application can mount L{HostRouter} in
its own C{Site} (the proxy leaves then render through twisted.web, which has
already read the request body), and can mount its own resources in ours with
L{HostRouter.mount}.  rproxy's own listeners walk the same tree once per
request head with a light request object (L{RoutingRequest}) and, when the
walk ends on a L{ProxyRoute}, stream the request themselves.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.web import resource
from twisted.web.resource import IResource, Resource, getChildForRequest

from .config import RouteConfig
from .http.exchange import RequestRejected
from .http.target import normalize_path

__all__ = [
    "HostRouter",
    "PathRouter",
    "ProxyRoute",
    "RoutingRequest",
    "ErrorPage",
    "build_router",
    "host_of",
    "resolve",
]


def host_of(host_header: bytes | None) -> bytes:
    """The lower-cased host name of a C{Host} header, without port or trailing dot."""
    if not host_header:
        return b""
    host = host_header.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end != -1 else host
    colon = host.rfind(b":")
    if colon != -1:
        host = host[:colon]
    return host.rstrip(b".")


class ErrorPage(Resource):
    """A short plain-text error, never a traceback."""

    isLeaf = True

    def __init__(self, code: int, message: str) -> None:
        super().__init__()
        self.code = code
        self.message = message

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (self.message + "\n").encode("utf-8")


NOT_FOUND = ErrorPage(404, "Not Found: no route for this path")
MISDIRECTED = ErrorPage(421, "Misdirected Request: this server does not serve that host")


class ProxyRoute(Resource):
    """
    The leaf for one C{[[route]]}: requests that reach it are proxied to the
    route's pool.  It owns the rest of the path.

    Rendering through twisted.web (when mounted in another application's
    C{Site}) is handled by the C{render_handler} given by the runtime; rproxy's
    own listeners never call C{render}.
    """

    isLeaf = True

    def __init__(self, config: RouteConfig, render_handler: Callable[["ProxyRoute", Any], Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.pool_name = config.pool
        self.prefix = config.path.encode("utf-8")
        self.strip_prefix = config.strip_prefix
        self.render_handler = render_handler
        self.plan: Any = None
        """The L{rproxy_tw.pipeline.RoutePlan} the runtime that built this route prepared for it."""

    def upstream_target(self, raw_path: bytes, depth: int, query: bytes = b"") -> bytes:
        """
        The request target to send to the origin.

        @param raw_path: the path as the client sent it (still percent-encoded).
        @param depth: how many of its segments lie above the mount point of the
            router (C{len(request.prepath)} when the walk reached this leaf).
        """
        if depth:
            path = b"/" + b"/".join(raw_path[1:].split(b"/")[depth:])
        else:
            path = raw_path
        if self.strip_prefix and path.startswith(self.prefix.rstrip(b"/")):
            path = path[len(self.prefix.rstrip(b"/")) :]
            if not path.startswith(b"/"):
                path = b"/" + path
        return path + (b"?" + query if query else b"")

    def render(self, request: Any) -> Any:
        if self.render_handler is None:
            return ErrorPage(502, "Bad Gateway: proxy not started").render(request)
        return self.render_handler(self, request)

    def __repr__(self) -> str:
        return f"<ProxyRoute {self.config.host or '*'}{self.config.path} -> {self.pool_name}>"


class PathRouter(Resource):
    """
    Longest-prefix match over the path below this router.  Prefixes are
    strings, as nginx's C{location /prefix}: C{/api} also matches C{/apiv2}.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mounts: list[tuple[bytes, IResource]] = []

    def mount(self, prefix: bytes, target: IResource) -> None:
        self._mounts.append((prefix, target))
        self._mounts.sort(key=lambda m: len(m[0]), reverse=True)

    def match(self, path: bytes) -> tuple[bytes, IResource] | None:
        for prefix, target in self._mounts:
            if path.startswith(prefix) or (prefix.endswith(b"/") and path == prefix[:-1]):
                return prefix, target
        return None

    def getChild(self, path: bytes, request: Any) -> IResource:
        # Undo the segment twisted.web popped: we match on the whole rest.
        request.postpath.insert(0, request.prepath.pop())
        return self._route(request)

    def _route(self, request: Any) -> IResource:
        try:
            # rproxy's own listeners hand over a normalised path already; a
            # twisted.web Site (the embedded path) hands over what the client sent.
            rest = normalize_path(b"/" + b"/".join(request.postpath))
        except RequestRejected as e:
            return ErrorPage(e.status, e.message)
        found = self.match(rest)
        if found is None:
            return NOT_FOUND
        prefix, target = found
        if target.isLeaf:
            return target
        # An application resource mounted at a prefix: hand it the segments
        # below the prefix, as putChild would.
        for segment in prefix.strip(b"/").split(b"/"):
            if segment and request.postpath and request.postpath[0] == segment:
                request.prepath.append(request.postpath.pop(0))
        return getChildForRequest(target, request)

    def render(self, request: Any) -> Any:
        return self._route(request).render(request)


class HostRouter(Resource):
    """
    Virtual hosts: an exact host, then a C{*.example.com} pattern (one
    label), then the routes without a host.  A host nothing serves gets 421.
    """

    _CACHE_SIZE = 4096

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple[bytes | None, bytes], tuple[IResource, int]] = {}
        self.exact: dict[bytes, PathRouter] = {}
        self.wildcard: dict[bytes, PathRouter] = {}
        self.default: PathRouter | None = None

    def _router_for(self, host: str | None, create: bool = True) -> PathRouter:
        if host is None:
            if self.default is None:
                self.default = PathRouter()
            return self.default
        key = host.lower().encode("idna" if not host.startswith("*.") else "ascii")
        table = self.exact
        if key.startswith(b"*."):
            key = key[1:]
            table = self.wildcard
        if key not in table:
            table[key] = PathRouter()
        return table[key]

    def mount(self, path: str, target: IResource, host: str | None = None) -> None:
        """
        Mount C{target} (any twisted.web resource, or a L{ProxyRoute}) at the
        path prefix C{path} for C{host} (or for any host).
        """
        self._router_for(host).mount(path.encode("utf-8"), target)
        self._cache.clear()

    def resolve(self, host: bytes | None, path: bytes) -> tuple[IResource, int]:
        """
        The resource a request head reaches, and how many path segments lie
        above the router's mount point.  Proxy routes depend on nothing but
        host and path, so they are remembered (a bounded table, emptied on
        every mount); other resources are walked each time.
        """
        key = (host, path)
        found = self._cache.get(key)
        if found is not None:
            return found
        resource, req = resolve(self, host, path)
        found = (resource, len(req.prepath))
        if isinstance(resource, ProxyRoute):
            cache = self._cache
            if len(cache) >= self._CACHE_SIZE:
                cache.clear()
            cache[key] = found
        return found

    def router_for_host(self, host: bytes) -> PathRouter | None:
        router = self.exact.get(host)
        if router is not None:
            return router
        dot = host.find(b".")
        if dot > 0:
            router = self.wildcard.get(host[dot:])
            if router is not None:
                return router
        return self.default

    def getChildWithDefault(self, path: bytes, request: Any) -> IResource:
        router = self.router_for_host(host_of(request.getHeader(b"host")))
        if router is None:
            return MISDIRECTED
        return router.getChild(path, request)

    def render(self, request: Any) -> Any:
        router = self.router_for_host(host_of(request.getHeader(b"host")))
        if router is None:
            return MISDIRECTED.render(request)
        return router.render(request)

    def routes(self) -> Iterable[IResource]:
        for router in [*self.exact.values(), *self.wildcard.values(), *([self.default] if self.default else [])]:
            for _, target in router._mounts:
                yield target


def build_router(
    routes: Iterable[RouteConfig], render_handler: Callable[[ProxyRoute, Any], Any] | None = None
) -> HostRouter:
    """The Resource tree for a config's C{[[route]]} entries."""
    root = HostRouter()
    for rc in routes:
        root.mount(rc.path, ProxyRoute(rc, render_handler), host=rc.host)
    return root


class RoutingRequest:
    """
    Just enough of a twisted.web request to walk the Resource tree: the
    C{Host} header and C{prepath}/C{postpath}.
    """

    __slots__ = ("host", "prepath", "postpath")

    def __init__(self, host: bytes | None, path: bytes) -> None:
        self.host = host
        self.prepath: list[bytes] = []
        self.postpath: list[bytes] = path[1:].split(b"/") if path.startswith(b"/") else [path]

    def getHeader(self, name: bytes) -> bytes | None:
        return self.host if name.lower() == b"host" else None


def resolve(root: IResource, host: bytes | None, path: bytes) -> tuple[IResource, RoutingRequest]:
    """
    Walk the tree for a request head.  Returns the resource the walk ends on
    and the light request (its C{postpath} is what the resource owns).
    """
    req = RoutingRequest(host, path)
    return getChildForRequest(root, req), req


# Re-exported for callers that render a resource found by resolve().
NoResource = resource.NoResource
