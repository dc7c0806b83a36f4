"""
Request ids: every proxied request carries one to the origin (C{X-Request-Id}
unless C{[server] request_id_header} names another header), and the access
log writes it.  A trusted peer's id (C{[server] trusted_proxies}: a load
balancer in front that already gave one) is kept; anyone else's is replaced,
so that a client cannot pick the id the logs file its request under.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from zope.interface import implementer

from .pipeline import IRequestFilter

__all__ = ["RequestIdFilter", "acceptable_id", "new_id"]

MAX_ID = 200
"""Longest id taken from a trusted peer: a longer one is replaced."""


_PREFIX = os.urandom(8).hex().encode("ascii")
_COUNTER = itertools.count(1)


def new_id() -> bytes:
    """
    32 hex digits: 64 random bits drawn once per process, then a counter.
    Unique without a system call per request (ids are labels, not secrets).
    """
    return b"%s%016x" % (_PREFIX, next(_COUNTER))


def acceptable_id(value: bytes) -> bool:
    """Short visible ASCII with no quote or backslash (it goes into log lines as is)."""
    return 0 < len(value) <= MAX_ID and all(0x21 <= c <= 0x7E and c not in (0x22, 0x5C) for c in value)


@implementer(IRequestFilter)
class RequestIdFilter:
    """The first request filter of every route: the request's id, in its header, for the origin."""

    def __init__(self, header: str) -> None:
        self.header = header.encode("ascii")
        self.lower = self.header.lower()
        self.size = len(self.header)

    def filterRequest(self, request: Any, exchange: Any) -> None:
        lower, size = self.lower, self.size
        headers = request.headers
        given = None
        count = 0
        for name, value in headers:
            if len(name) == size and name.lower() == lower:
                given = value
                count += 1
        if given is not None and count == 1 and exchange.info.trusted and acceptable_id(given):
            request.request_id = given
            return
        if request.request_id is None:
            request.request_id = new_id()
        if given is not None:
            request.headers = [(n, v) for n, v in headers if not (len(n) == size and n.lower() == lower)]
            request.headers.append((self.header, request.request_id))
        elif type(headers) is list:
            headers.append((self.header, request.request_id))
        else:
            request.headers = [*headers, (self.header, request.request_id)]
