"""
The C{Date} of responses the proxy makes itself.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.http import datetimeToString

__all__ = ["http_date"]

_date_cache: list[Any] = [None, b""]
"""The second last formatted by L{http_date}, and its IMF-fixdate."""


def http_date(clock: IReactorTime) -> bytes:
    """
    The C{Date} of a response the proxy makes itself (RFC 9110 6.6.1), as
    IMF-fixdate, from the injected clock: formatted once a second, not per
    response.
    """
    second = int(clock.seconds())
    cache = _date_cache
    if cache[0] != second:
        cache[1] = datetimeToString(second)
        cache[0] = second
    return cache[1]
