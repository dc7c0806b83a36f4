"""
Scrubbing on real sockets: rate limits (429 with Retry-After and the
RateLimit fields), IP policy at connect (before TLS, on http and tcp
listeners) and per route (403), the WAF on HTTP/1.1, HTTP/2 and the
embedded path (403 with an incident id; request bodies read before the
origin is contacted), detect mode, exclusions, the 404-burst rule, the
in-flight cap (503), per-address connection limits and the minimum body
rate (408).  Every refusal is a RequestRefused (or ConnectionRefused) event.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor

from rproxy_tw.config import RouteWafConfig
from rproxy_tw.events import ConnectionRefused, EventRecorder, RequestFinished, RequestRefused

from .conftest import proxy_config, request, until
from .test_pipeline import ENTRIES, Proxy
from .test_tls import pki  # noqa: F401 - pki is a fixture

inline = pytest_twisted.inlineCallbacks

XSS = b"/search?q=%3Cscript%3Ealert(document.cookie)%3C/script%3E"


def _config(origin: Any, **sections: Any) -> dict[str, Any]:
    config = proxy_config(origin.backend, routes=sections.pop("routes", None), limits=sections.pop("limits", None))
    config.update(sections)
    return config


def _recorder(proxy: Any) -> EventRecorder:
    recorder = EventRecorder()
    proxy.service.runtime.events.subscribe(recorder)
    return recorder


@inline
def _get(net: Any, port: int, target: bytes = b"/", headers: Any = (), method: bytes = b"GET",
         body: bytes | None = None) -> Any:
    client = yield net.client(port)
    client.send(request(method, target, headers=headers, body=body))
    [resp] = yield client.until_responses([method])
    return resp


class ScrubProxy(Proxy):
    """The three entry points of test_pipeline's proxy, with scrubbing sections added."""

    def __init__(self, net: Any, pki: Any, origin: Any, sections: dict[str, Any]) -> None:
        super().__init__(net, pki, origin)
        self.sections = sections

    @inline
    def start(self) -> Any:
        original = self.net.proxy

        def with_sections(config: dict[str, Any], *a: Any, **kw: Any) -> Any:
            config.update(self.sections)
            return original(config, *a, **kw)

        self.net.proxy = with_sections
        try:
            yield super().start()
        finally:
            self.net.proxy = original
        return self


# ---------------------------------------------------------------------------
# Rate limiting


@inline
def test_over_the_rate_a_client_gets_429_with_retry_after_and_ratelimit_fields(net):
    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, rate_limit={"requests": 1, "per": 30.0, "burst": 2}))
    recorder = _recorder(proxy)
    statuses = []
    for _ in range(3):
        resp = yield _get(net, proxy.port)
        statuses.append(resp.status)
    assert statuses == [200, 200, 429]
    assert resp.header(b"retry-after") == [b"30"]
    assert resp.header(b"ratelimit-policy") == [b'"default";q=2;w=60']
    assert resp.header(b"ratelimit") == [b'"default";r=0;t=60']
    assert b"Too Many Requests" in resp.body
    assert len(origin.requests) == 2, "the refused request never reached the origin"
    [refused] = recorder.of(RequestRefused)
    assert (refused.reason, refused.rule, refused.status, refused.client) == ("rate_limit", "default", 429, "127.0.0.1")


@inline
def test_a_route_can_have_its_own_rate_limit_or_none(net):
    origin = yield net.origin()
    routes = [{"path": "/", "pool": "p"}, {"path": "/free/", "pool": "p", "rate_limit": False},
              {"path": "/tight/", "pool": "p", "rate_limit": {"requests": 1, "per": 60.0, "burst": 1}}]
    proxy = yield net.proxy(_config(origin, routes=routes, rate_limit={"requests": 1, "per": 60.0, "burst": 3}))
    free = []
    for _ in range(5):
        resp = yield _get(net, proxy.port, b"/free/x")
        free.append(resp.status)
    assert free == [200] * 5
    tight = []
    for _ in range(2):
        resp = yield _get(net, proxy.port, b"/tight/x")
        tight.append(resp.status)
    assert tight == [200, 429]
    assert resp.header(b"ratelimit-policy") == [b'"route */tight/";q=1;w=60']
    # The global budget is another bucket: still whole.
    resp = yield _get(net, proxy.port, b"/other")
    assert resp.status == 200


@inline
def test_a_header_key_limits_each_api_key_apart(net):
    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, rate_limit={"requests": 1, "per": 60.0, "burst": 1,
                                                      "key": "header:X-Api-Key"}))
    seen = []
    for key in (b"alice", b"alice", b"bob"):
        resp = yield _get(net, proxy.port, headers=[(b"X-Api-Key", key)])
        seen.append(resp.status)
    assert seen == [200, 429, 200]


@pytest.mark.parametrize("entry", ENTRIES)
@inline
def test_rate_limiting_holds_on_every_entry_point(net, pki, entry):
    origin = yield net.origin()
    proxy = yield ScrubProxy(net, pki, origin, {"rate_limit": {"requests": 1, "per": 60.0, "burst": 1}}).start()
    first, _, _ = yield proxy.send(entry, b"GET", b"/a")
    second, _, headers = yield proxy.send(entry, b"GET", b"/b")
    assert (first, second) == (200, 429)
    assert (b"retry-after", b"60") in [(n.lower(), v) for n, v in headers]
    assert [r.target for r in origin.requests] == [b"/a"]


# ---------------------------------------------------------------------------
# IP policy


def _raw_connect(port: int) -> bytes:
    """Connect, send a request, and read until the proxy closes: what a denied client gets (nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        except OSError:
            return b""
        data = b""
        try:
            while True:
                more = s.recv(65536)
                if not more:
                    return data
                data += more
        except (ConnectionResetError, socket.timeout):
            return data


@inline
def test_a_denied_address_is_refused_at_connect_on_http_tls_and_tcp_listeners(net, pki):
    from twisted.internet import threads

    origin = yield net.origin()
    config = _config(origin, waf={"mode": "off", "deny": ["127.0.0.0/8", "2001:db8::/32"]})
    config["listen"] += [{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main"},
                         {"endpoint": "tcp:0:interface=127.0.0.1", "protocol": "tcp", "pool": "p"}]
    config["tls"] = {"main": {"certificates": [{"cert": pki.path("www-ec.pem"), "key": pki.path("www-ec.key")}]}}
    proxy = yield net.proxy(config)
    recorder = _recorder(proxy)
    for port in proxy.ports:
        got = yield threads.deferToThread(_raw_connect, port)
        assert got == b"", "closed before a byte was read: no answer, no TLS handshake"
    yield until(lambda: len(recorder.of(ConnectionRefused)) == 3, "three refusals")
    assert {(e.reason, e.rule, e.client) for e in recorder.of(ConnectionRefused)} == {
        ("ip_policy", "deny 127.0.0.0/8", "127.0.0.1")}
    assert origin.requests == [] and origin.connections == []
    assert proxy.service.guard.refused["ip_policy"] == 3


@inline
def test_an_allow_list_that_names_the_client_lets_it_in(net):
    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, waf={"mode": "off", "allow": ["127.0.0.1/32"]}))
    resp = yield _get(net, proxy.port)
    assert resp.status == 200


@pytest.mark.parametrize("entry", ENTRIES)
@inline
def test_a_route_denying_an_address_answers_403_before_the_origin(net, pki, entry):
    origin = yield net.origin()
    proxy = yield ScrubProxy(net, pki, origin, {"waf": {"mode": "off"}}).start()
    # A route that denies the loopback network: the listeners stay open to it, the route answers 403.
    config = proxy.service.config
    private = RouteWafConfig(deny=(ipaddress.ip_network("127.0.0.0/8"),))
    routes = (attrs.evolve(config.routes[0], path="/private/", waf=private), *config.routes)
    proxy.service.reload(attrs.evolve(config, routes=routes))
    status, body, _ = yield proxy.send(entry, b"GET", b"/private/x")
    assert status == 403 and b"Forbidden" in body
    status, _, _ = yield proxy.send(entry, b"GET", b"/public")
    assert status == 200
    assert [r.target for r in origin.requests] == [b"/public"]


# ---------------------------------------------------------------------------
# The WAF


@pytest.mark.parametrize("entry", ENTRIES)
@inline
def test_the_waf_blocks_an_attack_with_an_incident_id_on_every_entry_point(net, pki, entry):
    origin = yield net.origin()
    proxy = yield ScrubProxy(net, pki, origin, {"waf": {}}).start()
    recorder = _recorder(proxy)
    status, body, _ = yield proxy.send(entry, b"GET", XSS)
    assert status == 403
    assert b"web application firewall" in body
    incident = body.split(b"Incident id: ")[1].strip()
    assert len(incident) == 32
    status, _, _ = yield proxy.send(entry, b"GET", b"/search?q=O%27Brien+%22select+a+plan%22")
    assert status == 200
    assert [r.target for r in origin.requests] == [b"/search?q=O%27Brien+%22select+a+plan%22"]
    [refused] = recorder.of(RequestRefused)
    assert (refused.reason, refused.rule, refused.status, refused.request_id) == ("waf", "941100,941110", 403, incident)
    finished = [e for e in recorder.of(RequestFinished) if e.status == 403]
    assert finished and finished[0].request_id == incident


@inline
def test_detect_mode_logs_and_lets_the_request_through(net):
    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, waf={"mode": "detect"}))
    recorder = _recorder(proxy)
    resp = yield _get(net, proxy.port, XSS)
    assert resp.status == 200
    assert len(origin.requests) == 1
    [flagged] = recorder.of(RequestRefused)
    assert flagged.blocked is False and flagged.reason == "waf" and flagged.status == 0 and flagged.score >= 5


@inline
def test_a_rule_can_be_switched_off_for_a_path_or_a_route(net):
    origin = yield net.origin()
    routes = [{"path": "/", "pool": "p"}, {"path": "/cms/", "pool": "p", "waf": {"exclude": ["941100", "941110"]}},
              {"path": "/raw/", "pool": "p", "waf": False}]
    proxy = yield net.proxy(_config(origin, routes=routes, waf={
        "exclude": [{"rule": "941100", "path": "/editor/"}, {"rule": "941110", "path": "/editor/"}]}))
    seen = {}
    for prefix in (b"", b"/editor", b"/cms", b"/raw"):
        resp = yield _get(net, proxy.port, prefix + XSS)
        seen[prefix] = resp.status
    assert seen == {b"": 403, b"/editor": 200, b"/cms": 200, b"/raw": 200}


@pytest.mark.parametrize("entry", ENTRIES)
@inline
def test_an_attack_in_a_form_body_is_blocked_and_the_origin_sees_nothing(net, pki, entry):
    origin = yield net.origin()
    proxy = yield ScrubProxy(net, pki, origin, {"waf": {}}).start()
    form = [(b"Content-Type", b"application/x-www-form-urlencoded")]
    status, _, _ = yield proxy.send(entry, b"POST", b"/login", form, b"user=admin%27+OR+1%3D1--&password=x")
    assert status == 403
    status, body, _ = yield proxy.send(entry, b"POST", b"/login", form, b"user=O%27Brien&password=x")
    assert status == 200 and body.endswith(b"user=O%27Brien&password=x")
    assert [r.target for r in origin.requests] == [b"/login"], "only the ordinary form reached the origin"


@inline
def test_a_large_body_streams_on_after_its_first_kib_were_read_and_an_attack_there_is_caught(net):
    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, waf={"body_limit": 4096}))
    text = [(b"Content-Type", b"text/plain")]
    big = b"ordinary words, " * 40_000  # 640 KB: held only up to 4 KiB, then streamed
    resp = yield _get(net, proxy.port, b"/upload", text, b"POST", big)
    assert resp.status == 200
    assert bytes(origin.requests[0].body) == big
    attack = b"<script>alert(1)</script>" + big
    resp = yield _get(net, proxy.port, b"/upload", text, b"POST", attack)
    assert resp.status == 403
    assert len(origin.requests) == 1, "the origin never saw the refused upload, not even its head"


@inline
def test_a_burst_of_404s_blocks_the_client(net):
    def not_found(req: Any) -> None:
        req.respond(404, b"no such page\n")

    origin = yield net.origin(not_found)
    proxy = yield net.proxy(_config(origin, waf={}))
    statuses = []
    for i in range(32):
        resp = yield _get(net, proxy.port, b"/probe-%d" % i)
        statuses.append(resp.status)
    assert statuses[:31] == [404] * 31 and statuses[31] == 403
    assert len(origin.requests) == 31


# ---------------------------------------------------------------------------
# Floods: the in-flight cap, connections per address, slow bodies


@inline
def test_over_the_in_flight_cap_requests_are_shed_with_503_at_once(net):
    held = []
    origin = yield net.origin(held.append)
    proxy = yield net.proxy(_config(origin, limits={"max_requests_in_flight": 2}))
    recorder = _recorder(proxy)
    waiting = []
    for _ in range(2):
        client = yield net.client(proxy.port)
        client.send(request())
        waiting.append(client)
    yield until(lambda: len(held) == 2, "two requests at the origin")
    resp = yield _get(net, proxy.port)
    assert resp.status == 503 and resp.header(b"retry-after") == [b"1"]
    held[0].respond(200, b"done")
    yield waiting[0].until_responses([b"GET"])
    # A client that leaves frees its place too.
    waiting[1].abort()
    yield until(lambda: origin.connections[1].closed, "the abandoned request's origin connection to close")
    after = yield net.client(proxy.port)
    after.send(request(target=b"/after"))
    yield until(lambda: len(held) == 3, "the next request at the origin")
    held[2].respond(200, b"ok")
    [resp] = yield after.until_responses([b"GET"])
    assert resp.status == 200
    assert [e.reason for e in recorder.of(RequestRefused)] == ["overload"]


@inline
def test_connections_per_address_over_the_limit_are_closed_at_once(net):
    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, limits={"max_connections_per_ip": 2}))
    recorder = _recorder(proxy)
    kept = []
    for _ in range(2):
        client = yield net.client(proxy.port)
        kept.append(client)
    extra = yield net.client(proxy.port)
    yield extra.until_closed()
    assert extra.buf == b""
    assert [e.reason for e in recorder.of(ConnectionRefused)] == ["connections_per_ip"]
    kept[0].abort()
    yield until(lambda: proxy.service.guard.open["127.0.0.1"] == 1, "the closed connection to be counted out")
    resp = yield _get(net, proxy.port)
    assert resp.status == 200


@inline
def test_new_connections_over_the_per_address_rate_are_refused(net):
    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, limits={"connection_rate_per_ip": 1, "connection_burst_per_ip": 3}))
    clients = []
    for _ in range(5):
        client = yield net.client(proxy.port)
        clients.append(client)
    yield until(lambda: sum(c.closed for c in clients) == 2, "two connections refused")
    assert [c.closed for c in clients] == [False, False, False, True, True]
    assert proxy.service.guard.refused["connection_rate"] == 2


@inline
def test_a_body_trickling_below_the_minimum_rate_gets_408(net):
    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, limits={"min_body_rate": 1000, "body_rate_window": 0.3}))
    recorder = _recorder(proxy)
    client = yield net.client(proxy.port)
    client.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)

    def trickle() -> None:
        if not client.closed:
            client.send(b"x")
            reactor.callLater(0.05, trickle)

    trickle()
    yield client.until_closed()
    assert client.buf.startswith(b"HTTP/1.1 408 ")
    assert [(e.reason, e.status) for e in recorder.of(RequestRefused)] == [("slow_body", 408)]
    # A body at a fair rate is not affected.
    resp = yield _get(net, proxy.port, b"/upload", method=b"POST", body=b"y" * 50_000)
    assert resp.status == 200


@inline
def test_a_reload_applies_new_ip_lists_and_limits_to_new_connections(net):
    from rproxy_tw import parse_config

    origin = yield net.origin()
    data = _config(origin)
    proxy = yield net.proxy(data)
    resp = yield _get(net, proxy.port)
    assert resp.status == 200
    data["waf"] = {"mode": "off", "deny": ["127.0.0.1/32"]}
    proxy.service.reload(parse_config(data, source="test.toml"))
    refused = yield net.client(proxy.port)
    yield refused.until_closed()
    assert refused.buf == b""
    del data["waf"]
    data["rate_limit"] = {"requests": 1, "per": 60.0, "burst": 1}
    proxy.service.reload(parse_config(data, source="test.toml"))
    statuses = []
    for _ in range(2):
        resp = yield _get(net, proxy.port)
        statuses.append(resp.status)
    assert statuses == [200, 429]


@inline
def test_a_listener_at_max_connections_publishes_each_refusal(net):
    origin = yield net.origin()
    config = _config(origin)
    config["listen"][0]["max_connections"] = 1
    proxy = yield net.proxy(config)
    recorder = _recorder(proxy)
    kept = yield net.client(proxy.port)
    kept.send(request())
    yield kept.until_responses([b"GET"])
    extra = yield net.client(proxy.port)
    yield extra.until_closed()
    [refused] = recorder.of(ConnectionRefused)
    assert (refused.reason, refused.rule) == ("max_connections", "max_connections 1")


@inline
def test_an_http2_body_trickling_below_the_minimum_rate_gets_408(net, pki):
    from twisted.internet import threads

    from .test_tls_h2 import _H2Client, _status

    origin = yield net.origin()
    proxy = yield ScrubProxy(net, pki, origin, {"limits": {"min_body_rate": 1000, "body_rate_window": 0.3}}).start()
    recorder = _recorder(proxy)

    def run() -> Any:
        client = _H2Client(pki, proxy.tls_port)
        try:
            sid = client.request(b"POST", b"/upload", b"x" * 10, end=False,
                                 headers=[(b"content-length", b"100000")])
            client.read(lambda: client.responses[sid]["ended"])
            return client.responses[sid]
        finally:
            client.close()

    answer = yield threads.deferToThread(run)
    assert _status(answer) == 408
    assert [(e.reason, e.status) for e in recorder.of(RequestRefused)] == [("slow_body", 408)]


@inline
def test_a_trusted_proxy_is_not_refused_at_connect_but_its_clients_are_judged_per_request(net):
    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, server={"access_log": "off", "trusted_proxies": ["127.0.0.1/32"]},
                                    waf={"mode": "off", "deny": ["127.0.0.0/8", "198.51.100.0/24"]},
                                    limits={"max_connections_per_ip": 1}))
    first = yield net.client(proxy.port)
    second = yield net.client(proxy.port)
    resp = yield _get(net, proxy.port, headers=[(b"X-Forwarded-For", b"203.0.113.9")])
    assert resp.status == 200, "the trusted proxy holds three connections and its client is allowed"
    resp = yield _get(net, proxy.port, headers=[(b"X-Forwarded-For", b"203.0.113.9, 198.51.100.7")])
    assert resp.status == 403
    assert not first.closed and not second.closed
    assert [r.header(b"x-forwarded-for") for r in origin.requests] == [[b"203.0.113.9, 127.0.0.1"]]


@inline
def test_a_client_expecting_100_continue_is_told_to_send_the_body_the_waf_reads(net):
    from .conftest import curl

    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, waf={}))
    form = "name=" + "O%27Brien+" * 300
    # Without the proxy's own 100 Continue, curl would wait its whole expect100-timeout (60 s)
    # before sending the body, past --max-time.
    out, err, code = yield curl("--expect100-timeout", "60", "-H", "Expect: 100-continue",
                                "-H", "Content-Type: application/x-www-form-urlencoded",
                                "--data-binary", form, f"{proxy.url}/form")
    assert code == 0, err
    assert out.endswith(form.encode())
    assert origin.requests[0].header(b"expect") == []
    resp = yield _get(net, proxy.port, b"/form", [(b"Content-Type", b"application/x-www-form-urlencoded")],
                      b"POST", b"q=%3Cscript%3Ealert(1)%3C/script%3E")
    assert resp.status == 403


@inline
def test_a_refusal_while_the_body_still_comes_closes_the_connection(net):
    origin = yield net.origin()
    proxy = yield net.proxy(_config(origin, waf={"body_limit": 1024}))
    client = yield net.client(proxy.port)
    head = (b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 100000000\r\n\r\n")
    client.send(head + b"<script>alert(1)</script>" + b"x" * 2000)
    yield client.until_closed()
    assert client.buf.startswith(b"HTTP/1.1 403 ") and b"Connection: close\r\n" in client.buf
    assert origin.requests == []
