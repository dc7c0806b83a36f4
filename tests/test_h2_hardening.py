"""
HTTP/2 against hostile clients: control-frame floods, a client that never
grants window, and an origin answering after the connection is gone.

Real TLS on 127.0.0.1, the C{h2} package (in a thread, over a blocking
socket) as the client; raw frames where the attack needs them.  Every flood
is bounded in frames sent and in time; nothing is decided by a timing.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.logger import formatEvent, globalLogPublisher

from rproxy_tw.http import h2 as h2mod
from rproxy_tw.http.h2 import H2ServerConnection
from rproxy_tw.http.h2session import H2Session
from rproxy_tw.http.hpack_out import ResponseEncoder

from .conftest import HANG_GUARD, OriginRequest, default_handler, until
from .test_tls import PKI, pki  # noqa: F401 - pki is a fixture
from .test_tls_h2 import _H2Client, _status

# ---------------------------------------------------------------------------
# Helpers


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PING, _WINDOW_UPDATE = 0, 1, 2, 3, 4, 6, 8
ENHANCE_YOUR_CALM = 0xB
FLOOD_FRAMES = 200_000
"""Frames a flooding client sends at most (3.4 MB of PINGs): the test's bound on its own work."""


def _tls_config(pki: PKI, *backends: str, pool: dict[str, Any] | None = None,
                limits: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server": {"access_log": "off"},
        "listen": [{"endpoint": "tcp:0:interface=127.0.0.1", "protocol": "http", "tls": "main"}],
        "tls": {"main": {"certificates": [{"cert": pki.path("www-ec.pem"), "key": pki.path("www-ec.key")}]}},
        "route": [{"path": "/", "pool": "p"}],
        "pool": {"p": {"backends": list(backends), **(pool or {})}},
    }
    if limits:
        data["limits"] = limits
    return data


def _h2_connections(proxy: Any) -> list[H2ServerConnection]:
    return [c for c in proxy.factory.connections if isinstance(c, H2ServerConnection)]


def _queued(conn: H2ServerConnection) -> int:
    """Bytes the proxy holds for this client in Twisted's TCP buffer (not yet taken by the kernel)."""
    tcp = getattr(conn.transport, "transport", None)
    if tcp is None or not hasattr(tcp, "dataBuffer"):
        return 0
    return tcp._tempDataLen + len(tcp.dataBuffer) - tcp.offset


class _QueueWatch:
    """
    Records, after every write the HTTP/2 connections make, the most output
    queued in the proxy for one client.  The proxy's socket gets a small
    send buffer (as on a host short of memory), so that what a client does
    not read piles up where it can be seen, not in the kernel's 4 MB.
    """

    def __init__(self, monkeypatch: Any, sndbuf: int = 16 * 1024) -> None:
        self.peak = 0
        original = H2ServerConnection.transmit
        tuned: set[int] = set()

        def transmit(conn: H2ServerConnection) -> None:
            tcp = getattr(conn.transport, "transport", None)
            if id(conn) not in tuned and hasattr(tcp, "socket"):
                tuned.add(id(conn))
                tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            original(conn)
            self.peak = max(self.peak, _queued(conn))

        monkeypatch.setattr(H2ServerConnection, "transmit", transmit)


class _Logs:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> _Logs:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def text(self) -> list[str]:
        out = []
        for e in self.events:
            line = formatEvent(e) or ""
            if e.get("log_failure") is not None:
                line += " " + e["log_failure"].getTraceback()
            out.append(line)
        return out


class _MemoryTLS:
    """
    A blocking TLS socket over memory BIOs, for a client that floods: a send
    that times out leaves the client's TLS state sound (the rest of the
    ciphertext is simply never sent), so it can still read what the proxy
    said, GOAWAY included.
    """

    def __init__(self, ctx: ssl.SSLContext, raw: socket.socket, hostname: str) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send()
                data = raw.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake")
                self.incoming.write(data)
        self._send()

    def _send(self) -> None:
        out = self.outgoing.read()
        if out:
            self.raw.sendall(out)

    def selected_alpn_protocol(self) -> str | None:
        return self.tls.selected_alpn_protocol()

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._send()

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                data = self.raw.recv(1 << 16)
                if not data:
                    return b""
                self.incoming.write(data)
            except ssl.SSLZeroReturnError:
                return b""

    def settimeout(self, seconds: float | None) -> None:
        self.raw.settimeout(seconds)

    def close(self) -> None:
        self.raw.close()


class _SlowClient(_H2Client):
    """An HTTP/2 client with a small receive buffer: what it does not read piles up at the proxy."""

    def __init__(self, pki: PKI, port: int, rcvbuf: int = 16 * 1024, window_updates: bool = True) -> None:
        ctx = ssl.create_default_context(cafile=pki.ca_path)
        ctx.set_alpn_protocols(["h2"])
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(10)
        raw.connect(("127.0.0.1", port))
        self.sock = _MemoryTLS(ctx, raw, "www.example.test")  # type: ignore[assignment]
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.window_updates = window_updates
        self.flush()
        self.responses = {}


def _get(pki: PKI, port: int, path: bytes) -> dict[str, Any]:
    c = _H2Client(pki, port)
    try:
        sid = c.request(b"GET", path)
        c.read(lambda: c.responses[sid]["ended"])
        return c.responses[sid]
    finally:
        c.close()


def _drain(c: _H2Client, limit: float = 5.0) -> list[Any]:
    """Everything the proxy still sends until it closes (or C{limit} seconds of silence)."""
    events: list[Any] = []
    c.sock.settimeout(limit)
    while True:
        try:
            data = c.sock.recv(1 << 20)
        except TimeoutError:
            events.append("silent")
            return events
        except OSError:
            events.append("reset")
            return events
        if not data:
            events.append("closed")
            return events
        try:
            events += c.conn.receive_data(data)
        except Exception as e:  # noqa: BLE001 - the client's h2 may object to what follows a GOAWAY
            events.append(e)
            return events


# ---------------------------------------------------------------------------
# Item 2: control-frame floods (CVE-2019-9512 ping flood, 9515 settings flood, and kin)


def _flood_frames(kind: str) -> tuple[bytes, bytes]:
    """(frames sent once before the flood, one flood frame)."""
    if kind == "ping":
        return b"", _frame(_PING, 0, 0, b"12345678")
    if kind == "settings":
        return b"", _frame(_SETTINGS, 0, 0)
    if kind == "window_update":
        return b"", _frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", 1))
    if kind == "priority":
        # Reprioritising an idle stream: legal, costs h2 a tree update, answers nothing.
        return b"", _frame(_PRIORITY, 0, 1001, struct.pack(">I", 0) + b"\x10")
    if kind == "empty_data":
        # An upload that never moves: DATA frames with nothing in them.
        return b"", _frame(_DATA, 0, 1)
    if kind == "rst_stream":
        # Resets of a stream long closed: each makes h2 look it up.
        return b"", _frame(_RST_STREAM, 0, 1, struct.pack(">I", 8))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["ping", "settings", "window_update", "priority", "empty_data", "rst_stream"])
@pytest_twisted.inlineCallbacks
def test_http2_control_frame_flood_is_cut(net: Any, pki: PKI, monkeypatch: Any, kind: str) -> None:
    """
    A client that floods frames which cost the proxy work and give the
    client nothing (without reading what it is sent) is told
    ENHANCE_YOUR_CALM and disconnected, with what the proxy queued for it
    bounded, while another client is served meanwhile.
    """
    watch = _QueueWatch(monkeypatch)
    origin = yield net.origin()
    proxy = yield net.proxy(_tls_config(pki, origin.backend))
    sent = [0]
    flooding = threading.Event()

    def flood() -> list[Any]:
        c = _SlowClient(pki, proxy.port)
        try:
            if kind == "empty_data":
                c.request(b"POST", b"/upload", end=False)
            elif kind == "rst_stream":
                sid = c.request(b"GET", b"/done")
                c.read(lambda: c.responses[sid]["ended"])
            first, frame = _flood_frames(kind)
            if first:
                c.sock.sendall(first)
            batch = frame * 1000
            c.sock.settimeout(3)
            flooding.set()
            while sent[0] < FLOOD_FRAMES:
                try:
                    c.sock.sendall(batch)
                except TimeoutError:
                    break  # the proxy stopped reading
                except OSError:
                    return ["cut while sending"]
                sent[0] += 1000
            return _drain(c)
        finally:
            flooding.set()
            c.close()

    def legit() -> dict[str, Any]:
        flooding.wait(HANG_GUARD)
        return _get(pki, proxy.port, b"/legit")

    with _Logs() as logs:
        flooded = threads.deferToThread(flood)
        served = yield threads.deferToThread(legit)
        events = yield flooded
        yield until(lambda: not _h2_connections(proxy), "the flooding connection to close")
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    acks = sum(1 for e in events if isinstance(e, (h2.events.PingAckReceived, h2.events.SettingsAcknowledged)))
    print(f"\n{kind}: client sent {sent[0]} frames, got {acks} acks, proxy queued at most {watch.peak} bytes, "
          f"end: {goaway or events[-1:]}")
    assert _status(served) == 200 and bytes(served["body"]) == b"GET /legit\n"
    # The client sees the connection end: a GOAWAY if it reads it before the
    # close, else the close itself (a flooder still sending meets a reset).
    assert events[-1] != "silent", "the proxy did not close the flooding connection"
    assert all(e.error_code == ENHANCE_YOUR_CALM for e in goaway), goaway
    assert any("disconnecting" in line for line in logs.text())
    assert watch.peak <= h2mod.OUTPUT_BOUND + 64 * 1024
    assert acks <= h2mod.CONTROL_ALLOWANCE + 100


@pytest_twisted.inlineCallbacks
def test_http2_slow_reader_gets_whole_downloads(net: Any, pki: PKI, monkeypatch: Any) -> None:
    """
    A legitimate client that reads slower than the origin sends (and grants
    a large window): the proxy pauses its reading and its origins instead of
    queueing, never cuts it, and the downloads arrive whole.
    """
    watch = _QueueWatch(monkeypatch)
    size = 4 * 1024 * 1024
    body = bytes(range(256)) * (size // 256)
    origin = yield net.origin(lambda req: req.respond(200, body))
    proxy = yield net.proxy(_tls_config(pki, origin.backend))

    def client() -> list[dict[str, Any]]:
        c = _SlowClient(pki, proxy.port)
        try:
            c.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            c.conn.increment_flow_control_window(2**31 - 1 - 65535)
            sids = [c.request(b"GET", b"/big/%d" % i) for i in range(3)]
            c.read(lambda: all(c.responses[s]["ended"] for s in sids))
            return [c.responses[s] for s in sids]
        finally:
            c.close()

    responses = yield threads.deferToThread(client)
    print(f"\nslow reader: proxy queued at most {watch.peak} bytes")
    for r in responses:
        assert _status(r) == 200 and r["reset"] is None
        assert bytes(r["body"]) == body
    assert watch.peak <= h2mod.OUTPUT_BOUND + 64 * 1024


# ---------------------------------------------------------------------------
# Item 5: a client's zero window is the client's stall, not the backend's failure


def _big(req: OriginRequest) -> None:
    req.respond(200, b"b" * (1024 * 1024))


@pytest_twisted.inlineCallbacks
def test_http2_zero_window_client_does_not_eject_backends(net: Any, pki: PKI) -> None:
    """
    A client opens big downloads and never grants window: each stream ends
    (reset) as the client's stall, the origins' connections are closed, and
    passive health ejects no backend; other clients still reach both.
    """
    a = yield net.origin(_big)
    b = yield net.origin(_big)
    proxy = yield net.proxy(_tls_config(pki, a.backend, b.backend, pool={"idle_timeout": 0.3}))
    pool = proxy.service.runtime.pools["p"]
    streams = 12

    with _Logs() as logs:
        def stingy() -> dict[int, dict[str, Any]]:
            c = _H2Client(pki, proxy.port, window_updates=False)
            try:
                sids = [c.request(b"GET", b"/big/%d" % i) for i in range(streams)]
                c.read(lambda: all(c.responses[s]["ended"] for s in sids))
                return c.responses
            finally:
                c.close()

        responses = yield threads.deferToThread(stingy)
        yield until(lambda: all(conn.closed for o in (a, b) for conn in o.connections), "origin connections closed")
        later = []
        for i in range(4):
            r = yield threads.deferToThread(_get, pki, proxy.port, b"/small")
            later.append(r)
    text = logs.text()
    ejected = [line for line in text if "ejected" in line]
    print(f"\nbackends healthy: {[be.healthy for be in pool.backends]}; ejections: {ejected}")
    assert all(r["reset"] is not None for r in responses.values()), responses
    assert not ejected, ejected
    assert all(be.healthy for be in pool.backends)
    assert any("stopped reading" in line for line in text), text
    assert all(_status(r) == 200 for r in later)
    assert len(a.requests) >= streams // 2 + 2 and len(b.requests) >= streams // 2 + 2


@pytest_twisted.inlineCallbacks
def test_http2_zero_window_wait_is_bounded_by_idle_timeout(net: Any, pki: PKI) -> None:
    """
    With a long pool idle_timeout, a response stalled on the client's
    window still ends after the listener's idle_timeout (limits), as the
    client's fault: the stream is reset and the backend is not blamed.
    """
    origin = yield net.origin(_big)
    proxy = yield net.proxy(_tls_config(pki, origin.backend, pool={"idle_timeout": 600},
                                        limits={"idle_timeout": 0.5}))
    pool = proxy.service.runtime.pools["p"]

    with _Logs() as logs:
        def stingy() -> dict[str, Any]:
            c = _H2Client(pki, proxy.port, window_updates=False)
            try:
                sid = c.request(b"GET", b"/big")
                c.read(lambda: c.responses[sid]["ended"])
                return c.responses[sid]
            finally:
                c.close()

        response = yield threads.deferToThread(stingy)
        yield until(lambda: all(conn.closed for conn in origin.connections), "origin connection closed")
    text = logs.text()
    assert response["reset"] is not None and len(response["body"]) <= 65535
    assert any("stopped reading" in line for line in text), text
    assert not any("failed" in line or "stalled" in line for line in text), text
    assert pool.backends[0].failures == 0


# ---------------------------------------------------------------------------
# Item 6: an origin's answer after the connection was ended by GOAWAY


@pytest_twisted.inlineCallbacks
def test_http2_response_after_goaway_is_dropped_quietly(net: Any, pki: PKI) -> None:
    """
    A slow request, then an invalid frame on its stream: the proxy sends
    GOAWAY; when the origin answers afterwards, nothing is logged against
    the backend and no exception escapes; the proxy serves the next client.
    """
    held: list[OriginRequest] = []

    def slow(req: OriginRequest) -> None:
        if req.target.startswith(b"/sleep"):
            held.append(req)  # answered when the test says
        else:
            default_handler(req)

    origin = yield net.origin(slow)
    proxy = yield net.proxy(_tls_config(pki, origin.backend))
    pool = proxy.service.runtime.pools["p"]
    client = yield threads.deferToThread(_H2Client, pki, proxy.port)

    with _Logs() as logs:
        try:
            yield threads.deferToThread(client.request, b"GET", b"/sleep?s=1")
            yield until(lambda: held, "the request at the origin")

            def invalid() -> list[Any]:
                # WINDOW_UPDATE with a zero increment on the connection: a connection error (RFC 9113 6.9).
                client.sock.sendall(_frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)))
                events: list[Any] = []
                while not any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                    data = client.sock.recv(65536)
                    if not data:
                        break
                    events += client.conn.receive_data(data)
                return events

            events = yield threads.deferToThread(invalid)
            # The client keeps its socket open: the proxy's connection is closing, not closed.
            held[0].respond(200, b"late answer")
            yield until(lambda: held[0].conn.closed, "the origin connection closed")
            yield threads.deferToThread(lambda: None)
        finally:
            client.close()
        after = yield threads.deferToThread(_get, pki, proxy.port, b"/after")
    text = logs.text()
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events), events
    assert not [line for line in text if "Unhandled" in line or "Traceback" in line], text
    assert not [line for line in text if "malformed" in line], text
    assert pool.backends[0].failures == 0
    assert _status(after) == 200 and bytes(after["body"]) == b"GET /after\n"


# ---------------------------------------------------------------------------
# The frame counter itself


@pytest.mark.parametrize("step", [1, 7, 9, 10, 1000])
def test_frame_count_does_not_depend_on_how_bytes_arrive(step: int) -> None:
    """Frames split anywhere (inside a header, inside a payload) are counted once each."""
    head = hpack.Encoder().encode([(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/"),
                                   (b":authority", b"a.test")])
    frames = (
        _frame(_SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64")
        + _frame(_PING, 0, 0, b"12345678")
        + _frame(_HEADERS, 0x4, 1, head)  # a request: given back
        + _frame(_DATA, 0, 1, b"x" * 300)  # body: given back
        + _frame(_DATA, 0, 1)  # empty, no END_STREAM: counted
        + _frame(_WINDOW_UPDATE, 0, 0, struct.pack(">I", 1))
        + _frame(_DATA, 0x1, 1)  # the end of an upload: not counted
        + _frame(7, 0, 0, b"\x00" * 8)  # GOAWAY: not counted
    )
    data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frames
    session = H2Session(ResponseEncoder(), max_concurrent_streams=100, stream_window=65535,
                        connection_window=65535, max_header_list_size=16384, flood_allowance=100, per_useful=2)
    events = []
    for i in range(0, len(data), step):
        events += session.receive(data[i : i + step])
    assert session.useless == 4 and session.useful == 2
    assert [type(e).__name__ for e in events] == ["RequestReceived", "DataReceived", "DataReceived", "WindowUpdated",
                                                  "DataReceived", "StreamEnded", "ConnectionTerminated"]
