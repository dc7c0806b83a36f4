"""
The server side of one HTTP/2 connection (RFC 9113) as pure logic: bytes in
(L{H2Session.receive}), events and bytes out (L{H2Session.data_to_send}); no
sockets, no clock.  L{rproxy_tw.http.h2.H2ServerConnection} drives it.

Why our own and not the C{h2} package: h2's state machine, frame objects
and checks were two thirds of the cost of an HTTP/2 request (bench/README.md,
issue 16).  This one does what a reverse proxy's server side needs and no
more: no server push, no priorities (PRIORITY is checked, then ignored, as
RFC 9113 5.3.2 allows), request heads checked once (8.2, 8.3).

It is the edge, so it is strict: a frame that breaks the protocol is a
connection error (GOAWAY, then L{ProtocolError}), a malformed request a
stream error (RST_STREAM PROTOCOL_ERROR; the connection's other streams go
on), and frames that cost work without doing anything for the client are
counted (L{H2Session.useless}) and, past an allowance, end the connection
with ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from attrs import define

from .hpack_in import DecodeError, HeaderListTooLarge, RequestDecoder
from .hpack_out import encode_fields
from .h2frames import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADER,
    HEADERS,
    MAX_MAX_FRAME_SIZE,
    SETTINGS,
    MAX_WINDOW,
    PADDED,
    PREFACE,
    PRIORITY_FLAG,
    SETTINGS_ACK,
    ErrorCode,
    Setting,
    goaway,
    header_frames,
    ping_ack,
    rst_stream,
    settings,
    window_update,
)

__all__ = ["ConnectionTerminated", "DataReceived", "H2Session", "ProtocolError", "RequestReceived",
           "StreamClosedError", "StreamEnded", "StreamReset", "WindowUpdated"]


# -- events ---------------------------------------------------------------------------------


@define(slots=True)
class RequestReceived:
    """
    A request head, checked (8.2, 8.3); C{ended}: it has no body.  C{headers}
    may be shared with other requests of the connection (a remembered block):
    read it, never change it.
    """

    stream_id: int
    headers: list[tuple[bytes, bytes]]
    ended: bool


@define(slots=True)
class DataReceived:
    """Request body; C{flow_controlled_length} (padding included) is what acknowledging it gives back."""

    stream_id: int
    data: bytes
    flow_controlled_length: int


@define(slots=True)
class StreamEnded:
    """The client's side of the stream ended (END_STREAM, on DATA or trailers)."""

    stream_id: int


@define(slots=True)
class StreamReset:
    """A stream ended early: reset by the client (C{remote}), or by us for its error."""

    stream_id: int
    error_code: int
    remote: bool


@define(slots=True)
class WindowUpdated:
    """More may be sent: on one stream, or (stream 0) on the connection or every stream."""

    stream_id: int


@define(slots=True)
class ConnectionTerminated:
    """The client sent GOAWAY."""

    error_code: int
    last_stream_id: int


class ProtocolError(Exception):
    """The connection broke the protocol: a GOAWAY with C{code} is queued, nothing more is read."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamClosedError(ProtocolError):
    """Sending on a stream that can take no more (reset, ended, or the connection closed)."""

    def __init__(self, stream_id: int) -> None:
        super().__init__(ErrorCode.STREAM_CLOSED, f"stream {stream_id} is closed")


class _StreamError(Exception):
    def __init__(self, code: ErrorCode) -> None:
        self.code = code


# -- request heads (RFC 9113 8.2, 8.3) ------------------------------------------------------

_names = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9a-z]+(?:\n[!#$%&'*+\-.^_`|~0-9a-z]+)*)?\Z").match
"""Field names, one a line: tokens (RFC 9110 5.1), lower case (RFC 9113 8.2)."""

_digits = re.compile(rb"[0-9]{1,18}\Z").match

CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
"""Forbidden in HTTP/2 (8.2.2); C{te} is allowed with the value C{trailers} only."""

_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})


def _check_fields(fields: list[tuple[bytes, bytes]], names: list[bytes]) -> int | None:
    """
    Raise L{_StreamError} unless every field may be sent in HTTP/2 (8.2):
    C{names}, the regular ones, are lower-case tokens and not
    connection-specific; no value holds NUL, CR or LF or starts or ends with
    whitespace (8.2.1).  Checked all at once, one line a field, in C
    (a request head has a dozen or more fields).  Returns the content length, if given.
    """
    values = b"\n".join([f[1] for f in fields])
    if values.count(b"\n") != len(fields) - 1 or b"\r" in values or b"\x00" in values \
            or b"\n " in values or b"\n\t" in values or b" \n" in values or b"\t\n" in values \
            or values[:1] in _BLANK or values[-1:] in _BLANK:
        raise _StreamError(ErrorCode.PROTOCOL_ERROR)
    joined = b"\n".join(names)
    if _names(joined) is None or names and joined.count(b"\n") != len(names) - 1 or b"" in names \
            or not CONNECTION_SPECIFIC.isdisjoint(names):
        raise _StreamError(ErrorCode.PROTOCOL_ERROR)
    length = None
    if b"te" in names or b"content-length" in names:
        for name, value in fields:
            if name == b"te" and value != b"trailers":
                raise _StreamError(ErrorCode.PROTOCOL_ERROR)
            if name == b"content-length":
                if _digits(value) is None or length is not None and int(value) != length:
                    raise _StreamError(ErrorCode.PROTOCOL_ERROR)
                length = int(value)
    return length


_BLANK = (b" ", b"\t")


def check_request(fields: list[tuple[bytes, bytes]]) -> int | None:
    """
    Raise L{_StreamError} for a malformed request head (8.3.1): pseudo-header
    fields unknown, repeated, after a regular field or missing, an empty
    C{:path}, CONNECT with C{:scheme} or C{:path} or without C{:authority};
    or a field that breaks L{_check_fields}.  Returns the content length, if given.
    """
    pseudo: dict[bytes, bytes] = {}
    names: list[bytes] = []
    for name, value in fields:
        if name[:1] == b":":
            if names or name in pseudo or name not in _REQUEST_PSEUDO:
                raise _StreamError(ErrorCode.PROTOCOL_ERROR)
            pseudo[name] = value
        else:
            names.append(name)
    if pseudo.get(b":method") == b"CONNECT":
        if b":scheme" in pseudo or b":path" in pseudo or b":authority" not in pseudo:
            raise _StreamError(ErrorCode.PROTOCOL_ERROR)
    elif b":scheme" not in pseudo or not pseudo.get(b":path") or b":method" not in pseudo:
        raise _StreamError(ErrorCode.PROTOCOL_ERROR)
    return _check_fields(fields, names)


def _check_trailers(fields: list[tuple[bytes, bytes]]) -> None:
    names = [f[0] for f in fields]
    if any(name[:1] == b":" for name in names):
        raise _StreamError(ErrorCode.PROTOCOL_ERROR)
    _check_fields(fields, names)


# -- the connection -------------------------------------------------------------------------


class _Stream:
    """What the session knows of an open stream: its windows, its ends, its body's length."""

    __slots__ = ("send_window", "recv_window", "remote_open", "local_open", "expected", "received", "unacked")

    def __init__(self, send_window: int, recv_window: int, remote_open: bool, expected: int | None) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.remote_open = remote_open
        self.local_open = True
        self.expected = expected
        self.received = 0
        self.unacked = 0


class _ConnectionError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        self.message = message


CLOSED_MEMORY = 1024
"""
Closed streams remembered (between this and twice this many): frames on one
we reset are ignored (5.1: the client may have sent them before it saw the
reset), frames on one closed otherwise are STREAM_CLOSED, and a HEADERS
frame on a stream below the last one and never opened is a PROTOCOL_ERROR
(5.1.1).
"""

BLOCK_CACHE_ENTRIES = 64
BLOCK_CACHE_BYTES = 1024
"""
Request header blocks remembered per connection with their checked fields.
A block that only refers to the tables decodes the same while the dynamic
table is unchanged (a client's repeated requests are such blocks); the
cache is emptied whenever a block changes the table.
"""

_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_pair = struct.Struct(">HL").unpack_from
_word = struct.Struct(">L").unpack_from
_two_words = struct.Struct(">LL").unpack_from


class H2Session:
    """
    One server connection's HTTP/2 state: streams, windows both ways,
    settings, HPACK, and what the client's frames cost (see the module).
    """

    def __init__(self, encoder: Any, max_concurrent_streams: int, stream_window: int, connection_window: int,
                 max_header_list_size: int, flood_allowance: int, per_useful: int) -> None:
        self.encoder = encoder
        self.max_concurrent_streams = max_concurrent_streams
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_header_list_size = max_header_list_size
        self.flood_allowance = flood_allowance
        self.per_useful = per_useful
        self.decoder = RequestDecoder(max_header_list_size=2 * max_header_list_size)
        self.streams: dict[int, _Stream] = {}
        self.last_stream_id = 0
        """The highest stream a client opened (or tried to)."""
        self.closed = False
        self.draining = False
        self.useful = 0
        self.useless = 0
        self.peer_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME_SIZE
        self.send_window = DEFAULT_WINDOW
        self.recv_window = connection_window
        self._unacked = 0
        self._out: list[bytes] = []
        self._buffer = b""
        self._preface = True
        self._settings_seen = False
        self._block_stream = 0
        self._block_flags = 0
        self._block_parts: list[bytes] = []
        self._block_size = 0
        self._closed: dict[int, bool] = {}
        """Recently closed streams: C{True} for those we reset."""
        self._closed_before: dict[int, bool] = {}
        self._blocks: dict[bytes, tuple[list[tuple[bytes, bytes]], int | None]] = {}

    def initiate(self) -> None:
        """The server's preface: SETTINGS, and the connection window opened to its size."""
        self._out.append(settings({
            Setting.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams,
            Setting.INITIAL_WINDOW_SIZE: self.stream_window,
            Setting.MAX_HEADER_LIST_SIZE: self.max_header_list_size,
        }))
        if self.connection_window > DEFAULT_WINDOW:
            self._out.append(window_update(0, self.connection_window - DEFAULT_WINDOW))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return b"".join(out)

    # -- frames in --------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Any]:
        """The events C{data} completes; L{ProtocolError} (with a GOAWAY queued) if it breaks the protocol."""
        if self.closed:
            return []
        events: list[Any] = []
        try:
            self._receive(data, events)
        except _ConnectionError as e:
            self.close(e.code)
            raise ProtocolError(e.code, e.message) from None
        return events

    def _receive(self, data: bytes, events: list[Any]) -> None:
        buf = self._buffer + data if self._buffer else data
        pos = 0
        n = len(buf)
        if self._preface:
            if n < len(PREFACE):
                if not PREFACE.startswith(buf):
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "no HTTP/2 connection preface")
                self._buffer = buf
                return
            if not buf.startswith(PREFACE):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "no HTTP/2 connection preface")
            self._preface = False
            pos = len(PREFACE)
        handlers = _HANDLERS
        while n - pos >= 9:
            high, low, kind, flags, sid = _unpack_header(buf, pos)
            length = (high << 8) | low
            if length > DEFAULT_MAX_FRAME_SIZE:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            end = pos + 9 + length
            if end > n:
                break
            payload = buf[pos + 9 : end]
            pos = end
            sid &= 0x7FFFFFFF
            if self._block_stream and (kind != CONTINUATION or sid != self._block_stream):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "a frame inside a field block")
            if not self._settings_seen and (kind != SETTINGS or flags & ACK):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "the preface's first frame is not SETTINGS")
            if not (kind == DATA and not length and flags & END_STREAM) and kind != GOAWAY:
                # Useless until it shows otherwise: a request opened, body carried.
                self.useless += 1
                if self.useless > self.flood_allowance + self.per_useful * self.useful:
                    raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM,
                                           f"sent {self.useless} frames that do nothing against {self.useful} "
                                           "useful ones")
            if kind < 10:
                handlers[kind](self, flags, sid, payload, events)
                if self.closed:
                    return
            # Other types (extensions such as PRIORITY_UPDATE) are ignored (5.5).
        self._buffer = buf[pos:] if pos < n else b""

    def _is_idle(self, sid: int) -> bool:
        """Never opened: above the last stream the client opened, or even (we push none)."""
        return sid > self.last_stream_id or not sid & 1

    def _data(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if not sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        if length > self.recv_window:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= length
        data = payload
        if flags & PADDED:
            pad = payload[0] if length else 0
            if pad >= length:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "padding longer than the DATA frame")
            data = payload[1 : length - pad]
        stream = self.streams.get(sid)
        if stream is None or not stream.remote_open:
            self._give_back(length)
            if stream is not None:
                self._stream_error(sid, ErrorCode.STREAM_CLOSED, events)
            elif self._is_idle(sid):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            elif not self._reset_by_us(sid):
                raise _ConnectionError(ErrorCode.STREAM_CLOSED, f"DATA on closed stream {sid}")
            return
        if length > stream.recv_window:
            raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, f"DATA beyond stream {sid}'s window")
        stream.recv_window -= length
        received = stream.received = stream.received + len(data)
        ended = flags & END_STREAM
        expected = stream.expected
        if expected is not None and (received > expected or ended and received != expected):
            self._give_back(length)
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)
            return
        if data:
            self.useless -= 1
            self.useful += 1
        events.append(DataReceived(sid, data, length))
        if ended:
            stream.remote_open = False
            events.append(StreamEnded(sid))
            if not stream.local_open:
                self._close_stream(sid, False)

    def _headers(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if not sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start = 0
        end = len(payload)
        if flags & PADDED:
            if not end:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its padding")
            start = 1
            end -= payload[0]
        depends_on_itself = False
        if flags & PRIORITY_FLAG:
            if end - start < 5:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            depends_on_itself = _word(payload, start)[0] & 0x7FFFFFFF == sid
            start += 5
        if end < start:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "padding longer than the HEADERS frame")
        fragment = payload[start:end] if start or end != len(payload) else payload
        if flags & END_HEADERS:
            self._field_block(sid, flags, fragment, depends_on_itself, events)
            return
        self._block_stream = sid
        self._block_flags = flags | (0x100 if depends_on_itself else 0)
        self._block_parts = [fragment]
        self._block_size = len(fragment)

    def _continuation(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if not self._block_stream:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without a field block")
        self._block_size += len(payload)
        if self._block_size > 2 * self.max_header_list_size:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, f"a field block over {self._block_size} bytes")
        self._block_parts.append(payload)
        if flags & END_HEADERS:
            block = b"".join(self._block_parts)
            flags = self._block_flags
            self._block_stream = 0
            self._block_parts = []
            self._field_block(sid, flags, block, bool(flags & 0x100), events)

    def _field_block(self, sid: int, flags: int, block: bytes, depends_on_itself: bool, events: list[Any]) -> None:
        """A whole field block: a request head, trailers, or an error."""
        ended = bool(flags & END_STREAM)
        stream = self.streams.get(sid)
        if stream is None:
            if not sid & 1:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on even stream {sid}")
            if sid <= self.last_stream_id:
                how = self._closed.get(sid, self._closed_before.get(sid))
                if how is None:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {sid}, below the last one")
                if not how:
                    raise _ConnectionError(ErrorCode.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
                self._decode(block)  # the dynamic table must follow, even for a stream we dropped
                return
            self.last_stream_id = sid
            fields, length = self._request_head(block, sid, events)
            if fields is None:
                return
            if self.draining:
                self._remember(sid, True)  # above the GOAWAY's last stream: ignored, and its frames (6.8)
                return
            if depends_on_itself:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)
            elif len(self.streams) >= self.max_concurrent_streams:
                self._stream_error(sid, ErrorCode.REFUSED_STREAM, events)
            elif ended and length:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)  # content-length, no DATA
            else:
                self.streams[sid] = _Stream(self.peer_window, self.stream_window, not ended, length)
                self.useless -= 1
                self.useful += 1
                events.append(RequestReceived(sid, fields, ended))
            return
        fields = self._decode(block)
        if not stream.remote_open:
            self._stream_error(sid, ErrorCode.STREAM_CLOSED, events)
            return
        try:
            if depends_on_itself or not ended:
                raise _StreamError(ErrorCode.PROTOCOL_ERROR)  # trailers end the stream (8.1)
            _check_trailers(fields)
            if stream.expected is not None and stream.received != stream.expected:
                raise _StreamError(ErrorCode.PROTOCOL_ERROR)
        except _StreamError as e:
            self._stream_error(sid, e.code, events)
            return
        stream.remote_open = False
        events.append(StreamEnded(sid))
        if not stream.local_open:
            self._close_stream(sid, False)

    def _request_head(self, block: bytes, sid: int,
                      events: list[Any]) -> tuple[list[tuple[bytes, bytes]] | None, int | None]:
        """Decode and check a request's field block (L{BLOCK_CACHE_ENTRIES} says when it is remembered)."""
        known = self._blocks.get(block)
        if known is not None:
            return known
        changes = self.decoder.changes
        fields = self._decode(block)
        if self.decoder.changes != changes:
            self._blocks.clear()  # the table changed: what was remembered may decode otherwise now
            cache = False
        else:
            cache = len(block) <= BLOCK_CACHE_BYTES
        try:
            length = check_request(fields)
        except _StreamError as e:
            self._stream_error(sid, e.code, events)
            return None, None
        if cache:
            if len(self._blocks) >= BLOCK_CACHE_ENTRIES:
                self._blocks.clear()
            self._blocks[block] = (fields, length)
        return fields, length

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return self.decoder.decode(block)
        except HeaderListTooLarge:
            raise _ConnectionError(ErrorCode.ENHANCE_YOUR_CALM, "a header list too large to decode") from None
        except DecodeError as e:
            raise _ConnectionError(ErrorCode.COMPRESSION_ERROR, f"HPACK: {e}") from None

    def _priority(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if not sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._stream_error(sid, ErrorCode.FRAME_SIZE_ERROR, events)  # a stream error (6.3)
        elif _word(payload)[0] & 0x7FFFFFFF == sid:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)

    def _rst_stream(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if not sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes long")
        if self.streams.pop(sid, None) is not None:
            self._remember(sid, False)
            events.append(StreamReset(sid, _word(payload)[0], True))
        elif self._is_idle(sid):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")

    def _settings(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        self._settings_seen = True
        window_changed = False
        for i in range(0, len(payload), 6):
            key, value = _pair(payload, i)
            if key == Setting.HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif key == Setting.ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
            elif key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1")
                delta = value - self.peer_window
                self.peer_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
                window_changed = True
            elif key == Setting.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_MAX_FRAME_SIZE:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            # Others (and unknown ones, 6.5.2) say nothing a server acts on.
        self._out.append(SETTINGS_ACK)
        if window_changed:
            events.append(WindowUpdated(0))

    def _push_promise(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _ping(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "PING not 8 bytes long")
        if not flags & ACK:
            self._out.append(ping_ack(payload))

    def _goaway(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        last, code = _two_words(payload)
        events.append(ConnectionTerminated(code, last & 0x7FFFFFFF))
        self.closed = True

    def _window_update(self, flags: int, sid: int, payload: bytes, events: list[Any]) -> None:
        if len(payload) != 4:
            raise _ConnectionError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes long")
        increment = _word(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not increment:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            events.append(WindowUpdated(0))
            return
        stream = self.streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # a closed stream: the update crossed its end
        if not increment:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, events)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(sid, ErrorCode.FLOW_CONTROL_ERROR, events)
            return
        events.append(WindowUpdated(sid))

    def _stream_error(self, sid: int, code: ErrorCode, events: list[Any]) -> None:
        """RST_STREAM with C{code} (5.4.2); the stream's owner is told if it had one."""
        self._out.append(rst_stream(sid, code))
        self._remember(sid, True)
        if self.streams.pop(sid, None) is not None:
            events.append(StreamReset(sid, code, False))

    def _close_stream(self, sid: int, by_us: bool) -> None:
        del self.streams[sid]
        self._remember(sid, by_us)

    def _remember(self, sid: int, reset_by_us: bool) -> None:
        """See L{CLOSED_MEMORY}."""
        closed = self._closed
        closed[sid] = reset_by_us
        if len(closed) >= CLOSED_MEMORY:
            self._closed_before = closed
            self._closed = {}

    def _reset_by_us(self, sid: int) -> bool:
        return self._closed.get(sid, self._closed_before.get(sid, False))

    def _give_back(self, length: int) -> None:
        """DATA nobody will read still counted against the connection window: acknowledge it."""
        self.acknowledge(0, length)

    # -- frames out -------------------------------------------------------------------------

    def window(self, sid: int) -> int:
        """How many bytes of DATA may go on stream C{sid} now (in one frame)."""
        stream = self.streams.get(sid)
        if stream is None or not stream.local_open or self.closed:
            raise StreamClosedError(sid)
        return min(stream.send_window, self.send_window, self.peer_max_frame)

    def send_headers(self, sid: int, fields: list[tuple[bytes, bytes]], end: bool = False) -> None:
        self.send_block(sid, encode_fields(fields), end)

    def send_block(self, sid: int, encoded: bytes, end: bool = False) -> None:
        """
        A header block of fields already encoded (L{encode_fields}' bytes, perhaps
        remembered): the encoder adds the table size updates the connection owes.
        """
        stream = self.streams.get(sid)
        if stream is None or not stream.local_open or self.closed:
            raise StreamClosedError(sid)
        self._out.append(header_frames(sid, self.encoder.block(encoded), end, self.peer_max_frame))
        if end:
            self._end(sid, stream)

    def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        """DATA of at most L{window} bytes."""
        stream = self.streams.get(sid)
        if stream is None or not stream.local_open or self.closed:
            raise StreamClosedError(sid)
        n = len(data)
        stream.send_window -= n
        self.send_window -= n
        if n:
            self.useful += 1
        self._out.append(_pack_header(n >> 8, n & 0xFF, DATA, END_STREAM if end else 0, sid))
        self._out.append(data)
        if end:
            self._end(sid, stream)

    def _end(self, sid: int, stream: _Stream) -> None:
        stream.local_open = False
        if not stream.remote_open:
            self._close_stream(sid, False)

    def reset_stream(self, sid: int, code: ErrorCode) -> None:
        """Reset a stream still open; nothing for one already closed."""
        if self.streams.pop(sid, None) is not None and not self.closed:
            self._out.append(rst_stream(sid, code))
            self._remember(sid, True)

    def acknowledge(self, sid: int, size: int) -> None:
        """
        C{size} bytes of stream C{sid}'s DATA were consumed: the client may
        send as many again.  Updates go out once half a stream window is
        consumed (as nghttp2 does), not one per DATA frame.
        """
        if self.closed or not size:
            return
        threshold = self.stream_window // 2
        unacked = self._unacked + size
        if unacked >= threshold:
            self._out.append(window_update(0, unacked))
            self.recv_window += unacked
            unacked = 0
        self._unacked = unacked
        stream = self.streams.get(sid)
        if stream is not None and stream.remote_open:
            unacked = stream.unacked + size
            if unacked >= threshold:
                self._out.append(window_update(sid, unacked))
                stream.recv_window += unacked
                unacked = 0
            stream.unacked = unacked

    def drain(self) -> None:
        """A graceful stop (6.8): GOAWAY NO_ERROR with the last stream taken; later streams are ignored."""
        if not self.draining and not self.closed:
            self.draining = True
            self._out.append(goaway(self.last_stream_id, ErrorCode.NO_ERROR))

    def close(self, code: ErrorCode) -> None:
        """GOAWAY with C{code}: nothing more is sent or read."""
        if not self.closed:
            self._out.append(goaway(self.last_stream_id, code))
            self.closed = True


_HANDLERS = (H2Session._data, H2Session._headers, H2Session._priority, H2Session._rst_stream, H2Session._settings,
             H2Session._push_promise, H2Session._ping, H2Session._goaway, H2Session._window_update,
             H2Session._continuation)
"""What each frame type (0 to 9, RFC 9113 6) does; functions, not bound methods (no cycle through the session)."""
