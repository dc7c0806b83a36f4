"""
Header rewriting between client and origin: pure functions over lists of
C{(name, value)} byte pairs, in the order they were received.

Lists rather than dicts, because repeated headers must keep every value and
their order (C{Set-Cookie}, C{Via}, C{Cache-Control}...).  Names keep the
case they arrived in; comparisons use the lower-cased name.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Sequence

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


def forwarded_node(ip: str) -> str:
    """An RFC 7239 node: IPv6 addresses are bracketed and quoted."""
    if ":" in ip:
        return f'"[{ip}]"'
    if not ip or ip == "unknown":
        return "unknown"
    return ip


def _quote_forwarded(value: str) -> str:
    if value and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ForwardingInfo:
    """
    What the proxy tells the origin about the client: fixed per connection
    except for the host, so it is built once per client connection.
    """

    __slots__ = ("client_ip", "proto", "trusted", "via", "_xff_ip", "_fwd_for")

    def __init__(self, client_ip: str, proto: str, trusted: bool, via: bytes) -> None:
        self.client_ip = client_ip
        self.proto = proto
        self.trusted = trusted
        self.via = via
        self._xff_ip = client_ip.encode("ascii", "replace")
        self._fwd_for = forwarded_node(client_ip)


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
    named = connection_tokens(headers) if any(n.lower() == b"connection" for n, _ in headers) else frozenset()
    out: list[Header] = []
    xff: list[bytes] = []
    fwd: list[bytes] = []
    xf_proto = None
    xf_host = None
    host = None
    via: list[bytes] = []
    upgrade = None
    trusted = info.trusted
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in FRAMING or lname in named or lname.startswith(b"proxy-"):
            if lname == b"upgrade":
                upgrade = (name, value)
            continue
        if lname in FORWARDING:
            if trusted:
                if lname == b"x-forwarded-for":
                    xff.append(value)
                elif lname == b"forwarded":
                    fwd.append(value)
                elif lname == b"x-forwarded-proto" and xf_proto is None:
                    xf_proto = value
                elif lname == b"x-forwarded-host" and xf_host is None:
                    xf_host = value
                elif lname == b"x-real-ip":
                    out.append((name, value))
            continue
        if lname == b"host":
            host = value
        elif lname == b"via":
            via.append(value)
            continue
        out.append((name, value))
    xff.append(info._xff_ip)
    out.append((b"X-Forwarded-For", b", ".join(xff)))
    out.append((b"X-Forwarded-Proto", xf_proto if xf_proto is not None else info.proto.encode("ascii")))
    if xf_host is not None:
        out.append((b"X-Forwarded-Host", xf_host))
    elif host is not None:
        out.append((b"X-Forwarded-Host", host))
    element = f"for={info._fwd_for};proto={info.proto}"
    if host is not None:
        element += ";host=" + _quote_forwarded(host.decode("latin-1"))
    fwd.append(element.encode("latin-1"))
    out.append((b"Forwarded", b", ".join(fwd)))
    via.append(b"%s %s" % (http_version, info.via))
    out.append((b"Via", b", ".join(via)))
    if keep_upgrade and upgrade is not None:
        out.append(upgrade)
        out.append((b"Connection", b"upgrade"))
    return out


def response_headers_for_client(
    headers: Headers,
    via: bytes,
    server_header: bytes,
    http_version: bytes = b"1.1",
    keep_upgrade: bool = False,
) -> list[Header]:
    """
    The headers to send to the client for an origin response.

    Drops hop-by-hop and framing headers and the headers that reveal the
    origin's software (C{Server}, C{X-Powered-By}...); adds C{Via} and our own
    C{Server} (no version) unless C{server_header} is empty.
    """
    named = connection_tokens(headers) if any(n.lower() == b"connection" for n, _ in headers) else frozenset()
    out: list[Header] = []
    via_values: list[bytes] = []
    upgrade = None
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in FRAMING or lname in named or lname in MASKED_RESPONSE_HEADERS:
            if lname == b"upgrade":
                upgrade = (name, value)
            continue
        if lname == b"via":
            via_values.append(value)
            continue
        out.append((name, value))
    via_values.append(b"%s %s" % (http_version, via))
    out.append((b"Via", b", ".join(via_values)))
    if server_header:
        out.append((b"Server", server_header))
    if keep_upgrade and upgrade is not None:
        out.append(upgrade)
        out.append((b"Connection", b"upgrade"))
    return out


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
    return b"".join([b"%s: %s\r\n" % (n, v) for n, v in headers])
