"""
rproxy_tw.acme without a CA: the renewal schedule and back-off, the
ClientHello reader, the storage folder (atomic private files, the lock), the
manager's decisions on an injected clock with a stand-in issuer, and the
challenge answers on real listeners.  tests/test_acme_pebble.py runs the
whole exchange against a real ACME server.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import stat
import struct
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from rproxy_tw import ProxyService, parse_config
from rproxy_tw.acme import AcmeFailure, IssueResult
from rproxy_tw.acme.challenges import ACME_IDENTIFIER, ClientHello, TLSALPNChallenge, client_hello
from rproxy_tw.acme.client import LockBusy, issue_blocking
from rproxy_tw.acme.manager import AcmeManager
from rproxy_tw.acme.schedule import backoff, renewal_time, retry_after_seconds
from rproxy_tw.acme.storage import AcmeStorage, self_signed
from rproxy_tw.config import AcmeConfig, ConfigError

from .conftest import Net, free_port, request

NOW = 1_800_000_000.0


# ---------------------------------------------------------------------------
# The schedule


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.floats(0, 2e9), st.floats(60, 400 * 86400), st.integers(0, 2**32))
def test_renewal_comes_between_three_fifths_and_two_thirds_of_the_lifetime(start: float, lifetime: float,
                                                                            seed: int) -> None:
    when = renewal_time(start, start + lifetime, random.Random(seed))
    assert start + lifetime * (2 / 3 - 0.05) - 1e-6 <= when <= start + lifetime * 2 / 3 + 1e-6


def test_renewal_information_wins_when_it_comes_before_expiry() -> None:
    rng = random.Random(1)
    assert renewal_time(0, 90 * 86400, rng, suggested=10 * 86400) == 10 * 86400
    assert renewal_time(0, 90, rng, suggested=1000) <= 60  # a window past expiry is not believed


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.integers(1, 60), st.integers(0, 2**32), st.one_of(st.none(), st.floats(0, 1e6)))
def test_backoff_doubles_up_to_the_cap_and_never_undercuts_retry_after(failures: int, seed: int,
                                                                       retry_after: float | None) -> None:
    delay = backoff(failures, random.Random(seed), 60, 3600, retry_after)
    base = min(3600, 60 * 2 ** (failures - 1))
    assert delay >= base and (delay <= base * 1.1 or (retry_after is not None and delay == retry_after))
    if retry_after is not None:
        assert delay >= retry_after


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert retry_after_seconds("120", NOW) == 120
    assert retry_after_seconds("Fri, 15 Jan 2027 08:00:00 GMT", 1_800_000_000.0 - 100) is not None
    assert retry_after_seconds("Thu, 01 Jan 1970 00:00:00 GMT", NOW) == 0
    assert retry_after_seconds("soon", NOW) is None
    assert retry_after_seconds(None, NOW) is None


# ---------------------------------------------------------------------------
# The ClientHello


def real_hello(name: str | None, alpn: list[str]) -> bytes:
    """The first flight of the standard library's TLS client."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_client_hello_gives_the_name_and_the_protocols_once_whole() -> None:
    hello = real_hello("Alpn.Example.com", ["acme-tls/1"])
    assert client_hello(hello) == ClientHello("alpn.example.com", (b"acme-tls/1",))
    assert client_hello(real_hello("www.example.com", ["h2", "http/1.1"])) == \
        ClientHello("www.example.com", (b"h2", b"http/1.1"))
    for cut in range(len(hello)):
        assert client_hello(hello[:cut]) is None


def test_client_hello_split_over_two_records_is_read() -> None:
    hello = real_hello("alpn.example.com", ["acme-tls/1"])
    message = hello[5:]
    first, second = message[:40], message[40:]
    framed = b"".join(b"\x16\x03\x01" + struct.pack("!H", len(part)) + part for part in (first, second))
    assert client_hello(framed[:50]) is None
    assert client_hello(framed) == ClientHello("alpn.example.com", (b"acme-tls/1",))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=300))
def test_client_hello_never_fails_on_garbage(data: bytes) -> None:
    result = client_hello(data)
    assert result is None or isinstance(result, ClientHello)
    result = client_hello(b"\x16\x03\x01\x00\x40\x01\x00\x00\x3c" + data)
    assert result is None or isinstance(result, ClientHello)


def test_tls_alpn01_certificate_carries_the_key_authorization_digest() -> None:
    import hashlib

    challenge = TLSALPNChallenge("alpn.example.com", b"token.thumbprint", NOW)
    cert = x509.load_pem_x509_certificate(challenge.pem)
    extension = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    assert extension.critical
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["alpn.example.com"]


# ---------------------------------------------------------------------------
# Storage


def test_storage_writes_private_files_whole_and_reads_back_only_valid_ones(tmp_path: Any) -> None:
    storage = AcmeStorage(str(tmp_path / "acme"))
    storage.prepare()
    path = storage.certificate_path("www.example.com")
    storage.write(path, self_signed("www.example.com", NOW))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp")] == []
    stored = storage.read(path, NOW)
    assert stored is not None and stored.names == ("www.example.com",)
    assert storage.read(path, NOW + 8 * 86400) is None  # expired
    key = storage.account_key()
    assert storage.account_key().private_numbers() == key.private_numbers()  # reused
    assert stat.S_IMODE(os.stat(tmp_path / "acme" / "account.key").st_mode) == 0o600
    # A certificate with another one's key is not a certificate.
    other = self_signed("www.example.com", NOW)
    storage.write(path, self_signed("www.example.com", NOW).split(b"-----BEGIN PRIVATE KEY")[0]
                  + b"-----BEGIN PRIVATE KEY" + other.split(b"-----BEGIN PRIVATE KEY")[1])
    assert storage.read(path, NOW) is None


def test_the_lock_is_held_by_one_opener_at_a_time(tmp_path: Any) -> None:
    one, two = AcmeStorage(str(tmp_path)), AcmeStorage(str(tmp_path))
    one.prepare()
    fd = one.try_lock("www.example.com")
    assert fd is not None
    assert two.try_lock("www.example.com") is None
    assert two.try_lock("other.example.com") is not None
    one.unlock(fd)
    assert two.try_lock("www.example.com") is not None


def test_issue_takes_what_another_process_stored_without_asking_the_ca(tmp_path: Any) -> None:
    """The directory is a closed port: reaching for the CA would fail."""
    import time

    config = AcmeConfig(directory=f"https://127.0.0.1:{free_port()}/dir", storage=str(tmp_path))
    storage = AcmeStorage(str(tmp_path))
    storage.prepare()
    storage.write(storage.certificate_path("www.example.com"), self_signed("www.example.com", time.time(), days=30))
    result = issue_blocking(config, storage, None, "www.example.com", ("http-01",), None, False,  # type: ignore[arg-type]
                            None)
    assert not result.issued and result.stored.names == ("www.example.com",)
    # Held by another process: LockBusy, at once.
    fd = AcmeStorage(str(tmp_path)).try_lock("www.example.com")
    with pytest.raises(LockBusy):
        issue_blocking(config, storage, None, "www.example.com", ("http-01",), None, False,  # type: ignore[arg-type]
                       None)
    storage.unlock(fd)  # type: ignore[arg-type]
    # The same serial as served, or forced: the CA is asked (and here cannot be reached).
    with pytest.raises(AcmeFailure, match="cannot reach the CA"):
        issue_blocking(config, storage, None, "www.example.com", ("http-01",), result.stored.serial, False,
                       None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# The manager, on a clock


class FakeIssuer:
    """Stands in for the CA: each call is answered by the test."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], int | None, bool]] = []
        self.pending: list[Deferred[IssueResult]] = []

    def __call__(self, name: str, challenges: tuple[str, ...], serial: int | None, force: bool) -> Deferred[Any]:
        self.calls.append((name, challenges, serial, force))
        d: Deferred[IssueResult] = Deferred()
        self.pending.append(d)
        return d


def manager_config(tmp_path: Any, plain: bool = True) -> Any:
    listen = [{"endpoint": "tcp:8443", "tls": "auto"}]
    if plain:
        listen.append({"endpoint": "tcp:8080"})
    return parse_config({
        "listen": listen, "tls": {"auto": {"acme": ["www.example.com"]}},
        "acme": {"storage": str(tmp_path / "acme"), "challenges": ["tls-alpn-01", "http-01"]},
        "route": [{"path": "/", "pool": "p"}], "pool": {"p": {"backends": ["tcp:127.0.0.1:1"]}},
    }, source="test.toml")


@pytest.fixture
def logged() -> Any:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def stored_result(tmp_path: Any, now: float, days: int = 90, issued: bool = True) -> IssueResult:
    storage = AcmeStorage(str(tmp_path / "acme"))
    path = storage.certificate_path("www.example.com")
    storage.write(path, self_signed("www.example.com", now, days=days))
    stored = storage.read(path, now)
    assert stored is not None
    return IssueResult(stored, issued=issued, challenge="http-01" if issued else None)


def test_manager_issues_at_start_then_renews_at_two_thirds_and_backs_off_on_failure(tmp_path: Any,
                                                                                   logged: list[str]) -> None:
    from rproxy_tw.events import CertificateChanged, CertificateFailed, EventBus, EventRecorder

    clock = Clock()
    clock.advance(NOW)
    issuer = FakeIssuer()
    events, recorder = EventBus(), EventRecorder()
    events.subscribe(recorder)
    manager = AcmeManager(clock, manager_config(tmp_path), issue=issuer, rng=random.Random(7), events=events)
    assert any("temporary self-signed certificate for www.example.com" in line for line in logged)
    temporary = manager.certificates_for("auto")[0].cert
    manager.startService()
    clock.advance(0)
    assert issuer.calls == [("www.example.com", ("tls-alpn-01", "http-01"), None, False)]
    result = stored_result(tmp_path, NOW)
    issuer.pending.pop().callback(result)
    assert manager.certificates_for("auto")[0].cert == result.stored.path != temporary
    due = manager.status()["www.example.com"]["next_attempt"]
    lifetime = result.stored.not_after - result.stored.not_before
    assert result.stored.not_before + lifetime * (2 / 3 - 0.05) <= due <= result.stored.not_before + lifetime * 2 / 3
    (line,) = [line for line in logged if line.startswith("acme: certificate for")]
    assert line.startswith("acme: certificate for www.example.com issued by http-01 (valid until ")
    assert "; next renewal at " in line
    # Nothing before it is due; then a renewal, which fails twice: back-off, the certificate kept.
    clock.advance(due - clock.seconds() - 1)
    assert len(issuer.calls) == 1
    clock.advance(1)
    assert issuer.calls[-1] == ("www.example.com", ("tls-alpn-01", "http-01"), result.stored.serial, False)
    issuer.pending.pop().errback(AcmeFailure("the CA refused: boom"))
    first_retry = manager.status()["www.example.com"]["next_attempt"] - clock.seconds()
    assert 60 <= first_retry <= 66
    assert manager.certificates_for("auto")[0].cert == result.stored.path
    clock.advance(first_retry)
    issuer.pending.pop().errback(AcmeFailure("the CA refused: again", retry_after=3600, rate_limited=True))
    assert manager.status()["www.example.com"]["next_attempt"] - clock.seconds() == 3600  # Retry-After wins
    assert manager.status()["www.example.com"]["failures"] == 2
    failures = [line for line in logged if " failed (" in line]
    assert failures[0].startswith("acme: getting a certificate for www.example.com failed (1 in a row): "
                                  "the CA refused: boom; the certificate valid until ")
    assert failures[1].startswith("acme: rate limited for www.example.com failed (2 in a row)")
    assert all("keeps serving; next attempt at " in line for line in failures)
    assert [(e.name, e.how, e.not_after) for e in recorder.of(CertificateChanged)] == \
        [("www.example.com", "issued", result.stored.not_after)]
    assert [(e.failures, e.rate_limited, e.next_attempt) for e in recorder.of(CertificateFailed)][1] == \
        (2, True, clock.seconds() + 3600)
    manager.stopService()
    assert not clock.getDelayedCalls()


def test_a_busy_lock_is_looked_at_again_and_the_other_process_result_taken(tmp_path: Any,
                                                                           logged: list[str]) -> None:
    clock = Clock()
    clock.advance(NOW)
    issuer = FakeIssuer()
    manager = AcmeManager(clock, manager_config(tmp_path), issue=issuer, rng=random.Random(1), min_backoff=30)
    manager.startService()
    clock.advance(0)
    issuer.pending.pop().errback(LockBusy("www.example.com"))
    assert manager.status()["www.example.com"]["failures"] == 0
    assert any(line.startswith("acme: another process is getting the certificate for www.example.com; looking "
                               "in the storage folder again at ") for line in logged)
    clock.advance(30)
    issuer.pending.pop().callback(stored_result(tmp_path, NOW, issued=False))
    assert any("www.example.com picked up from the storage folder" in line for line in logged)


def test_forced_renewal_shares_an_attempt_in_flight_and_reports_failure(tmp_path: Any) -> None:
    clock = Clock()
    clock.advance(NOW)
    issuer = FakeIssuer()
    manager = AcmeManager(clock, manager_config(tmp_path), issue=issuer)
    manager.startService()
    clock.advance(0)
    forced = manager.renew("www.example.com")
    assert len(issuer.calls) == 1  # the start's attempt answers both
    failures: list[Any] = []
    forced.addErrback(failures.append)
    issuer.pending.pop().errback(AcmeFailure("no"))
    assert failures and failures[0].check(AcmeFailure)
    again = manager.renew("www.example.com")
    assert issuer.calls[-1][3] is True
    issuer.pending.pop().callback(stored_result(tmp_path, NOW))
    assert again.result.issued  # type: ignore[attr-defined]
    unknown: list[Any] = []
    manager.renew("other.example.com").addErrback(unknown.append)
    assert unknown[0].check(KeyError)


def test_only_the_challenges_a_listener_can_answer_are_used(tmp_path: Any) -> None:
    clock = Clock()
    issuer = FakeIssuer()
    manager = AcmeManager(clock, manager_config(tmp_path, plain=False), issue=issuer)
    manager.startService()
    clock.advance(0)
    assert issuer.calls[0][1] == ("tls-alpn-01",)


# ---------------------------------------------------------------------------
# The challenges on real listeners


def acme_service_config(tmp_path: Any, origin: str, http_port: int, https_port: int,
                        redirect: bool) -> dict[str, Any]:
    plain: dict[str, Any] = {"endpoint": f"tcp:{http_port}:interface=127.0.0.1"}
    if redirect:
        plain["redirect_https"] = 443
    return {
        "listen": [plain, {"endpoint": f"tcp:{https_port}:interface=127.0.0.1", "tls": "auto"}],
        "tls": {"auto": {"acme": ["www.example.com"]}},
        # A CA that cannot be reached: attempts fail (and back off); the listeners serve regardless.
        "acme": {"storage": str(tmp_path / "acme"), "directory": f"https://127.0.0.1:{free_port()}/dir"},
        "route": [{"path": "/", "pool": "p"}], "pool": {"p": {"backends": [origin]}},
        "server": {"access_log": "off"},
    }


async def start(net: Net, config: dict[str, Any]) -> ProxyService:
    service = ProxyService(parse_config(config, source="test.toml"), reactor)
    service.startService()
    net.services.append(service)
    await service.listening()
    return service


@pytest_twisted.ensureDeferred
async def test_http01_is_answered_before_the_redirect_and_unknown_tokens_go_on(net: Net, tmp_path: Any) -> None:
    origin = await net.origin()
    http_port, https_port = free_port(), free_port()
    service = await start(net, acme_service_config(tmp_path, origin.backend, http_port, https_port, redirect=True))
    service.acme.responder.http01[b"tok3n"] = b"tok3n.thumbprint"
    client = await net.client(http_port)
    client.send(request(b"GET", b"/.well-known/acme-challenge/tok3n", host=b"www.example.com"))
    client.send(request(b"GET", b"/.well-known/acme-challenge/other", host=b"www.example.com"))
    ok, other = await client.until_responses([b"GET", b"GET"])
    assert ok.status == 200 and ok.body == b"tok3n.thumbprint"
    assert ok.one(b"content-type") == b"application/octet-stream"
    assert other.status == 308  # not ours: the listener's own policy
    # Not on the TLS listener: there it is an ordinary path, for the routes.
    await deferToThread(https_get, https_port, "www.example.com", b"/.well-known/acme-challenge/tok3n")
    assert [r.target for r in origin.requests] == [b"/.well-known/acme-challenge/tok3n"]


def https_get(port: int, name: str, target: bytes) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(request(b"GET", target, host=name.encode()) + b"")
            return tls.recv(65536)


def handshake(port: int, name: str, alpn: list[str]) -> tuple[x509.Certificate, str | None]:
    """A blocking TLS handshake (run in a thread): the certificate served and the protocol chosen."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
            return x509.load_der_x509_certificate(der), tls.selected_alpn_protocol()


@pytest_twisted.ensureDeferred
async def test_tls_alpn01_certificate_goes_only_to_the_validator(net: Net, tmp_path: Any) -> None:
    origin = await net.origin()
    http_port, https_port = free_port(), free_port()
    service = await start(net, acme_service_config(tmp_path, origin.backend, http_port, https_port, redirect=False))
    # Before any challenge: the temporary certificate, at once (the listener did not wait for the CA).
    cert, protocol = await deferToThread(handshake, https_port, "www.example.com", ["h2", "http/1.1"])
    assert protocol == "h2"
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    temporary_serial = cert.serial_number
    service.acme.responder.tls_alpn01["www.example.com"] = TLSALPNChallenge("www.example.com", b"k.a", NOW)
    cert, protocol = await deferToThread(handshake, https_port, "www.example.com", ["acme-tls/1"])
    assert protocol == "acme-tls/1"
    assert cert.extensions.get_extension_for_oid(ACME_IDENTIFIER).critical
    # Everyone else still gets the name's certificate, during the challenge too.
    cert, protocol = await deferToThread(handshake, https_port, "www.example.com", ["h2", "http/1.1"])
    assert cert.serial_number == temporary_serial and protocol == "h2"
    cert, protocol = await deferToThread(handshake, https_port, "other.example.com", ["acme-tls/1"])
    assert cert.serial_number == temporary_serial and protocol is None


def test_acme_true_means_every_routed_host_name_but_wildcards(tmp_path: Any) -> None:
    from rproxy_tw.acme import acme_names

    config = parse_config({
        "listen": [{"endpoint": "tcp:8443", "tls": "auto"}],
        "tls": {"auto": {"acme": True}, "list": {"acme": ["a.example.com"]}},
        "route": [{"host": "WWW.example.com.", "path": "/", "pool": "p"}, {"host": "*.example.com", "pool": "p"},
                  {"path": "/", "pool": "p"}, {"host": "www.example.com", "path": "/x", "pool": "p"}],
        "pool": {"p": {"backends": ["tcp:127.0.0.1:1"]}},
    }, source="test.toml")
    assert acme_names(config) == {"auto": ("www.example.com",), "list": ("a.example.com",)}


@pytest_twisted.ensureDeferred
async def test_unissued_refuse_fails_handshakes_until_issued_but_answers_the_validator(net: Net,
                                                                                         tmp_path: Any) -> None:
    origin = await net.origin()
    http_port, https_port = free_port(), free_port()
    config = acme_service_config(tmp_path, origin.backend, http_port, https_port, redirect=False)
    config["acme"]["unissued"] = "refuse"
    service = await start(net, config)
    for name in ("www.example.com", "other.example.com"):
        with pytest.raises(ssl.SSLError):
            await deferToThread(handshake, https_port, name, ["h2", "http/1.1"])
    # The CA's validator is still answered: refusing would otherwise make issuance by TLS-ALPN-01 impossible.
    service.acme.responder.tls_alpn01["www.example.com"] = TLSALPNChallenge("www.example.com", b"k.a", NOW)
    cert, protocol = await deferToThread(handshake, https_port, "www.example.com", ["acme-tls/1"])
    assert protocol == "acme-tls/1"
    assert cert.extensions.get_extension_for_oid(ACME_IDENTIFIER).critical
    assert origin.requests == []


def test_unissued_takes_self_signed_or_refuse_only(tmp_path: Any) -> None:
    config = acme_service_config(tmp_path, "tcp:127.0.0.1:1", 1, 2, redirect=False)
    assert parse_config(config, source="t.toml").deferred_sections["acme"].unissued == "self-signed"
    config["acme"]["unissued"] = "drop"
    with pytest.raises(ConfigError, match=r"t.toml: acme.unissued: .*refuse"):
        parse_config(config, source="t.toml")


@pytest_twisted.ensureDeferred
async def test_a_rate_limited_answer_is_reported_with_its_retry_after(net: Net, tmp_path: Any) -> None:
    """A CA (a real HTTP server here) that answers 429 rateLimited: the wait it asks for is kept."""
    import json

    from twisted.web.resource import Resource

    class RateLimited(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            request.setResponseCode(429)
            request.setHeader(b"Content-Type", b"application/problem+json")
            request.setHeader(b"Retry-After", b"1800")
            return json.dumps({"type": "urn:ietf:params:acme:error:rateLimited",
                               "detail": "too many certificates already issued"}).encode()

    site = await net.web_origin(RateLimited())
    config = AcmeConfig(directory=f"http://127.0.0.1:{site.port}/dir", storage=str(tmp_path))
    storage = AcmeStorage(str(tmp_path))
    with pytest.raises(AcmeFailure) as info:
        await deferToThread(issue_blocking, config, storage, None, "www.example.com", ("http-01",), None, True, None)
    assert info.value.rate_limited and info.value.retry_after == 1800
    assert "rateLimited" in str(info.value) and "too many certificates" in str(info.value)


def test_a_reload_that_adds_an_acme_profile_serves_its_names_at_once(tmp_path: Any) -> None:
    clock = Clock()
    clock.advance(NOW)
    base = {
        "listen": [{"endpoint": "tcp:8080"}],
        "route": [{"path": "/", "pool": "p"}], "pool": {"p": {"backends": ["tcp:127.0.0.1:1"]}},
        "server": {"access_log": "off"},
    }
    service = ProxyService(parse_config(base, source="test.toml"), clock)
    assert service.acme is None and service.runtime.acme_challenges is None
    with_acme = {**base, "listen": [{"endpoint": "tcp:8080"}, {"endpoint": "tcp:8443", "tls": "auto"}],
                 "tls": {"auto": {"acme": ["www.example.com"]}}, "acme": {"storage": str(tmp_path / "acme")}}
    service.reload(parse_config(with_acme, source="test.toml"))
    assert service.runtime.acme_challenges is service.acme.responder
    contexts = service.factories[1].contexts
    assert [c.names for c in contexts.generation.certificates] == [("www.example.com",)]
    assert contexts.challenges is service.acme.responder


def test_a_refused_reload_leaves_the_acme_names_as_they_were(tmp_path: Any) -> None:
    from rproxy_tw.config import ConfigError

    clock = Clock()
    clock.advance(NOW)
    base = {
        "listen": [{"endpoint": "tcp:8080"}, {"endpoint": "tcp:8443", "tls": "auto"}],
        "tls": {"auto": {"acme": ["www.example.com"]}}, "acme": {"storage": str(tmp_path / "acme")},
        "route": [{"path": "/", "pool": "p"}], "pool": {"p": {"backends": ["tcp:127.0.0.1:1"]}},
        "server": {"access_log": "off"},
    }
    service = ProxyService(parse_config(base, source="test.toml"), clock)
    broken = {**base, "listen": [*base["listen"], {"endpoint": "tcp:9443", "tls": "files"}],  # type: ignore[list-item]
              "tls": {"auto": {"acme": ["www.example.com", "new.example.com"]},
                      "files": {"certificates": [{"cert": str(tmp_path / "missing.pem"),
                                                  "key": str(tmp_path / "missing.key")}]}}}
    with pytest.raises(ConfigError):
        service.reload(parse_config(broken, source="test.toml"))
    assert list(service.acme.status()) == ["www.example.com"]


def test_check_names_what_an_acme_config_lacks(tmp_path: Any) -> None:
    from rproxy_tw.acme import check_acme
    from rproxy_tw.config import ConfigError

    def config(**changes: Any) -> Any:
        data: dict[str, Any] = {
            "listen": [{"endpoint": "tcp:8443", "tls": "auto"}],
            "tls": {"auto": {"acme": ["www.example.com"]}}, "acme": {"storage": str(tmp_path / "a" / "b")},
            "route": [{"path": "/", "pool": "p"}], "pool": {"p": {"backends": ["tcp:127.0.0.1:1"]}},
        }
        data.update(changes)
        return parse_config(data, source="test.toml")

    check_acme(config())  # a folder that does not exist yet is made at start
    with pytest.raises(ConfigError, match=r"^test.toml: tls.auto.acme: is true, but no route names a host"):
        check_acme(config(tls={"auto": {"acme": True}}))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a folder"):
        check_acme(config(acme={"storage": str(tmp_path / "file" / "acme")}))
    with pytest.raises(ConfigError, match=r"tls.auto.acme: no listener can answer \['http-01'\]"):
        check_acme(config(acme={"storage": str(tmp_path), "challenges": ["http-01"]}))


def test_the_temporary_certificate_is_made_anew_before_it_lapses(tmp_path: Any) -> None:
    clock = Clock()
    clock.advance(NOW)
    issuer = FakeIssuer()
    manager = AcmeManager(clock, manager_config(tmp_path), issue=issuer)
    path = manager.certificates_for("auto")[0].cert
    first = manager.storage.read(path, NOW)
    assert first is not None
    clock.advance(6.5 * 86400)  # the CA has failed for six days and a half
    manager.renew("www.example.com").addErrback(lambda f: None)
    issuer.pending.pop().errback(AcmeFailure("still down"))
    second = manager.storage.read(path, clock.seconds())
    assert second is not None and second.serial != first.serial and second.not_after > first.not_after


def test_renewal_information_is_asked_again_and_can_bring_the_renewal_forward(tmp_path: Any,
                                                                              logged: list[str]) -> None:
    """A CA offering RFC 9773 renewal information (pebble 2.4 does not: a stand-in answers here)."""
    clock = Clock()
    clock.advance(NOW)
    issuer = FakeIssuer()
    asked: list[Deferred[Any]] = []

    def renewal_info(pem: bytes) -> Deferred[Any]:
        asked.append(Deferred())
        return asked[-1]

    manager = AcmeManager(clock, manager_config(tmp_path), issue=issuer, renewal_info=renewal_info,
                          rng=random.Random(3))
    manager.startService()
    clock.advance(0)
    result = stored_result(tmp_path, NOW)
    window = NOW + 50 * 86400
    issuer.pending.pop().callback(IssueResult(result.stored, issued=True, suggested_renewal=window,
                                              ari_next_poll=NOW + 6 * 3600))
    assert manager.status()["www.example.com"]["next_attempt"] == window
    clock.advance(6 * 3600)
    assert len(asked) == 1
    # The CA moves the window (a revocation to come, say): the renewal comes forward.
    asked.pop().callback((NOW + 86400, NOW + 12 * 3600))
    assert manager.status()["www.example.com"]["next_attempt"] == NOW + 86400
    assert any("renewal information moves the renewal of www.example.com" in line for line in logged)
    clock.advance(6 * 3600)
    asked.pop().errback(AcmeFailure("unreachable"))  # the renewal unchanged, and asked again six hours on
    assert manager.status()["www.example.com"]["next_attempt"] == NOW + 86400
    clock.advance(6 * 3600)
    asked.pop().callback((None, NOW + 48 * 3600))  # no window: nothing moves; next ask after the renewal
    clock.advance(86400 - 18 * 3600)
    assert issuer.calls[-1][3] is False and len(issuer.calls) == 2  # the renewal, when the CA said
    assert not asked


@pytest_twisted.ensureDeferred
async def test_renewal_information_is_read_from_a_ca_that_offers_it(net: Net, tmp_path: Any) -> None:
    """A CA (a real HTTP server here) whose directory has renewalInfo (RFC 9773)."""
    import datetime
    import json

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.web.resource import Resource

    from rproxy_tw.acme.client import renewal_info_blocking

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(4242).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    start, end = now + datetime.timedelta(days=10), now + datetime.timedelta(days=11)
    seen: list[bytes] = []

    class CA(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"Content-Type", b"application/json")
            if request.path == b"/dir":
                base = f"http://127.0.0.1:{site.port}"
                return json.dumps({"newNonce": base + "/nonce", "newAccount": base + "/acct",
                                   "newOrder": base + "/order", "renewalInfo": base + "/ari"}).encode()
            seen.append(request.path)
            request.setHeader(b"Retry-After", b"21600")
            return json.dumps({"suggestedWindow": {"start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                                   "end": end.strftime("%Y-%m-%dT%H:%M:%SZ")}}).encode()

    site = await net.web_origin(CA())
    config = AcmeConfig(directory=f"http://127.0.0.1:{site.port}/dir", storage=str(tmp_path))
    suggested, again = await deferToThread(renewal_info_blocking, config,
                                           cert.public_bytes(serialization.Encoding.PEM))
    assert start.timestamp() - 1 <= suggested <= end.timestamp() + 1
    assert again > now.timestamp() + 3600
    assert seen and seen[0].startswith(b"/ari/") and seen[0].endswith(b".EJI")  # serial 4242, RFC 9773's form
