"""
One level filter for the proxy's own log events.

twistd writes every event it is given, debug included, so per-probe health
lines and per-handshake TLS errors would fill a default log.  Every
C{Logger} in rproxy_tw emits through L{observer}, which passes events at
or above the proxy's level (C{info} unless C{[server] log_level} or
C{--log-level} says otherwise) on to Twisted's global publisher, where
twistd, C{twist} or an embedding application's observers see them.
"""

from __future__ import annotations

from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogPublisher

__all__ = ["LEVELS", "observer", "set_level"]

LEVELS = ("debug", "info", "warn", "error", "critical")

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)

observer = FilteringLogObserver(globalLogPublisher, [_predicate])
"""Pass as C{Logger(observer=observer)} in every module of the proxy."""


def set_level(name: str) -> None:
    """The least severe level the proxy logs: one of L{LEVELS}."""
    _predicate.defaultLogLevel = LogLevel.levelWithName(name)
    _predicate.clearLogLevels()
