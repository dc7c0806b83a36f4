"""
Access log: one line per request, in combined log format or JSON, emitted
through twisted.logger (namespace C{rproxy_tw.access}).

C{access_log = "-"} sends the events to the global log (twistd's output);
a path sends them to an observer that appends lines to that file.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from zope.interface import implementer

from .events import IEventObserver, RequestFinished

__all__ = ["AccessLog", "AccessLogFileObserver", "make_access_log"]

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _quote(value: bytes | None) -> str:
    if not value:
        return "-"
    text = value.decode("latin-1")
    return text.replace("\\", "\\\\").replace('"', '\\"')


@implementer(ILogObserver)
class AccessLogFileObserver:
    """Writes each access event's line to a file."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        line = event.get("access_line")
        if line is not None:
            self.stream.write(line + "\n")
            self.stream.flush()


@implementer(IEventObserver)
class AccessLog:
    """Formats and emits one line per finished request: an observer of the proxy's events."""

    def __init__(self, clock: IReactorTime, fmt: str, observer: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.clock = clock
        self.json = fmt == "json"
        self._log = Logger(namespace="rproxy_tw.access", observer=observer or globalLogPublisher)
        self._stamp_second = -1
        self._stamp = ""

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._stamp_second:
            t = time.gmtime(second)
            self._stamp = "%02d/%s/%04d:%02d:%02d:%02d +0000" % (
                t.tm_mday,
                _MONTHS[t.tm_mon - 1],
                t.tm_year,
                t.tm_hour,
                t.tm_min,
                t.tm_sec,
            )
            self._stamp_second = second
        return self._stamp

    def observe(self, event: Any) -> None:
        """One line for each finished request (a tunnel's when it closes, with the bytes each way)."""
        if not isinstance(event, RequestFinished):
            return
        now = event.finished
        started = event.started
        version = event.http_version.decode("latin-1")
        received_bytes = event.bytes_received
        if self.json:
            fields = {
                "time": now,
                "client": event.client,
                "method": event.method.decode("latin-1"),
                "uri": event.target.decode("latin-1"),
                "protocol": "HTTP/" + version,
                "host": event.host.decode("latin-1") if event.host else None,
                "status": event.status,
                "bytes": event.bytes_sent,
                "referer": event.referer.decode("latin-1") if event.referer else None,
                "user_agent": event.user_agent.decode("latin-1") if event.user_agent else None,
                "route": event.route,
                "backend": event.backend,
                "duration": round(now - started, 6) if started else None,
            }
            if event.request_id is not None:
                fields["request_id"] = event.request_id.decode("latin-1")
            if received_bytes is not None:
                fields["bytes_received"] = received_bytes
            line = json.dumps(fields, separators=(",", ":"))
        else:
            line = '%s - - [%s] "%s %s HTTP/%s" %d %d "%s" "%s"' % (
                event.client,
                self._timestamp(now),
                _quote(event.method),
                _quote(event.target),
                version,
                event.status,
                event.bytes_sent,
                _quote(event.referer),
                _quote(event.user_agent),
            )
            if received_bytes is not None:
                # A tunnel: what the client sent and how long it stayed open, after the combined fields.
                line += " tunnel_received=%d duration=%.3f" % (received_bytes, now - started if started else 0.0)
        self._log.info("{access_line}", access_line=line)


def make_access_log(
    clock: IReactorTime, target: str, fmt: str, open_file: Callable[[str], IO[str]] | None = None
) -> AccessLog | None:
    """The access log a C{[server]} section asks for, or None when it is off."""
    if target == "off":
        return None
    if target == "-":
        return AccessLog(clock, fmt)
    stream = (open_file or (lambda p: open(p, "a", buffering=1, encoding="utf-8")))(target)
    publisher = LogPublisher(AccessLogFileObserver(stream))
    return AccessLog(clock, fmt, publisher)
