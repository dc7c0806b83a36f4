"""
The admin listener: Prometheus /metrics after known traffic, the JSON API
(status, drain and undrain under load, reload, the token), on real sockets.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from zope.interface.verify import verifyObject

from rproxy_tw.admin.api import IAdminSource, LocalSource
from rproxy_tw.events import IEventObserver
from tests.conftest import proxy_config, until, web_client
from tests.test_tls import pki  # noqa: F401 - a fixture


def admin_config(*backends: str, token: str = "", **kw: Any) -> dict[str, Any]:
    config = proxy_config(*backends, **kw)
    config["admin"] = {"endpoint": "tcp:0:interface=127.0.0.1", "token": token}
    return config


def admin_url(proxy: Any) -> str:
    return f"http://127.0.0.1:{proxy.service.admin_listener._port.getHost().port}"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@inlineCallbacks
def get(url: str) -> Any:
    client = web_client()
    response = yield client.get(url)
    body = yield response.content()
    return response.code, body


@inlineCallbacks
def post(url: str, body: Any = None, headers: dict[bytes, list[bytes]] | None = None) -> Any:
    client = web_client()
    data = json.dumps(body).encode() if body is not None else b""
    response = yield client.post(url, data=data, headers={b"Content-Type": [b"application/json"], **(headers or {})})
    answer = yield response.content()
    return response.code, json.loads(answer)


def test_the_sources_provide_their_interfaces() -> None:
    from rproxy_tw.config import parse_config
    from rproxy_tw.service import ProxyService

    service = ProxyService(parse_config(admin_config("tcp:127.0.0.1:1")), reactor)
    assert isinstance(service.admin, LocalSource)
    verifyObject(IAdminSource, service.admin)
    verifyObject(IEventObserver, service.admin.counters)


@inlineCallbacks
def test_metrics_count_known_traffic(net) -> None:
    def handler(req: Any) -> None:
        if req.target == b"/fail":
            req.respond(503, b"no")
        else:
            req.respond(200, b"hello")

    origin = yield net.origin(handler)
    proxy = yield net.proxy(admin_config(origin.backend))
    client = web_client()
    for _ in range(3):
        response = yield client.get(proxy.url + "/ok")
        yield response.content()
    response = yield client.post(proxy.url + "/fail", data=b"12345678")
    yield response.content()
    code, body = yield get(admin_url(proxy) + "/metrics")
    assert code == 200
    found = samples(body.decode())
    labels = (("backend", origin.backend), ("pool", "p"), ("route", "*/"))
    assert found[("rproxy_requests_total", tuple(sorted((*labels, ("code", "2xx")))))] == 3
    assert found[("rproxy_requests_total", tuple(sorted((*labels, ("code", "5xx")))))] == 1
    assert found[("rproxy_response_body_bytes_total", tuple(sorted((*labels, ("code", "2xx")))))] == 15
    assert found[("rproxy_request_body_bytes_total", tuple(sorted((*labels, ("code", "5xx")))))] == 8
    route = (("pool", "p"), ("route", "*/"))
    assert found[("rproxy_request_duration_seconds_count", route)] == 4
    assert found[("rproxy_upstream_head_seconds_count", route)] == 4
    assert found[("rproxy_request_duration_seconds_bucket", tuple(sorted((*route, ("le", "+Inf")))))] == 4
    assert found[("rproxy_backend_healthy", (("backend", origin.backend), ("pool", "p")))] == 1
    assert found[("rproxy_pool_backends_in_rotation", (("pool", "p"),))] == 1
    assert found[("rproxy_client_connections_total", (("listener", "tcp:0:interface=127.0.0.1"),))] >= 1


@inlineCallbacks
def test_status_lists_listeners_routes_pools_and_backends(net) -> None:
    a = yield net.origin()
    b = yield net.origin()
    proxy = yield net.proxy(admin_config(a.backend, b.backend))
    code, body = yield get(admin_url(proxy) + "/api/status")
    assert code == 200
    status = json.loads(body)
    assert [l["endpoint"] for l in status["listeners"]] == ["tcp:0:interface=127.0.0.1"]
    assert [r["name"] for r in status["routes"]] == ["*/"]
    [pool] = status["pools"]
    assert [x["endpoint"] for x in pool["backends"]] == [a.backend, b.backend]
    assert all(x["healthy"] and not x["draining"] and x["weight"] == 1 for x in pool["backends"])
    code, body = yield get(admin_url(proxy) + "/api/pools")
    assert json.loads(body)[0]["name"] == "p"
    code, body = yield get(admin_url(proxy) + "/api/nothing")
    assert code == 404


@inlineCallbacks
def test_draining_through_the_api_under_a_request_loop_loses_none(net) -> None:
    a = yield net.origin(lambda req: req.respond(200, b"a"))
    b = yield net.origin(lambda req: req.respond(200, b"b"))
    proxy = yield net.proxy(admin_config(a.backend, b.backend))
    client = web_client()
    answers: list[tuple[int, bytes]] = []
    drained_at: list[int] = []

    @inlineCallbacks
    def loop(n: int) -> Any:
        for _ in range(n):
            response = yield client.get(proxy.url + "/")
            body = yield response.content()
            answers.append((response.code, body))

    @inlineCallbacks
    def drain() -> Any:
        yield until(lambda: len(answers) >= 20, "requests before the drain")
        code, result = yield post(admin_url(proxy) + "/api/drain", {"pool": "p", "backend": a.backend})
        assert code == 200 and result["draining"] is True and result["healthy"] is True
        drained_at.append(len(answers))

    yield gatherResults([loop(40), loop(40), drain()])
    assert len(answers) == 80 and all(code == 200 for code, _ in answers)
    after = answers[drained_at[0] + 2:]  # the two loops' requests in flight at the drain may still go to a
    assert after and all(body == b"b" for _, body in after)
    backend = proxy.service.pool("p").backend(a.backend)
    assert backend.draining and backend.healthy and backend.inflight == 0
    code, result = yield post(admin_url(proxy) + "/api/undrain", {"pool": "p", "backend": a.backend})
    assert code == 200 and result["draining"] is False
    yield loop(4)
    assert {body for _, body in answers[-4:]} == {b"a", b"b"}


@inlineCallbacks
def test_unknown_backends_and_bad_bodies_are_clear_errors(net) -> None:
    a = yield net.origin()
    proxy = yield net.proxy(admin_config(a.backend))
    code, result = yield post(admin_url(proxy) + "/api/drain", {"pool": "nope", "backend": a.backend})
    assert code == 404 and "nope" in result["error"]
    code, result = yield post(admin_url(proxy) + "/api/drain?pool=p&backend=tcp:127.0.0.1:1")
    assert code == 404 and "tcp:127.0.0.1:1" in result["error"]
    code, result = yield post(admin_url(proxy) + "/api/drain", {"pool": "p"})
    assert code == 400
    code, body = yield get(admin_url(proxy) + "/api/drain")
    assert code == 405


@inlineCallbacks
def test_the_token_guards_changing_calls_and_cross_site_posts_are_refused(net) -> None:
    a = yield net.origin()
    proxy = yield net.proxy(admin_config(a.backend, token="s3cret"))
    url = admin_url(proxy) + "/api/drain"
    body = {"pool": "p", "backend": a.backend}
    code, result = yield post(url, body)
    assert code == 401 and "Bearer" in result["error"]
    code, result = yield post(url, body, {b"Authorization": [b"Bearer wrong"]})
    assert code == 401
    assert not proxy.service.pool("p").backend(a.backend).draining
    code, result = yield post(url, body, {b"Authorization": [b"Bearer s3cret"], b"Origin": [b"http://evil.example"]})
    assert code == 403
    code, result = yield post(url, body, {b"Authorization": [b"Bearer s3cret"]})
    assert code == 200 and proxy.service.pool("p").backend(a.backend).draining
    code, _ = yield get(admin_url(proxy) + "/api/status")
    assert code == 200  # reading needs no token


@inlineCallbacks
def test_reload_through_the_api_applies_the_file_or_says_why_not(net, tmp_path) -> None:
    from rproxy_tw.config import load_config

    a = yield net.origin(lambda req: req.respond(200, b"a"))
    b = yield net.origin(lambda req: req.respond(200, b"b"))
    proxy = yield net.proxy(admin_config(a.backend))
    path = tmp_path / "rproxy.toml"
    proxy.service.load_config = lambda: load_config(str(path))
    path.write_text(f'[[listen]]\nendpoint = "tcp:0:interface=127.0.0.1"\n[[route]]\npath = "/"\npool = "p"\n'
                    f'[pool.p]\nbackends = ["{b.backend}"]\n[admin]\nendpoint = "tcp:0:interface=127.0.0.1"\n'
                    '[server]\naccess_log = "off"\n')
    code, result = yield post(admin_url(proxy) + "/api/reload")
    assert code == 200 and result["ok"] is True and "pools ~p" in result["summary"]
    response = yield web_client().get(proxy.url + "/")
    assert (yield response.content()) == b"b"
    path.write_text("[pool.p\n")
    code, result = yield post(admin_url(proxy) + "/api/reload")
    assert code == 200 and result["ok"] is False and "not valid TOML" in result["error"]
    code, body = yield get(admin_url(proxy) + "/metrics")
    found = samples(body.decode())
    assert found[("rproxy_reloads_total", (("result", "applied"),))] == 1
    assert found[("rproxy_reloads_total", (("result", "refused"),))] == 1


@inlineCallbacks
def test_the_status_page_is_one_self_contained_file(net) -> None:
    a = yield net.origin()
    proxy = yield net.proxy(admin_config(a.backend))
    code, body = yield get(admin_url(proxy) + "/")
    assert code == 200 and body.startswith(b"<!doctype html>")
    assert b"api/status" in body
    for external in (b"http://", b"https://", b"<link", b"src="):
        assert external not in body


@inlineCallbacks
def test_a_drain_set_through_the_api_survives_a_reload_that_keeps_the_backend(net, tmp_path) -> None:
    from rproxy_tw.config import load_config

    a = yield net.origin(lambda req: req.respond(200, b"a"))
    b = yield net.origin(lambda req: req.respond(200, b"b"))
    proxy = yield net.proxy(admin_config(a.backend, b.backend))
    code, _ = yield post(admin_url(proxy) + "/api/drain", {"pool": "p", "backend": a.backend})
    assert code == 200
    path = tmp_path / "rproxy.toml"
    path.write_text('[[listen]]\nendpoint = "tcp:0:interface=127.0.0.1"\n[[route]]\npath = "/"\npool = "p"\n'
                    f'[pool.p]\nbackends = ["{a.backend}", "{b.backend}"]\nretries = 2\n'
                    '[admin]\nendpoint = "tcp:0:interface=127.0.0.1"\n[server]\naccess_log = "off"\n')
    proxy.service.load_config = lambda: load_config(str(path))
    code, result = yield post(admin_url(proxy) + "/api/reload")
    assert code == 200 and result["ok"] is True
    code, body = yield get(admin_url(proxy) + "/api/pools")
    [pool] = json.loads(body)
    states = {x["endpoint"]: x["draining"] for x in pool["backends"]}
    assert states == {a.backend: True, b.backend: False}
    client = web_client()
    for _ in range(4):
        response = yield client.get(proxy.url + "/")
        assert (yield response.content()) == b"b"


def test_a_new_event_type_is_counted_by_adding_one_entry() -> None:
    import attrs

    from rproxy_tw.admin.metrics import ProxyMetrics, exposition

    @attrs.frozen
    class Refused:
        reason: str

    metrics = ProxyMetrics()
    metrics.count(Refused, "refusals", "Requests refused by scrubbing", lambda e: {"reason": e.reason})
    for reason in ("rate_limit", "waf", "rate_limit"):
        metrics.observe(Refused(reason))
    found = samples(exposition(metrics.snapshot()).decode())
    assert found[("rproxy_refusals_total", (("reason", "rate_limit"),))] == 2
    assert found[("rproxy_refusals_total", (("reason", "waf"),))] == 1


def test_workers_snapshots_add_up_and_gauges_follow_their_rule() -> None:
    from rproxy_tw.admin.metrics import (
        ProxyMetrics,
        exposition,
        gauge_family,
        merge_snapshots,
    )
    from rproxy_tw.events import RequestFinished

    def worker(healthy: int) -> dict[str, Any]:
        metrics = ProxyMetrics(lambda: gauge_family("backend_healthy", "h", ("backend",), [[["b"], healthy]],
                                                    merge="min"))
        for status in (200, 200, 502):
            metrics.observe(RequestFinished("c", b"GET", b"/", b"1.1", None, status, 10, 1.0, 1.004, "*/", "p", "b"))
        return metrics.snapshot()

    merged = merge_snapshots([worker(1), worker(0)])
    found = samples(exposition(merged).decode())
    assert found[("rproxy_requests_total", (("backend", "b"), ("code", "2xx"), ("pool", "p"), ("route", "*/")))] == 4
    assert found[("rproxy_request_duration_seconds_count", (("pool", "p"), ("route", "*/")))] == 6
    assert found[("rproxy_request_duration_seconds_bucket", (("le", "0.005"), ("pool", "p"), ("route", "*/")))] == 6
    assert found[("rproxy_backend_healthy", (("backend", "b"),))] == 0


def _events_strategy() -> Any:
    from hypothesis import strategies as st

    from rproxy_tw.events import RequestFinished

    def build(route: Any, backend: Any, status: int, started: Any, duration: float, upstream: Any, attempts: int,
              tunnel: bool, sent: int, body: int) -> RequestFinished:
        return RequestFinished("c", b"GET", b"/", b"1.1", None, status, sent, started,
                               (started or 0.0) + duration, route, "p" if route else None, backend, (),
                               body if tunnel else None, tunnel, None, upstream, attempts, body)

    return st.lists(st.builds(
        build, st.sampled_from([None, "*/", "*/api/"]), st.sampled_from([None, "b1", "b2"]),
        st.sampled_from([101, 200, 204, 304, 404, 499, 502, 503]), st.sampled_from([None, 100.0]),
        st.floats(0, 40), st.one_of(st.none(), st.floats(0, 40)), st.integers(0, 3), st.booleans(),
        st.integers(0, 10**6), st.integers(0, 10**6)), max_size=40)


def test_the_counts_are_those_of_the_events() -> None:
    from hypothesis import given, settings

    from rproxy_tw.admin.metrics import ProxyMetrics

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(_events_strategy())
    def check(events: list[Any]) -> None:
        from bisect import bisect_left

        import pytest

        from rproxy_tw.admin.metrics import LATENCY_BUCKETS
        from rproxy_tw.events import RequestFinished

        metrics = ProxyMetrics()
        errors: list[Any] = []
        metrics.also = errors.append
        for i, event in enumerate(events):
            if i % 2:
                metrics.observe(event)
            else:
                metrics.observe_request(tuple(event))  # as the bus hands requests out: their fields, an exact tuple
        # The same counts, computed plainly from the events.
        requests: dict[Any, list[int]] = {}
        total: dict[Any, list[Any]] = {}
        upstream: dict[Any, list[Any]] = {}
        retries: dict[str, int] = {}
        for e in events:
            if e.tunnel:
                continue
            code = f"{e.status // 100}xx"
            counts = requests.setdefault((e.route or "-", e.pool or "-", e.backend or "-", code), [0, 0, 0])
            counts[0] += 1
            counts[1] += e.request_bytes
            counts[2] += e.bytes_sent
            if e.started is not None:
                h = total.setdefault((e.route or "-", e.pool or "-"), [[0] * (len(LATENCY_BUCKETS) + 1), 0.0])
                h[0][bisect_left(LATENCY_BUCKETS, e.finished - e.started)] += 1
                h[1] += e.finished - e.started
                if e.upstream_time is not None:
                    u = upstream.setdefault((e.route or "-", e.pool or "-"),
                                            [[0] * (len(LATENCY_BUCKETS) + 1), 0.0])
                    u[0][bisect_left(LATENCY_BUCKETS, e.upstream_time)] += 1
                    u[1] += e.upstream_time
            if e.attempts > 1:
                retries[e.pool or "-"] = retries.get(e.pool or "-", 0) + e.attempts - 1
        assert metrics.requests == requests
        assert metrics.retries == retries
        for found, expected in ((metrics.total_latency, total), (metrics.upstream_latency, upstream)):
            assert {k: h.counts for k, h in found.items() if sum(h.counts)} == {k: h[0] for k, h in expected.items()}
            assert {k: h.total for k, h in found.items() if sum(h.counts)} == \
                {k: pytest.approx(h[1]) for k, h in expected.items()}
        assert sum(t[0] for t in metrics.tunnels.values()) == sum(1 for e in events if e.tunnel)
        assert errors == [e for e in events if e.status >= 500]
        assert all(type(e) is RequestFinished for e in errors)  # the recent errors read them by name

    check()


def test_histogram_buckets_from_folds_are_those_of_bisect_on_every_bound() -> None:
    """
    Requests are counted in folds (when FOLD_EVERY wait, and when the counts
    are read), their latencies bucketed by sorting: the exposition, parsed by
    prometheus_client, has the buckets, counts and sums each request gives
    alone, values exactly on a bound included, across several folds.
    """
    from bisect import bisect_left

    import pytest

    from rproxy_tw.admin.metrics import FOLD_EVERY, LATENCY_BUCKETS, ProxyMetrics, exposition
    from rproxy_tw.events import RequestFinished

    durations = [d for bound in LATENCY_BUCKETS for d in (bound, bound * 1.001, bound * 0.999)] + [0.0, 31.0, 99.0]
    events = [RequestFinished("c", b"GET", b"/", b"1.1", None, status, 100 + i, 0.0, durations[i % len(durations)],
                              "*/", "p", "b", (), None, False, None, durations[-1 - i % len(durations)], 1, 7)
              for i, status in enumerate([200, 404, 503] * (FOLD_EVERY // 2 + 5))]
    metrics = ProxyMetrics()
    errors: list[Any] = []
    metrics.also = errors.append
    for event in events[:FOLD_EVERY]:
        metrics.observe_request(event)
    assert not metrics._pending  # FOLD_EVERY waiting: counted at once
    for event in events[FOLD_EVERY:]:
        metrics.observe(event)
    found = samples(exposition(metrics.snapshot()).decode())
    assert not metrics._pending
    for name, values in (("request_duration_seconds", [e.finished - e.started for e in events]),
                         ("upstream_head_seconds", [e.upstream_time for e in events])):
        counts = [0] * (len(LATENCY_BUCKETS) + 1)
        for value in values:
            counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        running = 0
        for bound, count in zip([*(repr(b) for b in LATENCY_BUCKETS), "+Inf"], counts):
            running += count
            assert found[(f"rproxy_{name}_bucket", (("le", bound), ("pool", "p"), ("route", "*/")))] == running
        assert found[(f"rproxy_{name}_count", (("pool", "p"), ("route", "*/")))] == len(values)
        assert found[(f"rproxy_{name}_sum", (("pool", "p"), ("route", "*/")))] == pytest.approx(sum(values))
    for status, code in ((200, "2xx"), (404, "4xx"), (503, "5xx")):
        mine = [e for e in events if e.status == status]
        labels = (("backend", "b"), ("code", code), ("pool", "p"), ("route", "*/"))
        assert found[("rproxy_requests_total", labels)] == len(mine)
        assert found[("rproxy_response_body_bytes_total", labels)] == sum(e.bytes_sent for e in mine)
        assert found[("rproxy_request_body_bytes_total", labels)] == 7 * len(mine)
    assert errors == [e for e in events if e.status >= 500]


def test_the_cache_events_are_counted() -> None:
    from rproxy_tw.admin.metrics import ProxyMetrics, exposition
    from rproxy_tw.events import CacheEvicted, CacheHit, CacheMiss, CacheStored

    metrics = ProxyMetrics()
    for event in (CacheMiss("*/", "k", "uri-miss"), CacheStored("*/", "k", 10), CacheHit("*/", "k", 10),
                  CacheHit("*/", "k", 10, "stale"), CacheHit("*/", "k", 10), CacheEvicted("k", 10, "lru")):
        metrics.observe(event)
    found = samples(exposition(metrics.snapshot()).decode())
    assert found[("rproxy_cache_hits_total", (("kind", "hit"), ("route", "*/")))] == 2
    assert found[("rproxy_cache_hits_total", (("kind", "stale"), ("route", "*/")))] == 1
    assert found[("rproxy_cache_misses_total", (("reason", "uri-miss"), ("route", "*/")))] == 1
    assert found[("rproxy_cache_stores_total", (("route", "*/"),))] == 1
    assert found[("rproxy_cache_evictions_total", (("reason", "lru"),))] == 1


@inlineCallbacks
def test_purge_through_the_api_makes_the_next_request_go_to_the_origin(net) -> None:
    def handler(req: Any) -> None:
        req.respond(200, b"page " + req.target, [(b"Cache-Control", b"max-age=600")])

    origin = yield net.origin(handler)
    proxy = yield net.proxy(admin_config(origin.backend, token="t0k",
                                         routes=[{"path": "/", "pool": "p", "cache": True}]))
    client = web_client()
    for path in ("/a/1", "/a/1", "/a/2", "/b"):
        response = yield client.get(proxy.url + path)
        assert (yield response.content()) == b"page " + path.encode()
    assert len(origin.requests) == 3  # the second /a/1 was a hit
    purge = admin_url(proxy) + "/api/purge"
    code, result = yield post(purge, {"url": "127.0.0.1/a/*"})
    assert code == 401  # a changing call: the token guards it
    auth = {b"Authorization": [b"Bearer t0k"]}
    host = f"127.0.0.1:{proxy.port}"
    code, result = yield post(purge, {"url": f"{host}/a/*"}, auth)
    assert code == 200 and result["purged"] == 2
    code, result = yield post(purge, {}, auth)
    assert code == 400
    for path in ("/a/1", "/b"):
        response = yield client.get(proxy.url + path)
        yield response.content()
    assert [r.target for r in origin.requests][3:] == [b"/a/1"]  # /b is still a hit


@inlineCallbacks
def test_purge_without_a_cached_route_is_a_clear_404(net) -> None:
    origin = yield net.origin()
    proxy = yield net.proxy(admin_config(origin.backend))
    code, result = yield post(admin_url(proxy) + "/api/purge", {"url": "example.com/*"})
    assert code == 404 and "cache" in result["error"]


@inlineCallbacks
def test_scrubbing_refusals_are_counted_by_reason(net) -> None:
    origin = yield net.origin()
    config = admin_config(origin.backend)
    config["waf"] = {"mode": "block"}
    proxy = yield net.proxy(config)
    client = web_client()
    response = yield client.get(proxy.url + "/search?q=1'%20OR%20'1'='1")
    yield response.content()
    assert response.code == 403
    response = yield client.get(proxy.url + "/search?q=shoes")
    yield response.content()
    assert response.code == 200 and len(origin.requests) == 1
    code, body = yield get(admin_url(proxy) + "/metrics")
    found = samples(body.decode())
    assert found[("rproxy_requests_refused_total", (("blocked", "true"), ("reason", "waf"), ("route", "*/")))] == 1


def _handshake(ca: str, port: int, alpn: list[str] | None) -> str | None:
    """A blocking TLS handshake (in a thread): the protocol ALPN chose."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=ca)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="www.example.test") as tls:
            return tls.selected_alpn_protocol()


@inlineCallbacks
def test_tls_handshakes_are_counted_by_alpn_and_failures_by_reason(net, pki) -> None:
    import socket

    from twisted.internet.threads import deferToThread

    origin = yield net.origin()
    config = admin_config(origin.backend)
    config["listen"][0]["tls"] = "main"
    config["tls"] = {"main": {"certificates": [{"cert": pki.path("www-ec.pem"), "key": pki.path("www-ec.key")}]}}
    proxy = yield net.proxy(config)
    assert (yield deferToThread(_handshake, pki.ca_path, proxy.port, ["h2", "http/1.1"])) == "h2"
    assert (yield deferToThread(_handshake, pki.ca_path, proxy.port, ["http/1.1"])) == "http/1.1"
    assert (yield deferToThread(_handshake, pki.ca_path, proxy.port, None)) is None

    def plain_bytes() -> None:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            raw.recv(100)

    yield deferToThread(plain_bytes)
    listener = config["listen"][0]["endpoint"]

    def counted() -> Any:
        d = get(admin_url(proxy) + "/metrics")
        return d.addCallback(lambda answer: samples(answer[1].decode()))

    found = yield counted()
    for alpn in ("h2", "http/1.1", "-"):
        assert found[("rproxy_tls_handshakes_total", (("alpn", alpn), ("listener", listener)))] == 1
    failures = [v for (name, labels), v in found.items()
                if name == "rproxy_tls_handshake_failures_total" and dict(labels)["listener"] == listener]
    assert sum(failures) == 1
