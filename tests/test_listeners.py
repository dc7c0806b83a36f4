"""
What an operator meets first on a listener: the connection limit of an
http listener, clients on a unix socket, a port already taken, and
C{--version}.  Real sockets on 127.0.0.1 (and a unix socket in the test's
folder); the twistd entry point in a subprocess.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory

from rproxy_tw import ListenError, ProxyService, parse_config

from .conftest import RawClient, proxy_config, request, until

inline = pytest_twisted.inlineCallbacks


# ---------------------------------------------------------------------------
# max_connections on an http listener


@inline
def test_http_max_connections_closes_connections_over_the_limit(net):
    origin = yield net.origin()
    config = proxy_config(origin.backend)
    config["listen"][0]["max_connections"] = 2
    proxy = yield net.proxy(config)

    served = []
    for _ in range(2):
        client = yield net.client(proxy.port)
        client.send(request())
        [resp] = yield client.until_responses([b"GET"])
        assert resp.status == 200
        served.append(client)
    refused = []
    for _ in range(2):
        client = yield net.client(proxy.port)
        client.send(request())
        refused.append(client)
    for client in refused:
        yield client.until_closed()
        assert client.buf == b"", "a connection over the limit is closed without an answer"
    assert len(origin.requests) == 2
    limit = proxy.factory.connection_limit
    assert limit.rejected == 2 and limit.active == 2

    # The two kept-alive clients still work; when one goes, a new client is served.
    served[0].send(request(target=b"/again"))
    [_, again] = yield served[0].until_responses([b"GET", b"GET"])
    assert again.status == 200
    served[1].abort()
    yield until(lambda: limit.active == 1, "the closed connection to be counted out")
    client = yield net.client(proxy.port)
    client.send(request(target=b"/new"))
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200 and origin.requests[-1].target == b"/new"


def test_max_connections_zero_is_no_limit():
    from twisted.internet.task import Clock

    from rproxy_tw.connection_limit import ConnectionLimit

    config = parse_config({"listen": [{"endpoint": "tcp:8080", "max_connections": 0}], "route": [{"pool": "p"}],
                           "pool": {"p": {"backends": ["tcp:127.0.0.1:1"]}}})
    limit = ConnectionLimit(Clock(), "tcp:8080", config.listen[0].max_connections)
    limit.active = 10**6
    assert limit.full(None) is None


# ---------------------------------------------------------------------------
# Clients on a unix socket have no address


@inline
def test_unix_socket_client_gets_no_x_forwarded_for_and_forwarded_for_unknown(net, tmp_path):
    origin = yield net.origin()
    path = str(tmp_path / "proxy.sock")
    config = proxy_config(origin.backend)
    config["listen"].append({"endpoint": f"unix:{path}"})
    yield net.proxy(config)

    client = RawClient()
    factory = Factory.forProtocol(lambda: client)
    factory.noisy = False
    yield UNIXClientEndpoint(reactor, path).connect(factory)
    net.protocols.append(client)
    client.send(request(headers=[(b"X-Forwarded-For", b"203.0.113.66")]))  # untrusted: dropped
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200
    [got] = origin.requests
    assert got.header(b"x-forwarded-for") == [], "no made-up address for a unix socket client"
    assert got.header(b"forwarded") == [b"for=unknown;proto=http;host=example.com"]
    assert got.header(b"x-forwarded-proto") == [b"http"]


# ---------------------------------------------------------------------------
# A port already in use


def test_listener_in_use_is_one_error_naming_it():
    """Embedded: startService raises ListenError with one line naming the listener."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        config = parse_config({
            "listen": [{"endpoint": "tcp:0:interface=127.0.0.1"},
                       {"endpoint": f"tcp:{port}:interface=127.0.0.1"}],
            "route": [{"pool": "p"}], "pool": {"p": {"backends": ["tcp:127.0.0.1:1"]}},
            "server": {"access_log": "off"}})
        service = ProxyService(config, reactor)
        with pytest.raises(ListenError) as info:
            service.privilegedStartService()
        assert str(info.value) == f"listen[1]: cannot listen (Address already in use): tcp:{port}:interface=127.0.0.1"
    finally:
        for listener in service.listeners:
            if listener._waitingForPort is not None and listener._waitingForPort.called:
                listener._waitingForPort.addCallback(lambda p: p and p.stopListening())
        held.close()


@pytest.mark.parametrize("runner", [
    [sys.executable, "-m", "twisted"],
    [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n"],
], ids=["twist", "twistd-n"])
def test_starting_on_a_port_in_use_says_so_in_one_line(tmp_path, runner):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    path = tmp_path / "rproxy.toml"
    path.write_text(f"""
[[listen]]
endpoint = "tcp:0:interface=127.0.0.1"

[[listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[[route]]
pool = "web"

[pool.web]
backends = ["tcp:127.0.0.1:1"]
""")
    try:
        result = subprocess.run(runner + ["rproxy", "--config", str(path)], cwd=str(tmp_path),
                                capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert result.returncode != 0
    line = f"listen[1]: cannot listen (Address already in use): tcp:{port}:interface=127.0.0.1"
    assert result.stderr.splitlines() == [line], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not os.path.exists(tmp_path / "twistd.pid")


# ---------------------------------------------------------------------------
# --version


@pytest.mark.parametrize("runner", [
    [sys.executable, "-m", "twisted"],
    [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"],
], ids=["twist", "twistd"])
def test_version_is_rproxys(tmp_path, runner):
    from importlib.metadata import version

    import twisted

    result = subprocess.run(runner + ["rproxy", "--version"], cwd=str(tmp_path), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"rproxy_tw {version('rproxy_tw')} (Twisted {twisted.version.short()})\n"


# ---------------------------------------------------------------------------
# idle_timeout = 0 on a pool: an HTTP response may pause for as long as it likes


def test_pool_idle_timeout_zero_lets_a_quiet_response_stream():
    from .test_http_server import Harness, request as raw_request, response

    h = Harness(pool={"idle_timeout": 0})
    proto, client = h.client()
    proto.dataReceived(raw_request())
    up, origin = h.accept_origin()
    up.dataReceived(response(200, length=False, headers=[(b"Content-Length", b"6")]) + b"abc")
    for _ in range(24):
        h.reactor.advance(3600)  # a day of silence from the origin, in hours
    assert not client.disconnecting and not origin.disconnecting
    up.dataReceived(b"def")
    assert client.value().endswith(b"abcdef")
