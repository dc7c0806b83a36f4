"""
Header rewriting between client and origin: pure functions over lists of
C{(name, value)} byte pairs, in the order they were received.

Lists rather than dicts, because repeated headers must keep every value and
their order (C{Set-Cookie}, C{Via}, C{Cache-Control}...).  Names keep the
case they arrived in; comparisons use the lower-cased name.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Sequence

from twisted.web.http import datetimeToString

__all__ = [
    "HOP_BY_HOP",
    "MASKED_RESPONSE_HEADERS",
    "ForwardingInfo",
    "connection_tokens",
    "forwarded_node",
    "is_trusted",
    "request_headers_for_origin",
    "response_headers_for_client",
]

Header = tuple[bytes, bytes]
Headers = Sequence[Header]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
"""RFC 9110 section 7.6.1, plus the C{Proxy-*} headers meant for this hop only."""

FRAMING = frozenset({b"content-length", b"transfer-encoding"})
"""Set by whoever writes the message; never copied across."""

MASKED_RESPONSE_HEADERS = frozenset(
    {
        b"server",
        b"x-powered-by",
        b"x-aspnet-version",
        b"x-aspnetmvc-version",
        b"x-runtime",
        b"x-version",
        b"x-generator",
        b"x-backend-server",
        b"x-served-by",
    }
)
"""Headers that reveal the origin's software or address: never passed to clients."""

FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"})


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """The lower-cased options named by every C{Connection} header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    tokens.add(token)
    return frozenset(tokens)


def is_trusted(ip: str, trusted: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether the peer C{ip} is one whose forwarding headers are believed."""
    if not trusted:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in trusted)


def _unknown(ip: str) -> bool:
    """Whether a client address is none at all (the listeners say "unknown" for a unix socket peer)."""
    return not ip or ip == "unknown"


def forwarded_node(ip: str) -> str:
    """An RFC 7239 node: IPv6 addresses are bracketed and quoted."""
    if _unknown(ip):
        return "unknown"
    if ":" in ip:
        return f'"[{ip}]"'
    return ip


def _quote_forwarded(value: str) -> str:
    if value and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ForwardingInfo:
    """
    What the proxy tells the origin about the client: fixed per client
    address (and client certificate) except for the host, so a listener
    builds it once per address (and the lines for the last host are kept,
    since a client rarely changes host).
    """

    __slots__ = ("client_ip", "proto", "trusted", "via", "client_subject", "_xff_ip", "_fwd_for", "_proto_b",
                 "_via_value", "_last_host", "_last_element", "_suffix_host", "_suffix_version", "_suffix")

    def __init__(self, client_ip: str, proto: str, trusted: bool, via: bytes, client_subject: str | None = None) -> None:
        self.client_ip = client_ip
        self.client_subject = client_subject
        """The verified TLS client certificate's subject, when the listener asks for one."""
        self.proto = proto
        self.trusted = trusted
        self.via = via
        # A client with no IP address (a unix socket peer) adds no X-Forwarded-For entry, whose
        # readers expect addresses; Forwarded says for=unknown, as RFC 7239 section 6.3 provides.
        self._xff_ip: bytes | None = None if _unknown(client_ip) else client_ip.encode("ascii", "replace")
        self._fwd_for = forwarded_node(client_ip)
        self._proto_b = proto.encode("ascii")
        self._via_value = b"1.1 " + via
        self._last_host: bytes | None = None
        self._last_element = b""
        self._suffix_host: bytes | None = None
        self._suffix_version = b""
        self._suffix: bytes | None = None

    def added_lines(self, host: bytes | None, http_version: bytes = b"1.1") -> bytes:
        """
        The header lines this hop adds for a request that brought no
        forwarding headers of its own, serialized once per host and client
        HTTP version (C{Via} names it; no final CRLF).
        """
        if self._suffix is not None and host == self._suffix_host and http_version == self._suffix_version:
            return self._suffix
        added = [(b"X-Forwarded-Proto", self._proto_b)]
        if self._xff_ip is not None:
            added.insert(0, (b"X-Forwarded-For", self._xff_ip))
        if host is not None:
            added.append((b"X-Forwarded-Host", host))
        added.append((b"Forwarded", self.forwarded_element(host)))
        added.append((b"Via", self._via_value if http_version == b"1.1" else http_version + b" " + self.via))
        if self.client_subject is not None:
            added.append((CLIENT_SUBJECT, self.client_subject.encode("utf-8", "replace")))
        self._suffix_host = host
        self._suffix_version = http_version
        self._suffix = b"\r\n".join([b": ".join(header) for header in added])
        return self._suffix

    def forwarded_element(self, host: bytes | None) -> bytes:
        """This hop's RFC 7239 element: C{for=...;proto=...;host=...}."""
        if host == self._last_host and self._last_element:
            return self._last_element
        element = f"for={self._fwd_for};proto={self.proto}"
        if host is not None:
            element += ";host=" + _quote_forwarded(host.decode("latin-1"))
        self._last_host = host
        self._last_element = element.encode("latin-1")
        return self._last_element


# What to do with each request header, by lower-cased name.
_KEEP, _DROP, _UPGRADE, _CONNECTION, _XFF, _FWD, _XFPROTO, _XFHOST, _REALIP, _HOST, _VIA, _DATE = range(12)
CLIENT_SUBJECT = b"X-Client-Cert-Subject"
"""Carries the verified client certificate's subject to the origin; never taken from a client."""

_REQUEST_ACTIONS = {name: _DROP for name in HOP_BY_HOP | FRAMING | {CLIENT_SUBJECT.lower()}}
_SPOOFABLE = FORWARDING | {CLIENT_SUBJECT.lower()}
"""Headers the proxy vouches for: their C{_} spellings (which CGI and WSGI read as the same
name) are dropped too, as nginx ignores underscored names by default."""
_REQUEST_ACTIONS.update(
    {
        b"upgrade": _UPGRADE,
        b"connection": _CONNECTION,
        b"x-forwarded-for": _XFF,
        b"forwarded": _FWD,
        b"x-forwarded-proto": _XFPROTO,
        b"x-forwarded-host": _XFHOST,
        b"x-real-ip": _REALIP,
        b"host": _HOST,
        b"via": _VIA,
    }
)
_RESPONSE_ACTIONS = {name: _DROP for name in HOP_BY_HOP | FRAMING | MASKED_RESPONSE_HEADERS}
_RESPONSE_ACTIONS.update({b"upgrade": _UPGRADE, b"connection": _CONNECTION, b"via": _VIA, b"date": _DATE})


_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})
_NEVER_NAMED = frozenset({b"host"})
"""Connection options that name no header we would otherwise forward."""


def _drop_named(
    out: list[Header], connection_values: list[bytes], keep_upgrade: bool, protected: frozenset[bytes] = frozenset()
) -> list[Header]:
    """Remove the headers that C{Connection} named (RFC 9110 7.6.1)."""
    if len(connection_values) == 1 and connection_values[0].lower() in _PLAIN_CONNECTION:
        return out
    named = connection_tokens([(b"connection", v) for v in connection_values]) - _PLAIN_CONNECTION - protected
    if keep_upgrade:
        named = named - {b"upgrade"}
    if not named:
        return out
    return [(n, v) for n, v in out if n.lower() not in named]


def request_headers_for_origin(
    headers: Headers,
    info: ForwardingInfo,
    http_version: bytes = b"1.1",
    keep_upgrade: bool = False,
) -> list[Header]:
    """
    The headers to send to the origin for a client request.

    Drops hop-by-hop headers (and those C{Connection} names) and the framing
    headers; adds C{X-Forwarded-For/-Proto/-Host}, C{Forwarded} and C{Via}.
    Incoming forwarding headers are extended when the peer is trusted and
    dropped otherwise, so a client cannot forge its address.

    @param keep_upgrade: keep C{Upgrade} (and send C{Connection: upgrade}) for
        a protocol switch such as WebSocket.
    """
    out: list[Header] = []
    append = out.append
    actions = _REQUEST_ACTIONS
    trusted = info.trusted
    xff: list[bytes] | None = None
    fwd: list[bytes] | None = None
    via: list[bytes] | None = None
    connection: list[bytes] | None = None
    xf_proto = xf_host = host = upgrade = None
    for header in headers:
        name = header[0]
        lname = name.lower()
        action = actions.get(lname, _KEEP)
        if action == _KEEP:
            if lname[:6] != b"proxy-" and (b"_" not in lname or lname.replace(b"_", b"-") not in _SPOOFABLE):
                append(header)
        elif action == _HOST:
            host = header[1]
            append(header)
        elif action == _DROP:
            pass
        elif action == _VIA:
            if via is None:
                via = []
            via.append(header[1])
        elif action == _CONNECTION:
            if connection is None:
                connection = []
            connection.append(header[1])
        elif action == _UPGRADE:
            upgrade = header
        elif trusted:
            if action == _XFF:
                if xff is None:
                    xff = []
                xff.append(header[1])
            elif action == _FWD:
                if fwd is None:
                    fwd = []
                fwd.append(header[1])
            elif action == _XFPROTO:
                if xf_proto is None:
                    xf_proto = header[1]
            elif action == _XFHOST:
                if xf_host is None:
                    xf_host = header[1]
            elif action == _REALIP:
                append(header)
    if connection is not None:
        # Host is never dropped: "Connection: host" would send an HTTP/1.1 request without one.
        out = _drop_named(out, connection, keep_upgrade, _NEVER_NAMED)
        append = out.append
    own_ip = info._xff_ip
    if own_ip is not None:
        append((b"X-Forwarded-For", own_ip if xff is None else b", ".join([*xff, own_ip])))
    elif xff is not None:
        append((b"X-Forwarded-For", b", ".join(xff)))
    append((b"X-Forwarded-Proto", info._proto_b if xf_proto is None else xf_proto))
    if xf_host is not None:
        append((b"X-Forwarded-Host", xf_host))
    elif host is not None:
        append((b"X-Forwarded-Host", host))
    element = info.forwarded_element(host)
    append((b"Forwarded", element if fwd is None else b", ".join([*fwd, element])))
    own_via = info._via_value if http_version == b"1.1" else http_version + b" " + info.via
    append((b"Via", own_via if via is None else b", ".join([*via, own_via])))
    if info.client_subject is not None:
        append((CLIENT_SUBJECT, info.client_subject.encode("utf-8", "replace")))
    if keep_upgrade and upgrade is not None:
        append(upgrade)
        append((b"Connection", b"upgrade"))
    return out


_date_cache: list[Any] = [None, b""]
"""The second last formatted by L{http_date}, and its IMF-fixdate."""


def http_date(clock: Any) -> bytes:
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


def response_headers_for_client(
    headers: Headers,
    via: bytes,
    server_header: bytes,
    http_version: bytes = b"1.1",
    keep_upgrade: bool = False,
    clock: Any = None,
) -> list[Header]:
    """
    The headers to send to the client for an origin response.

    Drops hop-by-hop and framing headers and the headers that reveal the
    origin's software (C{Server}, C{X-Powered-By}...); adds C{Via} and our own
    C{Server} (no version) unless C{server_header} is empty, and a C{Date}
    from C{clock} when the origin sent none (RFC 9110 section 6.6.1).
    """
    out: list[Header] = []
    append = out.append
    actions = _RESPONSE_ACTIONS
    via_values: list[bytes] | None = None
    connection: list[bytes] | None = None
    upgrade = None
    dated = False
    for header in headers:
        action = actions.get(header[0].lower(), _KEEP)
        if action == _KEEP:
            append(header)
        elif action == _DROP:
            pass
        elif action == _VIA:
            if via_values is None:
                via_values = []
            via_values.append(header[1])
        elif action == _CONNECTION:
            if connection is None:
                connection = []
            connection.append(header[1])
        elif action == _UPGRADE:
            upgrade = header
        elif action == _DATE:
            append(header)
            dated = True
    if connection is not None:
        out = _drop_named(out, connection, keep_upgrade)
        append = out.append
        dated = any(name.lower() == b"date" for name, _ in out)  # "Connection: date" may have dropped it
    if clock is not None and not dated:
        append((b"Date", http_date(clock)))
    own_via = http_version + b" " + via
    append((b"Via", own_via if via_values is None else b", ".join([*via_values, own_via])))
    if server_header:
        append((b"Server", server_header))
    if keep_upgrade and upgrade is not None:
        append(upgrade)
        append((b"Connection", b"upgrade"))
    return out


_MEMO_NAMES = 512
"""How many header names (as they arrived, in their case) the one-pass serializers remember."""
_MEMO_NAME_LENGTH = 64
_REQUEST_BY_NAME: dict[bytes, int] = {}
_RESPONSE_BY_NAME: dict[bytes, int] = {}


def _remember(memo: dict[bytes, int], name: bytes, action: int) -> int:
    """
    Keep a name's action for the next message, so that most names are
    looked up once, not lower-cased and looked up per field (bounded: names
    come from clients and origins; emptied when full).
    """
    if len(name) <= _MEMO_NAME_LENGTH:
        if len(memo) >= _MEMO_NAMES:
            memo.clear()
        memo[name] = action
    return action


def _request_action(name: bytes) -> int:
    """What L{request_head_block} does with a request header: a kept name the general rewrite drops is L{_DROP}."""
    lname = name.lower()
    action = _REQUEST_ACTIONS.get(lname, _KEEP)
    if action == _KEEP and (lname[:6] == b"proxy-" or (b"_" in lname and lname.replace(b"_", b"-") in _SPOOFABLE)):
        action = _DROP
    return _remember(_REQUEST_BY_NAME, name, action)


def _response_action(name: bytes) -> int:
    """What L{response_head_block} does with a response header."""
    return _remember(_RESPONSE_BY_NAME, name, _RESPONSE_ACTIONS.get(name.lower(), _KEEP))


def request_head_block(headers: Headers, info: ForwardingInfo, keep_upgrade: bool = False,
                       http_version: bytes = b"1.1") -> bytes:
    """
    C{serialize(request_headers_for_origin(headers, info, http_version, keep_upgrade))},
    made in one pass for the common request (with no forwarding, C{Via},
    C{Upgrade} or C{Connection} options to merge), whatever its HTTP
    version; any other falls back to the general rewrite.  Measured: header
    rewriting was a third of the proxy's Python time per request.

    @param http_version: the version the client spoke (C{b"1.0"}, C{b"1.1"},
        C{b"2"}): C{Via} names it (RFC 9110, section 7.6.3).
    """
    parts: list[bytes] = []
    append = parts.append
    memo = _REQUEST_BY_NAME
    host = None
    for header in headers:
        action = memo.get(header[0])
        if action is None:
            action = _request_action(header[0])
        if action == _KEEP:
            append(b": ".join(header))
        elif action == _HOST:
            host = header[1]
            append(b": ".join(header))
        elif action == _DROP or (action == _CONNECTION and header[1].lower() in _PLAIN_CONNECTION):
            pass
        else:
            return serialize(request_headers_for_origin(headers, info, http_version, keep_upgrade))
    append(info.added_lines(host, http_version))
    return b"\r\n".join(parts) + b"\r\n"


def response_head_block(headers: Headers, added: bytes, clock: Any = None) -> bytes | None:
    """
    C{serialize(response_headers_for_client(...))} in one pass for the common
    response, or None when the general rewrite is needed (C{Via},
    C{Upgrade}, C{Connection} options).

    @param added: this hop's own lines (C{Via}, C{Server}), serialized, no final CRLF.
    @param clock: where the C{Date} added when the origin sent none comes
        from (formatted only then: most origins send one).
    """
    parts: list[bytes] = []
    append = parts.append
    memo = _RESPONSE_BY_NAME
    for header in headers:
        action = memo.get(header[0])
        if action is None:
            action = _response_action(header[0])
        if action == _KEEP:
            append(b": ".join(header))
        elif action == _DROP or (action == _CONNECTION and header[1].lower() in _PLAIN_CONNECTION):
            pass
        elif action == _DATE:
            append(b": ".join(header))
            clock = None
        else:
            return None
    if clock is not None:
        append(b"Date: " + http_date(clock))
    append(added)
    return b"\r\n".join(parts) + b"\r\n"


def response_added_lines(via: bytes, server_header: bytes, http_version: bytes = b"1.1") -> bytes:
    """The lines L{response_headers_for_client} adds when the origin sent no C{Via}."""
    lines = [b"Via: " + http_version + b" " + via]
    if server_header:
        lines.append(b"Server: " + server_header)
    return b"\r\n".join(lines)


def trailers_for_client(trailers: Headers) -> list[Header]:
    """Trailer fields that may be relayed: framing and hop-by-hop ones never."""
    return [(n, v) for n, v in trailers if n.lower() not in HOP_BY_HOP and n.lower() not in FRAMING]


def header_value(headers: Headers, lname: bytes) -> bytes | None:
    """The first value of the header whose lower-cased name is C{lname}."""
    for name, value in headers:
        if name.lower() == lname:
            return value
    return None


def serialize(headers: Headers) -> bytes:
    """C{Name: value\\r\\n} for each header, in order."""
    if not headers:
        return b""
    return b"\r\n".join([b": ".join(header) for header in headers]) + b"\r\n"
