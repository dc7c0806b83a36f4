"""
A request head read once, the same way for every front end.

HTTP/1.1 (llhttp), HTTP/2 (the C{h2} package) and the embedded path (a
twisted.web C{Request}) each hand L{read_request_head} what they parsed, and
get back either a L{ProxyRequest} or a L{RequestRejected} with the status to
answer: the same refusals and limits on all three.  The request is a value
that request filters may still rewrite (headers, target) before the
exchange serialises it for the origin.
"""

from __future__ import annotations

from typing import Any, Sequence

from .exchange import RequestRejected
from .target import is_token, parse_target, valid_host

__all__ = ["ProxyRequest", "read_request_head"]

Headers = Sequence[tuple[bytes, bytes]]

_COMMON_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"))
"""Methods known to be tokens, so that the token check runs only for others (HTTP/2 sends any bytes)."""


_VALID_HOSTS: set[bytes] = set()
"""Host values already found valid: most requests repeat a few, so each is checked once (bounded)."""


class ProxyRequest:
    """
    One request as the proxy will forward it.  Mutable on purpose: request
    filters rewrite it (a header rule, a target change) before the exchange
    turns it into bytes for the origin.
    """

    __slots__ = ("method", "target", "path", "query", "host", "headers", "http_version", "body", "content_length",
                 "asterisk", "keep_alive", "upgrade", "route", "request_id", "body_limit")

    def __init__(self, method: bytes, target: bytes, path: bytes, query: bytes, host: bytes | None,
                 headers: list[tuple[bytes, bytes]], http_version: bytes, body: str, content_length: int | None,
                 asterisk: bool = False, keep_alive: bool = True) -> None:
        self.method = method
        self.target = target
        """The request target as the client sent it (for the access log)."""
        self.path = path
        """Normalised (see L{rproxy_tw.http.target.normalize_path}); routing and the origin use it."""
        self.query = query
        self.host = host
        """The host the request is for: C{Host}, C{:authority}, or an absolute-form target's."""
        self.headers = headers
        self.http_version = http_version
        self.body = body
        """C{"none"}, C{"length"} or C{"chunked"}: how the request body is framed."""
        self.content_length = content_length
        self.asterisk = asterisk
        """C{OPTIONS *}: the path is C{/} for routing, the origin gets C{*}."""
        self.keep_alive = keep_alive
        self.upgrade = False
        """Whether the request asks for a protocol switch the proxy tunnels (WebSocket)."""
        self.route: Any = None
        """The L{rproxy_tw.routing.ProxyRoute} the request was routed to."""
        self.request_id: bytes | None = None
        self.body_limit = 0
        """The most body bytes a chunked request may send (C{[limits] max_body_bytes}; 0: no limit)."""


def read_request_head(
    method: bytes,
    url: bytes,
    http_version: bytes,
    headers: list[tuple[bytes, bytes]],
    limits: Any,
    keep_alive: bool = True,
    sizes_checked: bool = False,
) -> ProxyRequest:
    """
    Check a request head and read what the proxy needs of it.

    @param http_version: C{b"1.1"}, C{b"1.0"} or C{b"2"}.  HTTP/1.1's parser
        (llhttp) has already refused controls in the target and bad framing
        headers; HTTP/2 sends its authority in C{:authority} (passed here as
        C{Host}) and never an absolute-form target.
    @param limits: the C{[limits]} in force (L{rproxy_tw.config.LimitsConfig}).
    @param sizes_checked: the front end already bounded the head's size and
        field count while reading it (HTTP/1.1 must, to bound its memory).
    @raise RequestRejected: with the status to answer (400, 405, 413, 414,
        431, 501) and whether the connection must close after it.
    """
    if not sizes_checked:
        if len(url) > limits.max_request_line:
            raise RequestRejected(414, "URI Too Long", close=False)
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 4
        if len(headers) > limits.max_headers or size > limits.max_header_bytes:
            raise RequestRejected(431, "Request Header Fields Too Large", close=False)
    body = "none"
    content_length = None
    host = None
    for name, value in headers:
        size = len(name)
        if size == 4 and name.lower() == b"host":
            if host is not None:
                raise RequestRejected(400, "Bad Request: more than one Host header")
            host = value
        elif size == 14 and name.lower() == b"content-length":
            # llhttp checks this on HTTP/1.1; HTTP/2 fields arrive unchecked.
            value = value.strip()
            if not value.isdigit() or (content_length is not None and int(value) != content_length):
                raise RequestRejected(400, "Bad Request: invalid Content-Length")
            content_length = int(value)
            body = "length"
        elif size == 17 and name.lower() == b"transfer-encoding":
            if http_version == b"1.0":
                # RFC 9112 section 6.1: such framing is faulty; nginx answers 400 too.
                raise RequestRejected(400, "Bad Request: Transfer-Encoding in an HTTP/1.0 request")
            if value.strip().lower() != b"chunked":
                raise RequestRejected(501, "Not Implemented: transfer coding other than chunked")
            body = "chunked"
    if body == "chunked":
        content_length = None
    if host is None and http_version == b"1.1":
        raise RequestRejected(400, "Bad Request: missing Host header")
    if host is not None and host not in _VALID_HOSTS:
        if not valid_host(host):
            raise RequestRejected(400, "Bad Request: invalid Host header")
        if len(_VALID_HOSTS) >= 1024:
            _VALID_HOSTS.clear()
        _VALID_HOSTS.add(host)
    if method == b"CONNECT":
        raise RequestRejected(405, "Method Not Allowed: this is a reverse proxy")
    if method not in _COMMON_METHODS and not is_token(method):
        raise RequestRejected(400, "Bad Request: invalid request method")
    http1 = http_version != b"2"
    path, _, query = url.partition(b"?")
    if http1 and path[:1] == b"/" and 0x23 not in url and 0x25 not in path and 0x5C not in path and \
            path.find(b"/.") == -1 and path.find(b"//") == -1:
        # HTTP/1.1 origin-form with no fragment and nothing to normalise (llhttp refused controls):
        # parse_target's first answer, without the call, for nearly every request.
        # test_read_request_head_target_is_parse_target holds the two equal.
        authority = None
    else:
        path, query, authority = parse_target(method, url, http1, http1)
    if authority is not None and authority != host:
        # RFC 9112 section 3.2.2: the target's authority decides, and the
        # origin is told that host, not the one in the Host header.
        if host is None:
            headers = [*headers, (b"Host", authority)]
        else:
            headers = [(b"Host", authority) if n.lower() == b"host" else (n, v) for n, v in headers]
        host = authority
    asterisk = path == b"*"
    if asterisk:
        path = b"/"
    max_body = limits.max_body_bytes
    if max_body and content_length is not None and content_length > max_body:
        raise RequestRejected(413, "Content Too Large")
    if content_length == 0:
        body = "length"
    request = ProxyRequest(method, url, path, query, host, headers, http_version, body, content_length, asterisk,
                           keep_alive)
    if max_body and body == "chunked":
        request.body_limit = max_body
    return request
