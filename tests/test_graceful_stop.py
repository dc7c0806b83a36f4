"""
Graceful stop: what a connection does when asked to drain (bytes on a
memory transport, time from a Clock), what C{ProxyService.stopService}
waits for on real sockets, and C{twistd -n rproxy} given SIGTERM once and
twice.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport

from rproxy_tw.http.h2 import H2ServerConnection

from .conftest import RawClient, free_port, proxy_config, request, response, until
from .test_http_server import Harness, one_response, take


# ---------------------------------------------------------------------------
# One connection asked to drain


def test_idle_http1_connection_closes_at_once():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(b"GET", b"/a"))
    up, origin = h.accept_origin()
    up.dataReceived(response(200, b"ok"))
    assert one_response(take(client)).status == 200
    assert not client.disconnecting
    proto.drain()
    assert client.disconnecting


def test_busy_http1_connection_answers_then_closes_with_connection_close():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request(b"GET", b"/slow"))
    up, origin = h.accept_origin()
    proto.drain()
    assert not client.disconnecting  # the request in flight is not cut
    up.dataReceived(response(200, b"the whole answer"))
    resp = one_response(take(client))
    assert resp.status == 200 and resp.body == b"the whole answer"
    assert resp.one(b"connection") == b"close"
    assert client.disconnecting


def test_http1_request_head_arriving_while_draining_is_answered_with_close():
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"GET /half HTTP/1.1\r\nHost: example.com\r\n")
    proto.drain()
    assert not client.disconnecting
    proto.dataReceived(b"\r\n")
    up, origin = h.accept_origin()
    up.dataReceived(response(200, b"ok"))
    resp = one_response(take(client))
    assert resp.status == 200 and resp.one(b"connection") == b"close"
    assert client.disconnecting


def _h2_client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    return c


def test_h2_connection_sends_goaway_then_finishes_its_streams():
    h = Harness()
    conn = H2ServerConnection(h.factory)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 8443), lenient=True)
    conn.makeConnection(transport)
    client = _h2_client()
    client.send_headers(1, [(b":method", b"GET"), (b":path", b"/long"), (b":scheme", b"https"),
                            (b":authority", b"example.com")], end_stream=True)
    conn.dataReceived(client.data_to_send())
    h.reactor.advance(0)  # the end of the reactor turn: the connection writes once per turn
    client.receive_data(take(transport))
    up, origin = h.accept_origin()

    conn.drain()
    events = client.receive_data(take(transport))
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert len(goaway) == 1 and goaway[0].error_code == 0 and goaway[0].last_stream_id == 1
    assert not transport.disconnecting  # stream 1 is still being answered

    up.dataReceived(response(200, b"all of it"))
    h.reactor.advance(0)
    data = take(transport)
    assert transport.disconnecting
    # The answer on stream 1 went out before the close (parsed without h2's
    # state machine, which stops at a GOAWAY).
    assert b"all of it" in data


# ---------------------------------------------------------------------------
# The service on real sockets


def _fired(d: Any) -> list[Any]:
    """A list that gets an item when C{d} has its result (C{d.called} is already true while it waits on another)."""
    fired: list[Any] = []

    def record(result: Any) -> Any:
        fired.append(True)
        return result

    d.addBoth(record)
    return fired


def _raw(port: int) -> Any:
    proto = RawClient()
    factory = Factory.forProtocol(lambda: proto)
    factory.noisy = False
    return TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)


@pytest_twisted.ensureDeferred
async def test_stop_lets_a_slow_request_finish_and_closes_idle_connections(net):
    held = []

    def handler(req):
        if req.target == b"/slow":
            held.append(req)
        else:
            req.respond(200, b"fast")

    origin = await net.origin(handler)
    proxy = await net.proxy(proxy_config(origin.backend))
    idle = await net.client(proxy.port)
    idle.send(request(b"GET", b"/fast"))
    await idle.until_responses([b"GET"])
    busy = await net.client(proxy.port)
    busy.send(request(b"GET", b"/slow"))
    await until(lambda: held, "the slow request to reach the origin")

    stopped = proxy.service.stopService()
    done = _fired(stopped)
    await idle.until_closed()
    assert not busy.closed and not done
    with pytest.raises(Refused):
        await _raw(proxy.port)

    held[0].respond(200, b"x" * 100000)
    [resp] = await busy.until_responses([b"GET"])
    assert resp.status == 200 and resp.body == b"x" * 100000
    await busy.until_closed()
    await stopped


@pytest_twisted.ensureDeferred
async def test_stop_lets_a_long_download_finish(net):
    total = 8 * 1024 * 1024
    sent = []

    def handler(req):
        req.write(response(200, length=False, headers=[(b"Content-Length", b"%d" % total)]))
        sent.append(req)

    origin = await net.origin(handler)
    proxy = await net.proxy(proxy_config(origin.backend))
    client = await net.client(proxy.port)
    client.send(request(b"GET", b"/big"))
    await until(lambda: sent, "the download to start")
    sent[0].write(b"a" * (total // 2))
    await until(lambda: len(client.buf) > total // 4, "part of the download")
    stopped = proxy.service.stopService()
    sent[0].write(b"b" * (total - total // 2))
    [resp] = await client.until_responses([b"GET"])
    assert len(resp.body) == total and resp.body.endswith(b"b" * 1000)
    await stopped


@pytest_twisted.ensureDeferred
async def test_stop_cuts_a_tunnel_at_shutdown_timeout_and_at_once_when_asked(net):
    def handler(req):
        req.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        req.conn.echo = True

    origin = await net.origin(handler)
    # A long timeout: the test cuts with abort_connections, as a second SIGTERM does.
    proxy = await net.proxy(proxy_config(origin.backend, server={"shutdown_timeout": 300}))
    ws = await net.client(proxy.port)
    ws.send(request(b"GET", b"/ws", headers=[(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]))
    await ws.until_contains(b"101 Switching")
    stopped = proxy.service.stopService()
    done = _fired(stopped)
    ws.send(b"still here")
    await ws.until_contains(b"echo:still here")
    assert not done
    proxy.service.abort_connections("test: second signal")
    await stopped
    await ws.until_closed()


@pytest_twisted.ensureDeferred
async def test_shutdown_timeout_cuts_what_remains(net):
    held = []
    origin = await net.origin(lambda req: held.append(req))
    proxy = await net.proxy(proxy_config(origin.backend, server={"shutdown_timeout": 0.2}))
    client = await net.client(proxy.port)
    client.send(request(b"GET", b"/never"))
    await until(lambda: held, "the request to reach the origin")
    await proxy.service.stopService()
    await client.until_closed()


# ---------------------------------------------------------------------------
# twistd -n rproxy and SIGTERM


class _SlowOrigin:
    """A blocking origin in a thread: answers /slow only when told, anything else at once."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.release = threading.Event()
        self.got_slow = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            if data.startswith(b"GET /slow"):
                self.got_slow.set()
                self.release.wait(60)
                body = b"s" * 200000
            else:
                body = b"quick"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self.release.set()
        self.sock.close()


def _start_twistd(tmp_path: Any, origin_port: int, port: int, extra: str = "") -> subprocess.Popen[bytes]:
    path = tmp_path / "rproxy.toml"
    path.write_text(f"""
[server]
access_log = "off"
{extra}

[[listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"

[[route]]
pool = "web"

[pool.web]
backends = ["tcp:127.0.0.1:{origin_port}"]
response_timeout = 60
""")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "rproxy", "--config",
         str(path)], cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("twistd did not start listening")


def _send(port: int, target: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET %s HTTP/1.1\r\nHost: example.com\r\n\r\n" % target)
    return s


def _until_refused(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, "still accepting after SIGTERM"
        time.sleep(0.05)


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def test_twistd_sigterm_drains_a_slow_request_then_exits(tmp_path):
    origin = _SlowOrigin()
    port = free_port()
    proc = _start_twistd(tmp_path, origin.port, port)
    try:
        slow = _send(port, b"/slow")
        assert origin.got_slow.wait(30)
        proc.send_signal(signal.SIGTERM)
        # Stopped listening: new connections are refused while the slow one is answered.
        _until_refused(port)
        assert proc.poll() is None
        origin.release.set()
        answer = _read_all(slow)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"s" * 200000)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped on
    finally:
        origin.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    log = proc.stdout.read().decode()
    assert "stopping: waiting up to 30.0s for" in log and "stopped: every connection finished" in log
    assert "Traceback" not in log


def test_twistd_second_sigterm_cuts_at_once(tmp_path):
    origin = _SlowOrigin()
    port = free_port()
    proc = _start_twistd(tmp_path, origin.port, port)
    try:
        slow = _send(port, b"/slow")
        assert origin.got_slow.wait(30)
        proc.send_signal(signal.SIGTERM)
        _until_refused(port)  # the first one is being handled: the service is draining
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped on
        assert _read_all(slow) == b""  # cut, never answered
    finally:
        origin.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    log = proc.stdout.read().decode()
    assert "stopping: SIGTERM again: cutting" in log
    assert "Traceback" not in log
