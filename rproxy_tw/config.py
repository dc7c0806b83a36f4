"""
Configuration: TOML in, frozen attrs values out, validated once.

Nothing else in rproxy_tw reads TOML.  Every problem is reported as a
L{ConfigError} whose C{str()} is one line naming the file, the key and the
problem, so C{twistd rproxy --config F --check} and a reload can print it as
it is.  The keys follow C{shared/config-contract.toml}; see docs/config.md.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from typing import Any, Callable, Mapping, Sequence

import attrs
from attrs import field, frozen

from .endpoint_string import bind_address, server_problem

__all__ = [
    "ConfigError",
    "ProxyConfig",
    "ServerConfig",
    "ListenConfig",
    "TLSProfile",
    "CertificateConfig",
    "RouteConfig",
    "PoolConfig",
    "BackendConfig",
    "HealthConfig",
    "LimitsConfig",
    "AdminConfig",
    "AcmeConfig",
    "RateLimitConfig",
    "RouteWafConfig",
    "WafConfig",
    "CacheConfig",
    "ClusterConfig",
    "load_config",
    "not_enforced_warnings",
    "parse_config",
    "quick_config",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BALANCE_RULES = ("round_robin", "least_conn", "random2")
BALANCE_PREFIXES = ("hash:client_ip", "hash:header:", "cookie:")

DEFAULT_MAX_CONNECTIONS = 10000
"""Connections open at once on one listener, unless it sets C{max_connections}."""

DEFAULT_SHUTDOWN_TIMEOUT = 30.0
"""Seconds a graceful stop waits for work in flight, unless C{[server] shutdown_timeout} says."""

TCP_IDLE_TIMEOUT = 3600.0
"""
Seconds a raw TCP relay may carry no byte either way before both sides are
closed, unless the listener sets C{idle_timeout}.  Long, as HAProxy users set
C{timeout tunnel}: a quiet Redis C{SUBSCRIBE} or an idle database session is
normal traffic, and an HTTP-sized timeout would cut it without a word.
"""


class ConfigError(Exception):
    """
    A configuration that cannot be used.  C{str()} gives one line:
    C{FILE: KEY: PROBLEM}.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(source, key, problem)
        self.source = source
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        if self.key:
            return f"{self.source}: {self.key}: {self.problem}"
        return f"{self.source}: {self.problem}"


@frozen
class CertificateConfig:
    cert: str
    key: str


@frozen
class TLSProfile:
    name: str
    certificates: tuple[CertificateConfig, ...]
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ("h2", "http/1.1")
    client_ca: str | None = None
    """Optional CA file: when set, clients must present a certificate it signed."""
    acme: bool | tuple[str, ...] = False
    """Names to get certificates for from the C{[acme]} CA (C{True}: the routes' host names); see docs/acme.md."""


@frozen
class ServerConfig:
    access_log: str = "-"
    access_log_format: str = "combined"
    trusted_proxies: tuple[IPNetwork, ...] = ()
    via: str = "rproxy"
    """The pseudonym put in C{Via}; never a version."""
    server_header: str = "rproxy"
    """Replaces the origin's C{Server} header; empty removes it."""
    log_level: str = "info"
    """The least severe of the proxy's own log events written (the access log is apart)."""
    workers: int | str = 1
    """Reactor processes sharing the listeners under one supervisor (C{"auto"}: one per core); C{twistd rproxy} only."""
    reuseport: bool = True
    """With workers: each worker its own C{SO_REUSEPORT} socket of each C{tcp:} listener; false: one socket shared."""
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    """Seconds a graceful stop (SIGTERM) waits for requests, downloads and tunnels in flight before cutting them."""
    request_id_header: str = "X-Request-Id"
    """The header carrying each request's id to the origin (a trusted peer's is kept); empty: no ids."""


@frozen
class ListenConfig:
    endpoint: str
    protocol: str = "http"
    tls: str | None = None
    pool: str | None = None
    proxy_protocol: str = "off"
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Connections open at once on this listener; more are closed at once (0: no limit)."""
    idle_timeout: float = TCP_IDLE_TIMEOUT
    """tcp listeners: seconds without a byte either way before both sides close (0: never)."""
    redirect_https: int | None = None
    """On a plain http listener: answer every request with 308 to https on this port."""
    hsts: str | None = None
    """On a TLS http listener: the Strict-Transport-Security value sent with every response."""


@frozen
class RouteConfig:
    pool: str
    host: str | None = None
    path: str = "/"
    strip_prefix: bool = False
    cache: bool = False
    retry_non_idempotent: bool = False
    """Allow replaying POST and PATCH on another backend after a failure."""
    hsts: str | None = None
    """Strict-Transport-Security value for this route's responses over TLS."""
    request_headers: HeaderRulesConfig = field(factory=lambda: HeaderRulesConfig())
    """Rules applied to the request before it goes to the origin."""
    response_headers: HeaderRulesConfig = field(factory=lambda: HeaderRulesConfig())
    """Rules applied to the response (the proxy's own answers included) before it goes to the client."""
    error_pages: Mapping[int, ErrorPageConfig] = field(factory=dict)
    """This route's pages for the proxy's own 4xx/5xx answers (over the global C{[error_pages]})."""
    compress: tuple[str, ...] | None = None
    """Codings to compress this route's responses with; None: C{[cache] compress}."""
    rate_limit: Any = None
    """C{None}: the global C{[rate_limit]}; C{False}: none on this route; a L{RateLimitConfig}: this route's own."""
    waf: Any = None
    """C{None}: the global C{[waf]} as it is; C{False}: no WAF rules here; a L{RouteWafConfig}: changes for this route."""


@frozen
class RouteWafConfig:
    """A route's C{waf = {...}}: its own mode, rules switched off here, and IP lists added to the global ones."""

    mode: str | None = None
    exclude: tuple[str, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    allow: tuple[IPNetwork, ...] = ()


@frozen
class HeaderRulesConfig:
    """C{{ set = {{NAME = VALUE}}, add = {{NAME = VALUE}}, remove = [NAME] }}; values may use $client_ip, $request_id, $route, $host, $scheme."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@frozen
class ErrorPageConfig:
    """A page served instead of the proxy's own plain-text answer for one status."""

    path: str
    content_type: str
    body: bytes


ERROR_PAGE_MAX_BYTES = 1024 * 1024
"""Error pages are read whole at load: a bound keeps a wrong path (a log file, a disk image) from being read."""

_PAGE_TYPES = {".html": "text/html; charset=utf-8", ".htm": "text/html; charset=utf-8",
               ".txt": "text/plain; charset=utf-8", ".json": "application/json"}


@frozen
class BackendConfig:
    endpoint: str
    weight: int = 1
    backup: bool = False
    drain: bool = False


@frozen
class HealthConfig:
    type: str = "http"
    path: str = "/"
    method: str = "GET"
    host: str | None = None
    expect_status: tuple[int, int] = (200, 399)
    expect_body: str | None = None
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 2
    slow_start: float = 0.0


def _positive(instance: Any, attribute: Any, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be greater than 0, not {value!r}")


def _share(instance: Any, attribute: Any, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be between 0 and 1, not {value!r}")


@frozen
class PassiveHealthConfig:
    """
    C{[pool.NAME.passive]}: outlier detection from live traffic (see
    L{rproxy_tw.upstream.health.PassiveHealth}).  Defaults are what the
    section means when left out.
    """

    enabled: bool = True
    consecutive_failures: int = field(default=5, validator=_positive)
    """Failures in a row (no success between) that eject a backend."""
    count_5xx: bool = False
    """Whether a 5xx answer counts as a failure (off: an app's 500 is not a dead server)."""
    base_ejection: float = field(default=10.0, validator=_positive)
    """Seconds of the first ejection; each further one doubles it."""
    max_ejection: float = field(default=300.0, validator=_positive)
    """Longest ejection; also the quiet time after which the doubling starts over."""
    max_ejection_share: float = field(default=0.5, validator=_share)
    """Largest share of the pool that may be out of rotation for health reasons when passive health ejects."""


@frozen
class PoolConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    balance: str = "round_robin"
    health: HealthConfig | None = None
    connect_timeout: float = 5.0
    """Seconds to establish a connection to a backend (then 502, or failover)."""
    response_timeout: float = 60.0
    """Seconds from the request being sent to the response head (then 504)."""
    idle_timeout: float = 60.0
    """Seconds without a byte from the backend while a response streams; C{math.inf} (written 0) for none."""
    keepalive: int = 128
    """Idle connections kept open per backend for reuse."""
    keepalive_timeout: float = 60.0
    """Seconds an idle pooled connection is kept."""
    retries: int = 2
    """Most further attempts per request (another backend each time)."""
    retry_on_status: tuple[int, ...] = ()
    """Statuses (e.g. 502, 503, 504) that make an idempotent request try another backend."""
    retry_budget: float = 0.2
    """Retries allowed pool-wide, as a share of requests (plus a floor of 3 a second)."""
    replay_buffer: int = 65536
    """Bytes of request body kept so that a failed request can be sent again."""
    passive: PassiveHealthConfig = PassiveHealthConfig()
    ca: str | None = None
    """CA bundle that tls: backends' certificates are verified against (else the system roots)."""
    client_cert: str | None = None
    """Certificate (and key, if no client_key) presented to tls: backends: mutual TLS."""
    client_key: str | None = None


@frozen
class LimitsConfig:
    max_request_line: int = 8192
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body_bytes: int = 0
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections_per_ip: int = 0
    """Connections one client address may hold open on each listener; more are closed at once (0: no limit)."""
    connection_rate_per_ip: int = 0
    """New connections a second one client address may open (0: no limit), with C{connection_burst_per_ip} at once."""
    connection_burst_per_ip: int = 0
    """0: the same as C{connection_rate_per_ip}."""
    max_requests_in_flight: int = 0
    """Requests being proxied at once, all routes together; over it: an immediate 503 (0: no limit)."""
    min_body_rate: int = 0
    """Bytes a second a request body must average over each C{body_rate_window} (else 408; 0: no minimum)."""
    body_rate_window: float = 5.0


@frozen
class DemoOriginConfig:
    """A small static origin started next to the proxy, for the out-of-the-box demo."""

    endpoint: str
    root: str


@frozen
class AdminConfig:
    """C{[admin]}: the listener of the status page, the JSON API and Prometheus C{/metrics}."""

    endpoint: str = "tcp:9901:interface=127.0.0.1"
    token: str = ""
    """When set, the JSON API's changing calls need C{Authorization: Bearer TOKEN}."""


@frozen
class AcmeConfig:
    """C{[acme]}: automatic certificates from an RFC 8555 CA (L{rproxy_tw.acme})."""

    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str = ""
    storage: str = "acme"
    """Folder for the account key and certificates (resolved against the config's folder)."""
    ca: str | None = None
    challenges: tuple[str, ...] = ("http-01", "tls-alpn-01")
    unissued: str = "self-signed"
    """A name the CA has not issued for yet: C{"self-signed"} serves a temporary certificate, C{"refuse"} fails its handshakes."""


@frozen
class RateLimitConfig:
    """C{[rate_limit]}: a token bucket per client key (GCRA, L{rproxy_tw.scrub.ratelimit})."""

    requests: int = 100
    per: float = 1.0
    burst: int = 0
    """Requests allowed at once; 0: C{requests}."""
    key: str = "client_ip"
    store: str = "memory"
    on_store_error: str = "allow"
    ipv6_prefix: int = 64
    """IPv6 clients are counted by this prefix (one subscriber usually holds a /64)."""
    max_keys: int = 100000
    """Clients remembered at once (least recently seen forgotten first): the table's memory bound."""


@frozen
class WafConfig:
    """C{[waf]}: IP policy and the rule engine (L{rproxy_tw.scrub})."""

    mode: str = "block"
    rules: str = "default"
    """C{"default"} (the bundled rules), or the path of a rule file."""
    deny: tuple[IPNetwork, ...] = ()
    allow: tuple[IPNetwork, ...] = ()
    threshold: int = 5
    """The anomaly score at which a request is refused (block) or reported (detect)."""
    body_limit: int = 16384
    """Bytes of a request body the rules read (held before the origin is contacted; 0: bodies are not read)."""
    exclude: tuple[tuple[str, str], ...] = ()
    """(rule id, path prefix) pairs: the rule is off for paths under the prefix."""


@frozen
class CacheConfig:
    """C{[cache]}: the shared HTTP cache (routes with C{cache = true}) and compression."""

    max_bytes: int = 268435456
    max_object_bytes: int = 10485760
    compress: tuple[str, ...] = ()
    store: str = "memory"
    path: str | None = None
    max_disk_bytes: int = 0
    """The disk store's bound; 0: 1 GiB."""


@frozen
class ClusterConfig:
    """C{[cluster]}: state shared through Redis across proxies (not built yet)."""

    redis: str
    key_prefix: str = "rproxy:"


@frozen
class ProxyConfig:
    source: str = "<config>"
    server: ServerConfig = ServerConfig()
    admin_endpoint: str | None = None
    """C{[admin] endpoint} (None: no C{[admin]} section, no admin listener)."""
    listen: tuple[ListenConfig, ...] = ()
    tls: Mapping[str, TLSProfile] = field(factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    pools: Mapping[str, PoolConfig] = field(factory=dict)
    limits: LimitsConfig = LimitsConfig()
    demo_origin: DemoOriginConfig | None = None
    error_pages: Mapping[int, ErrorPageConfig] = field(factory=dict)
    """Pages for the proxy's own 4xx/5xx answers, by status (C{[error_pages]})."""
    deferred_sections: Mapping[str, Any] = field(factory=dict)
    """
    Contract sections accepted, validated and not enforced yet, by name
    (C{"acme"}, C{"cluster"}); L{not_enforced_warnings} names them.
    """
    cache: CacheConfig = CacheConfig()
    """C{[cache]}: the shared HTTP cache's store and bounds, and the codings compression offers."""
    rate_limit: RateLimitConfig | None = None
    """C{[rate_limit]}, when present: every route is limited unless it says C{rate_limit = false}."""
    waf: WafConfig | None = None
    """C{[waf]}, when present."""
    admin: AdminConfig | None = None
    """C{[admin]}: the admin listener (None: no section, no listener)."""


# ---------------------------------------------------------------------------
# Reading


class _Reader:
    """Typed access to one TOML table that reports errors by dotted key."""

    def __init__(self, source: str, prefix: str, table: Any) -> None:
        self.source = source
        self.prefix = prefix
        if not isinstance(table, dict):
            raise ConfigError(source, prefix, f"must be a table, not {_kind(table)}")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def get(self, name: str, kinds: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        if isinstance(value, bool) and bool not in _as_tuple(kinds):
            raise self.error(name, f"must be {_kinds_name(kinds)}, not a boolean")
        if not isinstance(value, kinds):
            raise self.error(name, f"must be {_kinds_name(kinds)}, not {_kind(value)}")
        return value

    def required(self, name: str, kinds: type | tuple[type, ...]) -> Any:
        if name not in self.table:
            self.used.add(name)
            raise self.error(name, "is required")
        return self.get(name, kinds, None)

    def number(self, name: str, default: float, minimum: float = 0.0, positive: bool = False) -> float:
        value = float(self.get(name, (int, float), default))
        if positive and value <= 0:
            raise self.error(name, f"must be greater than 0, not {value:g}")
        if value < minimum:
            raise self.error(name, f"must be at least {minimum:g}, not {value:g}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        value = self.get(name, int, default)
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {value}")
        return int(value)

    def choice(self, name: str, choices: Sequence[str], default: str) -> str:
        value = self.get(name, str, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return str(value)

    def timeout(self, name: str, default: float) -> float:
        """Seconds, where 0 means no timeout at all: given back as C{math.inf}, which any deadline sum keeps."""
        value = self.number(name, default)
        return math.inf if value == 0 else value

    def strings(self, name: str, default: Sequence[str], choices: Sequence[str] | None = None) -> tuple[str, ...]:
        """A list of strings (from C{choices}, when given), each at most once."""
        values = self.get(name, list, list(default))
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise self.error(f"{name}[{i}]", f"must be a string, not {_kind(value)}")
            if choices is not None and value not in choices:
                raise self.error(f"{name}[{i}]", f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
            if value in values[:i]:
                raise self.error(f"{name}[{i}]", f"repeats {value!r}")
        return tuple(values)

    def networks(self, name: str) -> tuple[IPNetwork, ...]:
        """A list of CIDRs (a bare address is a /32 or /128)."""
        out = []
        for i, item in enumerate(self.get(name, list, [])):
            if not isinstance(item, str):
                raise self.error(f"{name}[{i}]", f"must be a string CIDR, not {_kind(item)}")
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError as e:
                raise self.error(f"{name}[{i}]", f"not an IP network: {e}") from None
        return tuple(out)

    def sub(self, name: str) -> "_Reader | None":
        self.used.add(name)
        if name not in self.table:
            return None
        return _Reader(self.source, self.key(name), self.table[name])

    def finish(self) -> None:
        for name in self.table:
            if name not in self.used:
                raise self.error(name, "is not a known key")


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _kinds_name(kinds: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    parts = [names.get(k, k.__name__) for k in _as_tuple(kinds)]
    if parts == ["an integer", "a number"]:
        return "a number"
    return " or ".join(parts)


def _kind(value: Any) -> str:
    return _kinds_name(type(value)) if type(value) in (str, int, float, bool, list, dict) else type(value).__name__


def _endpoint_problem(description: str, server: bool) -> str | None:
    """
    Check an endpoint string's shape without touching the network or a reactor.
    """
    if not description or description.strip() != description:
        return "must be a non-empty endpoint string such as 'tcp:8080'"
    kind = description.split(":", 1)[0]
    if server:
        known = {p.prefix for p in _server_plugins()} | {"tcp", "tcp6", "ssl", "unix", "systemd"}
        if kind not in known:
            return f"unknown endpoint type {kind!r} (tcp, tcp6, ssl, unix, systemd, haproxy...)"
        problem = server_problem(description)
        if problem is not None:
            return f"bad endpoint {description!r}: {problem}"
    else:
        if kind not in ("tcp", "tcp6", "ssl", "unix", "tls", "host"):
            if kind not in {p.prefix for p in _client_plugins()}:
                return f"unknown endpoint type {kind!r} (tcp, tls, unix...)"
        if kind == "tcp" and len(description.split(":")) < 3:
            return f"bad endpoint {description!r}: expected tcp:HOST:PORT"
    return None


def _server_plugins() -> list[Any]:
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    return list(getPlugins(IStreamServerEndpointStringParser))


def _client_plugins() -> list[Any]:
    from twisted.internet.interfaces import IStreamClientEndpointStringParserWithReactor
    from twisted.plugin import getPlugins

    return list(getPlugins(IStreamClientEndpointStringParserWithReactor))


def _resolve_path(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _optional_path(base: str, path: str | None) -> str | None:
    return None if path is None else _resolve_path(base, path)


def _parse_server(r: _Reader | None) -> ServerConfig:
    if r is None:
        return ServerConfig()
    access_log = r.get("access_log", str, "-")
    fmt = r.get("access_log_format", str, "combined")
    if fmt not in ("combined", "json"):
        if "$" not in fmt:
            raise r.error("access_log_format", f"must be 'combined', 'json' or a format string of $fields, not {fmt!r}")
        from .accesslog import compile_format

        try:
            compile_format(fmt)
        except ValueError as e:
            raise r.error("access_log_format", str(e)) from None
    trusted = r.networks("trusted_proxies")
    via = r.get("via", str, "rproxy")
    server_header = r.get("server_header", str, "rproxy")
    log_level = r.choice("log_level", ("debug", "info", "warn", "error", "critical"), "info")
    optional: dict[str, Any] = {}
    if "workers" in r.table:
        workers = r.get("workers", (int, str), None)
        if workers != "auto" and not (isinstance(workers, int) and workers >= 1):
            raise r.error("workers", f"must be a positive integer or \"auto\", not {workers!r}")
        optional["workers"] = workers
    if "reuseport" in r.table:
        optional["reuseport"] = r.get("reuseport", bool, True)
    if "shutdown_timeout" in r.table:
        optional["shutdown_timeout"] = r.number("shutdown_timeout", 0.0)
    if "request_id_header" in r.table:
        header = r.get("request_id_header", str, "")
        if header and not _is_token(header):
            raise r.error("request_id_header", f"must be a header name (or \"\" for no request ids), not {header!r}")
        optional["request_id_header"] = header
    r.finish()
    return ServerConfig(
        access_log=access_log,
        access_log_format=fmt,
        trusted_proxies=trusted,
        via=via,
        server_header=server_header,
        log_level=log_level,
        **optional,
    )


def _parse_listen(source: str, raw: Any) -> tuple[ListenConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(source, "listen", "must be an array of tables ([[listen]])")
    out = []
    for i, item in enumerate(raw):
        r = _Reader(source, f"listen[{i}]", item)
        endpoint = r.required("endpoint", str)
        problem = _endpoint_problem(endpoint, server=True)
        if problem:
            raise r.error("endpoint", problem)
        protocol = r.choice("protocol", ("http", "tcp"), "http")
        tls = r.get("tls", str, None)
        pool = r.get("pool", str, None)
        proxy_protocol = r.choice("proxy_protocol", ("off", "v1", "v2"), "off")
        max_connections = r.integer("max_connections", DEFAULT_MAX_CONNECTIONS)
        optional: dict[str, Any] = {}
        if "idle_timeout" in r.table:
            if protocol != "tcp":
                raise r.error("idle_timeout", "only applies to protocol = \"tcp\" (http uses [limits] idle_timeout)")
            optional["idle_timeout"] = r.timeout("idle_timeout", 0.0)
        redirect = r.get("redirect_https", (bool, int), False)
        if redirect is True:
            redirect = 443
        elif redirect is False:
            redirect = None
        elif not 1 <= redirect <= 65535:
            raise r.error("redirect_https", f"must be true or a port number, not {redirect}")
        hsts = r.get("hsts", str, None)
        if redirect is not None and (protocol != "http" or tls is not None):
            raise r.error("redirect_https", "only applies to a plain (no tls) http listener")
        if hsts is not None and (protocol != "http" or tls is None):
            raise r.error("hsts", "only applies to an http listener with tls")
        if protocol == "tcp" and pool is None:
            raise r.error("pool", "is required when protocol = \"tcp\"")
        if protocol == "http" and pool is not None:
            raise r.error("pool", "only applies to protocol = \"tcp\" (http listeners use [[route]])")
        if protocol == "http" and proxy_protocol != "off":
            raise r.error("proxy_protocol", "only applies to protocol = \"tcp\"")
        r.finish()
        out.append(
            ListenConfig(
                endpoint=endpoint,
                protocol=protocol,
                tls=tls,
                pool=pool,
                proxy_protocol=proxy_protocol,
                max_connections=max_connections,
                redirect_https=redirect,
                hsts=hsts,
                **optional,
            )
        )
    return tuple(out)


def _parse_tls(source: str, base: str, raw: Any) -> dict[str, TLSProfile]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "tls", "must be a table of profiles ([tls.NAME])")
    out = {}
    for name, table in raw.items():
        r = _Reader(source, f"tls.{name}", table)
        acme = _parse_acme_names(r)
        certs_raw = r.get("certificates", list, None) if acme else r.required("certificates", list)
        if certs_raw is None:
            certs_raw = []
        elif not certs_raw:
            raise r.error("certificates", "needs at least one { cert = ..., key = ... }")
        certs = []
        for i, c in enumerate(certs_raw):
            cr = _Reader(source, f"tls.{name}.certificates[{i}]", c)
            cert = _resolve_path(base, cr.required("cert", str))
            key = _resolve_path(base, cr.required("key", str))
            cr.finish()
            certs.append(CertificateConfig(cert=cert, key=key))
        min_version = r.choice("min_version", ("1.2", "1.3"), "1.2")
        alpn_raw = r.get("alpn", list, ["h2", "http/1.1"])
        for i, proto in enumerate(alpn_raw):
            if proto not in ("h2", "http/1.1"):
                raise r.error(f"alpn[{i}]", f"must be 'h2' or 'http/1.1', not {proto!r}")
        client_ca = r.get("client_ca", str, None)
        r.finish()
        out[name] = TLSProfile(
            name=name,
            certificates=tuple(certs),
            min_version=min_version,
            alpn=tuple(alpn_raw),
            client_ca=_resolve_path(base, client_ca) if client_ca else None,
            acme=acme,
        )
    return out


def _parse_acme_names(r: _Reader) -> bool | tuple[str, ...]:
    """C{[tls.NAME] acme}: C{true} (the routes' host names) or the host names to get certificates for."""
    acme = r.get("acme", (bool, list), False)
    if isinstance(acme, bool):
        return acme
    if not acme:
        raise r.error("acme", "needs at least one host name (or true)")
    names = r.strings("acme", ())
    for i, host in enumerate(names):
        problem = _host_pattern_problem(host.lower().rstrip("."))
        if problem or host.startswith("*"):
            raise r.error(f"acme[{i}]", f"{host!r} is not a host name (ACME http-01 and tls-alpn-01 give no wildcards)")
    return tuple(h.lower().rstrip(".") for h in names)


def _parse_routes(source: str, raw: Any, base: str = ".") -> tuple[RouteConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(source, "route", "must be an array of tables ([[route]])")
    out = []
    seen: dict[tuple[str | None, str], int] = {}
    for i, item in enumerate(raw):
        r = _Reader(source, f"route[{i}]", item)
        host = r.get("host", str, None)
        if host is not None:
            host = host.lower().rstrip(".")
            problem = _host_pattern_problem(host)
            if problem:
                raise r.error("host", problem)
        path = r.get("path", str, "/")
        if not path.startswith("/"):
            raise r.error("path", f"must start with '/', not {path!r}")
        problem = _route_path_problem(path)
        if problem:
            raise r.error("path", problem)
        pool = r.required("pool", str)
        strip_prefix = r.get("strip_prefix", bool, False)
        cache = r.get("cache", bool, False)
        route_compress = r.get("compress", (bool, list), None)
        if isinstance(route_compress, list):
            route_compress = r.strings("compress", (), ("gzip", "br"))
        elif route_compress is not None:
            route_compress = ("gzip", "br") if route_compress else ()
        retry_non_idempotent = r.get("retry_non_idempotent", bool, False)
        route_hsts = r.get("hsts", str, None)
        request_headers = _parse_header_rules(r.sub("request_headers"))
        response_headers = _parse_header_rules(r.sub("response_headers"))
        pages_reader = r.sub("error_pages")
        pages = _parse_error_pages(pages_reader, base) if pages_reader is not None else {}
        scrub: dict[str, Any] = {}
        for name, parse in (("rate_limit", _parse_rate_limit), ("waf", _parse_route_waf)):
            value = r.get(name, (bool, dict), None)
            if value is True:
                raise r.error(name, "must be false (off on this route) or a table of settings")
            scrub[name] = value if value is None or value is False else parse(r.sub(name))  # type: ignore[arg-type]
        r.finish()
        if (host, path) in seen:
            raise r.error("path", f"duplicates route[{seen[(host, path)]}] (same host and path)")
        seen[(host, path)] = i
        out.append(
            RouteConfig(
                pool=pool,
                host=host,
                path=path,
                strip_prefix=strip_prefix,
                cache=cache,
                retry_non_idempotent=retry_non_idempotent,
                hsts=route_hsts,
                request_headers=request_headers,
                response_headers=response_headers,
                error_pages=pages,
                compress=route_compress,
                **scrub,
            )
        )
    return tuple(out)


_HEADER_NAME_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_NEVER_RULED = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
                          "keep-alive", "proxy-connection"})
"""Framing and routing headers belong to the proxy: a rule on them would break the message, so it is refused."""


def _parse_header_rules(r: _Reader | None) -> HeaderRulesConfig:
    if r is None:
        return HeaderRulesConfig()
    from .pipeline import HeaderValue

    def name_problem(name: str) -> str | None:
        if not name or not set(name) <= _HEADER_NAME_CHARS:
            return f"{name!r} is not a header name"
        if name.lower() in _NEVER_RULED:
            return f"{name!r} is set by the proxy itself (framing and routing) and cannot be ruled"
        return None

    def table(key: str) -> tuple[tuple[str, str], ...]:
        raw = r.get(key, dict, {})
        out = []
        for name, value in raw.items():
            problem = name_problem(name)
            if problem:
                raise r.error(f"{key}.{name}", problem)
            if not isinstance(value, str):
                raise r.error(f"{key}.{name}", f"must be a string, not {_kind(value)}")
            if any(c in value for c in "\r\n\0"):
                raise r.error(f"{key}.{name}", "must not contain line breaks or NUL")
            try:
                value.encode("latin-1")
                HeaderValue.parse(value)
            except (UnicodeEncodeError, ValueError) as e:
                raise r.error(f"{key}.{name}", str(e)) from None
            out.append((name, value))
        return tuple(out)

    set_ = table("set")
    add = table("add")
    remove = r.get("remove", list, [])
    for i, name in enumerate(remove):
        problem = name_problem(name) if isinstance(name, str) else f"must be a header name, not {_kind(name)}"
        if problem:
            raise r.error(f"remove[{i}]", problem)
    r.finish()
    return HeaderRulesConfig(set=set_, add=add, remove=tuple(remove))


def _parse_error_pages(r: _Reader, base: str) -> dict[int, ErrorPageConfig]:
    """C{{ "502" = "pages/502.html", ... }}: read once here, so a missing page is a config error, not a 500 later."""
    pages = {}
    for key in list(r.table):
        if not key.isdigit() or not 400 <= int(key) <= 599:
            r.used.add(key)
            raise r.error(key, "must be a 4xx or 5xx status code")
        path = _resolve_path(base, r.get(key, str, ""))
        extension = os.path.splitext(path)[1].lower()
        if extension not in _PAGE_TYPES:
            raise r.error(key, f"{path!r}: the page must be .html, .htm, .txt or .json (its type is taken from that)")
        try:
            with open(path, "rb") as f:
                body = f.read(ERROR_PAGE_MAX_BYTES + 1)
        except OSError as e:
            raise r.error(key, f"cannot read {path!r}: {e.strerror or e}") from None
        if len(body) > ERROR_PAGE_MAX_BYTES:
            raise r.error(key, f"{path!r} is over {ERROR_PAGE_MAX_BYTES} bytes")
        pages[int(key)] = ErrorPageConfig(path=path, content_type=_PAGE_TYPES[extension], body=body)
    r.finish()
    return pages


def _route_path_problem(path: str) -> str | None:
    """
    Requests are routed on their normalised path (see rproxy_tw.http.target),
    so a prefix that is not normalised itself could never match: say so.
    """
    from .http.exchange import RequestRejected
    from .http.target import normalize_path

    try:
        raw = path.encode("utf-8")
        normal = normalize_path(raw)
    except RequestRejected as e:
        return f"{path!r} is not a usable path prefix: {e.message.removeprefix('Bad Request: ')}"
    if normal != raw:
        return f"{path!r} is never requested as written: requests are matched normalised, as {normal.decode()!r}"
    return None


def _host_pattern_problem(host: str) -> str | None:
    if not host:
        return "must not be empty (leave it out to match any host)"
    labels = host.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 1:
            continue
        if not label or "*" in label or not all(c.isalnum() or c in "-_" for c in label):
            return f"{host!r} is not a host name or a '*.example.com' pattern"
    return None


def _parse_backend(r_source: str, key: str, item: Any) -> BackendConfig:
    if isinstance(item, str):
        problem = _endpoint_problem(item, server=False)
        if problem:
            raise ConfigError(r_source, key, problem)
        return BackendConfig(endpoint=item)
    r = _Reader(r_source, key, item)
    endpoint = r.required("endpoint", str)
    problem = _endpoint_problem(endpoint, server=False)
    if problem:
        raise r.error("endpoint", problem)
    weight = r.integer("weight", _default(BackendConfig, "weight"), minimum=1)
    backup = r.get("backup", bool, _default(BackendConfig, "backup"))
    drain = r.get("drain", bool, _default(BackendConfig, "drain"))
    r.finish()
    return BackendConfig(endpoint=endpoint, weight=weight, backup=backup, drain=drain)


def _parse_health(r: _Reader) -> HealthConfig:
    kind = r.choice("type", ("http", "tcp"), _default(HealthConfig, "type"))
    path = r.get("path", str, _default(HealthConfig, "path"))
    if not path.startswith("/"):
        raise r.error("path", f"must start with '/', not {path!r}")
    method = r.get("method", str, _default(HealthConfig, "method")).upper()
    host = r.get("host", str, _default(HealthConfig, "host"))
    expect = r.get("expect_status", (list, int), [200, 399])
    if isinstance(expect, int):
        expect = [expect, expect]
    if len(expect) != 2 or not all(isinstance(x, int) and 100 <= x <= 599 for x in expect) or expect[0] > expect[1]:
        raise r.error("expect_status", "must be a status code or [LOW, HIGH] between 100 and 599")
    expect_body = r.get("expect_body", str, _default(HealthConfig, "expect_body"))
    interval = r.number("interval", _default(HealthConfig, "interval"), positive=True)
    timeout = r.number("timeout", _default(HealthConfig, "timeout"), positive=True)
    rise = r.integer("rise", _default(HealthConfig, "rise"), minimum=1)
    fall = r.integer("fall", _default(HealthConfig, "fall"), minimum=1)
    slow_start = r.number("slow_start", _default(HealthConfig, "slow_start"))
    r.finish()
    return HealthConfig(
        type=kind,
        path=path,
        method=method,
        host=host,
        expect_status=(expect[0], expect[1]),
        expect_body=expect_body,
        interval=interval,
        timeout=timeout,
        rise=rise,
        fall=fall,
        slow_start=slow_start,
    )


def _parse_pools(source: str, raw: Any, base: str = ".") -> dict[str, PoolConfig]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "pool", "must be a table of pools ([pool.NAME])")
    out = {}
    for name, table in raw.items():
        r = _Reader(source, f"pool.{name}", table)
        backends_raw = r.required("backends", list)
        if not backends_raw:
            raise r.error("backends", "needs at least one backend endpoint")
        backends = tuple(
            _parse_backend(source, f"pool.{name}.backends[{i}]", item) for i, item in enumerate(backends_raw)
        )
        balance = r.get("balance", str, _default(PoolConfig, "balance"))
        if balance not in BALANCE_RULES and not any(
            balance.startswith(p) and (balance != p or p == "hash:client_ip") for p in BALANCE_PREFIXES
        ):
            raise r.error(
                "balance",
                f"must be round_robin, least_conn, random2, hash:client_ip, hash:header:NAME or cookie:NAME, not {balance!r}",
            )
        hr = r.sub("health")
        health = _parse_health(hr) if hr is not None else None
        pr = r.sub("passive")
        passive = _parse_passive(pr) if pr is not None else PassiveHealthConfig()
        statuses = r.get("retry_on_status", list, [])
        for i, code in enumerate(statuses):
            if not isinstance(code, int) or isinstance(code, bool) or not 500 <= code <= 599:
                raise r.error(f"retry_on_status[{i}]", "must be a 5xx status code")
        budget = r.number("retry_budget", _default(PoolConfig, "retry_budget"))
        if budget > 1:
            raise r.error("retry_budget", f"must be a share between 0 and 1, not {budget:g}")
        pool = PoolConfig(
            name=name,
            backends=backends,
            balance=balance,
            health=health,
            connect_timeout=r.number("connect_timeout", _default(PoolConfig, "connect_timeout"), positive=True),
            response_timeout=r.number("response_timeout", _default(PoolConfig, "response_timeout"), positive=True),
            idle_timeout=r.timeout("idle_timeout", _default(PoolConfig, "idle_timeout")),
            keepalive=r.integer("keepalive", _default(PoolConfig, "keepalive")),
            keepalive_timeout=r.number("keepalive_timeout", _default(PoolConfig, "keepalive_timeout"), positive=True),
            retries=r.integer("retries", _default(PoolConfig, "retries")),
            retry_on_status=tuple(statuses),
            retry_budget=budget,
            replay_buffer=r.integer("replay_buffer", _default(PoolConfig, "replay_buffer")),
            passive=passive,
            ca=_optional_path(base, r.get("ca", str, _default(PoolConfig, "ca"))),
            client_cert=_optional_path(base, r.get("client_cert", str, _default(PoolConfig, "client_cert"))),
            client_key=_optional_path(base, r.get("client_key", str, _default(PoolConfig, "client_key"))),
        )
        r.finish()
        out[name] = pool
    return out


def _parse_passive(r: _Reader) -> PassiveHealthConfig:
    default = PassiveHealthConfig()
    share = r.number("max_ejection_share", default.max_ejection_share)
    if share > 1:
        raise r.error("max_ejection_share", f"must be a share between 0 and 1, not {share:g}")
    config = PassiveHealthConfig(
        enabled=r.get("enabled", bool, default.enabled),
        consecutive_failures=r.integer("consecutive_failures", default.consecutive_failures, minimum=1),
        count_5xx=r.get("count_5xx", bool, default.count_5xx),
        base_ejection=r.number("base_ejection", default.base_ejection, positive=True),
        max_ejection=r.number("max_ejection", default.max_ejection, positive=True),
        max_ejection_share=share,
    )
    r.finish()
    return config


def _parse_limits(r: _Reader | None) -> LimitsConfig:
    if r is None:
        return LimitsConfig()
    limits = LimitsConfig(
        max_request_line=r.integer("max_request_line", _default(LimitsConfig, "max_request_line"), minimum=64),
        max_header_bytes=r.integer("max_header_bytes", _default(LimitsConfig, "max_header_bytes"), minimum=256),
        max_headers=r.integer("max_headers", _default(LimitsConfig, "max_headers"), minimum=1),
        max_body_bytes=r.integer("max_body_bytes", _default(LimitsConfig, "max_body_bytes")),
        header_timeout=r.number("header_timeout", _default(LimitsConfig, "header_timeout"), positive=True),
        idle_timeout=r.number("idle_timeout", _default(LimitsConfig, "idle_timeout"), positive=True),
        max_connections_per_ip=r.integer("max_connections_per_ip", _default(LimitsConfig, "max_connections_per_ip")),
        connection_rate_per_ip=r.integer("connection_rate_per_ip", _default(LimitsConfig, "connection_rate_per_ip")),
        connection_burst_per_ip=r.integer("connection_burst_per_ip", _default(LimitsConfig, "connection_burst_per_ip")),
        max_requests_in_flight=r.integer("max_requests_in_flight", _default(LimitsConfig, "max_requests_in_flight")),
        min_body_rate=r.integer("min_body_rate", _default(LimitsConfig, "min_body_rate")),
        body_rate_window=r.number("body_rate_window", _default(LimitsConfig, "body_rate_window"), positive=True),
    )
    r.finish()
    return limits


def _default(cls: type, name: str) -> Any:
    """The default of attribute C{name} of the attrs class C{cls}: the one place it is written."""
    return attrs.fields_dict(cls)[name].default


def _parse_admin(r: _Reader) -> AdminConfig:
    endpoint = r.get("endpoint", str, _default(AdminConfig, "endpoint"))
    problem = _endpoint_problem(endpoint, server=True)
    if problem:
        raise r.error("endpoint", problem)
    admin = AdminConfig(endpoint=endpoint, token=r.get("token", str, _default(AdminConfig, "token")))
    r.finish()
    return admin


def _parse_acme(r: _Reader, base: str) -> AcmeConfig:
    directory = r.get("directory", str, _default(AcmeConfig, "directory"))
    from urllib.parse import urlsplit

    url = urlsplit(directory)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise r.error("directory", f"must be an http(s) URL of an ACME directory, not {directory!r}")
    ca = r.get("ca", str, "")
    acme = AcmeConfig(
        directory=directory,
        email=r.get("email", str, _default(AcmeConfig, "email")),
        storage=_resolve_path(base, r.get("storage", str, _default(AcmeConfig, "storage"))),
        ca=_resolve_path(base, ca) if ca else None,
        challenges=r.strings("challenges", _default(AcmeConfig, "challenges"), ("http-01", "tls-alpn-01")),
        unissued=r.choice("unissued", ("self-signed", "refuse"), _default(AcmeConfig, "unissued")),
    )
    if not acme.challenges:
        raise r.error("challenges", "needs at least one of 'http-01', 'tls-alpn-01'")
    r.finish()
    return acme


def _parse_rate_limit(r: _Reader) -> RateLimitConfig:
    key = r.get("key", str, _default(RateLimitConfig, "key"))
    if key != "client_ip" and not (key.startswith("header:") and _is_token(key[7:])):
        raise r.error("key", f"must be \"client_ip\" or \"header:NAME\", not {key!r}")
    config = RateLimitConfig(
        requests=r.integer("requests", _default(RateLimitConfig, "requests"), minimum=1),
        per=r.number("per", _default(RateLimitConfig, "per"), positive=True),
        burst=r.integer("burst", _default(RateLimitConfig, "burst")),
        key=key,
        store=r.choice("store", ("memory", "redis"), _default(RateLimitConfig, "store")),
        on_store_error=r.choice("on_store_error", ("allow", "deny"), _default(RateLimitConfig, "on_store_error")),
        ipv6_prefix=r.integer("ipv6_prefix", _default(RateLimitConfig, "ipv6_prefix"), minimum=1),
        max_keys=r.integer("max_keys", _default(RateLimitConfig, "max_keys"), minimum=1),
    )
    if config.ipv6_prefix > 128:
        raise r.error("ipv6_prefix", f"must be at most 128, not {config.ipv6_prefix}")
    r.finish()
    return config


def _is_token(name: str) -> bool:
    """An RFC 9110 field name."""
    return bool(name) and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in name)


def _parse_waf(r: _Reader, base: str) -> WafConfig:
    rules = r.get("rules", str, _default(WafConfig, "rules"))
    if not rules:
        raise r.error("rules", "must be \"default\" or the path of a rule file")
    exclude = []
    for i, item in enumerate(r.get("exclude", list, [])):
        er = _Reader(r.source, r.key(f"exclude[{i}]"), item)
        rule = er.required("rule", (str, int))
        path = er.get("path", str, "/")
        if not path.startswith("/"):
            raise er.error("path", f"must start with '/', not {path!r}")
        er.finish()
        exclude.append((str(rule), path))
    config = WafConfig(
        mode=r.choice("mode", ("off", "detect", "block"), _default(WafConfig, "mode")),
        rules=rules if rules == "default" else _resolve_path(base, rules),
        deny=r.networks("deny"),
        allow=r.networks("allow"),
        threshold=r.integer("threshold", _default(WafConfig, "threshold"), minimum=1),
        body_limit=r.integer("body_limit", _default(WafConfig, "body_limit")),
        exclude=tuple(exclude),
    )
    r.finish()
    from .scrub.waf import RuleError, load_rules

    try:
        rule_set = load_rules(config.rules)
    except RuleError as e:
        raise r.error("rules", str(e)) from None
    known = rule_set.ids()
    for i, (rule, _) in enumerate(config.exclude):
        if rule not in known:
            raise r.error(f"exclude[{i}].rule", f"no rule {rule!r} in {config.rules}")
    return config


def _parse_route_waf(r: _Reader) -> RouteWafConfig:
    mode = r.get("mode", str, None)
    if mode is not None and mode not in ("off", "detect", "block"):
        raise r.error("mode", f"must be one of 'off', 'detect', 'block', not {mode!r}")
    config = RouteWafConfig(mode=mode, exclude=r.strings("exclude", ()), deny=r.networks("deny"),
                            allow=r.networks("allow"))
    r.finish()
    return config


def _parse_cache(r: _Reader, base: str) -> CacheConfig:
    path = r.get("path", str, None)
    config = CacheConfig(
        max_bytes=r.integer("max_bytes", _default(CacheConfig, "max_bytes")),
        max_object_bytes=r.integer("max_object_bytes", _default(CacheConfig, "max_object_bytes")),
        compress=r.strings("compress", _default(CacheConfig, "compress"), ("gzip", "br")),
        store=r.choice("store", ("memory", "disk", "redis"), _default(CacheConfig, "store")),
        path=_optional_path(base, path),
        max_disk_bytes=r.integer("max_disk_bytes", _default(CacheConfig, "max_disk_bytes")),
    )
    if config.store == "disk" and config.path is None:
        raise r.error("path", "is required when store = \"disk\"")
    r.finish()
    return config


def _parse_cluster(r: _Reader) -> ClusterConfig:
    redis = r.required("redis", str)
    problem = _endpoint_problem(redis, server=False)
    if problem:
        raise r.error("redis", problem)
    config = ClusterConfig(redis=redis, key_prefix=r.get("key_prefix", str, _default(ClusterConfig, "key_prefix")))
    r.finish()
    return config


# Contract sections whose capability has not landed: validated, kept, and named by not_enforced_warnings.
_DEFERRED_PARSERS: dict[str, Callable[[_Reader, str], Any]] = {
    "acme": _parse_acme,
    "cluster": lambda r, base: _parse_cluster(r),
}


def not_enforced_warnings(config: ProxyConfig) -> list[str]:
    """
    One line for each section or key of C{config} that this version accepts
    (it is in the configuration contract) but does not act on yet.  The
    service start logs these and C{--check} prints them: the same list.
    """
    lines = [f"[{name}] is accepted but not enforced by this version" for name in config.deferred_sections
             if name != "acme"]
    if config.cache.store == "redis":
        lines.append('cache.store = "redis" is accepted but not enforced by this version (the memory store serves)')
    if config.rate_limit is not None and config.rate_limit.store == "redis":
        lines.append("rate_limit.store = \"redis\" is accepted but not enforced by this version "
                     "(each process keeps its own table)")
    return lines


def _overlap(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether binding C{a} and C{b} at once fails: equal, or the same port with a wildcard address."""
    if a == b:
        return True
    if a[0] != "ip" or b[0] != "ip" or a[2] != b[2]:
        return False
    hosts = {a[1], b[1]}
    if "::" in hosts:
        return True  # an IPv6 wildcard is dual-stack: it takes the IPv4 port too
    if "0.0.0.0" in hosts:
        return all(":" not in h for h in hosts)
    return False


def _refuse_overlapping_endpoints(source: str, named: list[tuple[str, str]]) -> None:
    seen: list[tuple[str, str, tuple[Any, ...]]] = []
    for key, description in named:
        bound = bind_address(description)
        if bound is None:
            continue
        for other_key, other, other_bound in seen:
            if _overlap(bound, other_bound):
                raise ConfigError(source, key, f"{description!r} overlaps {other_key} {other!r} "
                                  "(the same port or socket): only one of them could listen")
        seen.append((key, description, bound))


def parse_config(data: Mapping[str, Any], source: str = "<config>", base: str | None = None) -> ProxyConfig:
    """
    Validate a parsed TOML document and return the L{ProxyConfig} it describes.

    @param source: the file name used in error messages.
    @param base: the folder relative file paths are resolved against.
    @raise ConfigError: on the first problem found.
    """
    if base is None:
        base = os.path.dirname(os.path.abspath(source)) if source != "<config>" else os.getcwd()
    top = _Reader(source, "", dict(data))
    server = _parse_server(top.sub("server"))
    top.used.update(("listen", "tls", "route", "pool"))
    listen = _parse_listen(source, data.get("listen"))
    tls = _parse_tls(source, base, data.get("tls"))
    routes = _parse_routes(source, data.get("route"), base)
    pools = _parse_pools(source, data.get("pool"), base)
    limits = _parse_limits(top.sub("limits"))
    pages_reader = top.sub("error_pages")
    error_pages = _parse_error_pages(pages_reader, base) if pages_reader is not None else {}
    demo = None
    dr = top.sub("demo_origin")
    if dr is not None:
        endpoint = dr.required("endpoint", str)
        problem = _endpoint_problem(endpoint, server=True)
        if problem:
            raise dr.error("endpoint", problem)
        root = _resolve_path(base, dr.required("root", str))
        dr.finish()
        demo = DemoOriginConfig(endpoint=endpoint, root=root)
    admin_reader = top.sub("admin")
    admin = _parse_admin(admin_reader) if admin_reader is not None else None
    deferred = {}
    for name, parse in _DEFERRED_PARSERS.items():
        section = top.sub(name)
        if section is not None:
            deferred[name] = parse(section, base)
    cache_reader = top.sub("cache")
    cache_config = _parse_cache(cache_reader, base) if cache_reader is not None else CacheConfig()
    rate_reader, waf_reader = top.sub("rate_limit"), top.sub("waf")
    rate_limit = _parse_rate_limit(rate_reader) if rate_reader is not None else None
    waf = _parse_waf(waf_reader, base) if waf_reader is not None else None
    top.finish()
    if "acme" not in deferred and any(profile.acme for profile in tls.values()):
        deferred["acme"] = _parse_acme(_Reader(source, "acme", {}), base)  # the defaults, storage beside the file
    admin_endpoint = admin.endpoint if admin is not None else None

    # Cross references.
    for i, lc in enumerate(listen):
        if lc.tls is not None and lc.tls not in tls:
            raise ConfigError(source, f"listen[{i}].tls", f"names TLS profile {lc.tls!r}, which has no [tls.{lc.tls}]")
        if lc.pool is not None and lc.pool not in pools:
            raise ConfigError(source, f"listen[{i}].pool", f"names pool {lc.pool!r}, which has no [pool.{lc.pool}]")
    for i, rc in enumerate(routes):
        if rc.pool not in pools:
            raise ConfigError(source, f"route[{i}].pool", f"names pool {rc.pool!r}, which has no [pool.{rc.pool}]")
    endpoints = [(f"listen[{i}].endpoint", lc.endpoint) for i, lc in enumerate(listen)]
    if demo is not None:
        endpoints.append(("demo_origin.endpoint", demo.endpoint))
    if admin_endpoint is not None:
        endpoints.append(("admin.endpoint", admin_endpoint))
    _refuse_overlapping_endpoints(source, endpoints)
    if rate_limit is not None and rate_limit.store == "redis" and "cluster" not in deferred:
        raise ConfigError(source, "rate_limit.store", "\"redis\" needs a [cluster] section naming the Redis server")
    if cache_config.store == "redis" and "cluster" not in deferred:
        raise ConfigError(source, "cache.store", "\"redis\" needs a [cluster] section naming the Redis server")
    return ProxyConfig(
        source=source,
        server=server,
        admin_endpoint=admin_endpoint,
        admin=admin,
        listen=listen,
        tls=tls,
        routes=routes,
        pools=pools,
        limits=limits,
        demo_origin=demo,
        deferred_sections=deferred,
        error_pages=error_pages,
        cache=cache_config,
        rate_limit=rate_limit,
        waf=waf,
    )


def load_config(path: str, read: Callable[[str], bytes] | None = None) -> ProxyConfig:
    """
    Read and validate the TOML file at C{path}.

    @raise ConfigError: naming the file, the key and the problem.
    """
    try:
        if read is not None:
            raw = read(path)
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", f"not UTF-8 text: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {e}") from None
    return parse_config(data, source=path, base=os.path.dirname(os.path.abspath(path)))


def quick_config(listen: Sequence[str], backends: Sequence[str], source: str = "command line") -> ProxyConfig:
    """
    The config for C{--listen ... --backend ...}: every request on every
    listener goes to one round-robin pool of the given backends.
    """
    data = {
        "listen": [{"endpoint": e, "protocol": "http"} for e in (listen or ["tcp:8080"])],
        "route": [{"path": "/", "pool": "default"}],
        "pool": {"default": {"backends": list(backends)}},
    }
    return parse_config(data, source=source)


def evolve(config: ProxyConfig, **changes: Any) -> ProxyConfig:
    return attrs.evolve(config, **changes)
