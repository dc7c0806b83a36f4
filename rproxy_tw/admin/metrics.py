"""
Prometheus metrics: counters kept by an observer of the proxy's events,
gauges read from the runtime when scraped, exposed by C{prometheus_client}.

Why plain dictionaries rather than C{prometheus_client} metric objects on the
request path: a labelled C{Counter.labels(...).inc()} takes a lock and
several calls per sample, while a request here costs one dictionary lookup
and a few additions (see bench/README.md, "metrics cost").  Finished
requests are not even counted one by one: the observer keeps each event
(up to L{FOLD_EVERY}) and counts them, a run of alike requests at a time
with C-level helpers, when that many wait or when anything reads the
counts (a scrape, the status page), so that a request costs a list append
and a share of a few calls rather than the calls of its own count
(measured: bench/README.md, issue 12).  At scrape time
the counts become C{prometheus_client} metric families in a L{snapshot}, a
plain JSON-able value that the supervisor of several workers sums
(L{merge_snapshots}) before C{prometheus_client} writes the exposition.

New event types are counted by adding an entry to L{ProxyMetrics.counting}
(event type -> function of the event), e.g. refusals by reason, cache hits.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import groupby
from operator import itemgetter, sub
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from zope.interface import implementer

from ..events import (
    BackendStateChanged,
    CacheEvicted,
    CacheHit,
    CacheMiss,
    CacheStored,
    CertificateChanged,
    CertificateFailed,
    ConnectionRefused,
    IRequestObserver,
    ReloadApplied,
    ReloadRefused,
    RequestFinished,
    RequestRefused,
    TCPSessionClosed,
    TLSHandshakeCompleted,
    TLSHandshakeFailed,
    request_event,
)

__all__ = ["LATENCY_BUCKETS", "ProxyMetrics", "exposition", "merge_snapshots", "registry_for"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds in seconds (C{+Inf} follows)."""

_STATUS_CLASS = {i: f"{i}xx" for i in range(1, 6)}

FOLD_EVERY = 256
"""Finished requests kept before they are counted (they are also counted whenever the counts are read)."""

# RequestFinished's fields, read by position in C (L{ProxyMetrics.fold}).
_RUN_KEY = itemgetter(9, 10, 11, 5, 14)
"""(route, pool, backend, status, tunnel): what a run of requests counted together shares."""
_KEY_FIELDS = (5, 11, 9, 10, 14)
"""_RUN_KEY's fields one by one (status and backend first: the likeliest to differ)."""
_BYTES_SENT, _STARTED, _FINISHED, _UPSTREAM_TIME, _ATTEMPTS, _REQUEST_BYTES = 6, 7, 8, 16, 17, 18


class _Histogram:
    """
    Bucket counts and a sum: what one label set of a histogram keeps.
    A fold extends C{values} with a run's values and L{settle} buckets them at
    once: sorted, each bucket is one C{bisect} (a C{bisect} per value, with
    its counting, costs four times an append).
    """

    __slots__ = ("counts", "total", "values")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.values: list[float] = []

    def settle(self) -> None:
        """
        Count the values appended since the last time (as C{bisect_left(LATENCY_BUCKETS, value)}
        would), leaving out the Nones a fold may append (the upstream times of requests no origin answered).
        """
        values = self.values
        if not values:
            return
        try:
            self.total += sum(values)
        except TypeError:  # a None among them: the sum fails on it, cheaper than looking for one first
            values[:] = [value for value in values if value is not None]
            self.total += sum(values)
        values.sort()
        counts, below = self.counts, 0
        for i, bound in enumerate(LATENCY_BUCKETS):
            upto = bisect_right(values, bound, below)
            counts[i] += upto - below
            below = upto
        counts[-1] += len(values) - below
        values.clear()  # the same list: folds hold its extend


@implementer(IRequestObserver)
class ProxyMetrics:
    """
    Counts what the proxy's events say; L{snapshot} adds what the runtime
    holds now (connections, pools, health) through C{gauges}.

    @ivar counting: event type -> the function that counts one such event.
        Later features add theirs with L{count}.
    """

    def __init__(self, gauges: Callable[[], dict[str, Any]] | None = None,
                 also: Callable[[RequestFinished], None] | None = None) -> None:
        """
        @param gauges: what L{snapshot} adds, read from the runtime at each scrape.
        @param also: called with each finished request answered 5xx (the admin's recent errors).
        """
        self.gauges = gauges
        self.also = also
        self._pending: list[tuple[Any, ...]] = []
        """Finished requests not counted yet (at most L{FOLD_EVERY})."""
        self._requests: dict[tuple[str, str, str, str], list[int]] = {}
        """(route, pool, backend, status class) -> [requests, request body bytes, response body bytes]."""
        self._records: dict[tuple[Any, ...], tuple[list[int], Any, Any]] = {}
        """
        (route, pool, backend, status, tunnel) as events carry them -> their counts,
        and the C{extend} of their route's two histograms' C{values}.
        """
        self._total_latency: dict[tuple[str, str], _Histogram] = {}
        self._upstream_latency: dict[tuple[str, str], _Histogram] = {}
        self._retries: dict[str, int] = {}
        self._tunnels: dict[tuple[str, str], list[int]] = {}
        """(route, pool) -> [tunnels closed, bytes from clients, bytes to clients]."""
        self.tcp: dict[tuple[str, str, str], list[int]] = {}
        """(listener, backend, reason) -> [sessions, bytes from clients, bytes to clients]."""
        self.tls_failures: dict[tuple[str, str], int] = {}
        self.backend_changes: dict[tuple[str, str, str], int] = {}
        self.reloads: dict[str, int] = {}
        self.other: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        """Counts added by L{count}: (metric name, label pairs) -> count."""
        self.other_help: dict[str, str] = {}
        self.counting: dict[type, Callable[[Any], None]] = {
            RequestFinished: self.observe_request,
            TCPSessionClosed: self._tcp,
            TLSHandshakeFailed: self._tls_failed,
            BackendStateChanged: self._backend_changed,
            ReloadApplied: lambda e: self._reload("applied"),
            ReloadRefused: lambda e: self._reload("refused"),
        }
        # The other issues' events, each counted by one entry (issue 14's cache, issue 13's ACME).
        self.count(CacheHit, "cache_hits", "Responses served from the shared cache, by route and kind",
                   lambda e: {"route": e.route or "-", "kind": e.kind})
        self.count(CacheMiss, "cache_misses", "Requests on cached routes that went to the origin, by reason",
                   lambda e: {"route": e.route or "-", "reason": e.reason})
        self.count(CacheStored, "cache_stores", "Responses stored in the shared cache",
                   lambda e: {"route": e.route or "-"})
        self.count(CacheEvicted, "cache_evictions", "Stored responses that left the cache, by reason",
                   lambda e: {"reason": e.reason})
        self.count(CertificateChanged, "acme_certificates", "ACME certificates issued, renewed or picked up",
                   lambda e: {"name": e.name, "how": e.how})
        self.count(CertificateFailed, "acme_failures", "Failed attempts to get an ACME certificate",
                   lambda e: {"name": e.name})
        self.count(TLSHandshakeCompleted, "tls_handshakes", "Completed TLS handshakes on HTTP listeners, by listener and ALPN",
                   lambda e: {"listener": e.listener, "alpn": e.alpn})
        # Issue 13's scrubbing: refusals by reason (detect mode's flagged requests apart).
        self.count(RequestRefused, "requests_refused",
                   "Requests refused (or, blocked=false, only flagged) by scrubbing, by reason and route",
                   lambda e: {"reason": e.reason, "route": e.route or "-", "blocked": "true" if e.blocked else "false"})
        self.count(ConnectionRefused, "connections_refused", "Connections closed at accept, by reason and listener",
                   lambda e: {"reason": e.reason, "listener": e.listener})

    # -- what the requests' counts are read through: each counts the requests kept first ------

    @property
    def requests(self) -> dict[tuple[str, str, str, str], list[int]]:
        """(route, pool, backend, status class) -> [requests, request body bytes, response body bytes]."""
        self.fold()
        return self._requests

    @property
    def total_latency(self) -> dict[tuple[str, str], _Histogram]:
        """(route, pool) -> time from the request head to the response's end."""
        self.fold()
        return self._total_latency

    @property
    def upstream_latency(self) -> dict[tuple[str, str], _Histogram]:
        """(route, pool) -> time from the request head to the origin's response head."""
        self.fold()
        return self._upstream_latency

    @property
    def retries(self) -> dict[str, int]:
        """Pool -> requests sent again to another backend."""
        self.fold()
        return self._retries

    @property
    def tunnels(self) -> dict[tuple[str, str], list[int]]:
        """(route, pool) -> [tunnels closed, bytes from clients, bytes to clients]."""
        self.fold()
        return self._tunnels

    # -- IRequestObserver -----------------------------------------------------------------------

    def observe_request(self, event: tuple[Any, ...]) -> None:
        """Kept (a request's fields, as the bus hands them out), to be counted with the others in L{fold}."""
        pending = self._pending
        pending.append(event)
        if len(pending) >= FOLD_EVERY:
            self.fold()

    def observe(self, event: Any) -> None:
        if type(event) is RequestFinished:
            self.observe_request(event)
            return
        count = self.counting.get(type(event))
        if count is not None:
            count(event)

    def count(self, event_type: type, name: str, help: str, labels: Callable[[Any], dict[str, str]]) -> None:
        """
        Count events of C{event_type} as the counter C{rproxy_NAME_total},
        with the labels C{labels(event)} gives.  For features that bring
        their own events (refusals by reason, cache hits and misses).
        """
        self.other_help[name] = help
        other = self.other

        def counted(event: Any) -> None:
            key = (name, tuple(sorted(labels(event).items())))
            other[key] = other.get(key, 0) + 1

        self.counting[event_type] = counted

    # -- per event ----------------------------------------------------------------------------

    def fold(self) -> None:
        """
        Count the finished requests kept, a run of requests of the same
        (route, pool, backend, status, tunnel) at a time, so that a steady
        workload costs a few C-level calls per fold rather than a Python
        loop's turn per request (bench/README.md): the batch turned into
        columns (one per field, C{zip}), a run's counts are C{len} and
        C{sum} over columns, its durations C{map(sub)} over two.  A batch that
        is one run (a steady workload) is recognised by its key fields'
        columns' C{count}; others are cut into runs by C{groupby}.
        """
        pending = self._pending
        if not pending:
            return
        self._pending = []
        columns = list(zip(*pending))
        size = len(pending)
        for field in _KEY_FIELDS:
            column = columns[field]
            if column.count(column[0]) != size:
                for key, run in groupby(pending, _RUN_KEY):
                    run = list(run)
                    self._count_run(key, run, list(zip(*run)))
                break
        else:
            self._count_run(_RUN_KEY(pending[0]), pending, columns)
        for histograms in (self._total_latency, self._upstream_latency):
            for histogram in histograms.values():
                histogram.settle()

    def _count_run(self, key: tuple[Any, ...], run: list[tuple[Any, ...]], columns: list[tuple[Any, ...]]) -> None:
        """Count a run of requests that share C{key}, (route, pool, backend, status, tunnel), given as columns too."""
        if key[3] >= 500 and self.also is not None:
            for event in run:
                self.also(request_event(event))
        if key[4]:
            for event in run:
                self._tunnel(request_event(event))
            return
        record = self._records.get(key)
        if record is None:
            record = self._record(key)
        counts, total, upstream = record
        counts[0] += len(run)
        counts[1] += sum(columns[_REQUEST_BYTES])
        counts[2] += sum(columns[_BYTES_SENT])
        attempts = columns[_ATTEMPTS]
        if max(attempts) > 1:
            pool = key[1] or "-"
            self._retries[pool] = self._retries.get(pool, 0) + sum(a - 1 for a in attempts if a > 1)
        try:
            total(list(map(sub, columns[_FINISHED], columns[_STARTED])))
        except TypeError:  # a start of None: a head never read has no durations
            timed = [event for event in run if event[_STARTED] is not None]
            total([event[_FINISHED] - event[_STARTED] for event in timed])
            upstream([event[_UPSTREAM_TIME] for event in timed])
        else:
            upstream(columns[_UPSTREAM_TIME])  # None for no origin's head: dropped when settled

    def _record(self, key: tuple[Any, ...]) -> tuple[list[int], Any, Any]:
        """The counts of a (route, pool, backend, status, tunnel) seen first, and its route's histograms' C{extend}."""
        route, pool, backend, status = key[:4]
        route, pool = route or "-", pool or "-"
        name = (route, pool, backend or "-", _STATUS_CLASS.get(status // 100, "other"))
        counts = self._requests.get(name)
        if counts is None:
            counts = self._requests[name] = [0, 0, 0]
        histograms = []
        for into in (self._total_latency, self._upstream_latency):
            histogram = into.get((route, pool))
            if histogram is None:
                histogram = into[(route, pool)] = _Histogram()
            histograms.append(histogram)
        if len(self._records) >= 10000:
            self._records.clear()  # bounded: the counts stay in self.requests
        record = self._records[key] = (counts, histograms[0].values.extend, histograms[1].values.extend)
        return record

    def _tunnel(self, event: RequestFinished) -> None:
        tkey = (event.route or "-", event.pool or "-")
        tunnel = self._tunnels.get(tkey)
        if tunnel is None:
            tunnel = self._tunnels[tkey] = [0, 0, 0]
        tunnel[0] += 1
        tunnel[1] += event.bytes_received or 0
        tunnel[2] += event.bytes_sent

    def _tcp(self, event: TCPSessionClosed) -> None:
        key = (event.listener, event.backend or "-", event.reason)
        counts = self.tcp.get(key)
        if counts is None:
            counts = self.tcp[key] = [0, 0, 0]
        counts[0] += 1
        counts[1] += event.bytes_from_client
        counts[2] += event.bytes_to_client

    def _tls_failed(self, event: TLSHandshakeFailed) -> None:
        key = (event.listener, _short_reason(event.reason))
        self.tls_failures[key] = self.tls_failures.get(key, 0) + 1

    def _backend_changed(self, event: BackendStateChanged) -> None:
        key = (event.pool, event.backend, event.reason)
        self.backend_changes[key] = self.backend_changes.get(key, 0) + 1

    def _reload(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1

    # -- scrape ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """
        Every metric now, as C{{name: {"type", "help", "labels", "samples"}}}:
        a counter's or gauge's samples are C{[label values, value]}, a
        histogram's C{[label values, bucket counts, sum]}.  JSON-able, so a
        supervisor can fetch it from each worker and add them up.
        """
        out: dict[str, Any] = {}

        def family(name: str, kind: str, help: str, labels: Iterable[str], samples: list[Any],
                   merge: str = "sum") -> None:
            out[name] = {"type": kind, "help": help, "labels": list(labels), "samples": samples, "merge": merge}

        req = sorted(self.requests.items())
        family("requests", "counter", "HTTP requests answered, by route, pool, backend and status class",
               ("route", "pool", "backend", "code"), [[list(k), v[0]] for k, v in req])
        family("request_body_bytes", "counter", "Request body bytes received from clients",
               ("route", "pool", "backend", "code"), [[list(k), v[1]] for k, v in req])
        family("response_body_bytes", "counter", "Response body bytes sent to clients",
               ("route", "pool", "backend", "code"), [[list(k), v[2]] for k, v in req])
        family("request_duration_seconds", "histogram", "Time from the request head to the response's end",
               ("route", "pool"), [[list(k), list(h.counts), h.total] for k, h in sorted(self.total_latency.items())])
        family("upstream_head_seconds", "histogram", "Time from the request head to the origin's response head",
               ("route", "pool"),
               [[list(k), list(h.counts), h.total] for k, h in sorted(self.upstream_latency.items())])
        family("retries", "counter", "Requests sent again to another backend", ("pool",),
               [[[k], v] for k, v in sorted(self.retries.items())])
        tunnels = sorted(self.tunnels.items())
        family("tunnels", "counter", "Tunnels (WebSocket) closed", ("route", "pool"), [[list(k), v[0]] for k, v in tunnels])
        family("tunnel_bytes_from_clients", "counter", "Bytes clients sent through tunnels", ("route", "pool"),
               [[list(k), v[1]] for k, v in tunnels])
        family("tunnel_bytes_to_clients", "counter", "Bytes origins sent through tunnels", ("route", "pool"),
               [[list(k), v[2]] for k, v in tunnels])
        tcp = sorted(self.tcp.items())
        family("tcp_sessions", "counter", "Raw TCP sessions closed", ("listener", "backend", "reason"),
               [[list(k), v[0]] for k, v in tcp])
        family("tcp_bytes_from_clients", "counter", "Bytes clients sent on raw TCP sessions",
               ("listener", "backend", "reason"), [[list(k), v[1]] for k, v in tcp])
        family("tcp_bytes_to_clients", "counter", "Bytes backends sent on raw TCP sessions",
               ("listener", "backend", "reason"), [[list(k), v[2]] for k, v in tcp])
        family("tls_handshake_failures", "counter", "Failed TLS handshakes, by listener and reason",
               ("listener", "reason"), [[list(k), v] for k, v in sorted(self.tls_failures.items())])
        family("backend_state_changes", "counter", "Backends entering or leaving rotation, by reason",
               ("pool", "backend", "reason"), [[list(k), v] for k, v in sorted(self.backend_changes.items())])
        family("reloads", "counter", "Configuration reloads, applied or refused", ("result",),
               [[[k], v] for k, v in sorted(self.reloads.items())])
        by_name: dict[str, list[Any]] = {}
        for (name, pairs), value in sorted(self.other.items()):
            by_name.setdefault(name, []).append((pairs, value))
        for name, items in by_name.items():
            label_names = sorted({k for pairs, _ in items for k, _ in pairs})
            family(name, "counter", self.other_help[name], label_names,
                   [[[dict(pairs).get(n, "") for n in label_names], v] for pairs, v in items])
        if self.gauges is not None:
            out.update(self.gauges())
        return out


def _short_reason(reason: str) -> str:
    """A TLS failure's reason as a label: bounded, so that a peer cannot grow the label set without end."""
    reason = reason.split(":")[0].strip().lower() or "unknown"
    return reason[:60]


def gauge_family(name: str, help: str, labels: Iterable[str], samples: list[Any], merge: str = "sum") -> dict[str, Any]:
    """One gauge in L{ProxyMetrics.snapshot}'s form (C{merge}: how workers' values combine: sum, min or max)."""
    return {name: {"type": "gauge", "help": help, "labels": list(labels), "samples": samples, "merge": merge}}


def merge_snapshots(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Several workers' snapshots as one: counters and histograms add up, gauges by their C{merge} rule."""
    out: dict[str, Any] = {}
    for snap in snapshots:
        for name, fam in snap.items():
            into = out.get(name)
            if into is None:
                out[name] = {**fam, "samples": [list(s) for s in fam["samples"]]}
                continue
            index = {tuple(s[0]): s for s in into["samples"]}
            for sample in fam["samples"]:
                key = tuple(sample[0])
                have = index.get(key)
                if have is None:
                    into["samples"].append(list(sample))
                    index[key] = into["samples"][-1]
                elif fam["type"] == "histogram":
                    have[1] = [a + b for a, b in zip(have[1], sample[1])]
                    have[2] += sample[2]
                elif fam.get("merge") == "min":
                    have[1] = min(have[1], sample[1])
                elif fam.get("merge") == "max":
                    have[1] = max(have[1], sample[1])
                else:
                    have[1] += sample[1]
    return out


class _SnapshotCollector:
    """A C{prometheus_client} collector over a snapshot function."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Any]:
        return []  # families vary with traffic: described when collected

    def collect(self) -> Iterable[Any]:
        return families(self.snapshot())


def families(snap: dict[str, Any]) -> Iterable[Any]:
    """C{prometheus_client} metric families of a snapshot (names get the C{rproxy_} prefix)."""
    for name, fam in snap.items():
        full, labels, kind = "rproxy_" + name, fam["labels"], fam["type"]
        if kind == "counter":
            metric = CounterMetricFamily(full, fam["help"], labels=labels)
            for values, value in fam["samples"]:
                metric.add_metric(values, value)
        elif kind == "histogram":
            metric = HistogramMetricFamily(full, fam["help"], labels=labels)
            for values, counts, total in fam["samples"]:
                buckets, running = [], 0
                for bound, count in zip([*(repr(b) for b in LATENCY_BUCKETS), "+Inf"], counts):
                    running += count
                    buckets.append((bound, running))
                metric.add_metric(values, buckets, total)
        else:
            metric = GaugeMetricFamily(full, fam["help"], labels=labels)
            for values, value in fam["samples"]:
                metric.add_metric(values, value)
        yield metric


def registry_for(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry of its own (not the process-global one): two services in one process do not collide."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))  # type: ignore[arg-type]
    return registry


def exposition(snap: dict[str, Any]) -> bytes:
    """The Prometheus text format of a snapshot, written by C{prometheus_client}."""
    return generate_latest(registry_for(lambda: snap))
