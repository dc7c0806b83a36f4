"""
TLS termination: the pyOpenSSL contexts behind a C{tls = "NAME"} listener.

Why not Twisted's C{CertificateOptions}: it serves one certificate, turns
session tickets and the session cache off (every reconnect pays a full
handshake), and cannot switch certificates by SNI.  Here one
L{ServerTLSContexts} per profile holds:

  - a I{front} context that every connection starts on.  It carries no
    certificate, only what OpenSSL reads from the first context of a
    connection: protocol versions, options, verify mode, the session cache
    and the session-ticket keys.  Its SNI callback moves the connection to
  - one I{certificate} context per group of certificates with the same
    names (an RSA and an ECDSA certificate for one site share a context, and
    OpenSSL picks by the client's signature algorithms), chosen by SNI:
    exact name, then wildcard, then the profile's first certificate.

pyOpenSSL gives no way to set ticket keys, but OpenSSL makes fresh random
keys for every new context, so rotating the keys is building a new front
context on a timer from the injected clock.  Tickets issued before a
rotation stop resuming (one full handshake per client per rotation), which
is also what bounds the forward-secrecy exposure of a stolen key.

Certificate files are re-read by L{ServerTLSContexts.reload} (call it on
SIGHUP; a small watcher also calls it when a file's mtime changes).  New
connections use the new files; open ones keep their context.  Files that do
not load leave the old ones serving.
"""

from __future__ import annotations

import datetime
import os
import ssl
from typing import Any, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import INegotiated, IOpenSSLServerConnectionCreator, IProtocolFactory, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import Interface, implementer

from .config import ConfigError, TLSProfile
from .logs import observer as log_observer

__all__ = [
    "CLIENT_SUBJECT_HEADER",
    "ICertificateReload",
    "INTERMEDIATE_CIPHERS",
    "ServerTLSContexts",
    "StdlibTLSContexts",
    "TLSServerFactory",
    "client_subject",
    "close_waits_for_peer",
    "client_tls_options",
    "negotiated_protocol",
    "tls_server_factory",
]

INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
"""
Mozilla's "intermediate" TLS 1.2 list without the DHE suites: ECDHE key
exchange with AEAD ciphers only.  TLS 1.3 suites are all AEAD and keep
OpenSSL's defaults.
"""

CLIENT_SUBJECT_HEADER = b"X-Client-Cert-Subject"
"""
The request header that carries a verified client certificate's subject to
the origin.  The HTTP layer must drop any copy the client sent.
"""

TICKET_ROTATION = 12 * 3600.0
"""Seconds between session-ticket key rotations (Caddy's interval)."""

WATCH_INTERVAL = 5.0
"""Seconds between checks of the certificate files' mtimes."""

EXPIRY_WARNING = 14 * 86400.0
"""Certificates expiring sooner than this are logged at load."""

_SESSION_ID_CONTEXT = b"rproxy"

_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

_OPTIONS = (
    SSL.OP_NO_SSLv2
    | SSL.OP_NO_SSLv3
    | SSL.OP_NO_TLSv1
    | SSL.OP_NO_TLSv1_1
    | SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
)
"""Belt and braces next to the minimum version: nothing older than TLS 1.2, ever."""

_log = Logger(observer=log_observer)

_QUIET = Logger(observer=lambda event: None)

_STDLIB_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

_STDLIB_OPTIONS = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE


# ---------------------------------------------------------------------------
# Loading certificate files


class _Certificate:
    """One certificate entry of a profile, parsed and checked."""

    __slots__ = ("index", "cert_path", "key_path", "leaf", "chain", "key", "names", "key_type")

    def __init__(self, index: int, cert_path: str, key_path: str, leaf: x509.Certificate,
                 chain: list[x509.Certificate], key: Any, names: tuple[str, ...], key_type: str) -> None:
        self.index = index
        self.cert_path = cert_path
        self.key_path = key_path
        self.leaf = leaf
        self.chain = chain
        self.key = key
        self.names = names
        self.key_type = key_type


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(path, key, f"cannot read: {e.strerror or e}") from None


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate serves: its SAN, or its CN when it has no SAN."""
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(a.value).lower().rstrip(".") for a in cns[:1])
    return tuple(n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))


def _key_type(key: Any, path: str, keyname: str) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ConfigError(path, keyname, f"RSA key of {key.key_size} bits is too weak (2048 at least)")
        return "RSA"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ECDSA"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return "EdDSA"
    raise ConfigError(path, keyname, f"unsupported key type {type(key).__name__} (RSA or ECDSA)")


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_certificate(index: int, cert_path: str, key_path: str, now: float, log: Logger,
                      keys: tuple[str, str], server: bool = True) -> _Certificate:
    """
    Read and check one certificate and its key.

    @param keys: the config keys of the certificate and the key file, for errors.
    @param server: a server certificate, which must name a DNS name (a
        client certificate need not).
    @raise ConfigError: naming the file and the config key, one line.
    """
    certname, keyname = keys
    data = _read(cert_path, certname)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(cert_path, certname, "no PEM certificate in the file") from None
    leaf, chain = certs[0], certs[1:]
    moment = _utc(now)
    for position, cert in enumerate(certs):
        what = "certificate" if position == 0 else f"chain certificate {position} ({cert.subject.rfc4514_string()})"
        if cert.not_valid_after_utc < moment:
            raise ConfigError(cert_path, certname, f"{what} expired on {_when(cert.not_valid_after_utc)}")
    if leaf.not_valid_before_utc > moment:
        log.warn("{path}: certificate is not valid before {when}", path=cert_path, when=_when(leaf.not_valid_before_utc))
    left = (leaf.not_valid_after_utc - moment).total_seconds()
    if left < EXPIRY_WARNING:
        log.warn("{path}: certificate expires in {days:.1f} days", path=cert_path, days=left / 86400)
    raw_key = data if key_path == cert_path else _read(key_path, keyname)
    try:
        key = serialization.load_pem_private_key(raw_key, password=None)
    except TypeError:
        raise ConfigError(key_path, keyname, "the private key is encrypted (give an unencrypted key)") from None
    except Exception:  # noqa: BLE001 - ValueError, UnsupportedAlgorithm...
        raise ConfigError(key_path, keyname, "no usable PEM private key in the file") from None
    key_type = _key_type(key, key_path, keyname)
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise ConfigError(key_path, keyname, f"the private key does not match the certificate in {cert_path}")
    names = _names(leaf)
    if not names and server:
        raise ConfigError(cert_path, certname, "the certificate names no DNS name (subjectAltName or CN)")
    return _Certificate(index, cert_path, key_path, leaf, chain, key, names, key_type)


def _load_client_ca(profile: str, path: str) -> list[x509.Certificate]:
    keyname = f"tls.{profile}.client_ca"
    try:
        cas = x509.load_pem_x509_certificates(_read(path, keyname))
    except ValueError:
        raise ConfigError(path, keyname, "no PEM certificate in the file") from None
    return cas


# ---------------------------------------------------------------------------
# Contexts


class _Generation:
    """
    The certificate contexts of one reading of a profile's files, and the SNI
    lookup over them.  Immutable once built: a reload builds a new one.
    """

    def __init__(self, certificates: list[_Certificate], contexts: list[Any],
                 exact: dict[str, Any], wildcard: dict[str, Any], refused: frozenset[Any] = frozenset(),
                 refusal: Any = None) -> None:
        self.certificates = certificates
        self.contexts = contexts
        self.default = contexts[0]
        self.exact = exact
        self.wildcard = wildcard
        self.refused = refused
        """Contexts whose handshakes fail: ACME names not issued yet, with C{[acme] unissued = "refuse"}."""
        self.refusal = refusal
        """A context with no certificate (pyOpenSSL): switching to it fails the handshake."""

    def context_for(self, server_name: bytes | str | None) -> Any:
        """The certificate context for a client's SNI name (exact, then C{*.} one label up, then the default)."""
        if not server_name:
            return self.default
        if isinstance(server_name, bytes):
            server_name = server_name.decode("ascii", "replace")
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        _, dot, parent = name.partition(".")
        if dot:
            ctx = self.wildcard.get(parent)
            if ctx is not None:
                return ctx
        return self.default

    def select(self, connection: SSL.Connection) -> None:
        """The SNI callback (pyOpenSSL): OpenSSL calls it for every ClientHello, with or without a name."""
        ctx = self.context_for(connection.get_servername())
        if ctx in self.refused:
            ctx = self.refusal  # no certificate: the handshake fails there
        connection.set_context(ctx)

    def select_stdlib(self, connection: ssl.SSLObject, server_name: str | None, front: ssl.SSLContext) -> int | None:
        """The SNI callback (the standard library's C{ssl}): the same choice."""
        ctx = self.context_for(server_name)
        if ctx in self.refused:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        connection.context = ctx
        return None


class _ProfileContexts:
    """
    The TLS side of one listener: certificate contexts chosen by SNI, a front
    context holding the ticket keys, reload and rotation on the injected clock.
    Subclasses build the contexts of one TLS library.

    @ivar generation: the certificate contexts new connections use.
    """

    _log = Logger(observer=log_observer)

    challenges: Any = None
    """The ACME challenges pending (L{rproxy_tw.acme.ChallengeResponder}), for an C{acme} profile's transport."""

    def __init__(self, clock: IReactorTime, profile: TLSProfile, http: bool = True,
                 ticket_rotation: float = TICKET_ROTATION, watch_interval: float | None = WATCH_INTERVAL,
                 acme: Any = None) -> None:
        """
        @param http: offer ALPN (the profile's C{alpn} list); a raw TCP
            listener offers none, since the bytes after the handshake are not HTTP.
        @param ticket_rotation: seconds between ticket key rotations; also
            the lifetime of a session.
        @param watch_interval: seconds between file checks, or C{None} for
            no watcher (reload only when L{reload} is called).
        @param acme: the L{rproxy_tw.acme.AcmeManager} of an C{acme} profile:
            its certificates are served after the profile's own files, and it
            reloads these contexts when one changes.
        @raise ConfigError: if a file cannot be used.
        """
        self.clock = clock
        self.profile = profile
        self.acme = acme
        if acme is not None and profile.acme:
            self.challenges = acme.responder
        self.alpn = tuple(p.encode("ascii") for p in profile.alpn) if http else ()
        self.ticket_rotation = ticket_rotation
        self.watch_interval = watch_interval
        self.rotations = 0
        self.reloads = 0
        self.reload_failures = 0
        self._stat = self._file_state(self._files())
        self.generation = self._build_generation()
        self._front = self._build_front(self.generation)
        self._previous_front: Any = None
        self._rotator: LoopingCall | None = None
        self._watcher: LoopingCall | None = None
        if self.challenges is not None:
            acme.attach(profile.name, self)

    # -- building ---------------------------------------------------------------------------

    def _base_context(self, front: bool = False) -> Any:
        raise NotImplementedError

    def _install(self, ctx: Any, c: _Certificate) -> None:
        raise NotImplementedError

    def _build_front(self, generation: _Generation) -> Any:
        raise NotImplementedError

    def _build_generation(self) -> _Generation:
        """Read every file of the profile.  @raise ConfigError: on the first unusable one."""
        profile = self.profile
        now = self.clock.seconds()
        certificates = [
            _load_certificate(i, cc.cert, cc.key, now, self._log,
                              (f"tls.{profile.name}.certificates[{i}].cert", f"tls.{profile.name}.certificates[{i}].key"))
            for i, cc in enumerate(profile.certificates)
        ]
        refused_files = self.acme.refused_for(profile.name) if self.challenges is not None else frozenset()
        refused_certificates = []
        for cc in self._acme_certificates():
            # No expiry warnings: the ACME manager renews these, and logs when it cannot.
            certificates.append(_load_certificate(len(certificates), cc.cert, cc.key, now, _QUIET,
                                                  (f"tls.{profile.name}.acme", f"tls.{profile.name}.acme")))
            if cc.cert in refused_files:
                refused_certificates.append(certificates[-1])
        if not certificates:
            raise ConfigError(profile.name, f"tls.{profile.name}", "no certificate to serve (no file, no acme name)")
        if profile.client_ca is not None:
            _load_client_ca(profile.name, profile.client_ca)
        # Group certificates serving the same names: one context, one slot per key type.
        groups: dict[frozenset[str], list[_Certificate]] = {}
        for c in certificates:
            groups.setdefault(frozenset(c.names), []).append(c)
        by_group: dict[frozenset[str], Any] = {}
        for names, members in groups.items():
            ctx = self._base_context()
            seen: set[str] = set()
            for c in members:
                if c.key_type in seen:
                    self._log.warn(
                        "tls profile {profile}: certificates[{index}] ({path}) is shadowed by an earlier {kind} "
                        "certificate for the same names", profile=profile.name, index=c.index,
                        path=c.cert_path, kind=c.key_type)
                    continue
                seen.add(c.key_type)
                self._install(ctx, c)
            by_group[names] = ctx
        contexts = [by_group[frozenset(c.names)] for c in certificates]
        exact: dict[str, Any] = {}
        wildcard: dict[str, Any] = {}
        for c in certificates:
            ctx = by_group[frozenset(c.names)]
            for name in c.names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], ctx)
                else:
                    exact.setdefault(name, ctx)
        unique = list(dict.fromkeys(contexts))
        refused = frozenset(by_group[frozenset(c.names)] for c in refused_certificates)
        return _Generation(certificates, unique, exact, wildcard, refused,
                           self._base_context() if refused else None)

    # -- reload and rotation -----------------------------------------------------------------

    def reload(self) -> bool:
        """
        Re-read the profile's files.  On success new connections use them;
        on failure the error is logged and the current ones keep serving.

        @return: whether the new files are in use.
        """
        # Stat before reading: a file replaced mid-read differs at the next check.
        self._stat = self._file_state(self._files())
        try:
            generation = self._build_generation()
        except ConfigError as e:
            self.reload_failures += 1
            self._log.error("tls profile {profile}: reload failed, still serving the previous certificates: {error}",
                            profile=self.profile.name, error=str(e))
            return False
        self.generation = generation
        self._swap_front(self._build_front(generation))
        self.reloads += 1
        self._log.info("tls profile {profile}: reloaded {count} certificate(s)",
                       profile=self.profile.name, count=len(generation.certificates))
        return True

    def rotate_ticket_keys(self) -> None:
        """New session-ticket keys (and an empty session cache) for new handshakes."""
        self._swap_front(self._build_front(self.generation))
        self.rotations += 1
        self._log.debug("tls profile {profile}: session ticket keys rotated", profile=self.profile.name)

    def _swap_front(self, front: Any) -> None:
        # The old front's Python callbacks must outlive handshakes that started on it.
        self._previous_front, self._front = self._front, front

    def _acme_certificates(self) -> tuple[Any, ...]:
        """The files of the profile's ACME names now (issued, or temporary until then)."""
        if self.challenges is None:
            return ()
        return tuple(self.acme.certificates_for(self.profile.name))

    def _files(self) -> tuple[str, ...]:
        profile = self.profile
        files = [path for cc in (*profile.certificates, *self._acme_certificates()) for path in (cc.cert, cc.key)]
        if profile.client_ca is not None:
            files.append(profile.client_ca)
        return tuple(dict.fromkeys(files))

    def _file_state(self, files: Iterable[str]) -> tuple[Any, ...]:
        state = []
        for path in files:
            try:
                st = os.stat(path)
                state.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                state.append((path, None))
        return tuple(state)

    def check_files(self) -> bool:
        """
        The watcher's tick: reload if any file changed since the last
        attempt.  A failed attempt is not retried until a file changes again
        (a certificate renewed before its key is written fails once, then
        loads when the key lands).

        @return: whether a reload was attempted.
        """
        if self._file_state(self._files()) == self._stat:
            return False
        self.reload()
        return True

    def start(self) -> None:
        """Start the ticket key rotation and the file watcher."""
        if self._rotator is None and self.ticket_rotation > 0:
            self._rotator = LoopingCall(self.rotate_ticket_keys)
            self._rotator.clock = self.clock
            self._rotator.start(self.ticket_rotation, now=False)
        if self._watcher is None and self.watch_interval:
            self._watcher = LoopingCall(self.check_files)
            self._watcher.clock = self.clock
            self._watcher.start(self.watch_interval, now=False).addErrback(
                lambda f: self._log.failure("tls certificate watcher stopped", f))

    def stop(self) -> None:
        for call in (self._rotator, self._watcher):
            if call is not None and call.running:
                call.stop()
        self._rotator = self._watcher = None

    @property
    def certificates(self) -> Sequence[x509.Certificate]:
        """The leaf certificates in use, in the profile's order."""
        return [c.leaf for c in self.generation.certificates]


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLSContexts(_ProfileContexts):
    """
    The profile's contexts in pyOpenSSL, for Twisted's C{TLSMemoryBIOProtocol}:
    raw TCP listeners (which need its TLS half-close) and origins' tests.
    """

    # -- IOpenSSLServerConnectionCreator ----------------------------------------------------

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return SSL.Connection(self._front, None)

    def _base_context(self, front: bool = False) -> SSL.Context:
        """
        A context with the settings every context of the profile shares.

        @param front: for the front context, which OpenSSL reads the
            versions, options and verify mode from, but whose CA store and
            CA names it never uses (the certificate context's count after the
            SNI switch), so a ticket rotation reads no file.
        """
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(_VERSIONS[self.profile.min_version])
        ctx.set_options(_OPTIONS)
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.set_cipher_list(INTERMEDIATE_CIPHERS.encode("ascii"))
        # Same on every context, so that SSL_set_SSL_CTX keeps it and sessions resume.
        ctx.set_session_id(_SESSION_ID_CONTEXT + b":" + self.profile.name.encode("utf-8")[:24])
        ca = self.profile.client_ca
        if ca is not None:
            if not front:
                try:
                    ctx.load_verify_locations(ca.encode("utf-8"))
                    ctx.load_client_ca(ca.encode("utf-8"))
                except SSL.Error as e:
                    raise ConfigError(ca, f"tls.{self.profile.name}.client_ca",
                                      f"OpenSSL refused it: {_ssl_reason(e)}") from None
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        if self.alpn:
            ctx.set_alpn_select_callback(self._select_alpn)
        return ctx

    def _install(self, ctx: SSL.Context, c: _Certificate) -> None:
        """
        Put one certificate, its chain and key in C{ctx}.  The chain goes
        with the certificate's own key-type slot, so an RSA and an ECDSA
        certificate with different intermediates each send their own.
        """
        keyname = f"tls.{self.profile.name}.certificates[{c.index}].key"
        try:
            ctx.use_certificate_chain_file(c.cert_path.encode("utf-8"))
            ctx.use_privatekey(c.key)
            ctx.check_privatekey()
        except SSL.Error as e:
            raise ConfigError(c.key_path, keyname, f"OpenSSL refused the certificate or key: {_ssl_reason(e)}") from None

    def _build_front(self, generation: _Generation) -> SSL.Context:
        """
        The context every connection starts on: fresh ticket keys, a fresh
        session cache, and the SNI switch to C{generation}'s contexts.
        """
        ctx = self._base_context(front=True)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        ctx.set_timeout(int(self.ticket_rotation))
        ctx.set_tlsext_servername_callback(generation.select)
        return ctx

    def _select_alpn(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        """Our preference order (the profile's), not the client's; no overlap means no ALPN, not a failure."""
        for proto in self.alpn:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS

class StdlibTLSContexts(_ProfileContexts):
    """
    The profile's contexts in the standard library's C{ssl} module, for
    L{rproxy_tw.tls_transport}: HTTP listeners.  Same choices as
    L{ServerTLSContexts}; the C{ssl} module sets compression off and a
    session ID context shared by every context (so sessions resume across
    the SNI switch) by itself.  An idle kept-alive connection costs the
    proxy 24 KiB here against 31 KiB on the pyOpenSSL path (1,000 measured).

    Not for profiles with C{client_ca}: the C{ssl} module cannot name the
    accepted CAs in its certificate request, which browsers use to pick a
    client certificate, so mutual-TLS listeners stay on L{ServerTLSContexts}.
    """

    def wrap(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject:
        """A server-side TLS connection over two memory buffers, starting on the front context."""
        return self._front.wrap_bio(incoming, outgoing, server_side=True)

    def _base_context(self, front: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _STDLIB_VERSIONS[self.profile.min_version]
        ctx.options |= _STDLIB_OPTIONS
        ctx.set_ciphers(INTERMEDIATE_CIPHERS)
        if self.profile.client_ca is not None:
            raise ValueError("mutual TLS profiles use ServerTLSContexts")
        if self.alpn:
            # Server preference: the C{ssl} module selects in this list's order.
            ctx.set_alpn_protocols([p.decode("ascii") for p in self.alpn])
        return ctx

    def _install(self, ctx: ssl.SSLContext, c: _Certificate) -> None:
        keyname = f"tls.{self.profile.name}.certificates[{c.index}].key"
        try:
            ctx.load_cert_chain(c.cert_path, c.key_path)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(c.key_path, keyname,
                              f"OpenSSL refused the certificate or key: {getattr(e, 'reason', None) or e}") from None

    def _build_front(self, generation: _Generation) -> ssl.SSLContext:
        ctx = self._base_context(front=True)
        ctx.sni_callback = generation.select_stdlib
        return ctx


def _ssl_reason(error: SSL.Error) -> str:
    try:
        return "; ".join(str(item[-1]) for item in error.args[0]) or str(error)
    except (IndexError, TypeError):
        return str(error)


# ---------------------------------------------------------------------------
# The listener factory


class ICertificateReload(Interface):
    """A TLS listener's factory, whose certificate and key files SIGHUP re-reads."""

    def reload() -> bool:
        """Re-read the certificate files; bad files keep the old ones.  @return: whether they are in use."""


@implementer(ICertificateReload)
class TLSServerFactory(TLSMemoryBIOFactory):
    """
    TLS around a listener's factory.  Starts the ticket rotation and the file
    watcher with the listener and stops them with it.
    """

    def __init__(self, contexts: ServerTLSContexts, wrapped: IProtocolFactory, clock: IReactorTime) -> None:
        super().__init__(contexts, False, wrapped, clock=clock)
        self.contexts = contexts

    def startFactory(self) -> None:
        self.contexts.start()

    def stopFactory(self) -> None:
        self.contexts.stop()

    def reload(self) -> bool:
        """Re-read the certificate files (for SIGHUP).  @return: whether they are in use."""
        return self.contexts.reload()


def tls_server_factory(reactor: IReactorTime, profile: TLSProfile, factory: IProtocolFactory, http: bool = True,
                       events: Any = None, listener: str = "", handshake_timeout: float | None = None,
                       **options: Any) -> Any:
    """
    Wrap a listener's C{factory} in TLS with C{profile}.

    HTTP listeners get L{rproxy_tw.tls_transport} (the standard library's
    C{ssl}, from C: a sixth more kept-alive requests/s, bench/README.md).
    Twisted's C{TLSMemoryBIOProtocol} over pyOpenSSL serves raw TCP listeners
    (for its TLS half-close) and mutual-TLS profiles (pyOpenSSL can name the
    accepted client CAs).  C{RPROXY_TLS_PYOPENSSL=1} puts every listener on
    that path, for A/B measurements.

    @param http: an HTTP listener (ALPN offered) rather than raw TCP.
    @param events: the L{rproxy_tw.events.EventBus} told of failed handshakes
        (on the C{ssl} transport; Twisted's reports them only in its log).
    @param listener: the listener's endpoint, as events name it.
    @param handshake_timeout: seconds the C{ssl} transport gives a handshake
        and the first bytes after it (the HTTP layer's header timeout).
    @param options: C{ticket_rotation}, C{watch_interval} of the contexts.
    @raise ConfigError: if a certificate, key or CA file cannot be used.
    """
    if http and profile.client_ca is None and not os.environ.get("RPROXY_TLS_PYOPENSSL"):
        from .tls_transport import StdlibTLSServerFactory

        return StdlibTLSServerFactory(StdlibTLSContexts(reactor, profile, http=True, **options), factory, reactor,
                                      events, listener, handshake_timeout)
    tls = TLSServerFactory(ServerTLSContexts(reactor, profile, http=http, **options), factory, reactor)
    if http:
        # Twisted's default TLS transport holds small writes for a reactor turn to
        # coalesce them; the proxy already writes a response's head and body together,
        # and without the wait kept-alive TLS requests/s rose 9% (13.5k -> 14.7k).
        tls.protocol = TLSMemoryBIOProtocol
    return tls


# ---------------------------------------------------------------------------
# What the HTTP layer asks of a TLS connection


def negotiated_protocol(transport: Any) -> bytes | None:
    """The ALPN protocol of a TLS transport (C{b"h2"}, C{b"http/1.1"}), or C{None}."""
    return transport.negotiatedProtocol if INegotiated.providedBy(transport) else None  # type: ignore[no-any-return]


def close_waits_for_peer(transport: Any) -> bool:
    """
    Whether C{transport.loseConnection()} waits for the peer's close_notify
    (Twisted's TLS does; plain TCP and L{rproxy_tw.tls_transport} end by
    themselves once what was written is sent).
    """
    return isinstance(transport, TLSMemoryBIOProtocol)


def client_subject(transport: Any) -> str | None:
    """
    The subject (RFC 4514) of the client certificate on a TLS transport.

    Only profiles with C{client_ca} ask for certificates, and OpenSSL ends
    the handshake when one does not verify, so a certificate here is a
    verified one.  Call after the handshake (when request bytes arrived).
    """
    if not isinstance(transport, TLSMemoryBIOProtocol):
        return None  # plain TCP, or the ssl-module transport, whose profiles ask for no certificates
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    return cert.to_cryptography().subject.rfc4514_string()


# ---------------------------------------------------------------------------
# TLS to origins


def client_tls_options(hostname: str, ca_file: str | None = None, client_cert: str | None = None,
                       client_key: str | None = None, *, now: float, pool: str | None = None) -> Any:
    """
    Client TLS options for an origin: verify its certificate and C{hostname}
    (DNS name or IP address, with service-identity) against every CA in
    C{ca_file} (or the platform's roots), optionally presenting a client
    certificate.

    The C{tls:host:port:trustRoots=DIR:certificate=C:privateKey=K} endpoint
    string does the same from a directory (one CA per C{.pem} file); this is
    for a CA bundle file.

    @param now: the time (from the injected clock) a client certificate must
        be valid at.
    @param pool: the pool's name, for the config keys errors name
        (C{pool.NAME.ca}, C{pool.NAME.client_cert}, C{pool.NAME.client_key}).
    @raise ConfigError: if a file cannot be used.
    """
    from twisted.internet import ssl

    prefix = f"pool.{pool}." if pool is not None else ""
    trust: Any = None
    if ca_file is not None:
        try:
            cas = x509.load_pem_x509_certificates(_read(ca_file, prefix + "ca"))
        except ValueError:
            raise ConfigError(ca_file, prefix + "ca", "no PEM certificate in the file") from None
        trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in cas])
    client = None
    if client_cert is not None:
        key_path = client_key or client_cert
        keys = (prefix + "client_cert", prefix + ("client_key" if client_key else "client_cert"))
        # The same checks as a listener's certificate: readable, a key that
        # matches, not expired (when a time is given), a usable key type.
        checked = _load_certificate(0, client_cert, key_path, now, _log, keys, server=False)
        pem = checked.leaf.public_bytes(serialization.Encoding.PEM)
        key_pem = checked.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
        client = ssl.PrivateCertificate.loadPEM(pem + b"\n" + key_pem)
    return ssl.optionsForClientTLS(hostname, trustRoot=trust, clientCertificate=client)

