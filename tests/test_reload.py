"""
Reload: C{ProxyService.reload(config)} / C{reload_file()} (SIGHUP) apply a
new config to a running proxy on real sockets, without cutting what is in
flight, keeping the state of backends that stay, and refusing a config that
cannot be used while the old one keeps serving.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher

from rproxy_tw import ListenError, parse_config
from rproxy_tw.config import ConfigError

from .conftest import RawClient, free_port, proxy_config, request, response, until


def named(origin: Any, name: bytes):
    """A handler answering with C{name} and the target, so a response says which pool served it."""
    def handler(req):
        req.respond(200, name + b" " + req.target)
    return handler


def cfg(data: dict[str, Any]):
    return parse_config(data, source="test.toml")


def two_pools(a: str, b: str, route_to: str = "a", **extra: Any) -> dict[str, Any]:
    data = proxy_config(routes=[{"path": "/", "pool": route_to}], pools={"a": {"backends": [a]}, "b": {"backends": [b]}})
    data.update(extra)
    return data


def same_listener(proxy: Any, data: dict[str, Any]) -> dict[str, Any]:
    """C{data} with the running proxy's listener endpoint (tcp:0 would be a new listener)."""
    data["listen"] = [{"endpoint": proxy.service.config.listen[0].endpoint}]
    return data


@pytest.fixture
def events():
    seen: list[str] = []

    def observe(event):
        seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


# ---------------------------------------------------------------------------
# Routes and pools under traffic


@pytest_twisted.ensureDeferred
async def test_reload_under_kept_alive_gets_fails_no_request(net, events):
    a = await net.origin()
    a.handler = named(a, b"A")
    b = await net.origin()
    b.handler = named(b, b"B")
    proxy = await net.proxy(two_pools(a.backend, b.backend))
    clients = [await net.client(proxy.port) for _ in range(3)]
    statuses: list[int] = []
    served: list[bytes] = []
    rounds = 60
    for i in range(rounds):
        if i % 10 == 5:
            route_to = "b" if (i // 10) % 2 == 0 else "a"
            summary = proxy.service.reload(cfg(same_listener(proxy, two_pools(a.backend, b.backend, route_to))))
            assert str(summary) == "reload: routes 1 -> 1"
        for c in clients:
            c.send(request(b"GET", b"/n%d" % i))
        for c in clients:
            rs = await c.until_responses([b"GET"] * (i + 1))
            statuses.append(rs[-1].status)
            served.append(rs[-1].body.split(b" ")[0])
        assert not any(c.closed for c in clients)
    assert statuses == [200] * (rounds * 3)
    # Each reload applied to the next request on the same kept-alive connections.
    expected = []
    for i in range(rounds):
        route = b"A" if i < 5 else (b"B" if ((i - 5) // 10) % 2 == 0 else b"A")
        expected += [route] * 3
    assert served == expected
    assert any(line.startswith("reload: ") for line in events)


@pytest_twisted.ensureDeferred
async def test_reload_keeps_a_websocket_a_tcp_session_and_a_download(net):
    # HTTP origin: /ws switches protocols and echoes, /big streams a body the test writes.
    big = []

    def handler(req):
        if req.target == b"/ws":
            req.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            req.conn.echo = True
        else:
            req.write(response(200, length=False, headers=[(b"Content-Length", b"%d" % (4 * 1024 * 1024))]))
            big.append(req)

    web = await net.origin(handler)
    other = await net.origin()
    echo = await _echo_server(net)
    tcp_port = free_port()
    data = proxy_config(web.backend, pools={"legacy": {"backends": [echo]}})
    data["listen"].append({"endpoint": f"tcp:{tcp_port}:interface=127.0.0.1", "protocol": "tcp", "pool": "legacy"})
    proxy = await net.proxy(data)

    ws = await net.client(proxy.port)
    ws.send(request(b"GET", b"/ws", headers=[(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]))
    await ws.until_contains(b"101 Switching")
    download = await net.client(proxy.port)
    download.send(request(b"GET", b"/big"))
    await until(lambda: big, "the download to start")
    big[0].write(b"a" * (2 * 1024 * 1024))
    session = await net.client(tcp_port)
    session.send(b"before")
    await until(lambda: bytes(session.buf) == b"before", "the TCP echo")

    # Every pool the open work uses is gone in the new config.
    new = proxy_config(other.backend, pools={"legacy2": {"backends": [echo]}})
    new["listen"] = [{"endpoint": proxy.service.config.listen[0].endpoint},
                     {"endpoint": f"tcp:{tcp_port}:interface=127.0.0.1", "protocol": "tcp", "pool": "legacy2"}]
    summary = proxy.service.reload(cfg(new))
    assert "pools +legacy2 -legacy ~p" in str(summary)

    ws.send(b"after")
    await ws.until_contains(b"echo:after")
    session.send(b" after")
    await until(lambda: bytes(session.buf) == b"before after", "the TCP echo after the reload")
    big[0].write(b"b" * (2 * 1024 * 1024))
    [resp] = await download.until_responses([b"GET"])
    assert len(resp.body) == 4 * 1024 * 1024 and resp.body.endswith(b"b" * 100)
    assert not ws.closed and not session.closed
    # New work uses the new config.
    fresh = await net.client(proxy.port)
    fresh.send(request(b"GET", b"/x"))
    [r] = await fresh.until_responses([b"GET"])
    assert r.status == 200 and len(other.requests) == 1


async def _echo_server(net: Any) -> str:
    class Echo(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Echo))
    net.ports.append(port)
    return f"tcp:127.0.0.1:{port.getHost().port}"


# ---------------------------------------------------------------------------
# Backends that stay


@pytest_twisted.ensureDeferred
async def test_backends_that_stay_keep_state_counters_and_idle_connections(net):
    a = await net.origin()
    b = await net.origin()
    data = proxy_config(a.backend, pool={"health": {"type": "tcp", "interval": 60}})
    proxy = await net.proxy(data)
    client = await net.client(proxy.port)
    client.send(request(b"GET", b"/1"))
    await client.until_responses([b"GET"])
    pool = proxy.service.pool("p")
    kept = pool.backend(a.backend)
    monitor = proxy.service.runtime.monitors["p"]
    assert kept.total == 1 and len(kept.idle) == 1

    new = same_listener(proxy, proxy_config(a.backend, b.backend, pool={"health": {"type": "tcp", "interval": 60}}))
    proxy.service.reload(cfg(new))
    assert proxy.service.pool("p").backend(a.backend) is kept and kept.total == 1 and len(kept.idle) == 1
    assert proxy.service.runtime.monitors["p"] is monitor and monitor.running
    assert monitor.pool is proxy.service.pool("p")

    # The idle connection is reused: the origin sees no second connection.
    client.send(request(b"GET", b"/2"))
    client.send(request(b"GET", b"/3"))
    await client.until_responses([b"GET"] * 3)
    assert len(a.connections) == 1

    # The pool goes: its monitor stops, its idle connections close.
    gone = same_listener(proxy, proxy_config(routes=[{"path": "/", "pool": "q"}], pools={"q": {"backends": [b.backend]}}))
    proxy.service.reload(cfg(gone))
    assert not monitor.running and monitor.parent is None
    await until(lambda: all(c.closed for c in a.connections), "the idle connection to the removed backend to close")


# ---------------------------------------------------------------------------
# Listeners


@pytest_twisted.ensureDeferred
async def test_listeners_added_and_removed(net):
    origin = await net.origin()
    proxy = await net.proxy(proxy_config(origin.backend))
    first = proxy.service.config.listen[0].endpoint
    kept = await net.client(proxy.port)
    kept.send(request(b"GET", b"/before"))
    await kept.until_responses([b"GET"])

    added = free_port()
    data = proxy_config(origin.backend)
    data["listen"] = [{"endpoint": first}, {"endpoint": f"tcp:{added}:interface=127.0.0.1"}]
    summary = proxy.service.reload(cfg(data))
    assert str(summary) == f"reload: listeners +tcp:{added}:interface=127.0.0.1"
    on_added = await net.client(added)
    on_added.send(request(b"GET", b"/added"))
    [r] = await on_added.until_responses([b"GET"])
    assert r.status == 200
    # The unchanged listener kept its socket and its connection.
    kept.send(request(b"GET", b"/kept"))
    await kept.until_responses([b"GET", b"GET"])

    data["listen"] = [{"endpoint": f"tcp:{added}:interface=127.0.0.1"}]
    proxy.service.reload(cfg(data))
    # Removed: no longer accepting; its idle kept-alive connection closes politely.
    await kept.until_closed()
    await _refused(proxy.port)
    on_added.send(request(b"GET", b"/still"))
    await on_added.until_responses([b"GET", b"GET"])


@pytest_twisted.ensureDeferred
async def test_listeners_with_one_endpoint_string_stay_apart_over_a_reload(net):
    """Two "tcp:0" listeners are two sockets: a reload pairs them up in order, not both with one."""
    origin = await net.origin()
    data = proxy_config(origin.backend)
    data["listen"] = [{"endpoint": "tcp:0:interface=127.0.0.1"},
                      {"endpoint": "tcp:0:interface=127.0.0.1", "protocol": "tcp", "pool": "p"}]
    proxy = await net.proxy(data)
    http_port, tcp_port = proxy.ports

    async def served_as_http(port: int) -> bool:
        client = await net.client(port)
        client.send(request(b"GET", b"/which"))
        await client.until_responses([b"GET"])
        # Through the HTTP listener the origin saw the proxy's forwarding headers; raw TCP adds none.
        return any(k.lower() == b"x-forwarded-for" for k, _ in origin.requests[-1].headers)

    summary = proxy.service.reload(cfg(data))
    assert str(summary) == "reload: no changes"
    assert await served_as_http(http_port) is True
    assert await served_as_http(tcp_port) is False

    data["listen"] = data["listen"][:1]
    summary = proxy.service.reload(cfg(data))
    assert str(summary) == "reload: listeners -tcp:0:interface=127.0.0.1 #2"
    await _refused(tcp_port)
    assert await served_as_http(http_port) is True


async def _refused(port: int) -> None:
    from twisted.internet.error import ConnectionRefusedError

    async def attempt() -> bool:
        try:
            proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(RawClient))
        except ConnectionRefusedError:
            return True
        proto.transport.abortConnection()
        return False

    for _ in range(100):
        if await attempt():
            return
    raise AssertionError(f"port {port} still accepts")


@pytest_twisted.ensureDeferred
async def test_a_listener_that_cannot_listen_refuses_the_whole_reload(net):
    a = await net.origin()
    a.handler = named(a, b"A")
    b = await net.origin()
    b.handler = named(b, b"B")
    proxy = await net.proxy(two_pools(a.backend, b.backend))
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        data = same_listener(proxy, two_pools(a.backend, b.backend, "b"))
        data["listen"].append({"endpoint": f"tcp:{held.getsockname()[1]}:interface=127.0.0.1"})
        with pytest.raises(ListenError, match=r"cannot listen \(Address already in use\)"):
            proxy.service.reload(cfg(data))
    finally:
        held.close()
    client = await net.client(proxy.port)
    client.send(request(b"GET", b"/x"))
    [r] = await client.until_responses([b"GET"])
    assert r.body == b"A /x"  # the old routes still serve
    assert len(proxy.service.listeners) == 1


# ---------------------------------------------------------------------------
# Limits, refusals, the file


@pytest_twisted.ensureDeferred
async def test_a_limit_changed_by_reload_applies_to_the_next_request(net):
    origin = await net.origin()
    proxy = await net.proxy(proxy_config(origin.backend))
    client = await net.client(proxy.port)
    client.send(request(b"POST", b"/up", body=b"x" * 100))
    [r] = await client.until_responses([b"POST"])
    assert r.status == 200
    proxy.service.reload(cfg(same_listener(proxy, proxy_config(origin.backend, limits={"max_body_bytes": 10}))))
    client.send(request(b"POST", b"/up", body=b"x" * 100))
    rs = await client.until_responses([b"POST", b"POST"])
    assert rs[1].status == 413
    assert len(origin.requests) == 1


@pytest_twisted.ensureDeferred
async def test_an_invalid_file_is_refused_and_the_old_config_keeps_serving(net, tmp_path, events):
    from rproxy_tw import ProxyService
    from rproxy_tw.config import load_config

    origin = await net.origin()
    path = tmp_path / "rproxy.toml"
    good = f"""
[server]
access_log = "off"

[[listen]]
endpoint = "tcp:0:interface=127.0.0.1"

[[route]]
pool = "web"

[pool.web]
backends = ["{origin.backend}"]
"""
    path.write_text(good)
    service = ProxyService(load_config(str(path)), reactor)
    service.startService()
    net.services.append(service)
    [port] = await service.listening()
    path.write_text(good.replace('pool = "web"\n\n[pool', 'pool = "nope"\n\n[pool'))
    assert service.reload_file() is None
    refused = [line for line in events if line.startswith("reload refused")]
    assert refused == [f"reload refused, still serving the previous configuration: {path}: route[0].pool: "
                       "names pool 'nope', which has no [pool.nope]"]
    client = await net.client(port.getHost().port)
    client.send(request(b"GET", b"/still"))
    [r] = await client.until_responses([b"GET"])
    assert r.status == 200

    # A good file again: applied, one line saying what changed.
    path.write_text(good.replace("[pool.web]", "[pool.web]\nconnect_timeout = 7"))
    summary = service.reload_file()
    assert str(summary) == "reload: pools ~web"
    assert "reload: pools ~web" in events


def test_reload_summary_line():
    old = cfg(proxy_config(routes=[{"path": "/", "pool": "app"}, {"path": "/w", "pool": "web"}],
                           pools={"app": {"backends": ["tcp:127.0.0.1:1"]}, "web": {"backends": ["tcp:127.0.0.1:2"]}}))
    data = proxy_config(routes=[{"path": "/", "pool": "app"}, {"path": "/a", "pool": "api"}, {"path": "/b", "pool": "api"}],
                        pools={"app": {"backends": ["tcp:127.0.0.1:3"]}, "api": {"backends": ["tcp:127.0.0.1:2"]}},
                        limits={"max_body_bytes": 5})
    data["listen"] = [{"endpoint": "tcp:8081"}]
    from rproxy_tw.service import summarize

    assert str(summarize(old, cfg(data))) == ("reload: routes 2 -> 3, pools +api -web ~app, "
                                             "listeners +tcp:8081 -tcp:0:interface=127.0.0.1, limits changed")
    assert str(summarize(old, old)) == "reload: no changes"


def test_reload_while_stopping_is_refused():
    from twisted.internet.task import Clock

    from rproxy_tw import ProxyService

    service = ProxyService(cfg(proxy_config("tcp:127.0.0.1:1")), Clock())
    service.stopService()
    with pytest.raises(ConfigError, match="stopping"):
        service.reload(cfg(proxy_config("tcp:127.0.0.1:2")))


# ---------------------------------------------------------------------------
# twistd -n rproxy and SIGHUP


class _NamedOrigin:
    """A blocking origin in a thread answering every request with its name."""

    def __init__(self, name: bytes) -> None:
        import threading

        self.name = name
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                try:  # a health check may close its connection first
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    status, body = self.answer(data)
                    conn.sendall(b"HTTP/1.1 %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (status, len(body), body))
                except OSError:
                    pass

    def answer(self, head: bytes) -> tuple[bytes, bytes]:
        """The status line's end and the body for a request with this C{head}."""
        return b"200 OK", self.name


def test_twistd_sighup_reloads_the_file_and_refuses_a_bad_one(tmp_path):
    import signal
    import time

    from .test_graceful_stop import _read_all, _start_twistd

    a, b = _NamedOrigin(b"A"), _NamedOrigin(b"B")
    port = free_port()
    proc = _start_twistd(tmp_path, a.port, port)
    path = tmp_path / "rproxy.toml"

    def body() -> bytes:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        with s:
            return _read_all(s).partition(b"\r\n\r\n")[2]

    try:
        assert body() == b"A"
        good = path.read_text()
        path.write_text(good.replace(f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while body() != b"B":
            assert time.monotonic() < deadline, "SIGHUP did not apply the new backend"
            time.sleep(0.05)
        path.write_text(good.replace('pool = "web"', 'pool = "nope"', 1))
        proc.send_signal(signal.SIGHUP)
        assert body() == b"B"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        a.sock.close()
        b.sock.close()
    log = proc.stdout.read().decode()
    assert "reload: pools ~web" in log
    assert f"reload refused, still serving the previous configuration: {path}: route[0].pool: " \
           "names pool 'nope', which has no [pool.nope]" in log
    assert "Traceback" not in log


# ---------------------------------------------------------------------------
# What an embedding application attached survives a reload


@pytest_twisted.ensureDeferred
async def test_an_application_s_site_observers_and_filters_follow_a_reload(net):
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from zope.interface import implementer

    from rproxy_tw.events import EventRecorder, RequestFinished
    from rproxy_tw.pipeline import IRequestFilter

    @implementer(IRequestFilter)
    class Tag:
        def filterRequest(self, request, exchange):
            request.headers = [*request.headers, (b"X-Tag", b"app")]

    a = await net.origin()
    a.handler = named(a, b"A")
    b = await net.origin()
    b.handler = named(b, b"B")
    proxy = await net.proxy(two_pools(a.backend, b.backend))
    recorder = EventRecorder()
    proxy.service.runtime.events.subscribe(recorder)
    proxy.service.add_filter(Tag())
    root = Resource()
    root.putChild(b"app", proxy.service.resource)
    site = Site(root)
    app_port = reactor.listenTCP(0, site, interface="127.0.0.1")
    net.ports.append(app_port)

    async def get(port: int, target: bytes) -> bytes:
        client = await net.client(port)
        client.send(request(b"GET", target))
        [resp] = await client.until_responses([b"GET"])
        return resp.body.split(b" ")[0]

    assert await get(app_port.getHost().port, b"/app/x") == b"A"
    proxy.service.reload(cfg(same_listener(proxy, two_pools(a.backend, b.backend, "b"))))
    assert await get(app_port.getHost().port, b"/app/x") == b"B", "the application's Site serves the new routes"
    assert await get(proxy.port, b"/y") == b"B"
    assert [r.one(b"x-tag") for r in b.requests] == [b"app", b"app"], "the application's filter is still there"
    await until(lambda: len(recorder.of(RequestFinished)) == 3, "three events")
    assert [e.backend for e in recorder.of(RequestFinished)] == [a.backend, b.backend, b.backend]
