"""
Access log: one line per request, an observer of the proxy's events.

Formats: C{"combined"} (Apache/nginx combined log format), C{"json"} (JSON
lines) or a format string with named fields, as nginx's C{log_format}:
C{'$remote_addr $request_id "$request" $status $upstream_time'}
(L{FIELDS} lists them).

Cheap on purpose: a request's event is kept in a buffer, and the lines are
made and written with one system call per flush (at most a second after the
request, when 512 are waiting, at a stop, and when the file is reopened).
C{access_log = "-"} writes to standard output (the process's file
descriptor 1: the terminal or journal of C{twistd -n}); a path is opened
for appending and reopened by L{AccessLog.reopen} (SIGUSR1), so that
logrotate can move the file without C{copytruncate}.
"""

from __future__ import annotations

import json
import os
import time
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from .events import IRequestObserver, RequestFinished, request_event
from .logs import observer as log_observer

__all__ = ["FIELDS", "AccessLog", "LineWriter", "compile_format", "make_access_log"]

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

FLUSH_SECONDS = 1.0
FLUSH_BYTES = 65536
FLUSH_ITEM = 128
"""What an event waiting to be formatted counts for against FLUSH_BYTES (512 of them fill it)."""


def _quote(value: bytes | None) -> str:
    if not value:
        return "-"
    text = value.decode("latin-1")
    if "\\" in text or '"' in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return text


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value else None


class _Clock:
    """The log's time stamps, formatted once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.until = -1.0
        """C{second + 1}: lines up to then share the stamps (the batch compares floats, calls nothing)."""
        self.local = ""
        self.local_bytes = b""
        self.iso = ""

    def at(self, now: float) -> None:
        second = int(now)
        if second != self.second:
            t = time.gmtime(second)
            self.local = "%02d/%s/%04d:%02d:%02d:%02d +0000" % (
                t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)
            self.iso = "%04d-%02d-%02dT%02d:%02d:%02dZ" % (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min,
                                                         t.tm_sec)
            self.local_bytes = self.local.encode("ascii")
            self.second = second
            self.until = second + 1.0


def _seconds(value: float | None) -> str:
    return "-" if value is None else "%.3f" % value


FIELDS: dict[str, Callable[[RequestFinished, _Clock], str]] = {
    "remote_addr": lambda e, c: e.client,
    "time_local": lambda e, c: c.local,
    "time_iso8601": lambda e, c: c.iso,
    "msec": lambda e, c: "%.3f" % e.finished,
    "request": lambda e, c: "%s %s HTTP/%s" % (_quote(e.method), _quote(e.target), e.http_version.decode("latin-1")),
    "request_method": lambda e, c: _quote(e.method),
    "request_uri": lambda e, c: _quote(e.target),
    "server_protocol": lambda e, c: "HTTP/" + e.http_version.decode("latin-1"),
    "host": lambda e, c: _quote(e.host),
    "status": lambda e, c: str(e.status),
    "body_bytes_sent": lambda e, c: str(e.bytes_sent),
    "request_length": lambda e, c: str(e.request_bytes if not e.tunnel else e.bytes_received or 0),
    "http_referer": lambda e, c: _quote(e.referer),
    "http_user_agent": lambda e, c: _quote(e.user_agent),
    "request_id": lambda e, c: _quote(e.request_id),
    "route": lambda e, c: e.route or "-",
    "pool": lambda e, c: e.pool or "-",
    "backend": lambda e, c: e.backend or "-",
    "upstream_time": lambda e, c: _seconds(e.upstream_time),
    "request_time": lambda e, c: _seconds(e.duration),
    "attempts": lambda e, c: str(e.attempts),
    "tunnel": lambda e, c: "1" if e.tunnel else "0",
}
"""The named fields of a format string (C{$name}; C{${name}} when a letter follows)."""

COMBINED = '$remote_addr - - [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"'


def _parse_template(fmt: str) -> list[tuple[bool, str]]:
    """(is a field, text) parts of a format string.  @raise ValueError: an unknown field."""
    parts: list[tuple[bool, str]] = []
    rest = fmt
    while rest:
        at = rest.find("$")
        if at == -1:
            parts.append((False, rest))
            break
        if at:
            parts.append((False, rest[:at]))
        if rest[at + 1 : at + 2] == "{":
            end = rest.find("}", at)
            if end == -1:
                raise ValueError("a ${ without its }")
            name, rest = rest[at + 2 : end], rest[end + 1 :]
        else:
            name = ""
            for ch in rest[at + 1 :]:
                if not (ch.isalnum() or ch == "_"):
                    break
                name += ch
            rest = rest[at + 1 + len(name) :]
        if name not in FIELDS:
            raise ValueError(f"unknown field ${name} (known: {', '.join('$' + f for f in FIELDS)})")
        parts.append((True, name))
    return parts


def compile_format(fmt: str) -> Callable[[tuple[Any, ...], _Clock], str | bytes]:
    """
    The function that makes a line of C{fmt} from a request's fields (as
    L{IRequestObserver.observe_request} gets them): C{"combined"}, C{"json"},
    or a format string of named fields.  @raise ValueError: an unknown field.
    """
    if fmt == "json":
        return _json_line
    if fmt == "combined":
        return _combined_line
    parts = _parse_template(fmt)
    # One %-format with a tuple of field values: about as cheap as a line can be made in Python.
    template = "".join("%s" if is_field else text.replace("%", "%%") for is_field, text in parts)
    getters = tuple(FIELDS[text] for is_field, text in parts if is_field)

    def line(fields: tuple[Any, ...], clock: _Clock) -> str:
        event = request_event(fields)
        return template % tuple(get(event, clock) for get in getters)

    return line


def _quote_bytes(value: bytes | None) -> bytes:
    if not value:
        return b"-"
    # Searched for as ints: `b'"' in value` goes through the buffer protocol, ten times the cost (callgrind).
    if 34 in value or 92 in value:  # '"', '\\'
        value = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return value


def _combined_line(e: tuple[Any, ...], c: _Clock) -> bytes:
    """
    The combined log format, made as bytes (no decoding) with one pass over
    the request's headers.  Written for its cost (one line per request):
    the event's fields unpacked at once rather than read one by one, and
    L{_quote_bytes} called only for a value that needs it.
    """
    client, method, target, version, _, status, sent, started, finished, _, _, _, headers, received, tunnel, _, _, _, _ = e
    agent = referer = None
    for name, value in headers:
        size = len(name)
        if size == 10 and name.lower() == b"user-agent":
            agent = value
        elif size == 7 and name.lower() == b"referer":
            referer = value
    line = b'%s - - [%s] "%s %s HTTP/%s" %d %d "%s" "%s"' % (
        client.encode("ascii", "replace"), c.local_bytes,
        _quote_bytes(method) if not method or 34 in method or 92 in method else method,
        _quote_bytes(target) if not target or 34 in target or 92 in target else target,
        version, status, sent,
        _quote_bytes(referer) if not referer or 34 in referer or 92 in referer else referer,
        _quote_bytes(agent) if not agent or 34 in agent or 92 in agent else agent)
    if tunnel:
        # A tunnel: what the client sent and how long it stayed open, after the combined fields.
        line += b" tunnel_received=%d duration=%.3f" % (received or 0, finished - started if started else 0.0)
    return line


_dumps = json.JSONEncoder(separators=(",", ":")).encode
_js = encode_basestring_ascii


def _json_text(value: bytes | None) -> str:
    return "null" if not value else _js(value.decode("latin-1"))


def _json_str(value: str | None) -> str:
    return "null" if value is None else _js(value)


def _json_line(fields: tuple[Any, ...], c: _Clock) -> str:
    """
    One JSON object, written out with one %-format and the C string encoder:
    a third of the time json.dumps of a dict takes, and the same text
    (a property test holds it to L{_json_line_plain}).
    """
    e = request_event(fields)
    agent = referer = None
    for name, value in e.request_headers:
        size = len(name)
        if size == 10 and name.lower() == b"user-agent":
            agent = value
        elif size == 7 and name.lower() == b"referer":
            referer = value
    started, finished, upstream = e.started, e.finished, e.upstream_time
    line = ('{"time":%r,"client":%s,"method":%s,"uri":%s,"protocol":%s,"host":%s,"status":%d,"bytes":%d,'
            '"referer":%s,"user_agent":%s,"route":%s,"pool":%s,"backend":%s,"duration":%s,"upstream_time":%s,'
            '"request_id":%s') % (
        finished, _js(e.client), _js(e.method.decode("latin-1")), _js(e.target.decode("latin-1")),
        _js("HTTP/" + e.http_version.decode("latin-1")), _json_text(e.host), e.status, e.bytes_sent,
        _json_text(referer), _json_text(agent), _json_str(e.route), _json_str(e.pool), _json_str(e.backend),
        repr(round(finished - started, 6)) if started else "null",
        repr(round(upstream, 6)) if upstream is not None else "null", _json_text(e.request_id))
    if e.tunnel:
        line += ',"bytes_received":%s' % ("null" if e.bytes_received is None else "%d" % e.bytes_received)
    elif e.request_bytes:
        line += ',"request_bytes":%d' % e.request_bytes
    if e.attempts > 1:
        line += ',"attempts":%d' % e.attempts
    return line + "}"


def _json_line_plain(e: RequestFinished, c: _Clock) -> str:
    """The JSON line as json.dumps makes it: what L{_json_line} is held to (tests)."""
    started = e.started
    fields: dict[str, Any] = {
        "time": e.finished,
        "client": e.client,
        "method": e.method.decode("latin-1"),
        "uri": e.target.decode("latin-1"),
        "protocol": "HTTP/" + e.http_version.decode("latin-1"),
        "host": _text(e.host),
        "status": e.status,
        "bytes": e.bytes_sent,
        "referer": _text(e.referer),
        "user_agent": _text(e.user_agent),
        "route": e.route,
        "pool": e.pool,
        "backend": e.backend,
        "duration": round(e.finished - started, 6) if started else None,
        "upstream_time": round(e.upstream_time, 6) if e.upstream_time is not None else None,
        "request_id": _text(e.request_id),
    }
    if e.tunnel:
        fields["bytes_received"] = e.bytes_received
    elif e.request_bytes:
        fields["request_bytes"] = e.request_bytes
    if e.attempts > 1:
        fields["attempts"] = e.attempts
    return _dumps(fields)


class LineWriter:
    """
    Lines kept in memory and written in one C{os.write} per flush: at most
    C{FLUSH_SECONDS} after a line, or when C{FLUSH_BYTES} wait.  A path is
    opened for appending (created C{0640}); C{None} writes to standard output.
    """

    _log = Logger(observer=log_observer)

    def __init__(self, clock: IReactorTime, path: str | None,
                 format_all: Callable[[list[Any]], list[Any]] | None = None) -> None:
        """
        @param format_all: makes the lines of what L{write} was given, a
            flush's worth at once (the access log hands it events: formatting
            leaves the request's path, and runs as one loop).
        """
        self.clock = clock
        self.path = path
        self.format_all = format_all
        self.lines: list[Any] = []
        self.size = 0
        self._call: Any = None
        self.fd = self._open()

    def _open(self) -> int:
        if self.path is None:
            return 1
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, line: Any) -> None:
        """A line (or, with C{format}, what becomes one) to write within a second."""
        lines = self.lines
        lines.append(line)
        self.size += FLUSH_ITEM if self.format_all is not None else len(line)
        if self.size >= FLUSH_BYTES:
            self.flush()
        elif self._call is None:
            self._call = self.clock.callLater(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if not self.lines:
            return
        lines = self.lines if self.format_all is None else self.format_all(self.lines)
        if type(lines[0]) is bytes:  # the combined format is made as bytes
            data = b"\n".join(lines) + b"\n"
        else:
            data = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        self.lines = []
        self.size = 0
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except OSError as e:
            self._log.error("access log {path}: cannot write ({why}): lines lost", path=self.path or "stdout",
                            why=e.strerror or str(e))

    def reopen(self) -> None:
        """Flush, then open the path again (after logrotate moved the file away)."""
        self.flush()
        if self.path is None:
            return
        try:
            fd = self._open()
        except OSError as e:
            self._log.error("access log {path}: cannot reopen ({why}): still writing to the old file",
                            path=self.path, why=e.strerror or str(e))
            return
        old, self.fd = self.fd, fd
        os.close(old)

    def close(self) -> None:
        self.flush()
        if self.path is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@implementer(IRequestObserver)
class AccessLog:
    """Formats and writes one line per finished request (a tunnel's when it closes, with the bytes each way)."""

    def __init__(self, clock: IReactorTime, fmt: str, writer: LineWriter | None = None,
                 path: str | None = None) -> None:
        self.clock = clock
        self.json = fmt == "json"
        self.format = compile_format(fmt)
        self._clock = _Clock()
        self.writer = writer if writer is not None else LineWriter(clock, path, self._lines)
        self.observe_request = self.writer.write
        """The bus hands each finished request straight to the writer: its line is made at flush time."""

    def _lines(self, events: list[tuple[Any, ...]]) -> list[str | bytes]:
        """The lines of a flush's events: one loop, the time stamps redone only when the second changes."""
        clock, format = self._clock, self.format
        lines = []
        append = lines.append
        for event in events:
            finished = event[8]  # RequestFinished.finished
            if not clock.second <= finished < clock.until:
                clock.at(finished)
            append(format(event, clock))
        return lines

    def observe(self, event: Any) -> None:
        """The event is kept; its line is made when the buffer is written (once a second, or 512 events)."""
        if type(event) is RequestFinished:
            self.observe_request(event)

    def flush(self) -> None:
        self.writer.flush()

    def reopen(self) -> None:
        self.writer.reopen()

    def close(self) -> None:
        self.writer.close()


def make_access_log(clock: IReactorTime, target: str, fmt: str) -> AccessLog | None:
    """The access log a C{[server]} section asks for, or None when it is off."""
    if target == "off":
        return None
    return AccessLog(clock, fmt, path=None if target == "-" else target)
