"""
Automatic HTTPS against a real ACME server: Debian's C{pebble}, with
C{pebble-challtestsrv} as its DNS (every name is 127.0.0.1), its HTTP-01 and
TLS-ALPN-01 validators pointed at the proxy's listeners, its directory served
over TLS with a CA this test makes (given to the proxy as C{[acme] ca}).

Each test starts its own pebble (it keeps no state, and a test stops it).
Skipped only when the pebble binaries are absent.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import globalLogPublisher

from rproxy_tw import ProxyService, parse_config

from .conftest import Net, OriginRequest, RawClient, curl, free_port, request, until

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"

pytestmark = pytest.mark.skipif(
    not (os.access(PEBBLE, os.X_OK) and os.access(CHALLTESTSRV, os.X_OK)),
    reason="the pebble ACME test server is not installed (Debian package 'pebble')",
)

ISSUE_GUARD = 60.0
"""Seconds before waiting for an issuance is declared hung (pebble issues in about a second)."""


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else b""
            raise RuntimeError(f"{what} exited with {process.returncode}: {output!r}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)  # polling a child's port before the test begins, with a deadline
    raise RuntimeError(f"{what} did not listen on {port} within {deadline} s")


def _directory_ca(folder: str) -> tuple[str, str, str]:
    """A CA, and a certificate for 127.0.0.1 it signs: pebble's directory listens with it.  (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble directory test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tuple(os.path.join(folder, n) for n in ("directory-ca.pem", "directory.pem", "directory.key"))
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths  # type: ignore[return-value]


class Pebble:
    """pebble and its DNS, with the ports the proxy must listen on for its validators."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.http_port = free_port()
        self.tls_port = free_port()
        self.port = free_port()
        self.management = free_port()
        self.dns = free_port()
        self.ca, self.cert, self.key = _directory_ca(folder)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pebble: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> None:
        dns = subprocess.Popen(
            [CHALLTESTSRV, "-dns01", f"127.0.0.1:{self.dns}", "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-management", f"127.0.0.1:{free_port()}", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.processes.append(dns)
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": self.cert, "privateKey": self.key, "httpPort": self.http_port, "tlsPort": self.tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
            "certificateValidityPeriod": 3600,
        }}
        path = os.path.join(self.folder, "pebble.json")
        with open(path, "w") as f:
            json.dump(config, f)
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        self.pebble = subprocess.Popen([PEBBLE, "-config", path, "-dnsserver", f"127.0.0.1:{self.dns}"],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.processes.append(self.pebble)
        _wait_for_port(self.port, self.pebble, "pebble")
        _wait_for_port(self.management, self.pebble, "pebble management")

    def root(self) -> bytes:
        """The root CA pebble issues under (fetched now: pebble makes a new one each start)."""
        context = ssl.create_default_context(cafile=self.ca)
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management}/roots/0", context=context,
                                    timeout=10) as answer:
            return answer.read()

    def stop_pebble(self) -> None:
        if self.pebble is not None and self.pebble.poll() is None:
            self.pebble.terminate()
            self.pebble.wait(10)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()


@pytest.fixture
def pebble(tmp_path: Any) -> Any:
    server = Pebble(str(tmp_path))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def logged() -> Any:
    """The text of every log event while the test runs."""
    from twisted.logger import formatEvent

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def acme_config(pebble: Pebble, storage: str, names: list[str], origin: str, plain: bool = True,
                challenges: list[str] | None = None) -> dict[str, Any]:
    listen: list[dict[str, Any]] = [{"endpoint": f"tcp:{pebble.tls_port}:interface=127.0.0.1", "tls": "auto"}]
    if plain:
        # Everyone else is sent to https: the CA's validator is answered first.
        listen.append({"endpoint": f"tcp:{pebble.http_port}:interface=127.0.0.1", "redirect_https": 443})
    return {
        "listen": listen,
        "tls": {"auto": {"acme": names}},
        "acme": {"directory": pebble.directory, "email": "ops@example.com", "storage": storage, "ca": pebble.ca,
                 "challenges": challenges or ["http-01", "tls-alpn-01"]},
        "route": [{"path": "/", "pool": "p"}],
        "pool": {"p": {"backends": [origin]}},
        "server": {"access_log": "off"},
    }


async def start_proxy(net: Net, config: dict[str, Any]) -> ProxyService:
    service = ProxyService(parse_config(config, source="test.toml"), reactor)
    service.startService()
    net.services.append(service)
    await service.listening()
    return service


def issued(service: ProxyService, name: str) -> Any:
    return until(lambda: service.acme.status()[name]["not_after"] is not None, f"a certificate for {name}",
                 timeout=ISSUE_GUARD)


async def tls_client(net: Net, port: int, name: str, root: bytes) -> RawClient:
    """A client that trusts only pebble's root and checks the name: a handshake that completes is verified."""
    proto = RawClient()
    factory = Factory.forProtocol(lambda: proto)
    factory.noisy = False
    options = optionsForClientTLS(name, trustRoot=Certificate.loadPEM(root))
    await wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port)).connect(factory)
    net.protocols.append(proto)
    return proto


async def served_serial(net: Net, port: int, name: str, root: bytes) -> int:
    client = await tls_client(net, port, name, root)
    client.send(request(b"GET", b"/who", host=name.encode()))
    (answer,) = await client.until_responses([b"GET"])
    assert answer.status == 200
    serial = client.transport.getPeerCertificate().get_serial_number()
    client.transport.loseConnection()
    return serial


@pytest_twisted.ensureDeferred
async def test_http01_issues_a_verified_certificate_stored_privately_and_reused_on_restart(
        net: Net, pebble: Pebble, tmp_path: Any, logged: list[str]) -> None:
    origin = await net.origin()
    storage = str(tmp_path / "acme")
    name = "http01.example.com"
    service = await start_proxy(net, acme_config(pebble, storage, [name], origin.backend, challenges=["http-01"]))
    await issued(service, name)
    root = pebble.root()
    serial = await served_serial(net, pebble.tls_port, name, root)
    assert serial == service.acme.status()[name]["serial"]
    # A real client that trusts only pebble's root: a verified handshake for the name.
    with open(tmp_path / "root.pem", "wb") as f:
        f.write(root)
    out, err, code = await curl("--cacert", str(tmp_path / "root.pem"), "--resolve",
                                f"{name}:{pebble.tls_port}:127.0.0.1", f"https://{name}:{pebble.tls_port}/curl")
    assert code == 0, err
    assert out.startswith(b"GET /curl")
    # The plain listener still redirects everyone else.
    out, err, code = await curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{pebble.http_port}/x")
    assert out == b"308"
    lines = [line for line in logged if line.startswith(f"acme: certificate for {name} issued")]
    assert len(lines) == 1 and "by http-01" in lines[0] and "next renewal at" in lines[0], logged
    # Stored with mode 0600, in a 0700 folder.
    stored = tmp_path / "acme" / "certificates" / f"{name}.pem"
    assert oct(stored.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "acme" / "account.key").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "acme").stat().st_mode & 0o777) == "0o700"
    # A restart serves the stored certificate at once, without asking the CA.
    await service.stopService()
    net.services.remove(service)
    logged.clear()
    again = await start_proxy(net, acme_config(pebble, storage, [name], origin.backend, challenges=["http-01"]))
    assert again.acme.status()[name]["serial"] == serial
    assert await served_serial(net, pebble.tls_port, name, root) == serial
    assert not [line for line in logged if "acme: certificate for" in line]


@pytest_twisted.ensureDeferred
async def test_tls_alpn01_issues_with_only_the_https_listener(net: Net, pebble: Pebble, tmp_path: Any,
                                                              logged: list[str]) -> None:
    origin = await net.origin()
    name = "alpn.example.com"
    from rproxy_tw.events import CertificateChanged, EventRecorder

    config = acme_config(pebble, str(tmp_path / "acme"), [name], origin.backend, plain=False)
    service = ProxyService(parse_config(config, source="test.toml"), reactor)
    recorder = EventRecorder()
    service.runtime.events.subscribe(recorder)  # what metrics will observe
    service.startService()
    net.services.append(service)
    await service.listening()
    await issued(service, name)
    assert [(e.name, e.how) for e in recorder.of(CertificateChanged)] == [(name, "issued")]
    assert await served_serial(net, pebble.tls_port, name, pebble.root()) == service.acme.status()[name]["serial"]
    assert any(line.startswith(f"acme: certificate for {name} issued by tls-alpn-01") for line in logged), logged


@pytest_twisted.ensureDeferred
async def test_forced_renewal_swaps_the_certificate_under_a_download_and_a_kept_alive_connection(
        net: Net, pebble: Pebble, tmp_path: Any, logged: list[str]) -> None:
    total = 1 << 20
    started: list[OriginRequest] = []

    def handler(req: OriginRequest) -> None:
        if req.target == b"/download":
            req.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total + b"a" * (total // 2))
            started.append(req)
        else:
            req.respond(200, b"small")

    origin = await net.origin(handler)
    name = "renew.example.com"
    service = await start_proxy(net, acme_config(pebble, str(tmp_path / "acme"), [name], origin.backend))
    await issued(service, name)
    root = pebble.root()
    first = service.acme.status()[name]["serial"]
    client = await tls_client(net, pebble.tls_port, name, root)
    client.send(request(b"GET", b"/download", host=name.encode()))
    await until(lambda: started and len(client.buf) > total // 4, "half of the download")
    result = await service.acme.renew(name)
    assert result.issued and result.stored.serial != first
    # New connections get the new certificate...
    assert await served_serial(net, pebble.tls_port, name, root) == result.stored.serial
    # ...while the download goes on to its end on the old one, and the connection stays usable.
    started[0].write(b"b" * (total - total // 2))
    (download,) = await client.until_responses([b"GET"])
    assert download.status == 200 and download.body == b"a" * (total // 2) + b"b" * (total - total // 2)
    assert client.transport.getPeerCertificate().get_serial_number() == first
    client.send(request(b"GET", b"/again", host=name.encode()))
    answers = await client.until_responses([b"GET", b"GET"])
    assert answers[1].status == 200 and answers[1].body == b"small"
    assert any(line.startswith(f"acme: certificate for {name} renewed") for line in logged), logged


@pytest_twisted.ensureDeferred
async def test_a_failing_ca_leaves_the_certificate_serving_and_logs_the_retry(
        net: Net, pebble: Pebble, tmp_path: Any, logged: list[str]) -> None:
    from rproxy_tw.acme import AcmeFailure

    origin = await net.origin()
    name = "fail.example.com"
    service = await start_proxy(net, acme_config(pebble, str(tmp_path / "acme"), [name], origin.backend))
    await issued(service, name)
    root = pebble.root()
    serial = service.acme.status()[name]["serial"]
    pebble.stop_pebble()
    logged.clear()
    with pytest.raises(AcmeFailure):
        await service.acme.renew(name)
    status = service.acme.status()[name]
    assert status["serial"] == serial and status["failures"] == 1
    assert status["next_attempt"] > reactor.seconds()
    (line,) = [line for line in logged if line.startswith("acme: ")]
    assert f"for {name} failed (1 in a row): cannot reach the CA" in line
    assert "keeps serving; next attempt at " in line
    assert await served_serial(net, pebble.tls_port, name, root) == serial


@pytest_twisted.ensureDeferred
async def test_two_managers_sharing_the_storage_folder_issue_once(net: Net, pebble: Pebble, tmp_path: Any,
                                                                  logged: list[str]) -> None:
    """
    A second manager on the same folder (its own file descriptors, so its
    own flock, as another process's would be) starts while the first is
    validating: it waits on the lock, then takes the stored certificate.
    """
    from rproxy_tw.acme import AcmeManager

    origin = await net.origin()
    name = "shared.example.com"
    config = acme_config(pebble, str(tmp_path / "acme"), [name], origin.backend, challenges=["http-01"])
    service = await start_proxy(net, config)
    await until(lambda: service.acme.responder.http01, "the first manager's challenge", timeout=ISSUE_GUARD)
    other = AcmeManager(reactor, parse_config(config, source="test.toml"), min_backoff=0.2)
    other.startService()
    try:
        await issued(service, name)
        await until(lambda: other.status()[name]["serial"] is not None, "the second manager's certificate",
                    timeout=ISSUE_GUARD)
        assert other.status()[name]["serial"] == service.acme.status()[name]["serial"]
    finally:
        other.stopService()
    assert len([line for line in logged if line.startswith(f"acme: certificate for {name} issued")]) == 1
    assert any(line.startswith(f"acme: certificate for {name} picked up from the storage folder")
               for line in logged), logged
