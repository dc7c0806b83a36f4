"""
HTTP/2 conformance end to end: h2spec's cases (RFC 9113 section by
section), sent as raw frames over a real TLS connection to a running proxy,
judged as h2spec judges them.  h2spec itself cannot be installed here; these
cases are the ones it runs against a server, written from the RFC, with an
encoder of their own (struct and the hpack package), so that a bug in the
server's frame layer is not mirrored by the client.

h2spec's verdicts, kept here: a connection error is a GOAWAY with the code
(or the connection closed); a stream error is a RST_STREAM with the code on
that stream, or a connection error with the code.
"""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Any, Callable

import hpack
import pytest
import pytest_twisted
from twisted.internet import threads

from .test_tls import PKI, pki  # noqa: F401 - pki is a fixture
from .test_tls_h2 import _Origin, _running, _stop

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 5, 6, 7, 9
MAX_CONCURRENT_STREAMS = 3


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def block(extra: list[tuple[bytes, bytes]] = (), method: bytes = b"GET", path: bytes = b"/",
          fields: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A request's header block, encoded by the hpack package (a dynamic table of its own per call)."""
    if fields is None:
        fields = [(b":method", method), (b":scheme", b"https"), (b":path", path),
                  (b":authority", b"www.example.test"), *extra]
    return hpack.Encoder().encode(fields)


def get(stream: int = 1, end_stream: bool = True, **kw: Any) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream, block(**kw))


class RawH2:
    """The client side of one connection: bytes out as given, frames in as they come."""

    def __init__(self, pki: PKI, port: int) -> None:
        ctx = ssl.create_default_context(cafile=pki.ca_path)
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname="www.example.test")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.buffer = b""
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.closed = False
        self.decoder = hpack.Decoder()

    def start(self) -> None:
        """Preface and an empty SETTINGS, then until the server's SETTINGS is acknowledged both ways."""
        self.send(PREFACE + settings())
        theirs = self.until(lambda f: f[0] == SETTINGS and not f[1] & ACK)
        assert theirs is not None, "no SETTINGS from the server"
        self.server_settings = dict(struct.iter_unpack(">HI", theirs[3]))
        self.send(frame(SETTINGS, ACK, 0))
        self.until(lambda f: f[0] == SETTINGS and f[1] & ACK)
        self.frames.clear()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True  # the server may close before it has read all of a bad frame

    def _read(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        except socket.timeout:
            raise AssertionError(f"no verdict within 5 s; frames seen: {self._names()}") from None
        if not data:
            self.closed = True
            return False
        self.buffer += data
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            kind, flags = self.buffer[3], self.buffer[4]
            stream = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            self.frames.append((kind, flags, stream, self.buffer[9:9 + length]))
            self.buffer = self.buffer[9 + length:]
        return True

    def until(self, wanted: Callable[[tuple[int, int, int, bytes]], bool]) -> tuple[int, int, int, bytes] | None:
        """The first frame C{wanted} accepts (answering PINGs on the way), or None if the connection closed first."""
        seen = 0
        while True:
            while seen < len(self.frames):
                f = self.frames[seen]
                seen += 1
                if wanted(f):
                    return f
            if self.closed or not self._read():
                return None

    def _names(self) -> list[str]:
        names = ["DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY",
                 "WINDOW_UPDATE", "CONTINUATION"]
        return [f"{names[k] if k < 10 else k}(flags={fl:#x}, stream={s}, {p[:16]!r})" for k, fl, s, p in self.frames]

    def close(self) -> None:
        self.sock.close()


def _code(payload: bytes, offset: int = 0) -> int:
    return int.from_bytes(payload[offset:offset + 4], "big")


def connection_error(c: RawH2, code: int) -> None:
    f = c.until(lambda f: f[0] == GOAWAY)
    if f is not None:
        assert _code(f[3], 4) == code, f"GOAWAY with error {_code(f[3], 4)}, expected {code}"


def stream_error(c: RawH2, stream: int, code: int) -> None:
    f = c.until(lambda f: f[0] == GOAWAY or (f[0] == RST_STREAM and f[2] == stream))
    assert f is not None, f"closed without RST_STREAM or GOAWAY; frames: {c._names()}"
    got = _code(f[3], 4) if f[0] == GOAWAY else _code(f[3])
    assert got == code, f"{'GOAWAY' if f[0] == GOAWAY else 'RST_STREAM'} with error {got}, expected {code}"


def answered(c: RawH2, stream: int = 1, status: bytes = b"200") -> None:
    f = c.until(lambda f: f[2] == stream and f[0] in (HEADERS, RST_STREAM) or f[0] == GOAWAY)
    assert f is not None and f[0] == HEADERS, f"no response head on stream {stream}: {c._names()}"
    head = dict(c.decoder.decode(f[3], raw=True))  # our server sends neither padding nor priority
    assert head[b":status"] == status, head


def ping_answered(c: RawH2, payload: bytes = b"h2spec!!") -> None:
    """Proof that what came before was ignored: a PING still gets its ACK."""
    c.send(frame(PING, 0, 0, payload))
    f = c.until(lambda f: f[0] == PING and f[1] & ACK or f[0] == GOAWAY)
    assert f is not None and f[0] == PING and f[3] == payload, c._names()


CASES: dict[str, tuple[bytes, Callable[[RawH2], None]]] = {
    # 4.1 frame format
    "4.1/1 an unknown frame type is ignored": (frame(0x16, 0, 0, b"x" * 8), ping_answered),
    "4.1/2 unknown flags are ignored": (frame(PING, 0x16, 0, b"h2spec!!"),
                                        lambda c: c.until(lambda f: f[0] == PING and f[1] & ACK) or pytest.fail()),
    "4.1/3 the reserved bit is ignored": (frame(HEADERS, END_HEADERS | END_STREAM, 1 | 0x80000000, block()),
                                          answered),
    # 4.2 frame size
    "4.2/2 DATA beyond SETTINGS_MAX_FRAME_SIZE": (get(end_stream=False, method=b"POST")
                                                  + frame(DATA, END_STREAM, 1, b"x" * 16385),
                                                  lambda c: stream_error(c, 1, FRAME_SIZE_ERROR)),
    "4.2/3 HEADERS beyond SETTINGS_MAX_FRAME_SIZE": (
        frame(HEADERS, END_HEADERS | END_STREAM, 1, block(extra=[(b"x-big", b"~" * 16400)])),
        lambda c: connection_error(c, FRAME_SIZE_ERROR)),
    # 4.3 header compression
    "4.3/1 an invalid header block": (frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x00\x00\x00\x00"),
                                      lambda c: connection_error(c, COMPRESSION_ERROR)),
    "4.3/3 a PRIORITY between HEADERS and CONTINUATION": (
        frame(HEADERS, END_STREAM, 1, block()) + frame(PRIORITY, 0, 3, b"\x00\x00\x00\x01\x10")
        + frame(CONTINUATION, END_HEADERS, 1, b""), lambda c: connection_error(c, PROTOCOL_ERROR)),
    # 5.1 stream states
    "5.1/1 DATA on an idle stream": (frame(DATA, END_STREAM, 1, b"x"), lambda c: connection_error(c, PROTOCOL_ERROR)),
    "5.1/2 RST_STREAM on an idle stream": (frame(RST_STREAM, 0, 1, struct.pack(">I", 8)),
                                           lambda c: connection_error(c, PROTOCOL_ERROR)),
    "5.1/3 WINDOW_UPDATE on an idle stream": (frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)),
                                              lambda c: connection_error(c, PROTOCOL_ERROR)),
    "5.1/5 DATA on a half-closed (remote) stream": (get(stream=1) + frame(DATA, 0, 1, b"x"),
                                                    lambda c: stream_error(c, 1, STREAM_CLOSED)),
    "5.1/6 HEADERS on a half-closed (remote) stream": (get(stream=1) + get(stream=1),
                                                       lambda c: stream_error(c, 1, STREAM_CLOSED)),
    "5.1.1/1 an even stream identifier": (get(stream=2), lambda c: connection_error(c, PROTOCOL_ERROR)),
    "5.1.1/2 a stream identifier below the last": (get(stream=5) + get(stream=3),
                                                   lambda c: connection_error(c, PROTOCOL_ERROR)),
    "5.1.2/1 beyond SETTINGS_MAX_CONCURRENT_STREAMS": (
        b"".join(get(stream=2 * i + 1, end_stream=False, method=b"POST") for i in range(101)),
        lambda c: (c.server_settings.get(MAX_CONCURRENT_STREAMS) == 100 or pytest.fail(str(c.server_settings)),
                   stream_error(c, 201, REFUSED_STREAM))),
    "5.4.1/2 a connection error closes the connection": (frame(DATA, END_STREAM, 1, b"x"),
                                                         lambda c: (connection_error(c, PROTOCOL_ERROR),
                                                                    c.until(lambda f: False), None)[2]),
    "5.5/1 an unknown extension frame in the middle of a header block": (
        frame(HEADERS, END_STREAM, 1, block()) + frame(0x16, 0, 1, b"x") + frame(CONTINUATION, END_HEADERS, 1, b""),
        lambda c: connection_error(c, PROTOCOL_ERROR)),
    # 6.1 DATA
    "6.1/1 DATA on stream 0": (frame(DATA, END_STREAM, 0, b"x"), lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.1/3 DATA with padding as long as the payload": (
        get(end_stream=False, method=b"POST") + frame(DATA, PADDED | END_STREAM, 1, b"\x05abcd"),
        lambda c: connection_error(c, PROTOCOL_ERROR)),
    # 6.2 HEADERS
    "6.2/1 HEADERS without END_HEADERS, then DATA": (frame(HEADERS, END_STREAM, 1, block()) + frame(DATA, 0, 1, b"x"),
                                                     lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.2/2 HEADERS on stream 0": (frame(HEADERS, END_HEADERS | END_STREAM, 0, block()),
                                  lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.2/3 HEADERS with padding as long as the payload": (
        frame(HEADERS, END_HEADERS | END_STREAM | PADDED, 1, bytes([len(block()) + 1]) + block()),
        lambda c: connection_error(c, PROTOCOL_ERROR)),
    # 6.3 PRIORITY
    "6.3/1 PRIORITY on stream 0": (frame(PRIORITY, 0, 0, b"\x00\x00\x00\x01\x10"),
                                   lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.3/2 PRIORITY of length 4": (get(end_stream=False, method=b"POST") + frame(PRIORITY, 0, 1, b"\x00\x00\x00\x03"),
                                   lambda c: stream_error(c, 1, FRAME_SIZE_ERROR)),
    # 6.4 RST_STREAM
    "6.4/1 RST_STREAM on stream 0": (frame(RST_STREAM, 0, 0, struct.pack(">I", 8)),
                                     lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.4/3 RST_STREAM of length 3": (get(end_stream=False, method=b"POST") + frame(RST_STREAM, 0, 1, b"\x00\x00\x08"),
                                     lambda c: connection_error(c, FRAME_SIZE_ERROR)),
    # 6.5 SETTINGS
    "6.5/1 SETTINGS ACK with a payload": (frame(SETTINGS, ACK, 0, b"\x00" * 6),
                                          lambda c: connection_error(c, FRAME_SIZE_ERROR)),
    "6.5/2 SETTINGS on a stream": (frame(SETTINGS, 0, 1, b""), lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.5/3 SETTINGS of length 3": (frame(SETTINGS, 0, 0, b"\x00\x03\x00"),
                                   lambda c: connection_error(c, FRAME_SIZE_ERROR)),
    "6.5.2/1 SETTINGS_ENABLE_PUSH of 2": (settings((2, 2)), lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.5.2/2 SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1": (settings((4, 2 ** 31)),
                                                          lambda c: connection_error(c, FLOW_CONTROL_ERROR)),
    "6.5.2/3 SETTINGS_MAX_FRAME_SIZE below 16384": (settings((5, 16383)),
                                                    lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.5.2/4 SETTINGS_MAX_FRAME_SIZE above 2^24-1": (settings((5, 2 ** 24)),
                                                     lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.5.2/5 an unknown setting is ignored": (settings((0xFF, 1)),
                                              lambda c: c.until(lambda f: f[0] == SETTINGS and f[1] & ACK)
                                              or pytest.fail("no SETTINGS ACK")),
    "6.5.3/2 SETTINGS are acknowledged": (settings((4, 100)),
                                          lambda c: c.until(lambda f: f[0] == SETTINGS and f[1] & ACK)
                                          or pytest.fail("no SETTINGS ACK")),
    # 6.7 PING
    "6.7/1 a PING gets an ACK with its payload": (b"", ping_answered),
    "6.7/2 a PING ACK is not answered": (frame(PING, ACK, 0, b"12345678"), ping_answered),
    "6.7/3 PING on a stream": (frame(PING, 0, 1, b"12345678"), lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.7/4 PING of length 6": (frame(PING, 0, 0, b"123456"), lambda c: connection_error(c, FRAME_SIZE_ERROR)),
    # 6.8 GOAWAY
    "6.8/1 GOAWAY on a stream": (frame(GOAWAY, 0, 1, struct.pack(">II", 0, 0)),
                                 lambda c: connection_error(c, PROTOCOL_ERROR)),
    # 6.9 WINDOW_UPDATE
    "6.9/1 WINDOW_UPDATE of 0 on the connection": (frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 0)),
                                                   lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.9/2 WINDOW_UPDATE of 0 on a stream": (get(end_stream=False, method=b"POST")
                                             + frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 0)),
                                             lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "6.9/3 WINDOW_UPDATE of length 3": (frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"),
                                        lambda c: connection_error(c, FRAME_SIZE_ERROR)),
    "6.9.1/2 the connection window above 2^31-1": (frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2 ** 31 - 1)),
                                                   lambda c: connection_error(c, FLOW_CONTROL_ERROR)),
    "6.9.1/3 a stream window above 2^31-1": (get(end_stream=False, method=b"POST")
                                             + frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 2 ** 31 - 1)),
                                             lambda c: stream_error(c, 1, FLOW_CONTROL_ERROR)),
    "6.9.2/3 SETTINGS_INITIAL_WINDOW_SIZE overflowing an open stream": (
        get(end_stream=False, method=b"POST") + frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 2 ** 31 - 65536))
        + settings((4, 2 ** 31 - 1)), lambda c: connection_error(c, FLOW_CONTROL_ERROR)),
    # 6.10 CONTINUATION
    "6.10/1 HEADERS in CONTINUATION frames": (
        frame(HEADERS, END_STREAM, 1, block()[:3]) + frame(CONTINUATION, 0, 1, block()[3:6])
        + frame(CONTINUATION, END_HEADERS, 1, block()[6:]), answered),
    "6.10/2 CONTINUATION after END_HEADERS": (get(stream=1) + frame(CONTINUATION, END_HEADERS, 1, block()),
                                              lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.10/4 CONTINUATION on stream 0": (frame(HEADERS, END_STREAM, 1, block()) + frame(CONTINUATION, END_HEADERS, 0, b""),
                                        lambda c: connection_error(c, PROTOCOL_ERROR)),
    "6.10/5 CONTINUATION of another stream": (
        frame(HEADERS, END_STREAM, 1, block()) + frame(CONTINUATION, END_HEADERS, 3, b""),
        lambda c: connection_error(c, PROTOCOL_ERROR)),
    # 8.1 HTTP message exchange
    "8.1/1 a second HEADERS without END_STREAM (not trailers)": (
        get(end_stream=False, method=b"POST") + frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode([(b"x", b"y")])),
        lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.1.1/1 an upper-case header name": (get(extra=[(b"X-Upper", b"1")]), lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.1.1/2 a pseudo-header after a regular one": (
        get(fields=[(b":method", b"GET"), (b":scheme", b"https"), (b"x", b"1"), (b":path", b"/"),
                    (b":authority", b"www.example.test")]), lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.1.1/3 an unknown pseudo-header": (get(extra=[(b":bogus", b"1")]), lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.1.1/4 a response pseudo-header in a request": (get(extra=[(b":status", b"200")]),
                                                      lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.2.2/1 a connection-specific header": (get(extra=[(b"connection", b"keep-alive")]),
                                             lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.2.2/2 TE other than trailers": (get(extra=[(b"te", b"gzip")]), lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.3.1/1 :method missing": (get(fields=[(b":scheme", b"https"), (b":path", b"/"),
                                            (b":authority", b"www.example.test")]),
                                lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.3.1/2 :path empty": (get(path=b""), lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.3.1/3 :scheme twice": (get(extra=[(b":scheme", b"https")]), lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.1.1/5 content-length that the DATA does not match": (
        get(end_stream=False, method=b"POST", extra=[(b"content-length", b"10")]) + frame(DATA, END_STREAM, 1, b"abc"),
        lambda c: stream_error(c, 1, PROTOCOL_ERROR)),
    "8.4/1 PUSH_PROMISE from a client": (get(end_stream=False, method=b"POST")
                                         + frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02" + block()),
                                         lambda c: connection_error(c, PROTOCOL_ERROR)),
    # HPACK (RFC 7541), as h2spec's hpack group: each a compression error for the connection.
    **{f"hpack {name}": (frame(HEADERS, END_HEADERS | END_STREAM, 1, raw),
                         lambda c: connection_error(c, COMPRESSION_ERROR))
       for name, raw in {
           "6.1/1 index 0": b"\x80",
           "2.3.3/1 an index beyond both tables": b"\xbe",
           "4.2/1 a table size update above SETTINGS_HEADER_TABLE_SIZE": b"\x3f\xe2\x1f",
           "4.2/2 a table size update after a field": b"\x82\x20",
           "5.2/1 EOS in a Huffman string": b"\x44\x84\xff\xff\xff\xff",
           "5.2/2 Huffman padding longer than 7 bits": b"\x44\x82\x07\xff",
           "5.2/3 Huffman padding that is not EOS's prefix": b"\x44\x81\x02",
       }.items()},
    # A plain request answers, before and after the others.
    "a GET is answered": (get(), answered),
    "a POST with a body is answered": (get(end_stream=False, method=b"POST", extra=[(b"content-length", b"3")])
                                       + frame(DATA, END_STREAM, 1, b"abc"), answered),
}


def _invalid_preface(c: RawH2) -> None:
    c.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + settings())
    connection_error(c, PROTOCOL_ERROR)


@pytest.mark.parametrize("name", ["3.5/2 an invalid preface", *sorted(CASES)])
@pytest_twisted.inlineCallbacks
def test_h2spec_case(pki: PKI, name: str) -> Any:
    service, http, origin_port, port = yield _running(pki, _Origin())

    def run() -> None:
        c = RawH2(pki, port)
        try:
            if name not in CASES:
                _invalid_preface(c)
                return
            frames, verdict = CASES[name]
            c.start()
            c.send(frames)
            verdict(c)
        finally:
            c.close()

    try:
        yield threads.deferToThread(run)
    finally:
        yield _stop(service, http, origin_port)
