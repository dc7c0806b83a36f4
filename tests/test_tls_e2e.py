"""
TLS end to end: a L{ProxyService} built from a config dict with
L{parse_config}, real origins (plain and TLS) and real clients (Twisted's
TLS client, curl, the C{h2} package, C{twistd rproxy --check}), all on
127.0.0.1 with certificates the tests make with C{cryptography}.

What a user sees: the redirect to https, HSTS, the client certificate's
subject at the origin (and never a forged one), TLS to origins that is
verified or refused, certificates replaced without a restart, --check's
verdict on certificate files, and HTTP/2 carrying statuses and bodies whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import sys
import time
from typing import Any, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate, optionsForClientTLS
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher

from rproxy_tw import ProxyService, parse_config

from .conftest import (
    Net,
    OriginRequest,
    RawClient,
    RawOrigin,
    chunk,
    free_port,
    curl,
    net,  # noqa: F401 - fixture
    request,
    until,
)
from .test_tls import PKI, _issue, _key, _key_pem, _pem

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOST = "www.example.test"
"""The name the proxy's listener certificate (C{www-ec}) carries, with localhost and 127.0.0.1."""

ALICE = b"CN=alice,O=rproxy tests"
"""The subject of the C{alice} client certificate, as RFC 4514 writes it."""

pytestmark = pytest.mark.filterwarnings(
    # Twisted's CertificateOptions takes pyOpenSSL objects, which pyOpenSSL now deprecates.
    "ignore:Passing pyOpenSSL:DeprecationWarning")


# ---------------------------------------------------------------------------
# Certificates: the shared test PKI plus a few of our own


class E2EPKI(PKI):
    """
    The PKI of test_tls (root, intermediate, www/api/other/expired leaves,
    a client CA with C{alice}), plus: C{renewed}, a second certificate for
    the listener's names (a renewal), and C{selfsigned}, a certificate for
    localhost that no CA here signed.
    """

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.leaf("renewed", "ec", dns=(HOST, "localhost"), ips=("127.0.0.1",))
        key = _key("ec")
        self.selfsigned = _issue(key, "localhost", None, dns=("localhost",), ips=("127.0.0.1",))
        self._write("selfsigned.pem", _pem(self.selfsigned))
        self._write("selfsigned.key", _key_pem(key))

    def pem(self, name: str) -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: Any) -> E2EPKI:
    return E2EPKI(str(tmp_path_factory.mktemp("e2e-pki")))


def fingerprint(cert: Any) -> bytes:
    """SHA-256 of a certificate (a C{cryptography} one or a pyOpenSSL C{X509})."""
    if not isinstance(cert, x509.Certificate):
        cert = cert.to_cryptography()
    return cert.fingerprint(hashes.SHA256())


def cert_entry(certs: E2EPKI, name: str) -> dict[str, str]:
    return {"cert": certs.path(f"{name}.pem"), "key": certs.path(f"{name}.key")}


# ---------------------------------------------------------------------------
# Starting things


def config(listen: list[dict[str, Any]], routes: list[dict[str, Any]], pools: dict[str, Any],
           tls: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"server": {"access_log": "off"}, "listen": listen, "route": routes, "pool": pools}
    if tls:
        data["tls"] = tls
    return data


@inlineCallbacks
def start(net: Net, data: dict[str, Any]) -> Any:
    """Start the proxy for C{data}; the port numbers of its listeners, in config order."""
    svc = ProxyService(parse_config(data, source="test.toml"), reactor)
    svc.startService()
    net.services.append(svc)  # stopped, and its connections closed, after the test
    ports = yield svc.listening()
    return svc, [p.getHost().port for p in ports]


def start_one_route(net: Net, certs: E2EPKI, backend: str, tls: Any) -> Any:
    """
    The proxy with one listener and every request to C{backend}; C{tls} is
    false, true, or C{"mutual"} (clients need a certificate from the client CA).
    """
    listen: dict[str, Any] = {"endpoint": "tcp:0:interface=127.0.0.1"}
    profile: dict[str, Any] = {"certificates": [cert_entry(certs, "www-ec")]}
    if tls:
        listen["tls"] = "main"
    if tls == "mutual":
        profile["client_ca"] = certs.client_ca_path
    return start(net, config(
        listen=[listen],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": [backend]}},
        tls={"main": profile},
    ))


def client_options(certs: E2EPKI, server_name: str = HOST, cert: str | None = None) -> Any:
    """Client TLS that trusts only the test root, verifies C{server_name}, and may present C{cert}."""
    client = None
    if cert is not None:
        client = PrivateCertificate.loadPEM(certs.pem(f"{cert}.pem") + certs.pem(f"{cert}.key"))
    return optionsForClientTLS(server_name, trustRoot=Certificate.loadPEM(certs.pem("ca.pem")),
                               clientCertificate=client)


@inlineCallbacks
def tls_client(net: Net, port: int, certs: E2EPKI, server_name: str = HOST, cert: str | None = None) -> Any:
    """A L{RawClient} over TLS (a fresh client context, so never a resumed session)."""
    proto = RawClient()
    factory = Factory.forProtocol(lambda: proto)
    factory.noisy = False
    endpoint = wrapClientTLS(client_options(certs, server_name, cert), TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    yield endpoint.connect(factory)
    net.protocols.append(proto)
    return proto


@inlineCallbacks
def tls_origin(net: Net, certs: E2EPKI, name: str, handler: Callable[[OriginRequest], None] | None = None,
               client_ca: bool = False) -> Any:
    """
    A L{RawOrigin} behind TLS, made with Twisted's own TLS (not rproxy's), that
    serves the C{name} certificate with its chain and, with C{client_ca},
    refuses clients without a certificate from the client CA.
    """
    origin = RawOrigin(handler)
    leaf = PrivateCertificate.loadPEM(certs.pem(f"{name}.pem") + certs.pem(f"{name}.key"))
    chain = [c for c in x509.load_pem_x509_certificates(certs.pem(f"{name}.pem"))[1:]]
    from OpenSSL import crypto

    verify: dict[str, Any] = {}
    if client_ca:
        # A trustRoot makes Twisted require and verify a client certificate.
        verify["trustRoot"] = Certificate.loadPEM(certs.pem("client-ca.pem"))
    options = CertificateOptions(
        privateKey=leaf.privateKey.original,
        certificate=leaf.original,
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain],
        **verify,
    )
    port = yield SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(origin)
    origin.port = port.getHost().port
    origin.listening = port
    net.ports.append(port)
    net.origins.append(origin)
    return origin


def curl_tls(certs: E2EPKI, *ports: int) -> list[str]:
    """curl options: trust the test root, and resolve HOST to 127.0.0.1 on C{ports}."""
    args = ["--cacert", certs.path("ca.pem")]
    for port in ports:
        args += ["--resolve", f"{HOST}:{port}:127.0.0.1"]
    return args


# ---------------------------------------------------------------------------
# An HTTP/2 client: the h2 package over a stdlib ssl socket, in a thread


class H2Client:
    def __init__(self, certs: E2EPKI, port: int, cert: str | None = None) -> None:
        ctx = ssl.create_default_context(cafile=certs.path("ca.pem"))
        ctx.set_alpn_protocols(["h2"])
        if cert is not None:
            ctx.load_cert_chain(certs.path(f"{cert}.pem"), certs.path(f"{cert}.key"))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname=HOST)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.flush()
        self.streams: dict[int, dict[str, Any]] = {}
        self.closed = False
        self.terminated: Any = None

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def headers(self, method: bytes, path: bytes, extra: list[tuple[bytes, bytes]] = (),
                end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method), (b":scheme", b"https"), (b":authority", HOST.encode()),
                  (b":path", path), *extra]
        self.conn.send_headers(sid, fields, end_stream=end)
        self.flush()
        self.streams[sid] = {"headers": None, "body": bytearray(), "ended": False, "reset": None}
        return sid

    def read_once(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            for s in self.streams.values():
                s["ended"] = True
            return
        for event in self.conn.receive_data(data):
            s = self.streams.get(getattr(event, "stream_id", 0))
            if isinstance(event, h2.events.ResponseReceived):
                s["headers"] = event.headers
            elif isinstance(event, h2.events.DataReceived):
                s["body"] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                s["ended"] = True
            elif isinstance(event, h2.events.StreamReset):
                s["reset"] = event.error_code
                s["ended"] = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event
        try:
            self.flush()
        except OSError:
            pass

    def read(self, done: Callable[[], bool]) -> None:
        while not done() and not self.closed:
            self.read_once()

    def upload(self, sid: int, total: int) -> int:
        """
        Send C{total} body bytes on C{sid} as the window allows, reading
        meanwhile; stop early if the stream ends.  Returns the bytes sent.
        """
        sent = 0
        block = b"u" * 16384
        while sent < total and not self.streams[sid]["ended"] and not self.closed:
            try:
                window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size,
                             total - sent)
            except h2.exceptions.StreamClosedError:
                break
            if window <= 0:
                self.read_once()
                continue
            self.conn.send_data(sid, block[:window], end_stream=sent + window == total)
            sent += window
            self.flush()
        return sent

    def close(self) -> None:
        self.sock.close()


def status(stream: dict[str, Any]) -> int | None:
    if stream["headers"] is None:
        return None
    return int(dict(stream["headers"])[b":status"])


def h2_header(stream: dict[str, Any], name: bytes) -> list[bytes]:
    return [v for n, v in stream["headers"] or () if n == name]


# ---------------------------------------------------------------------------
# (1) HTTP to HTTPS


@pytest_twisted.ensureDeferred
async def test_plain_listener_redirects_to_https_keeping_method_path_and_query(net: Net, certs: E2EPKI) -> None:
    origin = await net.origin()
    https_port = free_port()
    svc, ports = await start(net, config(
        listen=[
            {"endpoint": "tcp:0:interface=127.0.0.1", "redirect_https": https_port},
            {"endpoint": "tcp:0:interface=127.0.0.1", "redirect_https": True},
            {"endpoint": f"tcp:{https_port}:interface=127.0.0.1", "tls": "main"},
        ],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": [origin.backend]}},
        tls={"main": {"certificates": [cert_entry(certs, "www-ec")]}},
    ))
    plain, default_port = ports[0], ports[1]
    assert ports[2] == https_port

    client = await net.client(plain)
    client.send(request(b"POST", b"/a/b?x=1&y=%20z", host=b"%s:%d" % (HOST.encode(), plain), body=b"payload"))
    client.send(request(b"GET", b"/second", host=HOST.encode()))
    first, second = await client.until_responses([b"POST", b"GET"])
    assert first.status == 308
    assert first.one(b"location") == b"https://%s:%d/a/b?x=1&y=%%20z" % (HOST.encode(), https_port)
    assert second.status == 308, "the connection stays usable after a redirect with a body"
    assert second.one(b"location") == b"https://%s:%d/second" % (HOST.encode(), https_port)
    assert second.one(b"strict-transport-security") is None

    other = await net.client(default_port)
    other.send(request(b"PUT", b"/p?q", host=HOST.encode() + b":8080", body=b""))
    (put,) = await other.until_responses([b"PUT"])
    assert put.status == 308
    assert put.one(b"location") == b"https://%s/p?q" % HOST.encode(), "redirect_https = true is port 443"
    assert origin.requests == [], "a plain listener that redirects sends nothing to the origin"

    # A real client follows it, and 308 keeps the method and the body.
    out, err, code = await curl(
        *curl_tls(certs, plain, https_port), "-L", "--data-binary", "payload",
        "-w", "\n%{http_code} %{num_redirects} %{url_effective}",
        f"http://{HOST}:{plain}/a/b?x=1",
    )
    assert code == 0, err
    assert out == b"POST /a/b?x=1\npayload\n200 1 https://%s:%d/a/b?x=1" % (HOST.encode(), https_port)
    (seen,) = origin.requests
    assert seen.method == b"POST" and bytes(seen.body) == b"payload"
    assert seen.one(b"x-forwarded-proto") == b"https"


@pytest_twisted.ensureDeferred
async def test_redirect_of_an_absolute_form_target_keeps_path_and_query(net: Net) -> None:
    origin = await net.origin()
    svc, ports = await start(net, config(
        listen=[{"endpoint": "tcp:0:interface=127.0.0.1", "redirect_https": 8443}],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": [origin.backend]}},
    ))
    client = await net.client(ports[0])
    client.send(request(b"GET", b"http://%s/a/b?x=1" % HOST.encode(), host=HOST.encode()))
    (r,) = await client.until_responses([b"GET"])
    assert r.status == 308
    assert r.one(b"location") == b"https://%s:8443/a/b?x=1" % HOST.encode()


# ---------------------------------------------------------------------------
# (2) HSTS


@pytest_twisted.ensureDeferred
async def test_hsts_from_the_listener_and_the_route_on_https_only(net: Net, certs: E2EPKI) -> None:
    def handler(req: OriginRequest) -> None:
        code = 404 if req.target.endswith(b"missing") else 200
        req.respond(code, b"origin " + req.target)

    origin = await net.origin(handler)
    svc, ports = await start(net, config(
        listen=[
            {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main", "hsts": "max-age=100"},
            {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main"},
            {"endpoint": "tcp:0:interface=127.0.0.1"},
        ],
        routes=[
            {"path": "/", "pool": "web"},
            {"path": "/strict/", "pool": "web", "hsts": "max-age=63072000; includeSubDomains"},
        ],
        pools={"web": {"backends": [origin.backend]}},
        tls={"main": {"certificates": [cert_entry(certs, "www-ec")]}},
    ))
    listener_hsts, route_only, plain = ports
    paths = [b"/", b"/missing", b"/strict/x", b"/strict/missing"]
    seen = {}
    for name, port in (("listener", listener_hsts), ("route only", route_only)):
        client = await tls_client(net, port, certs)
        for path in paths:
            client.send(request(b"GET", path, host=HOST.encode()))
        responses = await client.until_responses([b"GET"] * len(paths))
        seen[name] = [(r.status, r.body, r.header(b"strict-transport-security")) for r in responses]
    client = await net.client(plain)
    for path in paths:
        client.send(request(b"GET", path, host=HOST.encode()))
    responses = await client.until_responses([b"GET"] * len(paths))
    seen["plain"] = [(r.status, r.body, r.header(b"strict-transport-security")) for r in responses]

    route = [b"max-age=63072000; includeSubDomains"]
    assert seen["listener"] == [
        (200, b"origin /", [b"max-age=100"]),
        (404, b"origin /missing", [b"max-age=100"]),
        (200, b"origin /strict/x", route),  # the route's value replaces the listener's
        (404, b"origin /strict/missing", route),
    ]
    assert seen["route only"] == [
        (200, b"origin /", []),
        (404, b"origin /missing", []),
        (200, b"origin /strict/x", route),
        (404, b"origin /strict/missing", route),
    ]
    # Never over plain HTTP (RFC 6797 section 7.2), whatever the route says.
    assert [h for _, _, h in seen["plain"]] == [[], [], [], []]

    # The same over HTTP/2.
    def over_h2() -> Any:
        c = H2Client(certs, listener_hsts)
        try:
            a = c.headers(b"GET", b"/")
            b = c.headers(b"GET", b"/strict/y")
            c.read(lambda: c.streams[a]["ended"] and c.streams[b]["ended"])
            return c.streams[a], c.streams[b]
        finally:
            c.close()

    a, b = await threads.deferToThread(over_h2)
    assert status(a) == 200 and h2_header(a, b"strict-transport-security") == [b"max-age=100"]
    assert status(b) == 200 and h2_header(b, b"strict-transport-security") == route


@pytest_twisted.ensureDeferred
async def test_hsts_on_the_proxys_own_responses(net: Net, certs: E2EPKI) -> None:
    svc, ports = await start(net, config(
        listen=[{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main", "hsts": "max-age=100"}],
        routes=[{"host": HOST, "path": "/", "pool": "dead"},
                {"host": HOST, "path": "/strict/", "pool": "dead", "hsts": "max-age=200"}],
        pools={"dead": {"backends": [f"tcp:127.0.0.1:{free_port()}"], "retries": 0}},
        tls={"main": {"certificates": [cert_entry(certs, "www-ec")]}},
    ))
    client = await tls_client(net, ports[0], certs)
    client.send(request(b"GET", b"/", host=HOST.encode()))
    client.send(request(b"GET", b"/strict/", host=HOST.encode()))
    client.send(request(b"GET", b"/", host=b"elsewhere.test"))
    responses = await client.until_responses([b"GET"] * 3)
    assert [(r.status, r.header(b"strict-transport-security")) for r in responses] == [
        (502, [b"max-age=100"]), (502, [b"max-age=200"]), (421, [b"max-age=100"])]


# ---------------------------------------------------------------------------
# (3) Mutual TLS on the listener


@pytest_twisted.ensureDeferred
async def test_client_certificate_subject_reaches_the_origin_and_cannot_be_forged(
        net: Net, certs: E2EPKI) -> None:
    origin = await net.origin()
    svc, ports = await start(net, config(
        listen=[
            {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "mutual"},
            {"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main"},
            {"endpoint": "tcp:0:interface=127.0.0.1"},
        ],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": [origin.backend]}},
        tls={"main": {"certificates": [cert_entry(certs, "www-ec")]},
             "mutual": {"certificates": [cert_entry(certs, "www-ec")], "client_ca": certs.path("client-ca.pem")}},
    ))
    mutual, anonymous, plain = ports
    forged = [(b"X-Client-Cert-Subject", b"CN=evil-1"), (b"x-client-cert-subject", b"CN=evil-2"),
              (b"X-CLIENT-CERT-SUBJECT", b"  CN=evil-3  ")]

    # HTTP/1.1 with alice's certificate: one header, alice's subject, however the client tries.
    alice = await tls_client(net, mutual, certs, cert="alice")
    alice.send(request(b"GET", b"/plain", host=HOST.encode()))
    alice.send(request(b"GET", b"/forged", host=HOST.encode(), headers=forged))
    await alice.until_responses([b"GET", b"GET"])
    # Without a certificate (a listener that asks for none) and on plain HTTP: no header at all.
    nobody = await tls_client(net, anonymous, certs)
    nobody.send(request(b"GET", b"/anonymous", host=HOST.encode(), headers=forged))
    clear = await net.client(plain)
    clear.send(request(b"GET", b"/clear", host=HOST.encode(), headers=forged))
    await nobody.until_responses([b"GET"])
    await clear.until_responses([b"GET"])

    # HTTP/2, with and without a certificate.
    def over_h2(port: int, cert: str | None) -> Any:
        c = H2Client(certs, port, cert=cert)
        try:
            sid = c.headers(b"GET", b"/h2-" + (cert or "none").encode(),
                            [(b"x-client-cert-subject", b"CN=evil-h2")])
            c.read(lambda: c.streams[sid]["ended"])
            return status(c.streams[sid])
        finally:
            c.close()

    h2_codes = [await threads.deferToThread(over_h2, mutual, "alice"),
                await threads.deferToThread(over_h2, anonymous, None)]
    # curl, both protocols, with alice's certificate and a forged header.
    for version in ("--http1.1", "--http2"):
        out, err, code = await curl(*curl_tls(certs, mutual), version, "--cert", certs.path("alice.pem"),
                                    "--key", certs.path("alice.key"), "-H", "X-Client-Cert-Subject: CN=curl",
                                    f"https://{HOST}:{mutual}/curl{version}")
        assert code == 0, err

    assert h2_codes == [200, 200]
    got = {bytes(r.target): r.header(b"x-client-cert-subject") for r in origin.requests}
    assert got == {
        b"/plain": [ALICE],
        b"/forged": [ALICE],
        b"/anonymous": [],
        b"/clear": [],
        b"/h2-alice": [ALICE],
        b"/h2-none": [],
        b"/curl--http1.1": [ALICE],
        b"/curl--http2": [ALICE],
    }
    # Not under any spelling, anywhere in what the origin received.
    for conn in origin.connections:
        assert b"evil" not in bytes(conn.received).lower(), bytes(conn.received).decode()
        assert b"cn=curl" not in bytes(conn.received).lower(), bytes(conn.received).decode()


@pytest_twisted.ensureDeferred
async def test_forged_client_subject_in_request_trailers_does_not_reach_the_origin(
        net: Net, certs: E2EPKI) -> None:
    origin = await net.origin()
    svc, ports = await start(net, config(
        listen=[{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main"}],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": [origin.backend]}},
        tls={"main": {"certificates": [cert_entry(certs, "www-ec")]}},
    ))
    client = await tls_client(net, ports[0], certs)
    client.send(request(b"POST", b"/trailers", host=HOST.encode(),
                        headers=[(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-Client-Cert-Subject")])
                + chunk(b"data") + b"0\r\nX-Client-Cert-Subject: CN=evil\r\n\r\n")
    (r,) = await client.until_responses([b"POST"])
    assert r.status == 200
    assert b"evil" not in b"".join(bytes(c.received) for c in origin.connections).lower()


@pytest_twisted.ensureDeferred
async def test_forged_client_subject_with_underscores_does_not_reach_a_wsgi_app(net: Net, certs: E2EPKI) -> None:
    """
    CGI and WSGI name both C{X-Client-Cert-Subject} and
    C{X_Client_Cert_Subject} C{HTTP_X_CLIENT_CERT_SUBJECT}, so an app behind
    the proxy cannot tell them apart (why nginx drops headers with
    underscores by default).
    """
    from twisted.web.wsgi import WSGIResource

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ.get("HTTP_X_CLIENT_CERT_SUBJECT", "no client certificate").encode()]

    site = await net.web_origin(WSGIResource(reactor, reactor.getThreadPool(), app))
    svc, ports = await start(net, config(
        listen=[{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main"}],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": [site.backend]}},
        tls={"main": {"certificates": [cert_entry(certs, "www-ec")]}},
    ))
    client = await tls_client(net, ports[0], certs)
    client.send(request(b"GET", b"/", host=HOST.encode(), headers=[(b"X_Client_Cert_Subject", b"CN=evil")]))
    (r,) = await client.until_responses([b"GET"])
    assert (r.status, r.body) == (200, b"no client certificate")


# ---------------------------------------------------------------------------
# (4) TLS to origins, verified against [pool] ca, with a client certificate


@pytest_twisted.ensureDeferred
async def test_tls_to_origins_verified_against_the_pool_ca(net: Net, certs: E2EPKI) -> None:
    def secret(req: OriginRequest) -> None:
        req.respond(200, b"origin secret " + req.target)

    good = await tls_origin(net, certs, "www-ec", secret)
    wrong_name = await tls_origin(net, certs, "other", secret)
    unknown_ca = await tls_origin(net, certs, "selfsigned", secret)
    mutual = await tls_origin(net, certs, "www-ec", secret, client_ca=True)
    ca = certs.path("ca.pem")
    alice = {"client_cert": certs.path("alice.pem"), "client_key": certs.path("alice.key")}
    pools = {
        "good": {"backends": [f"tls:localhost:{good.port}"], "ca": ca},
        "good-ip": {"backends": [f"tls:127.0.0.1:{good.port}"], "ca": ca},
        "wrong-name": {"backends": [f"tls:localhost:{wrong_name.port}"], "ca": ca},
        "unknown-ca": {"backends": [f"tls:localhost:{unknown_ca.port}"], "ca": ca},
        "mutual": {"backends": [f"tls:localhost:{mutual.port}"], "ca": ca, **alice},
        "no-cert": {"backends": [f"tls:localhost:{mutual.port}"], "ca": ca},
    }
    routes = [{"path": f"/{name}/", "pool": name} for name in pools]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        svc, ports = await start(net, config(listen=[{"endpoint": "tcp:0:interface=127.0.0.1"}],
                                             routes=routes, pools=pools))
        codes = {}
        for name in pools:
            client = await net.client(ports[0])
            client.send(request(b"GET", f"/{name}/x".encode(), host=HOST.encode()))
            (r,) = await client.until_responses([b"GET"])
            codes[name] = (r.status, r.body)
    finally:
        globalLogPublisher.removeObserver(events.append)

    assert codes["good"] == (200, b"origin secret /good/x")
    assert codes["good-ip"] == (200, b"origin secret /good-ip/x")
    assert codes["mutual"] == (200, b"origin secret /mutual/x")
    for name in ("wrong-name", "unknown-ca", "no-cert"):
        status_code, body = codes[name]
        assert status_code == 502, (name, codes[name])
        assert b"origin secret" not in body, name
        assert b"TLS with the backend failed" in body, (name, body)
    assert wrong_name.requests == [] and unknown_ca.requests == [], "a request went to an unverified origin"
    # The origin saw the proxy's client certificate.
    presented = [c.transport.getPeerCertificate() for c in mutual.connections if c.requests]
    assert presented and all(fingerprint(p) == fingerprint(certs.alice) for p in presented)
    assert [bytes(r.target) for r in mutual.requests] == [b"/mutual/x"], "the no-cert request reached the origin"
    # A log line says why, for each refused origin.
    lines = [formatEvent(e) for e in events]
    for port in (wrong_name.port, unknown_ca.port):
        assert any(str(port) in line and ("verif" in line.lower() or "mismatch" in line.lower()
                                          or "certificate" in line.lower()) for line in lines), (port, lines)


# ---------------------------------------------------------------------------
# (5) Replacing certificates without a restart


def copy_pair(certs: E2EPKI, cert_name: str, key_name: str, cert: str, key: str) -> None:
    shutil.copyfile(certs.path(f"{cert_name}.pem"), cert)
    shutil.copyfile(certs.path(f"{key_name}.key"), key)


@pytest_twisted.ensureDeferred
async def test_reload_serves_the_new_certificate_and_keeps_open_connections(
        net: Net, certs: E2EPKI, tmp_path: Any) -> None:
    cert, key = str(tmp_path / "site.pem"), str(tmp_path / "site.key")
    copy_pair(certs, "www-ec", "www-ec", cert, key)
    origin = await net.origin()
    svc, ports = await start(net, config(
        listen=[{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main"}],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": [origin.backend]}},
        tls={"main": {"certificates": [{"cert": cert, "key": key}]}},
    ))
    port = ports[0]

    async def served_fingerprint(path: bytes) -> bytes:
        c = await tls_client(net, port, certs)
        c.send(request(b"GET", path, host=HOST.encode(), headers=[(b"Connection", b"close")]))
        (r,) = await c.until_responses([b"GET"])
        assert r.status == 200 and r.body == b"GET %s\n" % path
        return fingerprint(c.transport.getPeerCertificate())

    kept = await tls_client(net, port, certs)
    kept.send(request(b"GET", b"/before", host=HOST.encode()))
    await kept.until_responses([b"GET"])
    before = fingerprint(kept.transport.getPeerCertificate())

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        copy_pair(certs, "renewed", "renewed", cert, key)
        svc.reload_tls()
        after = await served_fingerprint(b"/after")
        kept.send(request(b"GET", b"/kept", host=HOST.encode()))
        await kept.until_responses([b"GET", b"GET"])
        # A broken replacement (the key of another certificate): the renewed one keeps serving.
        copy_pair(certs, "www-ec", "other", cert, key)
        svc.reload_tls()
        broken = await served_fingerprint(b"/broken")
        kept.send(request(b"GET", b"/still-kept", host=HOST.encode()))
        responses = await kept.until_responses([b"GET"] * 3)
    finally:
        globalLogPublisher.removeObserver(events.append)

    assert before == fingerprint(certs.www_ec)
    assert after == fingerprint(certs.renewed)
    assert broken == fingerprint(certs.renewed)
    assert [r.status for r in responses] == [200, 200, 200] and not kept.closed
    assert fingerprint(kept.transport.getPeerCertificate()) == before, "the open connection kept its session"
    assert [bytes(r.target) for r in origin.requests] == [b"/before", b"/after", b"/kept", b"/broken",
                                                          b"/still-kept"]
    lines = [formatEvent(e) for e in events]
    assert any(key in line and "does not match" in line for line in lines), lines


# ---------------------------------------------------------------------------
# (6) twistd rproxy --check on certificate files


CHECK_CONFIG = """\
[server]
access_log = "off"

[[listen]]
endpoint = "tcp:0:interface=127.0.0.1"
tls = "main"

[tls.main]
certificates = [{{ cert = "{cert}", key = "{key}" }}]

[[route]]
path = "/"
pool = "web"

[pool.web]
backends = ["tcp:127.0.0.1:9"]
"""


def run_check(config_path: str) -> Any:
    """C{twistd rproxy --config F --check} in a child process: (stdout, stderr, exit code)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return getProcessOutputAndValue(sys.executable, [
        "-c", "from twisted.scripts.twistd import run; run()", "rproxy", "--config", config_path, "--check",
    ], env=env, path=REPO_ROOT)


def check_config(tmp_path: Any, cert: str, key: str) -> str:
    path = tmp_path / "rproxy.toml"
    path.write_text(CHECK_CONFIG.format(cert=cert, key=key))
    return str(path)


@pytest_twisted.ensureDeferred
async def test_check_accepts_usable_certificate_files(certs: E2EPKI, tmp_path: Any) -> None:
    path = check_config(tmp_path, certs.path("www-ec.pem"), certs.path("www-ec.key"))
    out, err, code = await run_check(path)
    assert (code, err) == (0, b""), err
    assert out == f"{path}: ok\n".encode()


@pytest.mark.parametrize("case", ["missing key", "expired"])
@pytest_twisted.ensureDeferred
async def test_check_names_the_file_and_key_of_an_unusable_certificate(
        certs: E2EPKI, tmp_path: Any, case: str) -> None:
    if case == "missing key":
        bad, key, problem = str(tmp_path / "missing.key"), "tls.main.certificates[0].key", "cannot read"
        path = check_config(tmp_path, certs.path("www-ec.pem"), bad)
    else:
        bad, key, problem = certs.path("expired.pem"), "tls.main.certificates[0].cert", "expired"
        path = check_config(tmp_path, bad, certs.path("expired.key"))
    out, err, code = await run_check(path)
    assert (code, out) == (1, b""), (out, err)
    lines = err.decode().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{bad}: {key}: "), lines[0]
    assert problem in lines[0], lines[0]


@pytest.mark.parametrize("case", ["usable", "garbage ca", "key not matching", "expired client certificate"])
@pytest_twisted.ensureDeferred
async def test_check_names_the_pool_key_of_an_unusable_origin_tls_file(
        certs: E2EPKI, tmp_path: Any, case: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    ca, cert, key = certs.ca_path, certs.path("alice.pem"), certs.path("alice.key")
    expect = None
    if case == "garbage ca":
        ca = str(garbage)
        expect = (ca, "pool.web.ca", "no PEM certificate")
    elif case == "key not matching":
        key = certs.path("other.key")
        expect = (key, "pool.web.client_key", "does not match")
    elif case == "expired client certificate":
        cert, key = certs.path("expired.pem"), certs.path("expired.key")
        expect = (cert, "pool.web.client_cert", "expired on")
    path = tmp_path / "pool.toml"
    path.write_text(CHECK_CONFIG.format(cert=certs.path("www-ec.pem"), key=certs.path("www-ec.key")).replace(
        'backends = ["tcp:127.0.0.1:9"]',
        f'backends = ["tls:127.0.0.1:9"]\nca = "{ca}"\nclient_cert = "{cert}"\nclient_key = "{key}"'))
    out, err, code = await run_check(str(path))
    if expect is None:
        assert (code, err, out) == (0, b"", f"{path}: ok\n".encode())
        return
    bad, config_key, problem = expect
    lines = err.decode().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"{bad}: {config_key}: ") and problem in lines[0], lines[0]


# ---------------------------------------------------------------------------
# (7) An origin that answers an upload early with 413 and closes


def early_413(req: OriginRequest) -> None:
    """
    What nginx does past client_max_body_size: 413 as soon as the head
    arrives, then it stops sending and discards the rest of the body
    (lingering close) until the client goes.
    """
    if req.method in (b"POST", b"PUT"):
        req.write(b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: 9\r\nConnection: close\r\n\r\ntoo large")
        req.conn.transport.loseWriteConnection()


UPLOAD = 4 * 1024 * 1024


@inlineCallbacks
def start_413(net: Net, certs: E2EPKI) -> Any:
    origin = yield net.origin(on_head=early_413)  # GETs get the default answer
    svc, ports = yield start(net, config(
        listen=[{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main"}],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": [origin.backend]}},
        tls={"main": {"certificates": [cert_entry(certs, "www-ec")]}},
    ))
    return origin, ports[0]


@pytest_twisted.ensureDeferred
async def test_http1_upload_answered_early_with_413(net: Net, certs: E2EPKI, tmp_path: Any) -> None:
    origin, port = await start_413(net, certs)
    upload = tmp_path / "upload"
    upload.write_bytes(b"u" * UPLOAD)
    out, err, code = await curl(*curl_tls(certs, port), "--http1.1", "-H", "Expect:",
                                "--data-binary", f"@{upload}", "-o", "-", "-w", "\n%{http_code}",
                                f"https://{HOST}:{port}/upload")
    assert b"\n413" in out, (out, err)
    assert out.startswith(b"too large"), out


def _h2_upload(certs: E2EPKI, port: int) -> Any:
    """POST a large body; then, on the same connection, a GET."""
    c = H2Client(certs, port)
    try:
        sid = c.headers(b"POST", b"/upload", [(b"content-length", b"%d" % UPLOAD)], end=False)
        sent = c.upload(sid, UPLOAD)
        c.read(lambda: c.streams[sid]["ended"])
        after = c.headers(b"GET", b"/after")
        c.read(lambda: c.streams[after]["ended"])
        return c.streams[sid], c.streams[after], sent
    finally:
        c.close()


@pytest_twisted.ensureDeferred
async def test_http2_upload_answered_early_with_413(net: Net, certs: E2EPKI) -> None:
    origin, port = await start_413(net, certs)
    upload, after, sent = await threads.deferToThread(_h2_upload, certs, port)
    assert status(upload) == 413, (upload, sent)
    assert bytes(upload["body"]) == b"too large"
    # The rest of the body need not be sent: the stream ends, or is reset with NO_ERROR (RFC 9113 8.1).
    assert upload["reset"] in (None, 0), upload
    assert status(after) == 200 and bytes(after["body"]) == b"GET /after\n", "the connection still works"
    assert [r.method for r in origin.requests] == [b"POST", b"GET"]


# ---------------------------------------------------------------------------
# (8) A large HTTP/2 download


@pytest_twisted.ensureDeferred
async def test_http2_download_of_1_mib_arrives_intact(net: Net, certs: E2EPKI, tmp_path: Any) -> None:
    body = hashlib.shake_256(b"rproxy").digest(1024 * 1024)

    def big(req: OriginRequest) -> None:
        req.respond(200, body, [(b"Content-Type", b"application/octet-stream")])

    origin = await net.origin(big)
    svc, ports = await start(net, config(
        listen=[{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main"}],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": [origin.backend]}},
        tls={"main": {"certificates": [cert_entry(certs, "www-ec")]}},
    ))
    port = ports[0]
    target = tmp_path / "download"
    out, err, code = await curl(*curl_tls(certs, port), "--http2", "-o", str(target),
                                "-w", "%{http_version} %{response_code} %{size_download}",
                                f"https://{HOST}:{port}/big")
    assert code == 0, err
    assert out == b"2 200 1048576"
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(body).digest()

    def over_h2() -> Any:
        c = H2Client(certs, port)
        try:
            sids = [c.headers(b"GET", b"/big/%d" % i) for i in range(3)]
            c.read(lambda: all(c.streams[s]["ended"] for s in sids))
            return [c.streams[s] for s in sids]
        finally:
            c.close()

    streams = await threads.deferToThread(over_h2)
    for s in streams:
        assert status(s) == 200 and s["reset"] is None
        assert h2_header(s, b"content-length") in ([b"1048576"], [])
        assert bytes(s["body"]) == body


# ---------------------------------------------------------------------------
# Connections the proxy closes are closed (no file descriptor left behind)


def open_sockets() -> int:
    """Sockets this process (the proxy, its origins and clients) holds open: what C{ulimit -n} counts."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # closed while we looked
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("tls", [
    False,
    True,
], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_connections_closed_by_the_proxy_release_their_sockets(net: Net, certs: E2EPKI, tls: bool) -> None:
    """
    Every request says C{Connection: close}: the proxy answers and closes,
    the client sees the end of the connection and closes too.  Afterwards the
    process holds no more sockets than before (the origin's kept-alive
    connection was already open).
    """
    origin = await net.origin()
    svc, ports = await start_one_route(net, certs, origin.backend, tls)

    async def closing_request(i: int) -> None:
        client = await (tls_client(net, ports[0], certs) if tls else net.client(ports[0]))
        client.send(request(b"GET", b"/%d" % i, host=HOST.encode(), headers=[(b"Connection", b"close")]))
        await client.until_closed()
        (r,) = client.responses([b"GET"])
        assert r.status == 200

    await closing_request(0)
    before = open_sockets()
    for i in range(1, 21):
        await closing_request(i)
    # A short guard: the sockets are gone within a few reactor turns, or never.
    await until(lambda: open_sockets() <= before, "the proxy to close its side of 20 connections", timeout=5.0)


def _fetch_closing(port: int, ca: str | None, target: bytes, slow: bool = False,
                   cert: tuple[str, str] | None = None) -> tuple[bytes, str | None]:
    """
    Runs in a thread: one GET with C{Connection: close}; the whole reply and
    how the connection ended (C{None}: a clean end; a stall shows as a
    timeout).  A C{slow} reader has a small receive buffer and takes 4 KiB
    every 20 ms.
    """
    raw = socket.socket()
    if slow:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
    raw.settimeout(30 if slow else 10)
    raw.connect(("127.0.0.1", port))
    sock: Any = raw
    if ca is not None:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.set_alpn_protocols(["http/1.1"])
        if cert is not None:
            ctx.load_cert_chain(*cert)
        sock = ctx.wrap_socket(raw, server_hostname=HOST)
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (target, HOST.encode()))
    got = bytearray()
    ending = None
    try:
        while True:
            data = sock.recv(4096 if slow else 65536)
            if not data:
                break
            got += data
            if slow:
                time.sleep(0.02)
    except (OSError, ssl.SSLError) as e:
        ending = repr(e)
    finally:
        sock.close()
    return bytes(got), ending


@pytest.mark.parametrize("tls", [False, True, "mutual"], ids=["plain", "tls", "mutual-tls"])
@pytest_twisted.ensureDeferred
async def test_a_slow_reader_gets_the_whole_response_before_the_close(
        net: Net, certs: E2EPKI, tls: Any, monkeypatch: Any) -> None:
    """
    The proxy has written the whole response and closes (C{Connection:
    close}) while the reader is still far behind.  Neither the close's
    backstop nor the TLS linger may cut the connection before the tail is
    delivered: the timers are made short here (0.2 s), and the reader needs
    about a second more.
    """
    import rproxy_tw.http.server as server_module
    import rproxy_tw.tls_transport as tls_transport

    monkeypatch.setattr(server_module, "CLOSE_GRACE", 0.2)
    monkeypatch.setattr(tls_transport, "LINGER", 0.2)
    body = hashlib.sha256(b"tail").digest() * (384 * 1024 // 32)  # 384 KiB
    origin = await net.origin(handler=lambda req: req.respond(200, body, [(b"Content-Type", b"application/octet-stream")]))
    svc, ports = await start_one_route(net, certs, origin.backend, tls)
    alice = (certs.path("alice.pem"), certs.path("alice.key")) if tls == "mutual" else None
    got, ending = await threads.deferToThread(_fetch_closing, ports[0], certs.ca_path if tls else None, b"/big",
                                              slow=True, cert=alice)
    assert ending is None, ending
    head, _, received = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert len(received) == len(body) and received == body


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_an_apps_static_file_mounted_in_the_proxy_downloads_whole(
        net: Net, certs: E2EPKI, tls: bool, tmp_path: Any) -> None:
    """
    twisted.web's C{File} is a pull producer (C{registerProducer(p, False)}):
    it is asked for each next piece when the transport's buffer empties.
    Writes sent straight to the socket never let Twisted see that, and the
    download stopped after the first 64 KiB.
    """
    from twisted.web.static import File

    content = hashlib.shake_256(b"static").digest(3 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(content)
    listen: dict[str, Any] = {"endpoint": "tcp:0:interface=127.0.0.1"}
    if tls:
        listen["tls"] = "main"
    svc = ProxyService(parse_config(config(
        listen=[listen],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": ["tcp:127.0.0.1:9"]}},
        tls={"main": {"certificates": [cert_entry(certs, "www-ec")]}},
    ), source="test.toml"), reactor)
    svc.mount("/files", File(str(tmp_path)))
    svc.startService()
    net.services.append(svc)
    (port,) = await svc.listening()
    got, ending = await threads.deferToThread(_fetch_closing, port.getHost().port,
                                              certs.ca_path if tls else None, b"/files/big.bin")
    head, _, body = got.partition(b"\r\n\r\n")
    assert ending is None, (ending, len(body))
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert len(body) == len(content) and body == content


def _leave_mid_response(port: int, ca: str, how: str, hold: float) -> int:
    """
    Runs in a thread: over TLS, GET an endless response, read a little, then
    leave (close_notify, or a FIN without one) and keep the socket open
    without reading for C{hold} seconds.  Returns the bytes read.
    """
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)

    def push() -> None:
        if outgoing.pending:
            raw.sendall(outgoing.read())

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            push()
            incoming.write(raw.recv(65536))
    push()
    tls.write(b"GET /endless HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST.encode())
    push()
    got = 0
    while got < 65536:
        incoming.write(raw.recv(65536))
        try:
            while True:
                got += len(tls.read(65536))
        except ssl.SSLWantReadError:
            pass
    time.sleep(0.5)  # reading nothing: the proxy's buffer towards us fills, its producer pauses
    if how == "close_notify":
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        push()
    else:
        raw.shutdown(socket.SHUT_WR)
    time.sleep(hold)
    raw.close()
    return got


@pytest.mark.parametrize("how", ["close_notify", "fin"])
@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_response_stops_the_origin_stream(
        net: Net, certs: E2EPKI, how: str, monkeypatch: Any) -> None:
    """
    The client leaves while the proxy's buffer towards it is full (its
    producer paused).  The exchange must end at once, stopping the pull from
    the origin, and the proxy's socket must close even though the client
    reads nothing more: before, the close waited on the paused producer, the
    origin was read (and its bytes dropped) for as long as it sent, and the
    socket stayed open.
    """
    import rproxy_tw.tls_transport as tls_transport
    from twisted.internet.task import LoopingCall, deferLater

    monkeypatch.setattr(tls_transport, "LINGER", 0.5)

    loops: list[LoopingCall] = []

    def endless(req: OriginRequest) -> None:
        req.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")

        def more() -> None:
            if req.conn.closed:
                loop.stop()
            else:
                req.conn.transport.write(b"10000\r\n" + b"z" * 65536 + b"\r\n")

        loop = LoopingCall(more)
        loops.append(loop)
        loop.start(0.01)

    origin = await net.origin(handler=endless)
    svc, ports = await start(net, config(
        listen=[{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "main"}],
        routes=[{"path": "/", "pool": "web"}],
        pools={"web": {"backends": [origin.backend]}},
        tls={"main": {"certificates": [cert_entry(certs, "www-ec")]}},
    ))
    before = open_sockets()
    client = threads.deferToThread(_leave_mid_response, ports[0], certs.ca_path, how, 3.0)
    try:
        await until(lambda: origin.connections and origin.connections[0].received, "the request to reach the origin")
        await deferLater(reactor, 0.5, lambda: None)  # the client stops reading, then leaves
        await until(lambda: origin.connections[0].closed, "the proxy to drop the origin's stream", timeout=3.0)
        # The client still holds its socket (one of this process's), reading
        # nothing: the proxy's end of the connection is cut all the same.
        await until(lambda: open_sockets() <= before + 1, "the proxy to close its socket", timeout=3.0)
    finally:
        for loop in loops:
            if loop.running:
                loop.stop()
        got = await client
    assert got >= 65536
