"""
The ACME storage folder: the account key and one file per name holding the
certificate chain and its private key.

Every file is written whole to a temporary file (mode 0600) that then
replaces the old one (C{os.replace}), so a reader (this process's TLS
contexts, or another process sharing the folder) sees the old file or the
new one, never half of one, and never a certificate with another one's key.

Layout::

    STORAGE/account.key              the ACME account's key (EC P-256)
    STORAGE/certificates/NAME.pem    issued: certificate, chain, then key
    STORAGE/certificates/NAME.lock   held (flock) by the process issuing for NAME
    STORAGE/temporary/NAME.pem       self-signed, served until one is issued
"""

from __future__ import annotations

import datetime
import fcntl
import os
import tempfile
from typing import Any

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

__all__ = ["AcmeStorage", "StoredCertificate", "new_key", "self_signed"]


@frozen
class StoredCertificate:
    """A certificate file of the storage folder, read and checked."""

    path: str
    names: tuple[str, ...]
    not_before: float
    not_after: float
    serial: int
    pem: bytes
    """The certificate chain (no key), for the CA's renewal information."""


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 key: certificates and accounts both use one (fast to make, small handshakes)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def self_signed(name: str, now: float, days: int = 7, extensions: tuple[tuple[Any, bool], ...] = ()) -> bytes:
    """
    A self-signed certificate for C{name} and its key, as one PEM file's bytes.

    @param extensions: more (extension, critical) pairs (the TLS-ALPN-01
        challenge's acmeIdentifier).
    """
    key = new_key()
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(moment - datetime.timedelta(minutes=5))
        .not_valid_after(moment + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM) + key_pem(key)


class AcmeStorage:
    """The storage folder of C{[acme] storage}; blocking file I/O, for startup and the issuing thread."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def prepare(self) -> None:
        """Make the folders (private to the owner).  @raise OSError: if they cannot be made."""
        for path in (self.folder, os.path.join(self.folder, "certificates"), os.path.join(self.folder, "temporary")):
            os.makedirs(path, mode=0o700, exist_ok=True)

    def certificate_path(self, name: str) -> str:
        return os.path.join(self.folder, "certificates", name + ".pem")

    def temporary_path(self, name: str) -> str:
        return os.path.join(self.folder, "temporary", name + ".pem")

    def lock_path(self, name: str) -> str:
        return os.path.join(self.folder, "certificates", name + ".lock")

    def write(self, path: str, data: bytes) -> None:
        """Replace C{path} with C{data} at once: a temporary file, mode 0600, flushed to disk, then renamed."""
        folder = os.path.dirname(path)
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise

    def account_key(self) -> Any:
        """The account key, made and stored on first use (reused across restarts, so the account is too)."""
        path = os.path.join(self.folder, "account.key")
        try:
            with open(path, "rb") as f:
                return serialization.load_pem_private_key(f.read(), password=None)
        except FileNotFoundError:
            pass
        key = new_key()
        self.write(path, key_pem(key))
        return key

    def read(self, path: str, now: float) -> StoredCertificate | None:
        """
        The certificate file at C{path} if it is there, whole and not expired
        (its key matching its certificate), else C{None}.
        """
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        try:
            certs = x509.load_pem_x509_certificates(data)
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            return None
        leaf = certs[0]
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
                leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
            return None
        not_after = leaf.not_valid_after_utc.timestamp()
        if not_after <= now:
            return None
        try:
            san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
            names = tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))
        except x509.ExtensionNotFound:
            names = ()
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
        return StoredCertificate(path, names, leaf.not_valid_before_utc.timestamp(), not_after,
                                 leaf.serial_number, chain)

    def try_lock(self, name: str) -> int | None:
        """
        Take the issuing lock for C{name} without waiting: a file descriptor to
        pass to L{unlock}, or C{None} when another process (or manager) holds it.
        The kernel drops the lock if the holder dies.
        """
        fd = os.open(self.lock_path(name), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return fd

    def unlock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
