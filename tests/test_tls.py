"""
TLS termination against real clients: a CA, an intermediate and leaf
certificates made here with C{cryptography}, a real listener on 127.0.0.1,
and the stdlib C{ssl} module (in a thread) or C{openssl s_client} as the
client.  What a browser or a scanner would see: the certificate chosen by
SNI, the versions and ciphers refused, ALPN, mutual TLS, resumption, reload.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import subprocess
import time
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from rproxy_tw.config import CertificateConfig, ConfigError, TLSProfile
from rproxy_tw.tls import (
    INTERMEDIATE_CIPHERS,
    ICertificateReload,
    ServerTLSContexts,
    StdlibTLSContexts,
    client_subject,
    negotiated_protocol,
    tls_server_factory,
)

# ---------------------------------------------------------------------------
# A small PKI, made once per test session


def _key(kind: str) -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rproxy tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject_key: Any, cn: str, issuer: tuple[Any, x509.Certificate] | None, *, ca: bool = False,
           dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), client: bool = False,
           not_before: datetime.datetime | None = None, days: int = 30) -> x509.Certificate:
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = not_before or now - datetime.timedelta(hours=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer[1].subject if issuer else _name(cn))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    signer = issuer[0] if issuer else subject_key
    return builder.sign(signer, hashes.SHA256())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class PKI:
    """Files in C{root}: a root CA, an intermediate, leaves (leaf + intermediate in each cert file)."""

    def __init__(self, root: str) -> None:
        self.root = root
        ca_key = _key("ec")
        self.ca = _issue(ca_key, "rproxy test root", None, ca=True, days=3650)
        self.ca_path = self._write("ca.pem", _pem(self.ca))
        os.makedirs(os.path.join(root, "trust"))
        self._write("trust/ca.pem", _pem(self.ca))
        self.trust_dir = os.path.join(root, "trust")
        inter_key = _key("ec")
        self.inter = _issue(inter_key, "rproxy test intermediate", (ca_key, self.ca), ca=True, days=3650)
        self.issuer = (inter_key, self.inter)
        self.leaf("www-rsa", "rsa", dns=("www.example.test", "localhost"), ips=("127.0.0.1",))
        self.leaf("www-ec", "ec", dns=("www.example.test", "localhost"), ips=("127.0.0.1",))
        self.leaf("api", "ec", dns=("api.example.test",))
        self.leaf("apps", "ec", dns=("*.apps.example.test",))
        self.leaf("other", "ec", dns=("other.example.test",))
        self.leaf("expired", "ec", dns=("old.example.test",),
                  not_before=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=60))
        # Client certificates: one from a client CA, one from a CA the server does not know.
        client_ca_key = _key("ec")
        self.client_ca = _issue(client_ca_key, "rproxy client CA", None, ca=True, days=3650)
        self.client_ca_path = self._write("client-ca.pem", _pem(self.client_ca))
        self.leaf("alice", "ec", cn="alice", issuer=(client_ca_key, self.client_ca), client=True)
        rogue_key = _key("ec")
        rogue = _issue(rogue_key, "rogue CA", None, ca=True, days=3650)
        self.leaf("mallory", "ec", cn="mallory", issuer=(rogue_key, rogue), client=True)

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.root, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def leaf(self, name: str, kind: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), cn: str | None = None,
             issuer: Any = None, client: bool = False, not_before: Any = None) -> None:
        key = _key(kind)
        issuer = issuer or self.issuer
        cert = _issue(key, cn or (dns[0] if dns else name), issuer, dns=dns, ips=ips, client=client,
                      not_before=not_before)
        chain = (cert, issuer[1]) if issuer is self.issuer else (cert,)
        self._write(f"{name}.pem", _pem(*chain))
        self._write(f"{name}.key", _key_pem(key))
        setattr(self, name.replace("-", "_"), cert)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def entry(self, name: str) -> CertificateConfig:
        return CertificateConfig(cert=self.path(f"{name}.pem"), key=self.path(f"{name}.key"))

    def profile(self, *names: str, **kw: Any) -> TLSProfile:
        return TLSProfile(name=kw.pop("name", "main"), certificates=tuple(self.entry(n) for n in names), **kw)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: Any) -> PKI:
    return PKI(str(tmp_path_factory.mktemp("pki")))


def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


# ---------------------------------------------------------------------------
# A real listener and real clients


class _Report(Protocol):
    """Answers each chunk with what the TLS layer told the application."""

    def dataReceived(self, data: bytes) -> None:
        alpn = negotiated_protocol(self.transport) or b"-"
        subject = (client_subject(self.transport) or "-").encode()
        self.transport.write(b"%s|%s|%s" % (alpn, subject, data))


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest_twisted.inlineCallbacks
def _listen(profile: TLSProfile, http: bool = True, **options: Any) -> Any:
    factory = tls_server_factory(_reactor(), profile, Factory.forProtocol(_Report), http=http, **options)
    port = yield serverFromString(_reactor(), "tcp:0:interface=127.0.0.1").listen(factory)
    return port, factory


def _client_context(pki: PKI, *, minimum: Any = None, maximum: Any = None, ciphers: str | None = None,
                    alpn: list[str] | None = None, cert: str | None = None, verify: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.load_verify_locations(pki.ca_path)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    if cert is not None:
        ctx.load_cert_chain(pki.path(f"{cert}.pem"), pki.path(f"{cert}.key"))
    return ctx


def _talk(port: int, ctx: ssl.SSLContext, server_name: str | None, session: Any = None) -> dict[str, Any]:
    """One connection (runs in a thread): handshake, one echo, and what the client saw."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name, session=session) as s:
            s.sendall(b"ping")
            reply = s.recv(4096)
            return {
                "cert": x509.load_der_x509_certificate(s.getpeercert(binary_form=True)),
                "version": s.version(),
                "cipher": s.cipher()[0],
                "alpn": s.selected_alpn_protocol(),
                "reply": reply,
                "session": s.session,
                "reused": s.session_reused,
            }


def talk(port: Any, ctx: ssl.SSLContext, server_name: str | None = None, session: Any = None) -> Any:
    return threads.deferToThread(_talk, port.getHost().port, ctx, server_name, session)


@pytest_twisted.inlineCallbacks
def refused(port: Any, ctx: ssl.SSLContext, server_name: str | None = None) -> Any:
    """The C{ssl.SSLError} a connection ends with (the handshake, or the first read in TLS 1.3)."""
    try:
        result = yield talk(port, ctx, server_name)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        return e
    raise AssertionError(f"the connection was accepted: {result['version']} {result['cipher']}")


# ---------------------------------------------------------------------------
# Tests


@pytest_twisted.inlineCallbacks
def test_sni_picks_the_certificate_and_the_first_is_the_default(pki: PKI) -> None:
    port, _ = yield _listen(pki.profile("www-ec", "api", "apps"))
    try:
        ctx = _client_context(pki)
        loose = _client_context(pki, verify=False)
        www = yield talk(port, ctx, "www.example.test")
        api = yield talk(port, ctx, "api.example.test")
        app = yield talk(port, ctx, "shop.apps.example.test")
        unknown = yield talk(port, loose, "nobody.example.test")
        nosni = yield talk(port, loose, None)
        deep = yield talk(port, loose, "a.b.apps.example.test")
    finally:
        yield port.stopListening()
    assert _fingerprint(www["cert"]) == _fingerprint(pki.www_ec)
    assert _fingerprint(api["cert"]) == _fingerprint(pki.api)
    assert _fingerprint(app["cert"]) == _fingerprint(pki.apps)
    # A wildcard covers one label only; anything else gets the first certificate.
    for result in (unknown, nosni, deep):
        assert _fingerprint(result["cert"]) == _fingerprint(pki.www_ec)
    # The chain was sent: the client trusts only the root, not the intermediate.
    assert www["reply"].endswith(b"|ping")


@pytest_twisted.inlineCallbacks
def test_rsa_and_ecdsa_for_one_name_are_chosen_by_the_client(pki: PKI) -> None:
    port, _ = yield _listen(pki.profile("www-rsa", "www-ec"))
    try:
        tls12 = dict(maximum=ssl.TLSVersion.TLSv1_2)
        rsa_only = yield talk(port, _client_context(pki, ciphers="ECDHE-RSA-AES128-GCM-SHA256", **tls12),
                              "www.example.test")
        ec_only = yield talk(port, _client_context(pki, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256", **tls12),
                             "www.example.test")
    finally:
        yield port.stopListening()
    assert _fingerprint(rsa_only["cert"]) == _fingerprint(pki.www_rsa)
    assert _fingerprint(ec_only["cert"]) == _fingerprint(pki.www_ec)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest_twisted.inlineCallbacks
def test_tls_1_0_and_1_1_and_weak_ciphers_are_refused(pki: PKI) -> None:
    port, _ = yield _listen(pki.profile("www-rsa"))
    try:
        errors = []
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            # SECLEVEL=0 so that the client itself is willing to speak the old versions.
            ctx = _client_context(pki, minimum=version, maximum=version, ciphers="ALL:@SECLEVEL=0")
            errors.append((yield refused(port, ctx, "www.example.test")))
        for weak in ("AES128-SHA:AES256-SHA:DES-CBC3-SHA", "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384",
                     "AES128-GCM-SHA256:AES256-GCM-SHA384"):
            ctx = _client_context(pki, maximum=ssl.TLSVersion.TLSv1_2, ciphers=weak + ":@SECLEVEL=0")
            errors.append((yield refused(port, ctx, "www.example.test")))
        good = yield talk(port, _client_context(pki, maximum=ssl.TLSVersion.TLSv1_2), "www.example.test")
        tls13 = yield talk(port, _client_context(pki), "www.example.test")
    finally:
        yield port.stopListening()
    assert all(isinstance(e, ssl.SSLError) for e in errors), errors
    assert "PROTOCOL_VERSION" in str(errors[0]) and "PROTOCOL_VERSION" in str(errors[1])
    assert all("HANDSHAKE_FAILURE" in str(e) for e in errors[2:]), errors
    assert good["version"] == "TLSv1.2" and good["cipher"] in INTERMEDIATE_CIPHERS.split(":")
    assert tls13["version"] == "TLSv1.3"


@pytest_twisted.inlineCallbacks
def test_min_version_1_3(pki: PKI) -> None:
    port, _ = yield _listen(pki.profile("www-ec", min_version="1.3"))
    try:
        error = yield refused(port, _client_context(pki, maximum=ssl.TLSVersion.TLSv1_2), "www.example.test")
        ok = yield talk(port, _client_context(pki), "www.example.test")
    finally:
        yield port.stopListening()
    assert "PROTOCOL_VERSION" in str(error)
    assert ok["version"] == "TLSv1.3"


@pytest_twisted.inlineCallbacks
def test_alpn_on_http_listeners_only(pki: PKI) -> None:
    http_port, _ = yield _listen(pki.profile("www-ec"))
    h1_port, _ = yield _listen(pki.profile("www-ec", alpn=("http/1.1",)))
    tcp_port, _ = yield _listen(pki.profile("www-ec"), http=False)
    try:
        both = _client_context(pki, alpn=["http/1.1", "h2"])
        h2 = yield talk(http_port, both, "www.example.test")
        h1 = yield talk(http_port, _client_context(pki, alpn=["http/1.1"]), "www.example.test")
        other = yield talk(http_port, _client_context(pki, alpn=["spdy/3"]), "www.example.test")
        none = yield talk(http_port, _client_context(pki), "www.example.test")
        only_h1 = yield talk(h1_port, both, "www.example.test")
        tcp = yield talk(tcp_port, both, "www.example.test")
    finally:
        for p in (http_port, h1_port, tcp_port):
            yield p.stopListening()
    # The server's preference wins over the client's order.
    assert h2["alpn"] == "h2" and h2["reply"].startswith(b"h2|")
    assert h1["alpn"] == "http/1.1" and h1["reply"].startswith(b"http/1.1|")
    # No common protocol is not a failure: the client gets no ALPN and HTTP/1.1.
    assert other["alpn"] is None and none["alpn"] is None and none["reply"].startswith(b"-|")
    assert only_h1["alpn"] == "http/1.1"
    assert tcp["alpn"] is None


@pytest_twisted.inlineCallbacks
def test_mutual_tls(pki: PKI) -> None:
    port, _ = yield _listen(pki.profile("www-ec", client_ca=pki.client_ca_path))
    try:
        alice = yield talk(port, _client_context(pki, cert="alice"), "www.example.test")
        ctx12 = _client_context(pki, cert="alice", maximum=ssl.TLSVersion.TLSv1_2)
        alice12 = yield talk(port, ctx12, "www.example.test")
        resumed = yield talk(port, ctx12, "www.example.test", session=alice12["session"])
        anonymous = yield refused(port, _client_context(pki), "www.example.test")
        mallory = yield refused(port, _client_context(pki, cert="mallory"), "www.example.test")
    finally:
        yield port.stopListening()
    assert alice["reply"] == b"-|CN=alice,O=rproxy tests|ping"
    assert alice12["reply"].endswith(b"|CN=alice,O=rproxy tests|ping")
    # A resumed session still knows who the client is.
    assert resumed["reused"] and resumed["reply"].endswith(b"|CN=alice,O=rproxy tests|ping")
    assert "CERTIFICATE_REQUIRED" in str(anonymous) or "HANDSHAKE_FAILURE" in str(anonymous), anonymous
    assert "UNKNOWN_CA" in str(mallory) or "BAD_CERTIFICATE" in str(mallory), mallory


def _s_client(port: int) -> str:
    """What C{openssl s_client} prints for one handshake (runs in a thread)."""
    done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "www.example.test"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    return done.stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest_twisted.inlineCallbacks
def test_mutual_tls_names_the_accepted_ca(pki: PKI) -> None:
    # Browsers offer only the client certificates whose issuer the server names.
    port, _ = yield _listen(pki.profile("www-ec", client_ca=pki.client_ca_path))
    try:
        out = yield threads.deferToThread(_s_client, port.getHost().port)
    finally:
        yield port.stopListening()
    names = out.split("Acceptable client certificate CA names", 1)
    assert len(names) == 2, out
    assert "rproxy client CA" in names[1].split("Requested Signature Algorithms", 1)[0], out


@pytest_twisted.inlineCallbacks
def test_sessions_resume_until_the_ticket_keys_rotate(pki: PKI) -> None:
    port, factory = yield _listen(pki.profile("www-ec", "api"))
    try:
        results = {}
        for label, maximum in (("1.2", ssl.TLSVersion.TLSv1_2), ("1.3", None)):
            ctx = _client_context(pki, maximum=maximum)
            first = yield talk(port, ctx, "api.example.test")
            again = yield talk(port, ctx, "api.example.test", session=first["session"])
            factory.contexts.rotate_ticket_keys()
            rotated = yield talk(port, ctx, "api.example.test", session=again["session"])
            results[label] = (first, again, rotated)
    finally:
        yield port.stopListening()
    for label, (first, again, rotated) in results.items():
        assert not first["reused"], label
        assert again["reused"], label
        assert _fingerprint(again["cert"]) == _fingerprint(pki.api)
        assert not rotated["reused"], label


# ---------------------------------------------------------------------------
# Loading errors, reload and the watcher: no network needed


def _now_clock() -> Clock:
    clock = Clock()
    clock.advance(time.time())
    return clock


def _config_error(profile: TLSProfile, contexts: Any = ServerTLSContexts) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        contexts(_now_clock(), profile)
    return info.value


@pytest.mark.parametrize("contexts", [ServerTLSContexts, StdlibTLSContexts], ids=["pyopenssl", "ssl"])
def test_loading_errors_are_one_line_config_errors(pki: PKI, tmp_path: Any, contexts: Any) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(open(pki.path("api.key"), "rb").read(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    weak = tmp_path / "weak.key"
    weak.write_bytes(_key_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    good = pki.entry("api")
    cases = {
        "missing": (TLSProfile("main", (good, CertificateConfig(str(tmp_path / "nope.pem"), good.key))),
                    str(tmp_path / "nope.pem"), "tls.main.certificates[1].cert", "cannot read: No such file"),
        "mismatch": (TLSProfile("main", (CertificateConfig(good.cert, pki.path("other.key")),)),
                     pki.path("other.key"), "tls.main.certificates[0].key", "does not match the certificate"),
        "expired": (pki.profile("expired"), pki.path("expired.pem"), "tls.main.certificates[0].cert",
                    "certificate expired on "),
        "garbage": (TLSProfile("main", (CertificateConfig(str(garbage), good.key),)), str(garbage),
                    "tls.main.certificates[0].cert", "no PEM certificate"),
        "encrypted": (TLSProfile("main", (CertificateConfig(good.cert, str(encrypted)),)), str(encrypted),
                      "tls.main.certificates[0].key", "encrypted"),
        "not a key": (TLSProfile("main", (CertificateConfig(good.cert, str(garbage)),)), str(garbage),
                      "tls.main.certificates[0].key", "no usable PEM private key"),
        "client ca": (pki.profile("api", client_ca=str(tmp_path / "ca-nope.pem")), str(tmp_path / "ca-nope.pem"),
                      "tls.main.client_ca", "cannot read"),
    }
    if contexts is StdlibTLSContexts:
        del cases["client ca"]  # mutual-TLS profiles are served by pyOpenSSL only
    for label, (profile, path, key, problem) in cases.items():
        error = _config_error(profile, contexts)
        line = str(error)
        assert "\n" not in line, label
        assert (error.source, error.key) == (path, key), (label, line)
        assert problem in error.problem, (label, line)
        assert line.startswith(f"{path}: {key}: "), line


def _copy(pki: PKI, name: str, cert: str, key: str, mtime: float) -> None:
    shutil.copyfile(pki.path(f"{name}.pem"), cert)
    shutil.copyfile(pki.path(f"{name}.key"), key)
    for path in (cert, key):
        os.utime(path, (mtime, mtime))


def test_both_tls_listener_factories_reload_their_certificates_on_sighup(pki: PKI) -> None:
    profile = TLSProfile("main", (CertificateConfig(pki.path("api.pem"), pki.path("api.key")),))
    for http in (True, False):  # the ssl-module transport (HTTP) and Twisted's (raw TCP)
        factory = tls_server_factory(_now_clock(), profile, Factory.forProtocol(Protocol), http=http)
        assert verifyObject(ICertificateReload, factory) and factory.reload()


def test_watcher_reloads_changed_files_and_keeps_serving_on_bad_ones(pki: PKI, tmp_path: Any) -> None:
    cert, key = str(tmp_path / "site.pem"), str(tmp_path / "site.key")
    _copy(pki, "api", cert, key, 1_000_000)
    clock = _now_clock()
    contexts = ServerTLSContexts(clock, TLSProfile("main", (CertificateConfig(cert, key),)),
                                 ticket_rotation=3600, watch_interval=5)
    verifyObject(IOpenSSLServerConnectionCreator, contexts)
    contexts.start()
    clock.advance(5)
    assert contexts.reloads == 0 and contexts.certificates == [pki.api]
    _copy(pki, "other", cert, key, 1_000_100)
    clock.advance(5)
    assert contexts.reloads == 1 and contexts.certificates == [pki.other]
    # A renewed certificate lands before its key: the old pair keeps serving...
    shutil.copyfile(pki.path("apps.pem"), cert)
    os.utime(cert, (1_000_200, 1_000_200))
    clock.advance(5)
    assert contexts.reloads == 1 and contexts.certificates == [pki.other]
    assert contexts.reload_failures == 1
    clock.advance(5)
    assert contexts.reload_failures == 1, "a failed reload is not retried until a file changes"
    # ...until the key lands too.
    shutil.copyfile(pki.path("apps.key"), key)
    os.utime(key, (1_000_300, 1_000_300))
    clock.advance(5)
    assert contexts.reloads == 2 and contexts.certificates == [pki.apps]
    assert contexts.rotations == 0
    clock.advance(3600)
    assert contexts.rotations == 1
    contexts.stop()
    assert clock.getDelayedCalls() == []


@pytest_twisted.inlineCallbacks
def test_reload_swaps_certificates_for_new_connections(pki: PKI, tmp_path: Any) -> None:
    cert, key = str(tmp_path / "site.pem"), str(tmp_path / "site.key")
    _copy(pki, "www-ec", cert, key, 1_000_000)
    port, factory = yield _listen(TLSProfile("main", (CertificateConfig(cert, key),)), watch_interval=None)
    try:
        loose = _client_context(pki, verify=False)
        before = yield talk(port, loose, "www.example.test")
        _copy(pki, "api", cert, key, 1_000_100)
        assert factory.reload()
        after = yield talk(port, loose, "www.example.test")
        shutil.copyfile(pki.path("other.key"), key)
        assert not factory.reload()
        still = yield talk(port, loose, "www.example.test")
    finally:
        yield port.stopListening()
    assert _fingerprint(before["cert"]) == _fingerprint(pki.www_ec)
    assert _fingerprint(after["cert"]) == _fingerprint(pki.api)
    assert _fingerprint(still["cert"]) == _fingerprint(pki.api)
    assert factory.contexts._watcher is None and factory.contexts._rotator is None


# ---------------------------------------------------------------------------
# Through the proxy: https in front, plain or verified TLS behind


class _Origin(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def render_GET(self, request: Any) -> bytes:
        self.seen.append(request.requestHeaders)
        return b"hello from the origin"


def _https_client(pki: PKI) -> Any:
    from treq.client import HTTPClient
    from twisted.internet.ssl import Certificate
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    with open(pki.ca_path, "rb") as f:
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(f.read()))
    return HTTPClient(Agent(_reactor(), contextFactory=policy))


def _proxy(pki: PKI, backend: str) -> Any:
    from rproxy_tw.config import parse_config
    from rproxy_tw.service import ProxyService

    config = parse_config({
        "server": {"access_log": "off"},
        "listen": [{"endpoint": "tcp:0:interface=127.0.0.1", "protocol": "http", "tls": "main"}],
        "tls": {"main": {"certificates": [{"cert": pki.path("www-ec.pem"), "key": pki.path("www-ec.key")}]}},
        "route": [{"path": "/", "pool": "web"}],
        "pool": {"web": {"backends": [backend], "retries": 0}},
    }, source="test.toml")
    return ProxyService(config, _reactor())


@pytest_twisted.inlineCallbacks
def test_https_through_the_proxy(pki: PKI) -> None:
    origin = _Origin()
    origin_port = _reactor().listenTCP(0, Site(origin), interface="127.0.0.1")
    service = _proxy(pki, f"tcp:127.0.0.1:{origin_port.getHost().port}")
    service.startService()
    port = (yield service.listening())[0].getHost().port
    try:
        response = yield _https_client(pki).get(f"https://localhost:{port}/hello")
        body = yield response.content()
    finally:
        yield service.stopService()
        yield origin_port.stopListening()
    assert response.code == 200
    assert body == b"hello from the origin"
    headers = origin.seen[0]
    assert headers.getRawHeaders(b"x-forwarded-proto") == [b"https"]
    assert b"proto=https" in b",".join(headers.getRawHeaders(b"forwarded"))


@pytest_twisted.inlineCallbacks
def test_tls_to_origins_verifies_the_name(pki: PKI) -> None:
    """
    The C{tls:} endpoint string verifies the origin's certificate and name
    (here an IP address, 127.0.0.1): a certificate for another name gives 502
    and a log line that says why.
    """
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    origins, codes, bodies = [], [], []
    try:
        for name in ("www-ec", "other"):
            origin = _Origin()
            origin_factory = tls_server_factory(_reactor(), pki.profile(name), Site(origin), watch_interval=None)
            origin_port = yield serverFromString(_reactor(), "tcp:0:interface=127.0.0.1").listen(origin_factory)
            service = _proxy(pki, f"tls:127.0.0.1:{origin_port.getHost().port}:trustRoots={pki.trust_dir}")
            service.startService()
            port = (yield service.listening())[0].getHost().port
            try:
                response = yield _https_client(pki).get(f"https://localhost:{port}/")
                bodies.append((yield response.content()))
                codes.append(response.code)
                origins.append(origin)
            finally:
                yield service.stopService()
                yield origin_port.stopListening()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert codes == [200, 502], bodies
    assert bodies[0] == b"hello from the origin"
    assert len(origins[0].seen) == 1 and origins[1].seen == []
    from twisted.logger import formatEvent

    why = [formatEvent(e) for e in events if e.get("log_level") is not None and "backend" in formatEvent(e)]
    assert any("127.0.0.1" in line and ("mismatch" in line.lower() or "verif" in line.lower()) for line in why), why
