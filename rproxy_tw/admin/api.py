"""
The admin listener's Resource tree: C{/metrics} (Prometheus), C{/api/...}
(JSON: status, drain, reload, purge) and C{/} (the status page).

Everything it shows or changes goes through an L{IAdminSource}: the service
in this process (L{LocalSource}), or, under a supervisor, every worker of
the group (L{rproxy_tw.admin.workers.GroupSource}), so that one tree serves
both.
"""

from __future__ import annotations

import hmac
import json
from importlib import resources
from typing import Any, Callable
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import Interface, implementer

from ..events import BackendStateChanged, ReloadApplied, ReloadRefused
from ..logs import observer as log_observer
from .metrics import ProxyMetrics, exposition
from .status import RecentErrors, gauges, status

__all__ = ["AdminSite", "IAdminSource", "LocalSource", "admin_site"]


class IAdminSource(Interface):
    """What the admin API reads and changes (each call answers a Deferred of a JSON-able value)."""

    def status() -> Deferred[dict[str, Any]]:
        """Listeners, routes, pools and backends now (L{rproxy_tw.admin.status.status})."""

    def metrics() -> Deferred[dict[str, Any]]:
        """Every metric now (L{ProxyMetrics.snapshot})."""

    def drain(pool: str, backend: str, draining: bool) -> Deferred[dict[str, Any]]:
        """Drain or undrain a backend.  @raise KeyError: no such pool or backend."""

    def purge(url: str) -> Deferred[dict[str, Any]]:
        """
        Remove one URL, or every URL under a prefix ending in C{*}, from the
        shared cache.  @raise KeyError: no route caches.
        """

    def reload() -> Deferred[dict[str, Any]]:
        """Re-read the config file and apply it, as SIGHUP does: C{{"ok": bool, "summary"|"error": str}}."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@implementer(IAdminSource)
class LocalSource:
    """
    The admin view of a L{rproxy_tw.service.ProxyService} in this process.
    Its L{counters} are what observes the service's events (subscribe them):
    the recent errors and the last reload's outcome ride on their counting.
    """

    def __init__(self, service: Any) -> None:
        self.service = service
        self.recent = RecentErrors()
        self.counters = ProxyMetrics(lambda: gauges(self.service), also=self.recent.observe)
        self._last_reload: Any = None
        counting = self.counters.counting
        for kind in (ReloadApplied, ReloadRefused, BackendStateChanged):
            counting[kind] = self._also(counting[kind])

    def _also(self, counted: Callable[[Any], None]) -> Callable[[Any], None]:
        def count(event: Any) -> None:
            counted(event)
            if type(event) is BackendStateChanged:
                self.recent.observe(event)
            else:
                self._last_reload = event

        return count

    def status(self) -> Deferred[dict[str, Any]]:
        return succeed(status(self.service, self.counters, self.recent))

    def metrics(self) -> Deferred[dict[str, Any]]:
        return succeed(self.counters.snapshot())

    def drain(self, pool: str, backend: str, draining: bool) -> Deferred[dict[str, Any]]:
        service = self.service
        if pool not in service.runtime.pools:
            raise KeyError(f"no pool {pool!r}")
        try:
            b = service.runtime.pools[pool].set_draining(backend, draining)
        except KeyError:
            raise KeyError(f"pool {pool!r} has no backend {backend!r}") from None
        return succeed({"pool": pool, "backend": b.name, "draining": b.draining, "healthy": b.healthy,
                        "inflight": b.inflight})

    def purge(self, url: str) -> Deferred[dict[str, Any]]:
        cache = self.service.cache
        if cache is None:
            raise KeyError("no route caches (cache = true): nothing to purge")
        return succeed({"url": url, "purged": cache.purge(url)})

    def reload(self) -> Deferred[dict[str, Any]]:
        self._last_reload = None
        summary = self.service.reload_file()
        if summary is not None:
            return succeed({"ok": True, "summary": str(summary)})
        last = self._last_reload
        error = last.error if isinstance(last, ReloadRefused) else "refused (see the log)"
        return succeed({"ok": False, "error": error})


def _json(request: Any, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value, separators=(",", ":"), default=str).encode("utf-8") + b"\n"


def _answer(request: Any, work: Callable[[], Deferred[Any]], render: Callable[[Any, Any], bytes]) -> Any:
    """Run C{work} and write what C{render} makes of its result; errors become JSON with a status."""

    def done(value: Any) -> None:
        if not request._disconnected:
            request.write(render(request, value))
            request.finish()

    def failed(failure: Failure) -> None:
        if failure.check(ApiError):
            body = _json(request, {"error": failure.value.message}, failure.value.status)
        elif failure.check(KeyError):
            body = _json(request, {"error": str(failure.value.args[0])}, 404)
        else:
            AdminSite._log.failure("admin API call failed", failure)
            body = _json(request, {"error": "internal error (see the log)"}, 500)
        if not request._disconnected:
            request.write(body)
            request.finish()

    maybeDeferred(work).addCallbacks(done, failed)
    return NOT_DONE_YET


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, admin: AdminSite) -> None:
        super().__init__()
        self.admin = admin

    def render(self, request: Any) -> Any:
        try:
            return super().render(request)
        except UnsupportedMethod as e:
            request.setHeader(b"allow", b", ".join(e.allowedMethods))
            return _json(request, {"error": "method not allowed"}, 405)


class _Metrics(_Leaf):
    def render_GET(self, request: Any) -> Any:
        def text(request: Any, snap: dict[str, Any]) -> bytes:
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            return exposition(snap)

        return _answer(request, self.admin.source.metrics, text)


class _Snapshot(_Leaf):
    """C{GET /api/snapshot}: the metrics as JSON (what a supervisor adds up over its workers)."""

    def render_GET(self, request: Any) -> Any:
        return _answer(request, self.admin.source.metrics, _json)


class _Status(_Leaf):
    """C{GET /api/status} (everything), C{/api/listeners}, C{/api/routes}, C{/api/pools}."""

    def __init__(self, admin: AdminSite, part: str | None = None) -> None:
        super().__init__(admin)
        self.part = part

    def render_GET(self, request: Any) -> Any:
        part = self.part
        return _answer(request, self.admin.source.status,
                       lambda r, v: _json(r, v if part is None else v[part]))


class _Change(_Leaf):
    """A changing call: POST only, the token checked, and no cross-site form posts."""

    def render_POST(self, request: Any) -> Any:
        refusal = self.admin.refusal(request)
        if refusal is not None:
            return _json(request, {"error": refusal[1]}, refusal[0])
        try:
            args = _arguments(request)
        except ApiError as e:
            return _json(request, {"error": e.message}, e.status)
        return _answer(request, lambda: self.call(args), _json)

    def call(self, args: dict[str, str]) -> Deferred[Any]:
        raise NotImplementedError


class _Drain(_Change):
    def __init__(self, admin: AdminSite, draining: bool) -> None:
        super().__init__(admin)
        self.draining = draining

    def call(self, args: dict[str, str]) -> Deferred[Any]:
        pool, backend = args.get("pool"), args.get("backend")
        if not pool or not backend:
            raise ApiError(400, "give pool and backend (JSON body or query arguments)")
        self.admin._log.info("admin API: {what} backend {backend} of pool {pool}",
                             what="drain" if self.draining else "undrain", backend=backend, pool=pool)
        return self.admin.source.drain(pool, backend, self.draining)


class _Purge(_Change):
    def call(self, args: dict[str, str]) -> Deferred[Any]:
        url = args.get("url")
        if not url:
            raise ApiError(400, "give url: HOST/PATH or SCHEME://HOST/PATH, ending in * for a prefix")
        self.admin._log.info("admin API: purge {url}", url=url)
        return self.admin.source.purge(url)


class _Reload(_Change):
    def call(self, args: dict[str, str]) -> Deferred[Any]:
        self.admin._log.info("admin API: reload")
        return self.admin.source.reload()


def _arguments(request: Any) -> dict[str, str]:
    """C{pool}/C{backend} from a JSON object body or from the query string."""
    args = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in (request.args or {}).items()}
    body = request.content.read(65537) if request.content is not None else b""
    if len(body) > 65536:
        raise ApiError(413, "body too large")
    if body.strip():
        try:
            value = json.loads(body)
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(value, dict):
            raise ApiError(400, "the body must be a JSON object")
        args.update({str(k): str(v) for k, v in value.items()})
    return args


class _Page(_Leaf):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy",
                          b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                          b"connect-src 'self'; img-src data:")
        return self.admin.page


class _NotFound(_Leaf):
    def render(self, request: Any) -> bytes:
        return _json(request, {"error": "not found"}, 404)


class _Dir(Resource):
    """A folder of the tree: anything not in it is a JSON 404."""

    def __init__(self, admin: AdminSite) -> None:
        super().__init__()
        self.admin = admin

    def getChild(self, path: bytes, request: Any) -> Resource:
        return _NotFound(self.admin)

    def render(self, request: Any) -> bytes:
        return _json(request, {"error": "not found"}, 404)


class AdminSite(Site):
    """The admin listener's site; C{token()} gives the bearer token in force ("" = none)."""

    _log = Logger(observer=log_observer)

    def __init__(self, source: IAdminSource, token: Callable[[], str]) -> None:
        self.source = source
        self.token = token
        self.page = resources.files("rproxy_tw.admin").joinpath("status.html").read_bytes()
        root = _Dir(self)
        root.putChild(b"", _Page(self))
        root.putChild(b"metrics", _Metrics(self))
        api = _Dir(self)
        api.putChild(b"status", _Status(self))
        api.putChild(b"snapshot", _Snapshot(self))
        for part in ("listeners", "routes", "pools"):
            api.putChild(part.encode("ascii"), _Status(self, part))
        api.putChild(b"drain", _Drain(self, True))
        api.putChild(b"undrain", _Drain(self, False))
        api.putChild(b"reload", _Reload(self))
        api.putChild(b"purge", _Purge(self))
        root.putChild(b"api", api)
        super().__init__(root)
        self.displayTracebacks = False
        self.noisy = False

    def log(self, request: Any) -> None:
        """The admin API is polled (status page, Prometheus, the supervisor): no line per call."""

    def refusal(self, request: Any) -> tuple[int, str] | None:
        """Why a changing call may not go on (status, message), or None."""
        origin = request.getHeader(b"origin")
        if origin is not None:
            host = request.getHeader(b"host") or b""
            if urlsplit(origin.decode("latin-1")).netloc.encode("latin-1") != host:
                return 403, "cross-origin changing calls are refused"
        token = self.token()
        if token:
            given = request.getHeader(b"authorization") or b""
            expected = b"Bearer " + token.encode("utf-8")
            if not hmac.compare_digest(given, expected):
                request.setHeader(b"www-authenticate", b'Bearer realm="rproxy admin"')
                return 401, "this call needs Authorization: Bearer TOKEN ([admin] token)"
        return None


def admin_site(service: Any) -> tuple[AdminSite, LocalSource]:
    """The admin site of a service in this process, and the source (an event observer to subscribe)."""
    source = LocalSource(service)

    def token() -> str:
        admin = service.config.admin
        return admin.token if admin is not None else ""

    return AdminSite(source, token), source

