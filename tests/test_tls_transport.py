"""
The TLS transport of HTTP listeners (L{rproxy_tw.tls_transport}), driven in
memory: a client C{ssl.SSLObject} on one side, a C{StringTransport} under
the server, a C{Clock} for time.  Real-socket behaviour is in test_tls*.py.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, INegotiated, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from rproxy_tw.config import CertificateConfig, TLSProfile
from rproxy_tw.tls import StdlibTLSContexts
from rproxy_tw.tls_transport import LINGER, StdlibTLSServerFactory
from rproxy_tw.transport import ILingerlessClose, ITimedHandshake


@pytest.fixture(scope="module")
def cert_files(tmp_path_factory: Any) -> tuple[str, str]:
    d: Path = tmp_path_factory.mktemp("tlsmem")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("www.example.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (d / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return str(d / "c.pem"), str(d / "k.pem")


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """What the wrapped (HTTP) protocol sees."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.handshakes = 0
        self.lost: Any = None
        self.losses = 0
        self.pause_after_first = False

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.pause_after_first:
            self.transport.pauseProducing()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason
        self.losses += 1


@implementer(ITCPTransport)
class TCP(StringTransport):
    """A StringTransport with TCP's write-side close (the parts of ITCPTransport the TLS transport uses)."""

    write_closed = False
    aborted = False
    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class Pair:
    """A server TLSServerConnection on a StringTransport, and an in-memory client."""

    def __init__(self, cert_files: tuple[str, str], alpn: tuple[str, ...] = ("h2", "http/1.1"),
                 client_alpn: list[str] | None = None, client_max: Any = None,
                 client_ciphers: str | None = None, handshake_timeout: float | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(datetime.datetime.now().timestamp())
        profile = TLSProfile("t", (CertificateConfig(*cert_files),), alpn=alpn)
        self.contexts = StdlibTLSContexts(self.clock, profile, watch_interval=None)
        factory = StdlibTLSServerFactory(self.contexts, Factory.forProtocol(Recorder), self.clock,
                                         handshake_timeout=handshake_timeout)
        self.server = factory.buildProtocol(None)
        self.app: Recorder = self.server.wrappedProtocol
        self.tcp = TCP()
        self.server.makeConnection(self.tcp)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if client_alpn:
            ctx.set_alpn_protocols(client_alpn)
        if client_max is not None:
            ctx.minimum_version = client_max
            ctx.maximum_version = client_max
        if client_ciphers is not None:
            ctx.set_ciphers(client_ciphers)
        self.cin, self.cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = ctx.wrap_bio(self.cin, self.cout, server_hostname="www.example.test")

    def to_server(self) -> None:
        data = self.cout.read()
        if data:
            self.server.dataReceived(data)

    def to_client(self) -> None:
        data = self.tcp.value()
        self.tcp.clear()
        if data:
            self.cin.write(data)

    def handshake(self) -> None:
        for _ in range(6):
            try:
                self.client.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            self.to_server()
            self.to_client()
            if done:
                return
        raise AssertionError("no handshake")

    def client_read(self) -> bytes:
        """What the client can read now; C{self.closed} tells whether a close_notify came after it."""
        out = []
        self.closed = False
        while True:
            try:
                chunk = self.client.read(65536)
            except ssl.SSLWantReadError:
                break
            if not chunk:  # the ssl module's way of saying close_notify
                self.closed = True
                break
            out.append(chunk)
        return b"".join(out)


def test_bytes_both_ways_and_alpn(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files, client_alpn=["http/1.1", "h2"])
    p.handshake()
    assert p.app.handshakes == 1
    assert p.server.negotiatedProtocol == b"h2", "the server's preference wins"
    p.client.write(b"GET / HTTP/1.1\r\n\r\n")
    p.to_server()
    assert b"".join(p.app.received) == b"GET / HTTP/1.1\r\n\r\n"
    p.app.transport.write(b"HTTP/1.1 200 OK\r\n")
    p.app.transport.writeSequence([b"Content-Length: 0\r\n", b"\r\n"])
    p.to_client()
    assert p.client_read() == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def test_no_common_alpn_is_no_alpn(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files, client_alpn=["spdy/3"])
    p.handshake()
    assert p.server.negotiatedProtocol is None


def test_paused_reader_gets_nothing_until_it_resumes(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    p.app.pause_after_first = True
    for part in (b"one", b"two", b"three"):
        p.client.write(part)  # three TLS records in one TCP read
    p.to_server()
    assert p.app.received == [b"one"]
    assert p.tcp.producerState == "paused"
    p.app.pause_after_first = False
    p.server.resumeProducing()
    assert p.app.received == [b"one"], "delivery waits for a later reactor turn"
    assert p.tcp.producerState == "paused", "what is buffered goes before anything new (a FIN, say)"
    p.clock.advance(0)
    assert p.app.received == [b"one", b"two", b"three"]
    assert p.tcp.producerState == "producing"


def test_paused_again_while_delivering_what_was_buffered(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    p.app.pause_after_first = True
    for part in (b"one", b"two", b"three"):
        p.client.write(part)
    p.to_server()
    p.server.resumeProducing()
    p.clock.advance(0)  # delivers "two", and the app pauses again
    assert p.app.received == [b"one", b"two"]
    assert p.tcp.producerState == "paused"
    p.app.pause_after_first = False
    p.server.resumeProducing()
    p.clock.advance(0)
    assert p.app.received == [b"one", b"two", b"three"] and p.tcp.producerState == "producing"


def test_producers_are_the_tcp_transports(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    producer = object()
    p.app.transport.registerProducer(producer, True)
    assert p.tcp.producer is producer and p.tcp.streaming
    p.app.transport.unregisterProducer()
    assert p.tcp.producer is None


def test_close_sends_close_notify_and_lingers_once_all_is_sent(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    p.app.transport.write(b"last words")
    p.app.transport.loseConnection()
    assert p.tcp.write_closed and not p.tcp.disconnecting, "reading goes on after the write side closes"
    p.to_client()
    assert p.client_read() == b"last words"
    assert p.closed, "then the server's close_notify"
    # The peer goes on sending: read and discarded, not delivered.
    p.client.write(b"late")
    p.to_server()
    assert b"late" not in b"".join(p.app.received)
    p.app.transport.write(b"after close")
    assert p.tcp.value() == b"", "nothing is written after loseConnection"
    # However slow the reader, nothing is cut while the TCP transport is still sending.
    p.clock.advance(LINGER * 10)
    assert not p.tcp.disconnecting and not p.tcp.aborted
    p.server.writeConnectionLost()  # the TCP transport sent everything, then its FIN
    p.clock.advance(LINGER - 0.1)
    assert not p.tcp.disconnecting
    p.clock.advance(0.1)
    assert p.tcp.disconnecting and not p.tcp.aborted, "an orderly close: the kernel still delivers the tail"
    assert p.app.lost is None, "the wrapped protocol learns when the socket is gone"
    p.server.connectionLost(Failure(ConnectionDone()))
    assert p.app.lost.check(ConnectionDone)


def test_peer_fin_ends_a_lingering_close_at_once(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    p.app.transport.loseConnection()
    p.server.writeConnectionLost()
    p.server.readConnectionLost()
    assert p.tcp.disconnecting
    p.server.connectionLost(Failure(ConnectionDone()))
    assert not p.clock.getDelayedCalls()
    assert p.app.lost.check(ConnectionDone)


def test_peer_fin_while_open_tells_the_wrapped_protocol_at_once(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    p.app.transport.write(b"partial")
    p.server.readConnectionLost()  # a FIN with no close_notify
    assert p.app.lost is not None and p.app.lost.check(ConnectionDone)
    assert p.tcp.disconnecting, "what was written is still sent, then the socket closes"
    p.app.transport.write(b"more")
    p.to_client()
    assert p.client_read() == b"partial"
    p.server.connectionLost(Failure(ConnectionDone()))
    assert p.app.losses == 1, "told once"


def test_peer_close_notify_is_answered_and_closes(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    p.client.write(b"bye")
    try:
        p.client.unwrap()
    except ssl.SSLWantReadError:
        pass
    p.to_server()
    assert p.app.received == [b"bye"]
    assert p.tcp.disconnecting
    p.to_client()
    p.client.unwrap()  # the server's close_notify completes the client's shutdown
    p.server.connectionLost(Failure(ConnectionDone()))
    assert p.app.lost.check(ConnectionDone)
    assert not p.clock.getDelayedCalls(), "no linger timer once the connection is gone"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1:DeprecationWarning")
def test_failed_handshake_sends_an_alert_and_reports_why(cert_files: tuple[str, str]) -> None:
    # SECLEVEL=0 so that the client itself is willing to speak TLS 1.1.
    p = Pair(cert_files, client_max=ssl.TLSVersion.TLSv1_1, client_ciphers="ALL:@SECLEVEL=0")
    try:
        p.client.do_handshake()
    except (ssl.SSLWantReadError, ssl.SSLError):
        pass
    p.to_server()
    assert p.tcp.disconnecting
    assert p.tcp.value(), "the alert was written before the close"
    p.to_client()
    p.server.connectionLost(Failure(ConnectionDone()))
    assert p.app.lost.check(ssl.SSLError)
    assert "UNSUPPORTED_PROTOCOL" in str(p.app.lost.value)
    with pytest.raises(ssl.SSLError, match="VERSION"):
        p.client.do_handshake()
    assert p.app.handshakes == 0 and p.app.received == []


def test_garbage_instead_of_a_client_hello(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.server.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert p.tcp.disconnecting
    p.server.connectionLost(Failure(ConnectionDone()))
    assert p.app.lost.check(ssl.SSLError)
    assert p.app.received == []


def test_request_in_the_same_segment_as_the_finished(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    # Run the client's side until its Finished is queued, then add a request behind it.
    try:
        p.client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    p.to_server()
    p.to_client()
    p.client.do_handshake()
    p.client.write(b"GET /early HTTP/1.1\r\n\r\n")
    p.to_server()  # Finished and the request, one read
    assert p.app.handshakes == 1
    assert b"".join(p.app.received) == b"GET /early HTTP/1.1\r\n\r\n"


def test_which_listeners_get_this_transport(cert_files: tuple[str, str], monkeypatch: Any) -> None:
    from rproxy_tw.tls import TLSServerFactory, tls_server_factory

    clock = Clock()
    clock.advance(datetime.datetime.now().timestamp())
    plain = TLSProfile("t", (CertificateConfig(*cert_files),))
    mutual = TLSProfile("m", (CertificateConfig(*cert_files),), client_ca=cert_files[0])
    wrapped = Factory.forProtocol(Protocol)
    assert isinstance(tls_server_factory(clock, plain, wrapped, watch_interval=None), StdlibTLSServerFactory)
    # Raw TCP (half-close) and mutual TLS (CA names in the request) stay on pyOpenSSL.
    assert isinstance(tls_server_factory(clock, plain, wrapped, http=False, watch_interval=None), TLSServerFactory)
    assert isinstance(tls_server_factory(clock, mutual, wrapped, watch_interval=None), TLSServerFactory)
    monkeypatch.setenv("RPROXY_TLS_PYOPENSSL", "1")
    assert isinstance(tls_server_factory(clock, plain, wrapped, watch_interval=None), TLSServerFactory)


def test_a_paused_connection_reads_again_once_it_closes(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    p.app.transport.pauseProducing()
    assert p.tcp.producerState == "paused"
    p.app.transport.loseConnection()
    assert p.tcp.producerState == "producing", "the linger must see the peer's close"
    p.client.write(b"ignored")
    p.to_server()
    assert p.app.received == []


class PausedProducer:
    """A streaming producer the TCP transport has paused (its buffer is full)."""

    def __init__(self) -> None:
        self.resumed = 0
        self.stopped = 0

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped += 1


@pytest.mark.parametrize("how", ["close_notify", "fin"])
def test_the_peer_leaving_mid_response_ends_it_at_once(cert_files: tuple[str, str], how: str) -> None:
    p = Pair(cert_files)
    p.handshake()
    producer = PausedProducer()
    p.app.transport.registerProducer(producer, True)
    p.app.transport.write(b"part of a long response")
    if how == "close_notify":
        try:
            p.client.unwrap()
        except ssl.SSLWantReadError:
            pass
        p.to_server()
    else:
        p.server.readConnectionLost()
    # The wrapped protocol learns now (and so stops pulling from its origin),
    # and its producer is gone, so Twisted's close is not held by it.
    assert p.app.lost is not None and p.app.lost.check(ConnectionDone)
    assert p.tcp.producer is None and p.tcp.disconnecting
    # What was written still drains; if it cannot, the connection is cut.
    p.clock.advance(LINGER)
    assert p.tcp.aborted
    p.server.connectionLost(Failure(ConnectionDone()))
    assert p.app.losses == 1 and not p.clock.getDelayedCalls()


def test_our_close_answered_by_the_peer_is_a_clean_end(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    p.app.transport.loseConnection()
    p.to_client()
    p.client_read()
    assert p.closed
    try:
        p.client.unwrap()  # the client answers our close_notify with its own
    except ssl.SSLError:
        pass
    p.to_server()
    assert p.tcp.disconnecting
    p.server.connectionLost(Failure(ConnectionDone()))
    assert p.app.lost.check(ConnectionDone), p.app.lost


def test_a_close_without_linger_closes_once_sent(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    assert verifyObject(ILingerlessClose, p.app.transport) and verifyObject(ITimedHandshake, p.app.transport)
    assert verifyObject(INegotiated, p.app.transport)
    p.app.transport.write(b"the answer")
    p.app.transport.loseConnectionWithoutLinger()
    assert p.tcp.disconnecting and not p.tcp.write_closed, "closed once sent, no write-side close and linger"
    assert not p.tcp.aborted
    p.to_client()
    assert p.client_read() == b"the answer"
    assert p.closed, "close_notify before the close"
    p.app.transport.write(b"after close")
    assert p.tcp.value() == b""
    p.server.connectionLost(Failure(ConnectionDone()))
    assert p.app.lost.check(ConnectionDone)
    assert not p.clock.getDelayedCalls()


def test_a_close_without_linger_lingers_when_the_peer_sent_more(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    p.app.pause_after_first = True
    p.client.write(b"one")
    p.client.write(b"two")
    p.to_server()
    assert p.app.received == [b"one"], "the second record waits, unread"
    p.app.transport.loseConnectionWithoutLinger()
    assert p.tcp.write_closed and not p.tcp.disconnecting, "the peer is still sending: the close lingers"


def test_a_close_without_linger_lingers_when_reading_was_paused(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    p.app.transport.pauseProducing()
    p.app.transport.loseConnectionWithoutLinger()
    assert p.tcp.write_closed and not p.tcp.disconnecting, "what the kernel holds is unknown: the close lingers"
    assert p.tcp.producerState == "producing", "and reads on, to see the peer's close"


def test_a_close_that_never_drains_is_cut(cert_files: tuple[str, str]) -> None:
    from rproxy_tw.tls_transport import CLOSE_TIMEOUT

    p = Pair(cert_files)
    p.handshake()
    p.app.transport.registerProducer(PausedProducer(), True)
    p.app.transport.write(b"x" * 100)
    p.app.transport.loseConnection()
    assert p.tcp.producer is None, "a paused producer would hold Twisted's write-side close"
    p.clock.advance(CLOSE_TIMEOUT - 1)
    assert not p.tcp.aborted
    p.clock.advance(1)
    assert p.tcp.aborted


def test_pull_producers_write_through_the_tcp_transports_buffer(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)
    p.handshake()
    written = []
    p.tcp.write = written.append  # type: ignore[method-assign]
    p.app.transport.registerProducer(PausedProducer(), False)
    p.app.transport.write(b"pulled")
    assert len(written) == 1, "Twisted asks a pull producer for more when its own buffer empties"
    p.app.transport.unregisterProducer()
    p.app.transport.write(b"pushed")
    assert len(written) == 1, "otherwise straight to the socket"


def test_writes_before_the_handshake_come_first(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files)

    def greet() -> None:
        p.app.transport.write(b"second")

    p.app.handshakeCompleted = greet  # type: ignore[method-assign]
    p.app.transport.write(b"first ")
    p.handshake()
    p.to_client()
    assert p.client_read() == b"first second"


def test_a_handshake_that_stalls_is_cut_at_its_deadline(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files, handshake_timeout=10.0)
    try:
        p.client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    p.to_server()  # the ClientHello, answered; the client's Finished never comes
    p.to_client()
    p.clock.advance(9.9)
    assert not p.tcp.aborted
    p.clock.advance(0.1)
    assert p.tcp.aborted
    p.server.connectionLost(Failure(ConnectionDone()))
    assert not p.clock.getDelayedCalls()


def test_the_first_bytes_after_the_handshake_are_due_by_the_same_deadline(cert_files: tuple[str, str]) -> None:
    silent = Pair(cert_files, handshake_timeout=10.0)
    silent.handshake()
    silent.clock.advance(10.0)
    assert silent.tcp.aborted, "a handshake and then nothing is cut too (as a slow request head would be)"
    talking = Pair(cert_files, handshake_timeout=10.0)
    talking.handshake()
    talking.client.write(b"GET")
    talking.to_server()
    talking.clock.advance(100.0)
    assert not talking.tcp.aborted, "from the first bytes on, the HTTP layer's timers are in charge"
    assert not talking.clock.getDelayedCalls(), "and the transport's timer is not made again"


def test_one_timer_serves_handshake_close_and_linger(cert_files: tuple[str, str]) -> None:
    """
    The handshake deadline is the listener's to watch (one call for all its
    connections); the linger, due before it, moves the connection to a timer
    of its own, which the close's backstop shares.
    """
    p = Pair(cert_files, handshake_timeout=10.0)

    def own() -> list[Any]:
        return [c for c in p.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is p.server]

    deadlines = p.server.factory.first_deadlines
    [watch] = p.clock.getDelayedCalls()
    assert own() == [] and deadlines.deadline(p.server) == p.clock.seconds() + 10.0
    p.handshake()
    p.client.write(b"GET / HTTP/1.1")
    p.to_server()
    p.app.transport.write(b"answer")
    p.app.transport.loseConnection()
    assert own() == [], "the close's backstop (CLOSE_TIMEOUT) comes after the watched deadline"
    p.server.writeConnectionLost()  # the response and our FIN went out: linger
    [timer] = own()
    assert deadlines.deadline(p.server) is None
    assert set(p.clock.getDelayedCalls()) == {watch, timer}, "the close's backstop and linger on the same timer"
    p.clock.advance(LINGER - 0.1)
    assert not p.tcp.disconnecting
    p.clock.advance(0.1)
    assert p.tcp.disconnecting and not p.tcp.aborted, "the linger ends on time, before the handshake deadline"
    p.server.connectionLost(Failure(ConnectionDone()))
    assert own() == []


def test_a_closed_connection_is_freed_by_reference_counting(cert_files: tuple[str, str]) -> None:
    """The wrapped protocol and this transport hold each other until the connection is lost, not after."""
    import gc
    import weakref

    p = Pair(cert_files, handshake_timeout=10.0)
    p.handshake()
    p.client.write(b"GET / HTTP/1.1")
    p.to_server()
    p.app.transport.loseConnection()
    gc.collect()
    gc.disable()
    try:
        p.server.connectionLost(Failure(ConnectionDone()))
        freed = weakref.ref(p.server)
        del p
        assert freed() is None
    finally:
        gc.enable()


def test_tls13_session_tickets_go_with_the_first_response(cert_files: tuple[str, str]) -> None:
    """One send fewer per connection: nothing is sent when the client's Finished comes, only with the answer."""
    p = Pair(cert_files)
    p.handshake()
    assert p.client.version() == "TLSv1.3"
    assert p.tcp.writes == 1, "the server's flight; the tickets wait"
    p.client.write(b"GET / HTTP/1.1")
    p.to_server()
    assert p.tcp.writes == 1
    p.app.transport.write(b"answer")
    assert p.tcp.writes == 2
    p.to_client()
    assert p.client_read() == b"answer"
    assert p.client.session is not None and p.client.session.has_ticket, "the tickets came with it"


def test_tls12_handshake_ends_with_the_server_s_finished_at_once(cert_files: tuple[str, str]) -> None:
    p = Pair(cert_files, client_max=ssl.TLSVersion.TLSv1_2)
    p.handshake()
    assert p.client.version() == "TLSv1.2"
    assert p.app.handshakes == 1
