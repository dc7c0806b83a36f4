"""
Request targets, hosts and methods checked as values, apart from any socket.

Why here: routing, and what the origin receives, must follow from one
reading of the request target.  A route matched on the raw path while the
origin resolves C{..} itself lets C{/public/../private} walk out of its
route; an absolute-form target routed by the C{Host} header reaches a host
the client did not name.  Every front end (HTTP/1.1, HTTP/2) passes its
method, target and host through these functions before routing.
"""

from __future__ import annotations

from .exchange import RequestRejected

__all__ = [
    "RequestTarget",
    "is_token",
    "normalize_path",
    "parse_target",
    "valid_host",
]

# Character classes as bytes, checked with C{bytes.translate(None, allowed)}:
# what is left over is what is not allowed, found at C speed on the hot path.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HEX = b"0123456789ABCDEFabcdef"
_UNRESERVED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_REG_NAME = _UNRESERVED + b"%!$&'()*+,;="
_IP_LITERAL = _HEX + b":.vV-_~!$&'()*+,;="
_DIGITS = b"0123456789"
# ... and bytes above 0x7E, which no URI holds (llhttp refuses them on HTTP/1.1).
_CONTROLS_AND_SPACE = bytes(range(0x21)) + bytes(range(0x7F, 0x100))
_PERCENT_DECODED = {b"%%%02X" % c: bytes((c,)) for c in _UNRESERVED} | {b"%%%02x" % c: bytes((c,)) for c in _UNRESERVED}


def _only(value: bytes, allowed: bytes) -> bool:
    """Whether every byte of C{value} is one of C{allowed}."""
    return not value.translate(None, allowed)


def is_token(value: bytes) -> bool:
    """Whether C{value} is an RFC 9110 token (what a method must be)."""
    return bool(value) and _only(value, _TCHAR)


def valid_host(value: bytes) -> bool:
    """
    Whether C{value} is an RFC 3986 C{host [ ":" port ]}, as C{Host} and
    C{:authority} must be: a reg-name, an IPv4 address or a bracketed IP
    literal, and digits for the port.  No user info, spaces, slashes or
    controls: a proxy that forwards those hands origins a host they may
    read differently.
    """
    if not value:
        return False
    if value[:1] == b"[":
        end = value.find(b"]")
        if end < 2 or not _only(value[1:end], _IP_LITERAL):
            return False
        rest = value[end + 1 :]
        if not rest:
            return True
        return rest[:1] == b":" and _only(rest[1:], _DIGITS) and len(rest) <= 6 and int(rest[1:] or b"0") <= 65535
    host, colon, port = value.rpartition(b":")
    if not colon:
        host, port = value, b""
    elif not _only(port, _DIGITS) or len(port) > 5 or (port and int(port) > 65535):
        return False
    if not host or not _only(host, _REG_NAME):
        return False
    return b"%" not in host or _percent_ok(host)


def _percent_ok(value: bytes) -> bool:
    """Every C{%} in C{value} starts a C{%HH} escape."""
    i = value.find(b"%")
    while i != -1:
        pair = value[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            return False
        i = value.find(b"%", i + 3)
    return True


def normalize_path(path: bytes) -> bytes:
    """
    The path a route matches and the origin receives: percent-encoded
    unreserved characters decoded (C{%2e} is C{.}), other escapes kept with
    upper-case hex (C{%2F} is never decoded: it is data, not a separator),
    empty segments merged (C{//} is C{/}, as nginx's C{merge_slashes}), and
    dot segments removed (RFC 3986 section 5.2.4).

    @raise RequestRejected: 400 for a path that is not origin-form, that
        has a broken escape, or whose dot segments climb above the root
        (e.g. C{/..}), for C{..;x} segments, which some origins read as
        C{..}, and for C{%00}.
    """
    if path[:1] != b"/":
        raise RequestRejected(400, "Bad Request: the request target must start with '/'")
    # Single bytes are tested as integers and pairs with find(): both are
    # several times faster than `bytes in bytes`, and this runs per request.
    if 0x25 not in path and 0x5C not in path and path.find(b"/.") == -1 and path.find(b"//") == -1:
        return path  # nothing to normalise: the common case
    if b"%" in path:
        path = _decode_unreserved(path)
    if b"\\" in path:
        raise RequestRejected(400, "Bad Request: backslash in the request path")
    segments = path.split(b"/")
    out: list[bytes] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments[1:], 1):
        if segment == b"..":
            if not out:
                raise RequestRejected(400, "Bad Request: the request path climbs above the root")
            out.pop()
            if i == last:
                out.append(b"")
        elif segment == b".":
            if i == last:
                out.append(b"")
        elif not segment:
            if i == last:
                out.append(b"")
        else:
            if segment.startswith((b"..;", b".;")):
                raise RequestRejected(400, "Bad Request: dot segment with parameters in the request path")
            out.append(segment)
    return b"/" + b"/".join(out)


def _decode_unreserved(path: bytes) -> bytes:
    parts = path.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        escape = part[:2]
        if len(escape) != 2 or escape[0] not in _HEX or escape[1] not in _HEX:
            raise RequestRejected(400, "Bad Request: broken percent-encoding in the request path")
        if escape == b"00":
            # A NUL cuts a path short in many origins' file and string handling.
            raise RequestRejected(400, "Bad Request: %00 in the request path")
        plain = _PERCENT_DECODED.get(b"%" + escape)
        out.append((plain if plain is not None else b"%" + escape.upper()) + part[2:])
    return b"".join(out)


RequestTarget = tuple[bytes, bytes, "bytes | None"]
"""
A request target as routing and the origin need it: C{(path, query, authority)}.
The path is normalised (see L{normalize_path}), or C{b"*"} for C{OPTIONS *};
the query has no C{?} and is empty when there is none; the authority is the
host of an absolute-form target, which outranks C{Host} (RFC 9112 section
3.2.2), else None.  A plain tuple: it is made for every request.
"""


def parse_target(method: bytes, target: bytes, absolute_allowed: bool = True,
                 characters_checked: bool = False) -> RequestTarget:
    """
    Read a request target: origin-form, absolute-form (HTTP/1.1 only:
    HTTP/2 sends its authority in C{:authority}), or C{*} for C{OPTIONS}.
    A fragment is dropped: it never belongs in a request.

    @param characters_checked: the parser already refused spaces, controls
        and bytes above 0x7E in the target (llhttp does, for HTTP/1.1).
    @raise RequestRejected: 400 for anything else, or for spaces and
        control characters anywhere in the target.
    """
    if not target or (not characters_checked and len(target.translate(None, _CONTROLS_AND_SPACE)) != len(target)):
        raise RequestRejected(400, "Bad Request: invalid request target")
    path, _, query = target.partition(b"?")
    if path[:1] == b"/" and 0x23 not in target:  # "#"
        # Origin-form without a fragment: nearly every request.  The test of
        # normalize_path's fast path is repeated here to save two calls per
        # request; test_parse_target_path_is_normalize_path holds them equal.
        if 0x25 in path or 0x5C in path or path.find(b"/.") != -1 or path.find(b"//") != -1:
            path = normalize_path(path)
        return path, query, None
    hash_at = target.find(b"#")
    if hash_at != -1:
        target = target[:hash_at]
    if target == b"*":
        if method != b"OPTIONS":
            raise RequestRejected(400, "Bad Request: '*' is a target for OPTIONS only")
        return b"*", b"", None
    authority = None
    if target[:1] != b"/":
        if not absolute_allowed:
            raise RequestRejected(400, "Bad Request: the request target must start with '/'")
        scheme, sep, rest = target.partition(b"://")
        if not sep or scheme.lower() not in (b"http", b"https"):
            raise RequestRejected(400, "Bad Request: invalid request target")
        end = len(rest)
        for stop in (b"/", b"?"):
            at = rest.find(stop)
            if at != -1 and at < end:
                end = at
        authority = rest[:end]
        if not valid_host(authority):
            raise RequestRejected(400, "Bad Request: invalid host in the request target")
        target = rest[end:]
        if target[:1] != b"/":
            target = b"/" + target
    path, _, query = target.partition(b"?")
    return normalize_path(path), query, authority
