"""
The PROXY protocol (HAProxy's, versions 1 and 2) as pure functions: addresses
and TLS facts in, header bytes out, and header bytes in, values out.

A TCP listener with C{proxy_protocol = "v1" | "v2"} sends one of these headers
as the first bytes to the backend, so that the backend learns the client's
address (and with v2, what TLS the proxy terminated) although the TCP
connection it sees comes from the proxy.

Accepting PROXY headers from a trusted load balancer I{in front} of rproxy:
prefix the listener's endpoint string, as in C{endpoint = "haproxy:tcp:6380"};
L{rproxy_tw.transport.proxy_header} reads each connection's header with
L{parse} before the listener's protocol exists, and C{getPeer()} is then the
address the balancer reported.

Specification: U{https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt}.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import TypeAlias

from attrs import field, frozen
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

__all__ = [
    "V2_SIGNATURE",
    "ProxyProtocolError",
    "TLSInfo",
    "ProxyHeader",
    "build_v1",
    "build_v2",
    "build",
    "parse",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_SSL",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_CLIENT_SSL",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
]

Address: TypeAlias = IPv4Address | IPv6Address | UNIXAddress

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
"""The longest v1 line the specification allows, CRLF included."""

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30

PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

_CMD_LOCAL = 0x20
_CMD_PROXY = 0x21
_FAM_UNSPEC = 0x00
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21
_FAM_UNIX = 0x31
_ADDR_LEN = {_FAM_TCP4: 12, _FAM_TCP6: 36, _FAM_UNIX: 216}


class ProxyProtocolError(ValueError):
    """Bytes that are not a valid PROXY header (the connection should be closed)."""


@frozen
class TLSInfo:
    """
    What the proxy knows of a TLS session it terminated, as v2's
    C{PP2_TYPE_SSL} (and C{ALPN}, C{AUTHORITY}) TLVs carry it.
    """

    version: str | None = None
    """Protocol version name as OpenSSL spells it, e.g. C{"TLSv1.3"}."""
    cipher: str | None = None
    """Cipher suite name as OpenSSL spells it, e.g. C{"TLS_AES_256_GCM_SHA384"}."""
    sni: str | None = None
    """Server name the client asked for; sent as C{PP2_TYPE_AUTHORITY}."""
    alpn: bytes | None = None
    """Negotiated application protocol; sent as C{PP2_TYPE_ALPN}."""
    client_cn: str | None = None
    """Common name of the client certificate, when the client presented one."""
    client_cert: bool = False
    """The client presented a certificate on this connection."""
    verified: bool = False
    """The client certificate was presented and verified (v2's C{verify} field is then 0)."""


@frozen
class ProxyHeader:
    """One parsed PROXY header."""

    version: int
    """1 or 2."""
    command: str
    """C{"PROXY"}, or C{"LOCAL"} (v2 health checks: use the real connection's addresses)."""
    source: Address | None
    """The original client; L{None} for C{UNKNOWN}/C{UNSPEC}/C{LOCAL}."""
    destination: Address | None
    """The address the client connected to; L{None} when C{source} is."""
    tlvs: tuple[tuple[int, bytes], ...] = ()
    """v2 type-length-values in wire order, raw."""
    tls: TLSInfo | None = None
    """Decoded from the C{PP2_TYPE_SSL}, C{ALPN} and C{AUTHORITY} TLVs, if C{PP2_TYPE_SSL} was sent."""
    raw: bytes = field(default=b"", repr=False)
    """The header exactly as received."""


# ---------------------------------------------------------------------------
# Building


def _normalise(source: Address | None, dest: Address | None) -> tuple[str, Address | None, Address | None]:
    """
    The family both addresses can be written in: C{"TCP4"}, C{"TCP6"},
    C{"UNIX"} or C{"UNKNOWN"}.

    A dual-stack listener reports IPv4 clients as C{::ffff:a.b.c.d}; those are
    written as IPv4 when both ends allow it, and an IPv4 end is mapped into
    IPv6 when the other end is a real IPv6 address, because the header has
    one family for both.
    """
    if isinstance(source, UNIXAddress) and isinstance(dest, UNIXAddress):
        return "UNIX", source, dest
    if not isinstance(source, (IPv4Address, IPv6Address)) or not isinstance(dest, (IPv4Address, IPv6Address)):
        return "UNKNOWN", None, None
    if source.type != "TCP" or dest.type != "TCP":
        return "UNKNOWN", None, None
    try:
        s_ip = ipaddress.ip_address(source.host.split("%", 1)[0])
        d_ip = ipaddress.ip_address(dest.host.split("%", 1)[0])
    except ValueError:
        return "UNKNOWN", None, None
    s4 = s_ip if s_ip.version == 4 else s_ip.ipv4_mapped  # type: ignore[union-attr]
    d4 = d_ip if d_ip.version == 4 else d_ip.ipv4_mapped  # type: ignore[union-attr]
    if s4 is not None and d4 is not None:
        return "TCP4", IPv4Address("TCP", str(s4), source.port), IPv4Address("TCP", str(d4), dest.port)
    s6 = s_ip if s_ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{s_ip}")
    d6 = d_ip if d_ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{d_ip}")
    return "TCP6", IPv6Address("TCP", str(s6), source.port), IPv6Address("TCP", str(d6), dest.port)


def build_v1(source: Address | None, dest: Address | None) -> bytes:
    """
    The v1 (text) header for a connection from C{source} to C{dest}.

    Anything that is not TCP over IP (UNIX sockets, unknown peers) is sent as
    C{PROXY UNKNOWN}, which tells the backend to use the connection's own
    addresses, as the specification asks.
    """
    family, s, d = _normalise(source, dest)
    if family not in ("TCP4", "TCP6"):
        return b"PROXY UNKNOWN\r\n"
    assert isinstance(s, (IPv4Address, IPv6Address)) and isinstance(d, (IPv4Address, IPv6Address))
    return f"PROXY {family} {s.host} {d.host} {s.port} {d.port}\r\n".encode("ascii")


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"TLV 0x{kind:02x} is {len(value)} bytes, more than 65535")
    return struct.pack("!BH", kind, len(value)) + value


def _tls_tlvs(tls: TLSInfo) -> bytes:
    out = []
    if tls.alpn:
        out.append(_tlv(PP2_TYPE_ALPN, tls.alpn))
    if tls.sni:
        out.append(_tlv(PP2_TYPE_AUTHORITY, tls.sni.encode("idna") if not tls.sni.isascii() else tls.sni.encode()))
    client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN if tls.client_cert else 0)
    # The spec: verify is 0 only when a certificate was presented and verified.
    verify = 0 if (tls.client_cert and tls.verified) else 1
    subs = []
    if tls.version:
        subs.append(_tlv(PP2_SUBTYPE_SSL_VERSION, tls.version.encode("ascii")))
    if tls.client_cn:
        subs.append(_tlv(PP2_SUBTYPE_SSL_CN, tls.client_cn.encode("utf-8")))
    if tls.cipher:
        subs.append(_tlv(PP2_SUBTYPE_SSL_CIPHER, tls.cipher.encode("ascii")))
    out.append(_tlv(PP2_TYPE_SSL, struct.pack("!BI", client, verify) + b"".join(subs)))
    return b"".join(out)


def build_v2(
    source: Address | None,
    dest: Address | None,
    tls: TLSInfo | None = None,
    tlvs: Sequence[tuple[int, bytes]] = (),
    local: bool = False,
) -> bytes:
    """
    The v2 (binary) header for a connection from C{source} to C{dest}.

    @param tls: when the proxy terminated TLS, what it negotiated; adds the
        C{PP2_TYPE_SSL} TLV (client flags, verify, version and cipher
        sub-TLVs) and C{ALPN}/C{AUTHORITY} when known.
    @param tlvs: further C{(type, value)} pairs, appended as given.
    @param local: send the C{LOCAL} command (the proxy's own connection, such
        as a health check) instead of C{PROXY}.
    """
    family, s, d = _normalise(source, dest)
    if local or family == "UNKNOWN":
        fam, addr = _FAM_UNSPEC, b""
    elif family == "TCP4":
        assert isinstance(s, IPv4Address) and isinstance(d, IPv4Address)
        fam = _FAM_TCP4
        addr = (
            ipaddress.IPv4Address(s.host).packed
            + ipaddress.IPv4Address(d.host).packed
            + struct.pack("!HH", s.port, d.port)
        )
    elif family == "TCP6":
        assert isinstance(s, IPv6Address) and isinstance(d, IPv6Address)
        fam = _FAM_TCP6
        addr = (
            ipaddress.IPv6Address(s.host).packed
            + ipaddress.IPv6Address(d.host).packed
            + struct.pack("!HH", s.port, d.port)
        )
    else:
        assert isinstance(s, UNIXAddress) and isinstance(d, UNIXAddress)
        fam = _FAM_UNIX
        addr = _unix_path(s) + _unix_path(d)
    extra = (_tls_tlvs(tls) if tls is not None else b"") + b"".join(_tlv(t, v) for t, v in tlvs)
    body = addr + extra
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 header body is {len(body)} bytes, more than 65535")
    cmd = _CMD_LOCAL if local else _CMD_PROXY
    return V2_SIGNATURE + struct.pack("!BBH", cmd, fam, len(body)) + body


def _unix_path(address: UNIXAddress) -> bytes:
    name = address.name or b""
    if isinstance(name, str):
        name = name.encode("utf-8")
    if len(name) > 108:
        raise ValueError(f"UNIX socket path longer than 108 bytes: {name!r}")
    return name.ljust(108, b"\x00")


def build(version: str, source: Address | None, dest: Address | None, tls: TLSInfo | None = None) -> bytes:
    """
    The header a listener's C{proxy_protocol} setting asks for: C{"v1"},
    C{"v2"}, or C{b""} for C{"off"}.  v1 has no room for TLS facts, so
    C{tls} only matters to v2.
    """
    if version == "off":
        return b""
    if version == "v1":
        return build_v1(source, dest)
    if version == "v2":
        return build_v2(source, dest, tls)
    raise ValueError(f"proxy_protocol must be 'off', 'v1' or 'v2', not {version!r}")


# ---------------------------------------------------------------------------
# Parsing


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """
    Parse the PROXY header at the start of C{data}.

    @return: the header and how many bytes of C{data} it took (the rest is the
        connection's payload), or L{None} if C{data} is a valid beginning that
        needs more bytes.
    @raise ProxyProtocolError: if C{data} cannot be the start of a header.
    """
    if data[:1] == b"\r":
        n = min(len(data), len(V2_SIGNATURE))
        if data[:n] != V2_SIGNATURE[:n]:
            raise ProxyProtocolError("not a PROXY header (bad v2 signature)")
        return _parse_v2(data)
    if data[:1] == b"P":
        n = min(len(data), 6)
        if data[:n] != b"PROXY "[:n]:
            raise ProxyProtocolError("not a PROXY header")
        return _parse_v1(data)
    if not data:
        return None
    raise ProxyProtocolError("not a PROXY header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX} bytes")
        if b"\n" in data:
            raise ProxyProtocolError("PROXY v1 line not ended by CRLF")
        return None
    raw = data[: end + 2]
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, "PROXY", None, None, raw=raw), len(raw)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"bad PROXY v1 line {line!r}")
    _, family, s_host, d_host, s_port, d_port = parts
    version = 4 if family == "TCP4" else 6
    hosts = []
    for host in (s_host, d_host):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ProxyProtocolError(f"bad address {host!r} in PROXY v1 line") from None
        if ip.version != version:
            raise ProxyProtocolError(f"address {host!r} is not {family}")
        hosts.append(str(ip))
    ports = []
    for port in (s_port, d_port):
        if not port.isdigit() or (len(port) > 1 and port[0] == "0") or int(port) > 65535:
            raise ProxyProtocolError(f"bad port {port!r} in PROXY v1 line")
        ports.append(int(port))
    cls = IPv4Address if version == 4 else IPv6Address
    source = cls("TCP", hosts[0], ports[0])
    dest = cls("TCP", hosts[1], ports[1])
    return ProxyHeader(1, "PROXY", source, dest, raw=raw), len(raw)


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < 16:
        return None
    ver_cmd, fam, length = struct.unpack_from("!BBH", data, 12)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"unsupported PROXY version {ver_cmd >> 4}")
    if ver_cmd not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"unknown PROXY v2 command 0x{ver_cmd & 0x0F:x}")
    total = 16 + length
    if len(data) < total:
        return None
    body = data[16:total]
    raw = data[:total]
    need = _ADDR_LEN.get(fam, 0)
    if fam not in _ADDR_LEN and fam != _FAM_UNSPEC:
        # UDP and unknown families: the addresses are not ours to interpret.
        need = {0x12: 12, 0x22: 36, 0x32: 216}.get(fam, 0)
    if len(body) < need:
        raise ProxyProtocolError(f"PROXY v2 address block is {len(body)} bytes, family 0x{fam:02x} needs {need}")
    source: Address | None = None
    dest: Address | None = None
    if ver_cmd == _CMD_PROXY:
        if fam == _FAM_TCP4:
            s, d = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
            sp, dp = struct.unpack_from("!HH", body, 8)
            source, dest = IPv4Address("TCP", str(s), sp), IPv4Address("TCP", str(d), dp)
        elif fam == _FAM_TCP6:
            s6, d6 = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
            sp, dp = struct.unpack_from("!HH", body, 32)
            source, dest = IPv6Address("TCP", str(s6), sp), IPv6Address("TCP", str(d6), dp)
        elif fam == _FAM_UNIX:
            source = UNIXAddress(body[0:108].split(b"\x00", 1)[0])
            dest = UNIXAddress(body[108:216].split(b"\x00", 1)[0])
    tlvs = _parse_tlvs(body[need:])
    return (
        ProxyHeader(
            2,
            "PROXY" if ver_cmd == _CMD_PROXY else "LOCAL",
            source,
            dest,
            tlvs=tlvs,
            tls=_tls_from_tlvs(tlvs),
            raw=raw,
        ),
        total,
    )


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyProtocolError("truncated PROXY v2 TLV")
        kind, length = struct.unpack_from("!BH", data, offset)
        offset += 3
        if len(data) - offset < length:
            raise ProxyProtocolError(f"PROXY v2 TLV 0x{kind:02x} runs past the header")
        out.append((kind, data[offset : offset + length]))
        offset += length
    return tuple(out)


def _tls_from_tlvs(tlvs: Sequence[tuple[int, bytes]]) -> TLSInfo | None:
    ssl = next((v for t, v in tlvs if t == PP2_TYPE_SSL), None)
    if ssl is None:
        return None
    if len(ssl) < 5:
        raise ProxyProtocolError("PROXY v2 SSL TLV shorter than 5 bytes")
    client, verify = struct.unpack_from("!BI", ssl, 0)
    subs = dict(_parse_tlvs(ssl[5:]))
    alpn = next((v for t, v in tlvs if t == PP2_TYPE_ALPN), None)
    authority = next((v for t, v in tlvs if t == PP2_TYPE_AUTHORITY), None)

    def text(kind: int) -> str | None:
        value = subs.get(kind)
        return value.decode("utf-8", "replace") if value is not None else None

    has_cert = bool(client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS))
    return TLSInfo(
        version=text(PP2_SUBTYPE_SSL_VERSION),
        cipher=text(PP2_SUBTYPE_SSL_CIPHER),
        sni=authority.decode("utf-8", "replace") if authority is not None else None,
        alpn=alpn,
        client_cn=text(PP2_SUBTYPE_SSL_CN),
        client_cert=has_cert,
        verified=has_cert and verify == 0,
    )
