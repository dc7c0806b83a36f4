"""
What the admin API says about a running service: listeners, routes, pools
and backends now (the JSON the status page polls), and the gauges the
metrics read at scrape time.  Plain functions of the service's state, and
L{merge_status} to add up the views of several workers.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

from zope.interface import implementer

from ..events import BackendStateChanged, IEventObserver, RequestFinished
from .metrics import ProxyMetrics, gauge_family

__all__ = ["RecentErrors", "gauges", "merge_status", "status"]

RECENT_ERRORS = 8
"""Errors kept per backend for the API (bounded: an outage must not grow memory)."""


@implementer(IEventObserver)
class RecentErrors:
    """The last few failures of each backend: 5xx answers and the reasons it left rotation."""

    def __init__(self) -> None:
        self.by_backend: dict[tuple[str, str], deque[dict[str, Any]]] = {}

    def _add(self, pool: str, backend: str, entry: dict[str, Any]) -> None:
        key = (pool, backend)
        kept = self.by_backend.get(key)
        if kept is None:
            if len(self.by_backend) >= 4096:
                self.by_backend.clear()  # backends come and go with reloads: bounded all the same
            kept = self.by_backend[key] = deque(maxlen=RECENT_ERRORS)
        kept.append(entry)

    def observe(self, event: Any) -> None:
        kind = type(event)
        if kind is RequestFinished:
            if event.status >= 500 and event.backend is not None and event.pool is not None:
                self._add(event.pool, event.backend, {"time": event.finished, "status": event.status,
                                                      "target": event.target.decode("latin-1")[:200]})
        elif kind is BackendStateChanged and not event.in_rotation and event.reason != "draining":
            self._add(event.pool, event.backend, {"time": None, "status": None, "error": event.reason[:200]})

    def of(self, pool: str, backend: str) -> list[dict[str, Any]]:
        return list(self.by_backend.get((pool, backend), ()))


def _listeners(service: Any) -> list[tuple[Any, Any]]:
    """(listen config, listener factory) of each listener."""
    return list(zip(service.config.listen, service.listener_factories()))


def status(service: Any, metrics: ProxyMetrics | None, recent: RecentErrors | None) -> dict[str, Any]:
    """The JSON the API's C{GET /api/status} answers."""
    runtime = service.runtime
    config = runtime.config
    now = runtime.reactor.seconds()
    per_backend: dict[tuple[str, str], list[int]] = {}
    per_pool: dict[str, list[float]] = {}
    if metrics is not None:
        for (route, pool, backend, code), counts in metrics.requests.items():
            b = per_backend.setdefault((pool, backend), [0, 0])
            p = per_pool.setdefault(pool, [0, 0, 0.0, 0])
            b[0] += counts[0]
            p[0] += counts[0]
            if code == "5xx":
                b[1] += counts[0]
                p[1] += counts[0]
        for (route, pool), histogram in metrics.total_latency.items():
            p = per_pool.setdefault(pool, [0, 0, 0.0, 0])
            p[2] += histogram.total
            p[3] += sum(histogram.counts)
    listeners = []
    for listen, factory in _listeners(service):
        counts = factory.connection_counts()
        listeners.append({
            "endpoint": listen.endpoint,
            "protocol": listen.protocol,
            "tls": listen.tls,
            "pool": listen.pool,
            "open_connections": len(factory.open_connections()),
            "tunnels": counts.tunnels,
            "accepted": counts.accepted,
            "rejected": counts.refused,
        })
    routes = [{"host": rc.host, "path": rc.path, "pool": rc.pool, "name": f"{rc.host or '*'}{rc.path}",
               "strip_prefix": rc.strip_prefix} for rc in config.routes]
    pools = []
    for name, pool in runtime.pools.items():
        backends = []
        for b in pool.backends:
            counts = per_backend.get((name, b.name), [0, 0])
            backends.append({
                "endpoint": b.name,
                "healthy": b.healthy,
                "draining": b.draining,
                "in_rotation": b.in_rotation,
                "backup": b.config.backup,
                "weight": b.config.weight,
                "effective_weight": b.effective_weight,
                "inflight": b.inflight,
                "idle_connections": len(b.idle),
                "requests": counts[0],
                "errors": counts[1],
                "since": round(now - b.since, 3),
                "last_error": b.last_error,
                "recent_errors": recent.of(name, b.name) if recent is not None else [],
            })
        p = per_pool.get(name, [0, 0, 0.0, 0])
        budget = runtime.exchange_settings[name].budget
        pools.append({
            "name": name,
            "balance": pool.config.balance,
            "health_check": pool.config.health.type if pool.config.health is not None else None,
            "backends": backends,
            "in_rotation": sum(1 for b in pool.backends if b.in_rotation),
            "requests": p[0],
            "errors": p[1],
            "duration_sum": p[2],
            "duration_count": p[3],
            "retry_budget": round(budget.tokens, 3) if budget is not None else None,
        })
    return {
        "time": now,
        "pid": os.getpid(),
        "workers": 1,
        "config": config.source,
        "listeners": listeners,
        "routes": routes,
        "pools": pools,
        "totals": {
            "requests": int(sum(p[0] for p in per_pool.values())),
            "errors": int(sum(p[1] for p in per_pool.values())),
            "open_connections": sum(listener["open_connections"] for listener in listeners),
            "tunnels": sum(listener["tunnels"] for listener in listeners),
        },
    }


def gauges(service: Any) -> dict[str, Any]:
    """What the metrics read from the runtime at each scrape, in L{ProxyMetrics.snapshot}'s form."""
    runtime = service.runtime
    out: dict[str, Any] = {}
    listeners = [(listen, factory, factory.connection_counts()) for listen, factory in _listeners(service)]
    out.update(gauge_family("open_client_connections", "Client connections open, by listener", ("listener",),
                            [[[l.endpoint], len(f.open_connections())] for l, f, _ in listeners]))
    out.update(gauge_family("open_tunnels", "Tunnels (WebSocket) open, by listener", ("listener",),
                            [[[l.endpoint], c.tunnels] for l, _, c in listeners if l.protocol == "http"]))
    accepted = gauge_family("client_connections", "Client connections accepted, by listener", ("listener",),
                            [[[l.endpoint], c.accepted] for l, _, c in listeners])
    accepted["client_connections"]["type"] = "counter"
    out.update(accepted)
    rejected = gauge_family("client_connections_rejected", "Client connections closed at max_connections",
                            ("listener",), [[[l.endpoint], c.refused] for l, _, c in listeners])
    rejected["client_connections_rejected"]["type"] = "counter"
    out.update(rejected)
    backends = [(name, b) for name, pool in runtime.pools.items() for b in pool.backends]
    out.update(gauge_family("upstream_requests_in_flight", "Requests and sessions in flight to each backend",
                            ("pool", "backend"), [[[n, b.name], b.inflight] for n, b in backends]))
    out.update(gauge_family("upstream_idle_connections", "Idle kept-alive connections to each backend",
                            ("pool", "backend"), [[[n, b.name], len(b.idle)] for n, b in backends]))
    out.update(gauge_family("backend_healthy", "1 when the backend passes its health checks", ("pool", "backend"),
                            [[[n, b.name], int(b.healthy)] for n, b in backends], merge="min"))
    out.update(gauge_family("backend_draining", "1 while the backend is drained", ("pool", "backend"),
                            [[[n, b.name], int(b.draining)] for n, b in backends], merge="max"))
    out.update(gauge_family("backend_weight", "The backend's configured weight", ("pool", "backend"),
                            [[[n, b.name], b.config.weight] for n, b in backends], merge="max"))
    out.update(gauge_family("pool_backends", "Backends configured in each pool", ("pool",),
                            [[[n], len(p.backends)] for n, p in runtime.pools.items()], merge="max"))
    out.update(gauge_family("pool_backends_in_rotation", "Backends healthy and not draining", ("pool",),
                            [[[n], sum(1 for b in p.backends if b.in_rotation)] for n, p in runtime.pools.items()],
                            merge="min"))
    budgets = [(n, s.budget) for n, s in runtime.exchange_settings.items() if s.budget is not None]
    out.update(gauge_family("retry_budget_tokens", "Retries the pool's budget allows now", ("pool",),
                            [[[n], round(b.tokens, 3)] for n, b in budgets]))
    refused = gauge_family("retry_budget_refused", "Retries the pool's budget refused", ("pool",),
                           [[[n], b.refused] for n, b in budgets])
    refused["retry_budget_refused"]["type"] = "counter"
    out.update(refused)
    return out


def merge_status(views: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Several workers' L{status} as one: counts add up; a backend is healthy
    only if every worker finds it so, draining if any drains it.
    """
    if not views:
        return {}
    first = views[0]
    out = {**first, "workers": len(views), "pid": [v["pid"] for v in views]}
    listeners = {l["endpoint"]: dict(l) for l in first["listeners"]}
    for view in views[1:]:
        for l in view["listeners"]:
            into = listeners.setdefault(l["endpoint"], dict(l, open_connections=0, tunnels=0, accepted=0, rejected=0))
            for key in ("open_connections", "tunnels", "accepted", "rejected"):
                into[key] += l[key]
    out["listeners"] = list(listeners.values())
    pools: dict[str, dict[str, Any]] = {}
    for view in views:
        for p in view["pools"]:
            into = pools.get(p["name"])
            if into is None:
                pools[p["name"]] = {**p, "backends": [dict(b) for b in p["backends"]]}
                continue
            for key in ("requests", "errors", "duration_sum", "duration_count"):
                into[key] += p[key]
            by_endpoint = {b["endpoint"]: b for b in into["backends"]}
            for b in p["backends"]:
                have = by_endpoint.get(b["endpoint"])
                if have is None:
                    into["backends"].append(dict(b))
                    continue
                for key in ("inflight", "idle_connections", "requests", "errors"):
                    have[key] += b[key]
                have["healthy"] = have["healthy"] and b["healthy"]
                have["draining"] = have["draining"] or b["draining"]
                have["in_rotation"] = have["in_rotation"] and b["in_rotation"]
                have["recent_errors"] = (have["recent_errors"] + b["recent_errors"])[-RECENT_ERRORS:]
                have["last_error"] = have["last_error"] or b["last_error"]
    for p in pools.values():
        p["in_rotation"] = sum(1 for b in p["backends"] if b["in_rotation"])
    out["pools"] = list(pools.values())
    out["totals"] = {key: sum(v["totals"][key] for v in views) for key in first["totals"]}
    return out
