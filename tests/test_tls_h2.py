"""
HTTP/2 through a TLS listener to an HTTP/1.1 origin: curl and the C{h2}
package as clients, a raw origin that shows when body bytes arrive.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

import h2.config
import h2.connection
import h2.events
import httptools
import pytest_twisted
from twisted.internet import threads
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from rproxy_tw.config import parse_config
from rproxy_tw.http.h2 import H2ServerConnection
from rproxy_tw.service import ProxyService

from .test_tls import PKI, _reactor, pki  # noqa: F401 - pki is a fixture

# ---------------------------------------------------------------------------
# An origin that records what it got, and when


class _Req:
    def __init__(self, conn: _OriginConn) -> None:
        self.transport = conn.transport
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.url = b""
        self.method = b""


class _OriginConn(Protocol):
    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.parser = httptools.HttpRequestParser(self)
        self.req: _Req | None = None

    def connectionMade(self) -> None:
        self.origin.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.req = _Req(self)

    def on_url(self, url: bytes) -> None:
        self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.req.method = self.parser.get_method()

    def on_body(self, body: bytes) -> None:
        self.req.body += body
        self.origin.on_body(self.req, body)

    def on_message_complete(self) -> None:
        self.origin.requests.append(self.req)
        self.origin.answer(self.req)


class _Origin(Factory):
    noisy = False

    def __init__(self, size: int = 0) -> None:
        self.size = size
        self.connections: list[_OriginConn] = []
        self.requests: list[_Req] = []
        self.first_body = threading.Event()

    def buildProtocol(self, addr: Any) -> _OriginConn:
        return _OriginConn(self)

    def on_body(self, conn: _Req, data: bytes) -> None:
        self.first_body.set()

    def answer(self, conn: _Req) -> None:
        if self.size:
            body = bytes(range(256)) * (self.size // 256)
        else:
            body = b"origin saw %s %s, %d body bytes" % (conn.method, conn.url, len(conn.body))
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                             b"X-Origin: yes\r\n\r\n%s" % (len(body), body))

    def header(self, conn: _Req, name: bytes) -> list[bytes]:
        return [v for n, v in conn.headers if n.lower() == name]


@pytest_twisted.inlineCallbacks
def _running(pki: PKI, origin: _Origin) -> Any:
    reactor = _reactor()
    origin_port = reactor.listenTCP(0, origin, interface="127.0.0.1")
    config = parse_config({
        "server": {"access_log": "off"},
        "listen": [{"endpoint": "tcp:0:interface=127.0.0.1", "protocol": "http", "tls": "main"}],
        "tls": {"main": {"certificates": [{"cert": pki.path("www-ec.pem"), "key": pki.path("www-ec.key")}]}},
        "route": [{"path": "/", "pool": "web"}],
        "pool": {"web": {"backends": [f"tcp:127.0.0.1:{origin_port.getHost().port}"]}},
    }, source="test.toml")
    service = ProxyService(config, reactor)
    http = service.factories[0].wrappedFactory
    service.startService()
    port = (yield service.listening())[0].getHost().port
    return service, http, origin_port, port


@pytest_twisted.inlineCallbacks
def _stop(service: Any, http: Any, origin_port: Any) -> Any:
    yield service.stopService()
    for conn in list(http.connections):
        conn.transport.abortConnection()
    yield origin_port.stopListening()


# ---------------------------------------------------------------------------
# An HTTP/2 client (the h2 package over a stdlib ssl socket, in a thread)


class _H2Client:
    def __init__(self, pki: PKI, port: int, window_updates: bool = True) -> None:
        ctx = ssl.create_default_context(cafile=pki.ca_path)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="www.example.test")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.window_updates = window_updates
        self.flush()
        self.responses: dict[int, dict[str, Any]] = {}

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, method: bytes, path: bytes, body: bytes | None = None, end: bool = True,
                headers: list[tuple[bytes, bytes]] = ()) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method), (b":scheme", b"https"), (b":authority", b"www.example.test"),
                  (b":path", path), *headers]
        self.conn.send_headers(sid, fields, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        self.responses[sid] = {"headers": None, "body": bytearray(), "ended": False, "reset": None}
        return sid

    def send(self, sid: int, body: bytes, end: bool) -> None:
        self.conn.send_data(sid, body, end_stream=end)
        self.flush()

    def read(self, until: Any) -> None:
        while not until():
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the proxy")
            for event in self.conn.receive_data(data):
                r = self.responses.get(getattr(event, "stream_id", 0))
                if isinstance(event, h2.events.ResponseReceived):
                    r["headers"] = event.headers
                elif isinstance(event, h2.events.DataReceived):
                    r["body"] += event.data
                    if self.window_updates:
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    r["ended"] = True
                elif isinstance(event, h2.events.StreamReset):
                    r["reset"] = event.error_code
                    r["ended"] = True
            self.flush()

    def close(self) -> None:
        self.sock.close()


def _status(r: dict[str, Any]) -> int:
    return int(dict(r["headers"])[b":status"])


# ---------------------------------------------------------------------------
# Tests


@pytest_twisted.inlineCallbacks
def test_curl_http2_gets_the_origins_bytes(pki: PKI) -> None:
    origin = _Origin()
    service, http, origin_port, port = yield _running(pki, origin)
    try:
        out, err, code = yield getProcessOutputAndValue("curl", [
            "-sS", "--http2", "--cacert", pki.ca_path, "--resolve", f"www.example.test:{port}:127.0.0.1",
            "-o", "-", "-w", "\n%{http_version} %{response_code}", "-H", "X-Test: 1",
            f"https://www.example.test:{port}/hello?x=1",
        ])
        posted, err2, code2 = yield getProcessOutputAndValue("curl", [
            "-sS", "--http2", "--cacert", pki.ca_path, "--resolve", f"www.example.test:{port}:127.0.0.1",
            "--data-binary", "a" * 100_000, f"https://www.example.test:{port}/upload",
        ])
    finally:
        yield _stop(service, http, origin_port)
    assert code == 0, err
    assert out == b"origin saw GET /hello?x=1, 0 body bytes\n2 200", out
    assert code2 == 0, err2
    assert posted == b"origin saw POST /upload, 100000 body bytes"
    first = origin.requests[0]
    assert origin.header(first, b"host") == [b"www.example.test:%d" % port]
    assert origin.header(first, b"x-forwarded-proto") == [b"https"]
    assert origin.header(first, b"x-test") == [b"1"]
    # Via names the protocol the proxy received the request in (RFC 9110, 7.6.3).
    assert origin.header(first, b"via") == [b"2 rproxy"]
    assert origin.header(origin.requests[1], b"content-length") == [b"100000"]


@pytest_twisted.inlineCallbacks
def test_http2_upload_streams_to_the_origin(pki: PKI) -> None:
    """The origin gets the first part of a body while the client still holds the rest."""
    origin = _Origin()
    service, http, origin_port, port = yield _running(pki, origin)

    def client() -> Any:
        c = _H2Client(pki, port)
        try:
            sid = c.request(b"POST", b"/stream", b"first part;", end=False)
            streamed = origin.first_body.wait(5)
            c.send(sid, b"second part", end=True)
            c.read(lambda: c.responses[sid]["ended"])
            return streamed, c.responses[sid]
        finally:
            c.close()

    try:
        streamed, response = yield threads.deferToThread(client)
    finally:
        yield _stop(service, http, origin_port)
    assert streamed, "the origin saw nothing before the client ended the stream"
    assert _status(response) == 200
    assert bytes(response["body"]) == b"origin saw POST /stream, 22 body bytes"
    conn = origin.requests[0]
    assert origin.header(conn, b"transfer-encoding") == [b"chunked"]
    assert bytes(conn.body) == b"first part;second part"


@pytest_twisted.inlineCallbacks
def test_http2_download_waits_for_the_clients_window(pki: PKI) -> None:
    """
    A client that stops granting window stops the origin's connection from
    being read (backpressure); granting it again delivers the rest intact.
    """
    size = 1024 * 1024
    origin = _Origin(size=size)
    service, http, origin_port, port = yield _running(pki, origin)
    client = yield threads.deferToThread(_H2Client, pki, port, False)
    try:
        sid = yield threads.deferToThread(client.request, b"GET", b"/big")
        # The client's initial window is 65535 bytes: read them, grant nothing.
        yield threads.deferToThread(client.read, lambda: len(client.responses[sid]["body"]) >= 65535)

        def blocked() -> Any:
            for conn in http.connections:
                if isinstance(conn, H2ServerConnection):
                    for stream in conn.blocked:
                        if stream.upstream_gate is not None and "h2-window" in stream.upstream_gate.reasons:
                            return True
            return False

        for _ in range(200):
            if blocked():
                break
            yield deferLater(_reactor(), 0.01, lambda: None)
        was_blocked = blocked()
        client.window_updates = True

        def rest() -> None:
            got = len(client.responses[sid]["body"])
            client.conn.acknowledge_received_data(got, sid)
            client.conn.increment_flow_control_window(size)
            client.flush()
            client.read(lambda: client.responses[sid]["ended"])

        yield threads.deferToThread(rest)
    finally:
        client.close()
        yield _stop(service, http, origin_port)
    assert was_blocked
    response = client.responses[sid]
    assert _status(response) == 200 and response["reset"] is None
    assert bytes(response["body"]) == bytes(range(256)) * (size // 256)


@pytest_twisted.inlineCallbacks
def test_http1_still_served_when_alpn_says_so(pki: PKI) -> None:
    origin = _Origin()
    service, http, origin_port, port = yield _running(pki, origin)
    try:
        out, err, code = yield getProcessOutputAndValue("curl", [
            "-sS", "--http1.1", "--cacert", pki.ca_path, "--resolve", f"www.example.test:{port}:127.0.0.1",
            "-w", "\n%{http_version}", f"https://www.example.test:{port}/one",
        ])
    finally:
        yield _stop(service, http, origin_port)
    assert code == 0, err
    assert out == b"origin saw GET /one, 0 body bytes\n1.1"




@pytest_twisted.inlineCallbacks
def test_http2_concurrent_streams_errors_and_resets(pki: PKI) -> None:
    """Streams of one connection are independent: a reset or a 404 from a refusal costs one stream."""
    origin = _Origin(size=512 * 1024)
    service, http, origin_port, port = yield _running(pki, origin)

    def client() -> Any:
        c = _H2Client(pki, port)
        try:
            a = c.request(b"GET", b"/a")
            b = c.request(b"GET", b"/b")
            big = c.request(b"GET", b"/c", headers=[(b"x-big", b"y" * 20000)])
            c.read(lambda: len(c.responses[a]["body"]) > 0)
            c.conn.reset_stream(a)
            c.flush()
            c.read(lambda: c.responses[b]["ended"] and c.responses[big]["ended"])
            after = c.request(b"GET", b"/d")
            c.read(lambda: c.responses[after]["ended"])
            return c.responses[b], c.responses[big], c.responses[after]
        finally:
            c.close()

    try:
        b, big, after = yield threads.deferToThread(client)
    finally:
        yield _stop(service, http, origin_port)
    full = bytes(range(256)) * (512 * 1024 // 256)
    assert _status(b) == 200 and bytes(b["body"]) == full
    assert _status(big) == 431
    assert _status(after) == 200 and bytes(after["body"]) == full
    assert len(origin.requests) == 3, "the reset stream's request reached the origin, the 431 did not"


@pytest_twisted.inlineCallbacks
def test_http2_malformed_request_resets_its_stream_only(pki: PKI) -> None:
    """
    A malformed request (two different content lengths) is a stream error
    (RFC 9113 8.1.1): RST_STREAM PROTOCOL_ERROR, nothing reaches the origin,
    and the connection's next request is served.
    """
    origin = _Origin()
    service, http, origin_port, port = yield _running(pki, origin)

    def client() -> Any:
        c = _H2Client(pki, port)
        try:
            bad = c.request(b"GET", b"/c", headers=[(b"content-length", b"5"), (b"content-length", b"7")])
            c.read(lambda: c.responses[bad]["reset"] is not None)
            good = c.request(b"GET", b"/after")
            c.read(lambda: c.responses[good]["ended"])
            return c.responses[bad], c.responses[good]
        finally:
            c.close()

    try:
        bad, good = yield threads.deferToThread(client)
    finally:
        yield _stop(service, http, origin_port)
    assert bad["reset"] == 1 and bad["headers"] is None
    assert _status(good) == 200
    assert [r.url for r in origin.requests] == [b"/after"]


@pytest_twisted.inlineCallbacks
def test_http2_origin_down_is_a_502(pki: PKI) -> None:
    origin = _Origin()
    service, http, origin_port, port = yield _running(pki, origin)
    yield origin_port.stopListening()

    def client() -> Any:
        c = _H2Client(pki, port)
        try:
            sid = c.request(b"GET", b"/")
            c.read(lambda: c.responses[sid]["ended"])
            return c.responses[sid]
        finally:
            c.close()

    try:
        response = yield threads.deferToThread(client)
    finally:
        yield service.stopService()
        for conn in list(http.connections):
            conn.transport.abortConnection()
    assert _status(response) == 502
    assert bytes(response["body"]).startswith(b"Bad Gateway")


@pytest_twisted.inlineCallbacks
def test_http2_rapid_reset_is_cut_off(pki: PKI) -> None:
    origin = _Origin()
    service, http, origin_port, port = yield _running(pki, origin)

    def client() -> Any:
        c = _H2Client(pki, port)
        events: list[Any] = []
        try:
            # All in one write: the proxy may cut the connection before a client sending them one by one is done.
            for _ in range(250):
                sid = c.conn.get_next_available_stream_id()
                c.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                          (b":authority", b"www.example.test"), (b":path", b"/")], end_stream=True)
                c.conn.reset_stream(sid)
            c.flush()
            while True:
                data = c.sock.recv(65536)
                if not data:
                    return events
                events += c.conn.receive_data(data)
        except (ConnectionError, OSError):
            return events
        finally:
            c.close()

    try:
        events = yield threads.deferToThread(client)
    finally:
        yield _stop(service, http, origin_port)
    assert any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 0xB for e in events)


@pytest_twisted.inlineCallbacks
def test_http2_upload_to_a_stalled_origin_stops_the_client(pki: PKI) -> None:
    """
    While the origin does not read, the stream stops granting window (the
    client cannot push more than a window ahead); when the origin reads
    again, the window reopens and the whole body arrives.
    """
    size = 8 * 1024 * 1024
    origin = _Origin()
    stalled: list[Any] = []

    def on_body(req: _Req, data: bytes) -> None:
        if not stalled:
            req.transport.pauseProducing()
            stalled.append(req.transport)

    origin.on_body = on_body  # type: ignore[method-assign]
    service, http, origin_port, port = yield _running(pki, origin)
    client = yield threads.deferToThread(_H2Client, pki, port)

    def upload() -> Any:
        c = client
        sid = c.request(b"PUT", b"/up", end=False, headers=[(b"content-length", b"%d" % size)])
        block = b"u" * 16384
        left = size
        while left:
            window = min(c.conn.local_flow_control_window(sid), c.conn.max_outbound_frame_size, left)
            if window <= 0:
                c.read(lambda: c.conn.local_flow_control_window(sid) > 0 or c.responses[sid]["ended"])
                continue
            c.conn.send_data(sid, block[:window], end_stream=window == left)
            left -= window
            c.flush()
        c.read(lambda: c.responses[sid]["ended"])
        return c.responses[sid]

    def held() -> bool:
        for conn in http.connections:
            if isinstance(conn, H2ServerConnection):
                for stream in conn.streams.values():
                    if stream.gate.paused and stream.unacknowledged > 0:
                        return True
        return False

    try:
        d = threads.deferToThread(upload)
        for _ in range(500):
            if held():
                break
            yield deferLater(_reactor(), 0.01, lambda: None)
        was_held = held()
        stalled[0].resumeProducing()
        response = yield d
    finally:
        client.close()
        yield _stop(service, http, origin_port)
    assert was_held, "the proxy kept granting window to a client whose origin does not read"
    assert _status(response) == 200
    assert bytes(response["body"]) == b"origin saw PUT /up, %d body bytes" % size


@pytest_twisted.inlineCallbacks
def test_http2_response_cut_short_resets_the_stream(pki: PKI) -> None:
    """An origin that dies mid-body: the client sees that stream reset, not a short 200 that looks whole."""
    origin = _Origin()

    def answer(req: _Req) -> None:
        req.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 20000)
        req.transport.loseConnection()

    origin.answer = answer  # type: ignore[method-assign]
    service, http, origin_port, port = yield _running(pki, origin)

    def client() -> Any:
        c = _H2Client(pki, port)
        try:
            sid = c.request(b"GET", b"/cut")
            c.read(lambda: c.responses[sid]["ended"])
            again = c.request(b"GET", b"/again")
            c.read(lambda: c.responses[again]["ended"])
            return c.responses[sid], c.responses[again]
        finally:
            c.close()

    try:
        cut, again = yield threads.deferToThread(client)
    finally:
        yield _stop(service, http, origin_port)
    assert cut["reset"] == 2, cut  # INTERNAL_ERROR
    assert len(cut["body"]) <= 20000
    assert again["reset"] == 2, "the connection still serves other streams"
