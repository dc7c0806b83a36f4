"""
Answering the CA's challenges while the proxy serves.

  - HTTP-01: the plain HTTP listeners answer C{GET /.well-known/acme-challenge/TOKEN}
    with the key authorization, before routing and before any redirect to
    https (L{rproxy_tw.http.server}).  Tokens we do not hold go on to the
    routes, so an origin that runs its own ACME client keeps working.
  - TLS-ALPN-01 (RFC 8737): a TLS listener given a ClientHello that names a
    pending name and offers only C{acme-tls/1} answers with the challenge
    certificate.  The standard library's C{ssl} offers no callback that sees
    both the SNI name and the offered ALPN protocols before the certificate is
    chosen, so the TLS transport reads them from the ClientHello itself
    (L{client_hello}) while a challenge is pending, and only then.

Every mutation comes from the reactor thread; the issuing thread goes
through C{blockingCallFromThread}.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import struct
import tempfile

from attrs import frozen
from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from .storage import self_signed

__all__ = ["ACME_TLS_1", "CHALLENGE_PREFIX", "ChallengeResponder", "ClientHello", "TLSALPNChallenge", "client_hello"]

ACME_TLS_1 = b"acme-tls/1"

CHALLENGE_PREFIX = b"/.well-known/acme-challenge/"

ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
"""id-pe-acmeIdentifier (RFC 8737 section 6.1)."""

MAX_HELLO = 16384 + 4
"""A ClientHello longer than one full record is not read for a challenge (it is served the normal way)."""


# ---------------------------------------------------------------------------
# Reading a ClientHello


@frozen
class ClientHello:
    server_name: str | None
    alpn: tuple[bytes, ...]


_NOT_A_HELLO = ClientHello(None, ())


def client_hello(data: bytes) -> ClientHello | None:
    """
    The SNI name and ALPN protocols of the ClientHello at the start of
    C{data} (the bytes a TLS client sent first), or C{None} when more bytes
    are needed.  Anything that is not a well-formed ClientHello, or is longer
    than L{MAX_HELLO}, gives a hello with neither (served the normal way,
    where OpenSSL judges it).
    """
    body = b""
    offset = 0
    needed: int | None = None
    while needed is None or len(body) < needed:
        if len(data) < offset + 5:
            return None if len(data) < MAX_HELLO + 5 else _NOT_A_HELLO
        kind, _, length = struct.unpack_from("!BHH", data, offset)
        if kind != 22 or length == 0 or length > 16384:
            return _NOT_A_HELLO
        if len(data) < offset + 5 + length:
            return None
        body += data[offset + 5:offset + 5 + length]
        offset += 5 + length
        if needed is None and len(body) >= 4:
            if body[0] != 1:
                return _NOT_A_HELLO
            needed = 4 + int.from_bytes(body[1:4], "big")
            if needed > MAX_HELLO:
                return _NOT_A_HELLO
    try:
        return _parse_hello(body[4:needed])
    except (IndexError, struct.error, UnicodeDecodeError):
        return _NOT_A_HELLO


def _parse_hello(hello: bytes) -> ClientHello:
    at = 2 + 32  # client_version, random
    at += 1 + hello[at]  # session id
    at += 2 + int.from_bytes(hello[at:at + 2], "big")  # cipher suites
    at += 1 + hello[at]  # compression methods
    if at >= len(hello):
        return _NOT_A_HELLO
    end = at + 2 + int.from_bytes(hello[at:at + 2], "big")
    if end > len(hello):
        return _NOT_A_HELLO
    at += 2
    name: str | None = None
    alpn: tuple[bytes, ...] = ()
    while at + 4 <= end:
        kind, length = struct.unpack_from("!HH", hello, at)
        value = hello[at + 4:at + 4 + length]
        if len(value) != length:
            return _NOT_A_HELLO
        at += 4 + length
        if kind == 0 and len(value) >= 5 and value[2] == 0:  # server_name, host_name
            size = int.from_bytes(value[3:5], "big")
            name = value[5:5 + size].decode("ascii").lower().rstrip(".")
        elif kind == 16 and len(value) >= 2:  # application_layer_protocol_negotiation
            protocols = []
            i = 2
            while i < len(value):
                size = value[i]
                protocols.append(value[i + 1:i + 1 + size])
                i += 1 + size
            alpn = tuple(protocols)
    return ClientHello(name, alpn)


# ---------------------------------------------------------------------------
# The challenge certificates


class TLSALPNChallenge:
    """
    The TLS-ALPN-01 answer for one name: a self-signed certificate for it
    carrying the acmeIdentifier extension, in an C{ssl} context offering only
    C{acme-tls/1}.  Only the C{ssl} transport (HTTP listeners without client
    certificates) answers it: pyOpenSSL's ALPN callback runs after OpenSSL
    chose the certificate in TLS 1.2, too late to switch it safely.
    """

    def __init__(self, name: str, key_authorization: bytes, now: float, folder: str | None = None) -> None:
        digest = hashlib.sha256(key_authorization).digest()
        extension = x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest)  # DER OCTET STRING
        pem = self_signed(name, now, days=1, extensions=((extension, True),))
        self.name = name
        self.pem = pem
        self.stdlib = self._stdlib_context(pem, folder)

    @staticmethod
    def _stdlib_context(pem: bytes, folder: str | None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols([ACME_TLS_1.decode("ascii")])
        # The ssl module loads certificates from files only: a private temporary one.
        fd, path = tempfile.mkstemp(dir=folder, prefix=".challenge-", suffix=".pem")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
        return ctx


# ---------------------------------------------------------------------------
# What the listeners ask


class ChallengeResponder:
    """The challenges pending now, by token (HTTP-01) and by name (TLS-ALPN-01)."""

    def __init__(self) -> None:
        self.http01: dict[bytes, bytes] = {}
        self.tls_alpn01: dict[str, TLSALPNChallenge] = {}

    def http01_answer(self, path: bytes) -> bytes | None:
        """The key authorization for a request path under L{CHALLENGE_PREFIX}, or C{None} for a token we do not hold."""
        if not path.startswith(CHALLENGE_PREFIX):
            return None
        return self.http01.get(path[len(CHALLENGE_PREFIX):])

    def tls_alpn01_for(self, hello: ClientHello) -> TLSALPNChallenge | None:
        """The challenge to answer a ClientHello with: only a validator's (SNI a pending name, ALPN C{acme-tls/1})."""
        if hello.server_name is None or ACME_TLS_1 not in hello.alpn:
            return None
        return self.tls_alpn01.get(hello.server_name)
