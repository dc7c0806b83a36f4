"""
The HTTP/2 server session (L{rproxy_tw.http.h2session}) frame by frame,
without sockets: the cases h2spec checks (RFC 9113 and 7541), each as the
frames a client sends and the answer it must get: a connection error
(GOAWAY with its code), a stream error (RST_STREAM with its code), or the
frame ignored.  Client header blocks come from C{hpack}'s encoder.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import hpack
import pytest
import hypothesis
from hypothesis import given
from hypothesis import strategies as st

from rproxy_tw.http.h2frames import (
    CONTINUATION,
    DATA,
    GOAWAY,
    HEADERS,
    PING,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ErrorCode,
    frame,
)
from rproxy_tw.http.h2session import (
    BLOCK_CACHE_ENTRIES,
    CLOSED_MEMORY,
    ConnectionTerminated,
    DataReceived,
    H2Session,
    ProtocolError,
    RequestReceived,
    StreamClosedError,
    StreamEnded,
    StreamReset,
    WindowUpdated,
    check_request,
)
from rproxy_tw.http.hpack_out import ResponseEncoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a.test")]
POST = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/up"), (b":authority", b"a.test")]
STREAM_WINDOW = 65535


def settings(**values: int) -> bytes:
    codes = {"HEADER_TABLE_SIZE": 1, "ENABLE_PUSH": 2, "MAX_CONCURRENT_STREAMS": 3, "INITIAL_WINDOW_SIZE": 4,
             "MAX_FRAME_SIZE": 5, "MAX_HEADER_LIST_SIZE": 6}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", codes[k], v) for k, v in values.items()))


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags = data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        out.append((kind, flags, sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


class Client:
    """A session that has had the client's preface and SETTINGS, and an HPACK encoder for the client's heads."""

    def __init__(self, max_concurrent_streams: int = 100, flood_allowance: int = 10_000,
                 max_header_list_size: int = 16384, preface: bytes = PREFACE + settings()) -> None:
        self.session = H2Session(ResponseEncoder(), max_concurrent_streams=max_concurrent_streams,
                                 stream_window=STREAM_WINDOW, connection_window=4 * STREAM_WINDOW,
                                 max_header_list_size=max_header_list_size, flood_allowance=flood_allowance,
                                 per_useful=2)
        self.session.initiate()
        self.session.data_to_send()
        self.encoder = hpack.Encoder()
        self.events: list[Any] = []
        if preface:
            self.send(preface)
            assert frames(self.session.data_to_send()) == [(SETTINGS, 1, 0, b"")]

    def send(self, data: bytes) -> list[Any]:
        events = self.session.receive(data)
        self.events += events
        return events

    def block(self, fields: list[tuple[bytes, bytes]]) -> bytes:
        return self.encoder.encode(fields)

    def headers(self, sid: int, fields: list[tuple[bytes, bytes]] = GET, end: bool = True) -> bytes:
        return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, self.block(fields))

    def out(self) -> list[tuple[int, int, int, bytes]]:
        return frames(self.session.data_to_send())

    def connection_error(self, data: bytes) -> ErrorCode:
        """C{data} must end the connection: a GOAWAY with the code of the error, and nothing read after."""
        with pytest.raises(ProtocolError) as e:
            self.send(data)
        out = self.out()
        assert out and out[-1][0] == GOAWAY, out
        assert struct.unpack(">L", out[-1][3][4:8])[0] == e.value.code
        assert self.send(self.headers(101)) == []
        return e.value.code

    def stream_error(self, data: bytes, sid: int) -> ErrorCode:
        """C{data} must reset stream C{sid} and leave the connection open."""
        self.send(data)
        resets = [f for f in self.out() if f[0] == RST_STREAM and f[2] == sid]
        assert len(resets) == 1, resets
        assert not self.session.closed
        return ErrorCode(struct.unpack(">L", resets[0][3])[0])


# ---------------------------------------------------------------------------
# The preface and SETTINGS (3.4, 6.5)


@pytest.mark.parametrize("preface", [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"])
def test_a_wrong_preface_is_a_protocol_error(preface: bytes) -> None:
    c = Client(preface=b"")
    assert c.connection_error(preface) == ErrorCode.PROTOCOL_ERROR


def test_a_preface_in_pieces_is_fine() -> None:
    c = Client(preface=b"")
    for i in range(len(PREFACE)):
        c.send(PREFACE[i : i + 1])
    c.send(settings())
    assert c.out() == [(SETTINGS, 1, 0, b"")]


def test_the_first_frame_must_be_settings() -> None:
    c = Client(preface=b"")
    assert c.connection_error(PREFACE + frame(PING, 0, 0, b"12345678")) == ErrorCode.PROTOCOL_ERROR


SETTINGS_ERRORS = {
    "ACK with a payload": (frame(SETTINGS, 1, 0, b"\x00" * 6), ErrorCode.FRAME_SIZE_ERROR),
    "length not a multiple of 6": (frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00\x00"), ErrorCode.FRAME_SIZE_ERROR),
    "on a stream": (frame(SETTINGS, 0, 1, b""), ErrorCode.PROTOCOL_ERROR),
    "ENABLE_PUSH 2": (settings(ENABLE_PUSH=2), ErrorCode.PROTOCOL_ERROR),
    "INITIAL_WINDOW_SIZE 2^31": (settings(INITIAL_WINDOW_SIZE=2**31), ErrorCode.FLOW_CONTROL_ERROR),
    "MAX_FRAME_SIZE 16383": (settings(MAX_FRAME_SIZE=16383), ErrorCode.PROTOCOL_ERROR),
    "MAX_FRAME_SIZE 2^24": (settings(MAX_FRAME_SIZE=2**24), ErrorCode.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("name", sorted(SETTINGS_ERRORS))
def test_invalid_settings_are_connection_errors(name: str) -> None:
    data, code = SETTINGS_ERRORS[name]
    assert Client().connection_error(data) == code


def test_settings_are_acknowledged_and_unknown_ones_ignored() -> None:
    c = Client()
    c.send(frame(SETTINGS, 0, 0, struct.pack(">HL", 0x99, 7)) + settings(ENABLE_PUSH=0, MAX_FRAME_SIZE=2**24 - 1))
    assert c.out() == [(SETTINGS, 1, 0, b""), (SETTINGS, 1, 0, b"")]
    c.send(frame(SETTINGS, 1, 0))  # the ACK of ours: nothing to answer
    assert c.out() == []


def test_initial_window_size_changes_adjust_open_streams() -> None:
    c = Client()
    c.send(c.headers(1))
    assert c.session.window(1) == 16384  # a frame's worth
    assert c.send(settings(INITIAL_WINDOW_SIZE=100)) == [WindowUpdated(0)]
    assert c.session.window(1) == 100
    c.session.send_data(1, b"x" * 100)
    c.send(settings(INITIAL_WINDOW_SIZE=50))
    assert c.session.window(1) == -50  # may go negative (6.9.2)
    c.send(settings(INITIAL_WINDOW_SIZE=2**31 - 1))
    assert c.session.window(1) == 16384


def test_initial_window_size_overflowing_a_stream_window_is_a_flow_control_error() -> None:
    c = Client()
    c.send(c.headers(1))
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 2**31 - 1 - 65535)))
    assert c.connection_error(settings(INITIAL_WINDOW_SIZE=65536)) == ErrorCode.FLOW_CONTROL_ERROR


# ---------------------------------------------------------------------------
# PING, GOAWAY, unknown frames, frame sizes (4.1, 4.2, 5.5, 6.7, 6.8)


def test_ping_is_answered_with_its_payload_and_an_ack_is_not() -> None:
    c = Client()
    c.send(frame(PING, 0xFE, 0, b"abcdefgh"))  # unknown flags ignored
    assert c.out() == [(PING, 1, 0, b"abcdefgh")]
    c.send(frame(PING, 1, 0, b"abcdefgh"))
    assert c.out() == []


@pytest.mark.parametrize("data, code", [
    (frame(PING, 0, 0, b"1234567"), ErrorCode.FRAME_SIZE_ERROR),
    (frame(PING, 0, 1, b"12345678"), ErrorCode.PROTOCOL_ERROR),
    (frame(GOAWAY, 0, 1, b"\x00" * 8), ErrorCode.PROTOCOL_ERROR),
    (frame(GOAWAY, 0, 0, b"\x00" * 7), ErrorCode.FRAME_SIZE_ERROR),
    (frame(DATA, 0, 1, b"x" * 16385), ErrorCode.FRAME_SIZE_ERROR),
    (frame(0x42, 0, 0, b"x" * 16385), ErrorCode.FRAME_SIZE_ERROR),
    (frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02"), ErrorCode.PROTOCOL_ERROR),
])
def test_control_frame_errors(data: bytes, code: ErrorCode) -> None:
    assert Client().connection_error(data) == code


def test_unknown_frame_types_and_priority_update_are_ignored() -> None:
    c = Client()
    c.send(frame(0x42, 0xFF, 0, b"whatever") + frame(0x10, 0, 0, b"\x00\x00\x00\x01u=1")
           + frame(0x42, 0, 7, b""))
    c.send(c.headers(1))
    assert c.out() == [] and [type(e) for e in c.events] == [RequestReceived]


def test_goaway_from_the_client_is_an_event_and_stops_reading() -> None:
    c = Client()
    assert c.send(frame(GOAWAY, 0, 0, struct.pack(">LL", 0, 0)) + c.headers(1)) == [ConnectionTerminated(0, 0)]
    assert c.send(c.headers(3)) == []


# ---------------------------------------------------------------------------
# Stream states and identifiers (5.1, 5.1.1)


@pytest.mark.parametrize("kind", ["data", "rst_stream", "window_update", "continuation"])
def test_frames_on_an_idle_stream_are_protocol_errors(kind: str) -> None:
    c = Client()
    data = {"data": frame(DATA, 0, 1, b"x"), "rst_stream": frame(RST_STREAM, 0, 1, b"\x00\x00\x00\x08"),
            "window_update": frame(WINDOW_UPDATE, 0, 1, b"\x00\x00\x00\x01"),
            "continuation": frame(CONTINUATION, END_HEADERS, 1, c.block(GET))}[kind]
    assert c.connection_error(data) == ErrorCode.PROTOCOL_ERROR


def test_priority_on_an_idle_stream_is_ignored() -> None:
    c = Client()
    c.send(frame(PRIORITY, 0, 9, struct.pack(">L", 3) + b"\x10"))
    assert c.out() == []
    c.send(c.headers(1))
    assert [type(e) for e in c.events] == [RequestReceived]


def test_an_even_stream_id_is_a_protocol_error() -> None:
    c = Client()
    assert c.connection_error(c.headers(2)) == ErrorCode.PROTOCOL_ERROR


def test_a_stream_id_below_the_last_one_is_a_protocol_error() -> None:
    c = Client()
    c.send(c.headers(5))
    assert c.connection_error(c.headers(3)) == ErrorCode.PROTOCOL_ERROR


def test_closed_streams_are_remembered_long_enough() -> None:
    c = Client()
    for sid in range(1, 2 * CLOSED_MEMORY + 1, 2):
        c.send(c.headers(sid))
        c.session.send_headers(sid, [(b":status", b"204")], end=True)
    assert c.connection_error(c.headers(2 * CLOSED_MEMORY - 1)) == ErrorCode.STREAM_CLOSED


@pytest.mark.parametrize("data, code", [
    (frame(DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
    (frame(HEADERS, END_HEADERS, 0, b"\x82"), ErrorCode.PROTOCOL_ERROR),
    (frame(PRIORITY, 0, 0, b"\x00" * 5), ErrorCode.PROTOCOL_ERROR),
    (frame(RST_STREAM, 0, 0, b"\x00" * 4), ErrorCode.PROTOCOL_ERROR),
])
def test_stream_frames_on_stream_0_are_protocol_errors(data: bytes, code: ErrorCode) -> None:
    assert Client().connection_error(data) == code


def test_data_and_headers_on_a_half_closed_remote_stream_are_stream_closed() -> None:
    c = Client()
    c.send(c.headers(1) + c.headers(3))
    assert c.stream_error(frame(DATA, 0, 1, b"x"), 1) == ErrorCode.STREAM_CLOSED
    assert c.stream_error(c.headers(3), 3) == ErrorCode.STREAM_CLOSED
    assert c.events[-2:] == [StreamReset(1, ErrorCode.STREAM_CLOSED, False),
                             StreamReset(3, ErrorCode.STREAM_CLOSED, False)]


def test_continuation_on_a_half_closed_stream_is_a_protocol_error() -> None:
    c = Client()
    c.send(c.headers(1))
    assert c.connection_error(frame(CONTINUATION, END_HEADERS, 1, c.block(GET))) == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("kind", ["data", "headers"])
def test_data_and_headers_on_a_closed_stream_are_stream_closed(kind: str) -> None:
    c = Client()
    c.send(c.headers(1))
    c.session.send_headers(1, [(b":status", b"200")], end=True)  # both ends closed
    c.out()
    data = frame(DATA, 0, 1, b"x") if kind == "data" else c.headers(1)
    assert c.connection_error(data) == ErrorCode.STREAM_CLOSED


def test_frames_after_the_client_reset_a_stream() -> None:
    c = Client()
    c.send(c.headers(1, POST, end=False))
    assert c.send(frame(RST_STREAM, 0, 1, struct.pack(">L", 8))) == [StreamReset(1, 8, True)]
    c.send(frame(RST_STREAM, 0, 1, struct.pack(">L", 8)) + frame(PRIORITY, 0, 1, b"\x00\x00\x00\x03\x10")
           + frame(WINDOW_UPDATE, 0, 1, b"\x00\x00\x00\x01"))  # ignored on a closed stream
    assert c.out() == []
    with pytest.raises(StreamClosedError):
        c.session.send_headers(1, [(b":status", b"200")])
    assert c.connection_error(frame(DATA, 0, 1, b"x")) == ErrorCode.STREAM_CLOSED


def test_data_on_a_stream_we_reset_is_ignored_and_its_window_given_back() -> None:
    c = Client()
    c.send(c.headers(1, POST, end=False))
    c.session.reset_stream(1, ErrorCode.CANCEL)
    assert c.out() == [(RST_STREAM, 0, 1, struct.pack(">L", 8))]
    for _ in range(3):
        assert c.send(frame(DATA, 0, 1, b"x" * 16384)) == []
    assert c.send(c.headers(1, [(b"x-trailer", b"1")])) == []  # late trailers: decoded, dropped
    # 48 KiB of the connection's window came back (one update once half a stream window is used).
    assert c.out() == [(WINDOW_UPDATE, 0, 0, struct.pack(">L", 2 * 16384))]


# ---------------------------------------------------------------------------
# Field blocks: HEADERS, CONTINUATION, padding, priority (4.3, 6.2, 6.10, 5.3)


def test_a_header_block_in_continuation_frames() -> None:
    c = Client()
    block = c.block([*GET, (b"x-long", b"y" * 30000)])
    c.send(frame(HEADERS, END_STREAM, 1, block[:10]) + frame(CONTINUATION, 0, 1, block[10:16000])
           + frame(CONTINUATION, END_HEADERS, 1, block[16000:]))
    [event] = c.events
    assert isinstance(event, RequestReceived) and event.ended and event.headers[-1] == (b"x-long", b"y" * 30000)


@pytest.mark.parametrize("interloper", [
    frame(PING, 0, 0, b"12345678"),
    frame(DATA, 0, 1, b"x"),
    frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10"),
    frame(0x42, 0, 0, b""),
    frame(CONTINUATION, END_HEADERS, 3, b"\x82"),
])
def test_a_frame_inside_a_header_block_is_a_protocol_error(interloper: bytes) -> None:
    c = Client()
    block = c.block(GET)
    assert c.connection_error(frame(HEADERS, END_STREAM, 1, block[:3]) + interloper) == ErrorCode.PROTOCOL_ERROR


def test_headers_of_another_stream_inside_a_header_block_is_a_protocol_error() -> None:
    c = Client()
    block = c.block(GET)
    assert c.connection_error(frame(HEADERS, END_STREAM, 1, block[:3]) + c.headers(3)) == ErrorCode.PROTOCOL_ERROR


def test_a_continuation_flood_is_bounded() -> None:
    c = Client(max_header_list_size=4096)
    c.send(frame(HEADERS, 0, 1, c.block(GET)))
    with pytest.raises(ProtocolError) as e:
        for _ in range(10):
            c.send(frame(CONTINUATION, 0, 1, b"\x40\x01a\x01b" * 200))
    assert e.value.code == ErrorCode.ENHANCE_YOUR_CALM


def test_empty_continuation_frames_count_against_the_flood_allowance() -> None:
    c = Client(flood_allowance=100)
    c.send(frame(HEADERS, 0, 1, c.block(GET)))
    with pytest.raises(ProtocolError) as e:
        c.send(frame(CONTINUATION, 0, 1, b"") * 200)
    assert e.value.code == ErrorCode.ENHANCE_YOUR_CALM


def test_padded_and_prioritised_headers() -> None:
    c = Client()
    block = c.block(GET)
    payload = bytes([3]) + struct.pack(">L", 0) + b"\x10" + block + b"\x00" * 3
    c.send(frame(HEADERS, END_HEADERS | END_STREAM | PADDED | PRIORITY_FLAG, 1, payload))
    assert [type(e) for e in c.events] == [RequestReceived] and c.events[0].headers == GET


@pytest.mark.parametrize("data", [
    frame(HEADERS, END_HEADERS | PADDED, 1, bytes([10]) + b"\x82\x84"),
    frame(DATA, PADDED, 1, bytes([5]) + b"abcd"),
    frame(DATA, PADDED, 1, b""),
])
def test_padding_longer_than_the_payload_is_a_protocol_error(data: bytes) -> None:
    c = Client()
    c.send(c.headers(1, POST, end=False))
    assert c.connection_error(data) == ErrorCode.PROTOCOL_ERROR


def test_padded_data_counts_its_padding_against_the_window() -> None:
    c = Client()
    c.send(c.headers(1, POST, end=False))
    assert c.send(frame(DATA, PADDED, 1, bytes([4]) + b"abc" + b"\x00" * 4)) == [DataReceived(1, b"abc", 8)]


def test_priority_depending_on_itself_is_a_stream_error() -> None:
    c = Client()
    assert c.stream_error(frame(PRIORITY, 0, 1, struct.pack(">L", 1) + b"\x10"), 1) == ErrorCode.PROTOCOL_ERROR
    c.send(c.headers(3, POST, end=False))
    assert c.stream_error(frame(PRIORITY, 0, 3, struct.pack(">L", 3) + b"\x10"), 3) == ErrorCode.PROTOCOL_ERROR
    payload = struct.pack(">L", 5) + b"\x10" + c.block(GET)
    assert c.stream_error(frame(HEADERS, END_HEADERS | END_STREAM | PRIORITY_FLAG, 5, payload), 5) == \
        ErrorCode.PROTOCOL_ERROR
    assert [type(e) for e in c.events] == [RequestReceived, StreamReset]


def test_priority_of_the_wrong_length_is_a_stream_error() -> None:
    c = Client()
    assert c.stream_error(frame(PRIORITY, 0, 1, b"\x00" * 4), 1) == ErrorCode.FRAME_SIZE_ERROR


# ---------------------------------------------------------------------------
# HPACK (RFC 7541; COMPRESSION_ERROR, 4.3)


@pytest.mark.parametrize("block", [
    b"\xff\x00",  # index 127+0: beyond both tables
    b"\x80",  # index 0
    b"\x82\x3f\xe1\x1f",  # a table size update (4096+) after a field
    b"\x3f\xe2\x1f\x82",  # a table size update above SETTINGS_HEADER_TABLE_SIZE
    b"\x40\x85\xff\xff\xff\xff\xff\x01a",  # a Huffman string with an invalid code / padding
    b"\x00\x05ab",  # a string longer than the block
])
def test_hpack_errors_are_compression_errors(block: bytes) -> None:
    assert Client().connection_error(frame(HEADERS, END_HEADERS | END_STREAM, 1, block)) == \
        ErrorCode.COMPRESSION_ERROR


def test_refused_streams_still_update_the_dynamic_table() -> None:
    c = Client(max_concurrent_streams=1)
    c.send(c.headers(1, POST, end=False))
    assert c.stream_error(c.headers(3, [*GET, (b"x-new", b"one")]), 3) == ErrorCode.REFUSED_STREAM
    c.send(frame(DATA, END_STREAM, 1, b""))
    c.session.send_headers(1, [(b":status", b"200")], end=True)
    c.send(c.headers(5, [*GET, (b"x-new", b"one")]))  # indexed now: the table must know it
    assert c.events[-1] == RequestReceived(5, [*GET, (b"x-new", b"one")], True)


def test_a_remembered_block_decodes_anew_once_the_table_changed() -> None:
    c = Client()
    c.send(c.headers(1, [*GET, (b"x-a", b"1")]))
    indexed = c.block([*GET, (b"x-a", b"1")])  # every field indexed: the block is remembered
    c.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, indexed))
    c.send(frame(HEADERS, END_HEADERS | END_STREAM, 5, indexed))
    c.send(c.headers(7, [*GET, (b"x-b", b"2")]))  # inserts: x-a moves from index 62 to 63
    c.send(frame(HEADERS, END_HEADERS | END_STREAM, 9, indexed))  # the same bytes, index 62 is x-b now
    heads = [e.headers[-1] for e in c.events]
    assert heads == [(b"x-a", b"1")] * 3 + [(b"x-b", b"2")] * 2
    assert BLOCK_CACHE_ENTRIES > 0


# ---------------------------------------------------------------------------
# Request heads (8.2, 8.3): malformed is a stream error, the connection goes on


MALFORMED = {
    "upper-case name": [*GET, (b"X-Upper", b"1")],
    "connection": [*GET, (b"connection", b"close")],
    "keep-alive": [*GET, (b"keep-alive", b"5")],
    "proxy-connection": [*GET, (b"proxy-connection", b"close")],
    "transfer-encoding": [*GET, (b"transfer-encoding", b"chunked")],
    "upgrade": [*GET, (b"upgrade", b"h2c")],
    "te other than trailers": [*GET, (b"te", b"gzip")],
    "unknown pseudo-header": [*GET, (b":foo", b"bar")],
    ":status in a request": [(b":status", b"200"), *GET],
    "repeated :method": [*GET[:1], *GET],
    "pseudo-header after a regular field": [*GET[:3], (b"accept", b"*/*"), GET[3]],
    "no :method": GET[1:],
    "no :scheme": [GET[0], *GET[2:]],
    "no :path": [*GET[:2], GET[3]],
    "empty :path": [*GET[:2], (b":path", b""), GET[3]],
    "CONNECT with :path": [(b":method", b"CONNECT"), (b":authority", b"a.test:443"), (b":path", b"/")],
    "CONNECT with :scheme": [(b":method", b"CONNECT"), (b":authority", b"a.test:443"), (b":scheme", b"https")],
    "CONNECT without :authority": [(b":method", b"CONNECT")],
    "CR LF in a value": [*GET, (b"x-a", b"1\r\nx-b: 2")],
    "NUL in a value": [*GET, (b"x-a", b"1\x002")],
    "leading space in a value": [*GET, (b"x-a", b" 1")],
    "trailing tab in a value": [*GET, (b"x-a", b"1\t")],
    "space in a name": [*GET, (b"x a", b"1")],
    "empty name": [*GET, (b"", b"1")],
    "content-length not a number": [*GET, (b"content-length", b"1e3")],
    "content-lengths that differ": [*GET, (b"content-length", b"5"), (b"content-length", b"7")],
    "content-length without DATA": [*GET, (b"content-length", b"5")],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_request_is_a_stream_error(name: str) -> None:
    c = Client()
    assert c.stream_error(c.headers(1, MALFORMED[name]), 1) == ErrorCode.PROTOCOL_ERROR
    c.send(c.headers(3))
    assert [type(e) for e in c.events] == [RequestReceived] and c.events[0].stream_id == 3


@pytest.mark.parametrize("fields", [
    [*GET, (b"te", b"trailers"), (b"content-length", b"0"), (b"content-length", b"0")],
    [(b":method", b"CONNECT"), (b":authority", b"a.test:443")],
    [*GET, (b"x-a", b"in the \t middle"), (b"x-b", b"")],
])
def test_well_formed_requests_pass(fields: list[tuple[bytes, bytes]]) -> None:
    c = Client()
    assert c.send(c.headers(1, fields)) == [RequestReceived(1, fields, True)]


def test_trailers_end_the_stream() -> None:
    c = Client()
    c.send(c.headers(1, POST, end=False) + frame(DATA, 0, 1, b"body"))
    c.send(c.headers(1, [(b"x-checksum", b"1")], end=True))
    assert [type(e) for e in c.events] == [RequestReceived, DataReceived, StreamEnded]


@pytest.mark.parametrize("trailers, end", [([(b":path", b"/x")], True), ([(b"x-a", b"1")], False),
                                           ([(b"Upper", b"1")], True)])
def test_malformed_trailers_are_a_stream_error(trailers: list[tuple[bytes, bytes]], end: bool) -> None:
    c = Client()
    c.send(c.headers(1, POST, end=False))
    assert c.stream_error(c.headers(1, trailers, end=end), 1) == ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize("chunks", [[b"123456"], [b"12", b"34", b""], [b"123", b""]])
def test_content_length_must_match_the_data(chunks: list[bytes]) -> None:
    c = Client()
    c.send(c.headers(1, [*POST, (b"content-length", b"5")], end=False))
    for i, chunk in enumerate(chunks):
        flags = END_STREAM if i == len(chunks) - 1 else 0
        if i == len(chunks) - 1:
            assert c.stream_error(frame(DATA, flags, 1, chunk), 1) == ErrorCode.PROTOCOL_ERROR
        else:
            c.send(frame(DATA, flags, 1, chunk))


def test_content_length_matching_the_data_passes() -> None:
    c = Client()
    c.send(c.headers(1, [*POST, (b"content-length", b"5")], end=False))
    c.send(frame(DATA, 0, 1, b"12") + frame(DATA, END_STREAM, 1, b"345"))
    assert [type(e) for e in c.events] == [RequestReceived, DataReceived, DataReceived, StreamEnded]


def test_max_concurrent_streams_refuses_the_stream_too_many() -> None:
    c = Client(max_concurrent_streams=2)
    c.send(c.headers(1) + c.headers(3))
    assert c.stream_error(c.headers(5), 5) == ErrorCode.REFUSED_STREAM
    c.session.send_headers(1, [(b":status", b"200")], end=True)
    c.send(c.headers(7))
    assert [e.stream_id for e in c.events] == [1, 3, 7]


# ---------------------------------------------------------------------------
# Flow control (5.2, 6.9)


def test_window_update_errors() -> None:
    assert Client().connection_error(frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00")) == ErrorCode.PROTOCOL_ERROR
    assert Client().connection_error(frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00")) == ErrorCode.FRAME_SIZE_ERROR
    assert Client().connection_error(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 2**31 - 65535))) == \
        ErrorCode.FLOW_CONTROL_ERROR
    c = Client()
    c.send(c.headers(1) + c.headers(3))
    assert c.stream_error(frame(WINDOW_UPDATE, 0, 1, b"\x00\x00\x00\x00"), 1) == ErrorCode.PROTOCOL_ERROR
    assert c.stream_error(frame(WINDOW_UPDATE, 0, 3, struct.pack(">L", 2**31 - 65535)), 3) == \
        ErrorCode.FLOW_CONTROL_ERROR


def test_window_updates_open_the_windows() -> None:
    c = Client()
    c.send(c.headers(1))
    c.session.send_data(1, b"x" * 16384)
    c.session.send_data(1, b"x" * 16384)
    c.session.send_data(1, b"x" * 16384)
    c.session.send_data(1, b"x" * 16383)
    assert c.session.window(1) == 0
    assert c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack(">L", 10))) == [WindowUpdated(1)]
    assert c.session.window(1) == 0  # the connection's window is still shut
    assert c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 20))) == [WindowUpdated(0)]
    assert c.session.window(1) == 10


def test_data_beyond_the_windows_is_a_flow_control_error() -> None:
    c = Client()
    c.send(c.headers(1, POST, end=False))
    for _ in range(3):
        c.send(frame(DATA, 0, 1, b"x" * 16384))
    with_stream = frame(DATA, 0, 1, b"x" * (STREAM_WINDOW - 3 * 16384 + 1))
    assert c.connection_error(with_stream) == ErrorCode.FLOW_CONTROL_ERROR
    c = Client()
    for sid in range(1, 11, 2):
        c.send(c.headers(sid, POST, end=False))
    for i in range(15):  # three frames a stream, none over its window, the connection's window all but full
        c.send(frame(DATA, 0, 1 + 2 * (i % 5), b"x" * 16384))
    assert c.connection_error(frame(DATA, 0, 9, b"x" * (4 * STREAM_WINDOW - 15 * 16384 + 1))) == \
        ErrorCode.FLOW_CONTROL_ERROR


def test_acknowledged_data_opens_the_clients_windows_by_half_a_window() -> None:
    c = Client()
    c.send(c.headers(1, POST, end=False))
    c.send(frame(DATA, 0, 1, b"x" * 16384) + frame(DATA, 0, 1, b"x" * 16384))
    c.session.acknowledge(1, 16384)
    assert c.out() == []
    c.session.acknowledge(1, 16384)
    assert c.out() == [(WINDOW_UPDATE, 0, 0, struct.pack(">L", 32768)), (WINDOW_UPDATE, 0, 1, struct.pack(">L", 32768))]


# ---------------------------------------------------------------------------
# What the server sends


def test_a_large_response_head_goes_in_continuation_frames() -> None:
    c = Client()
    c.send(c.headers(1))
    fields = [(b":status", b"200"), (b"x-big", bytes(range(256)) * 150)]
    c.session.send_headers(1, fields, end=True)
    out = c.out()
    assert [(k, f) for k, f, _, _ in out] == [(HEADERS, END_STREAM), (CONTINUATION, 0), (CONTINUATION, END_HEADERS)]
    assert hpack.Decoder().decode(b"".join(p for *_, p in out), raw=True) == fields


def test_drain_sends_goaway_and_ignores_later_streams() -> None:
    c = Client()
    c.send(c.headers(1))
    c.session.drain()
    assert c.out() == [(GOAWAY, 0, 0, struct.pack(">LL", 1, 0))]
    assert c.send(c.headers(3, POST, end=False) + frame(DATA, END_STREAM, 3, b"x")) == []
    c.session.send_headers(1, [(b":status", b"204")], end=True)
    assert [k for k, *_ in c.out()] == [HEADERS]


# ---------------------------------------------------------------------------
# The head checks, done a few fields at a time in C, against one field at a time


def _one_by_one(fields: list[tuple[bytes, bytes]]) -> int | None | str:
    """RFC 9113 8.2 and 8.3.1 as written: the content length, or "malformed"."""
    token = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
    pseudo: dict[bytes, bytes] = {}
    regular = False
    length = None
    for name, value in fields:
        if any(c in value for c in b"\x00\r\n") or value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
            return "malformed"
        if name.startswith(b":"):
            if regular or name in pseudo or name not in (b":method", b":scheme", b":path", b":authority"):
                return "malformed"
            pseudo[name] = value
            continue
        regular = True
        if not token.match(name) or name in (b"connection", b"keep-alive", b"proxy-connection",
                                             b"transfer-encoding", b"upgrade"):
            return "malformed"
        if name == b"te" and value != b"trailers":
            return "malformed"
        if name == b"content-length":
            if not re.fullmatch(rb"[0-9]{1,18}", value) or length is not None and int(value) != length:
                return "malformed"
            length = int(value)
    if pseudo.get(b":method") == b"CONNECT":
        if b":scheme" in pseudo or b":path" in pseudo or b":authority" not in pseudo:
            return "malformed"
    elif not all(k in pseudo for k in (b":method", b":scheme", b":path")) or not pseudo[b":path"]:
        return "malformed"
    return length


_field_names = st.one_of(
    st.sampled_from([b":method", b":scheme", b":path", b":authority", b":status", b"te", b"content-length",
                     b"connection", b"accept", b"", b"x-a"]),
    st.binary(max_size=6).map(lambda b: bytes(b"aZ -:\n0!"[c % 8] for c in b)),
)
_field_values = st.one_of(
    st.sampled_from([b"GET", b"CONNECT", b"https", b"/", b"", b"trailers", b"5", b"7", b"a.test"]),
    st.binary(max_size=6).map(lambda b: bytes(b"a \t\r\n\x001"[c % 7] for c in b)),
)


@hypothesis.settings(max_examples=2000, deadline=None, derandomize=True)
@given(st.lists(st.tuples(_field_names, _field_values), max_size=8))
def test_head_checks_agree_with_the_rules_one_field_at_a_time(fields: list[tuple[bytes, bytes]]) -> None:
    _agree(fields)


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.tuples(_field_names, _field_values), max_size=4))
def test_head_checks_agree_on_heads_that_start_well_formed(extra: list[tuple[bytes, bytes]]) -> None:
    _agree([*GET, *extra])


def _agree(fields: list[tuple[bytes, bytes]]) -> None:
    try:
        got: int | None | str = check_request(fields)
    except Exception as e:
        assert type(e).__name__ == "_StreamError"
        got = "malformed"
    assert got == _one_by_one(fields)


def test_a_session_is_freed_by_reference_counting() -> None:
    """No cycle through the session (its frame handlers are functions, not bound methods)."""
    import gc
    import weakref

    c = Client()
    c.send(c.headers(1, POST, end=False) + frame(DATA, 0, 1, b"x"))
    session = weakref.ref(c.session)
    gc.disable()
    try:
        del c
        assert session() is None
    finally:
        gc.enable()
