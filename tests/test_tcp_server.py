"""
Our TCP listening port and server transport (rproxy_tw/transport/tcp_server.py):
Twisted's transport contract kept on real sockets on 127.0.0.1 (bytes in
order, backpressure both ways, half-close, a close after what was written,
a reset on abort, the protocol told once and never from inside its own
call), and a listener that survives a failing connection and running out of
file descriptors.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableDescriptor,
    IHalfCloseableProtocol,
    IListeningPort,
    IPushProducer,
    IReadWriteDescriptor,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from rproxy_tw.transport.fastwrite import held_bytes
from rproxy_tw.transport.tcp_server import (
    ACCEPT_PAUSE,
    WRITE_HIGH_WATER,
    TCPListeningPort,
    TCPServerConnection,
    TCPServerEndpoint,
    server_endpoint,
)

from .conftest import until

BIG = 8 * 1024 * 1024


class Recorder(Protocol):
    """A server protocol that keeps what it is told, and can be told what to do on connect."""

    on_connect: Any = None

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: list[Any] = []
        self.closing = False
        self.in_close = False

    def connectionMade(self) -> None:
        if self.on_connect is not None:
            self.on_connect(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        assert not self.in_close, "connectionLost from inside the protocol's own loseConnection"
        self.lost.append(reason)

    def close(self) -> None:
        self.in_close = True
        self.transport.loseConnection()
        self.in_close = False


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.read_ended = False
        self.write_ended = False

    def readConnectionLost(self) -> None:
        self.read_ended = True
        self.transport.write(b"after your FIN")
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        self.write_ended = True
        self.transport.loseConnection()


class Listener:
    """A real port on 127.0.0.1 whose protocols are kept for the test to look at."""

    def __init__(self, protocol: type = Recorder, on_connect: Any = None) -> None:
        self.protocols: list[Any] = []
        self.protocol = protocol
        self.on_connect = on_connect
        self.port: Any = None

    def buildProtocol(self, addr: Any) -> Any:
        proto = self.protocol()
        proto.on_connect = self.on_connect
        proto.peer = addr
        self.protocols.append(proto)
        return proto

    @pytest_twisted.inlineCallbacks
    def start(self) -> Any:
        factory = Factory()
        factory.buildProtocol = self.buildProtocol
        factory.noisy = False
        self.port = yield TCPServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        return self


@pytest.fixture
def listener_cleanup():
    ports: list[Any] = []
    yield ports
    for port in ports:
        port.stopListening()


@pytest_twisted.inlineCallbacks
def start(cleanup: list[Any], **kwargs: Any) -> Any:
    listener = yield Listener(**kwargs).start()
    cleanup.append(listener.port)
    return listener


@pytest_twisted.inlineCallbacks
def connect(net: Any, listener: Listener) -> Any:
    client = yield net.client(listener.port.getHost().port)
    yield until(lambda: listener.protocols and listener.protocols[-1].transport, "the server side")
    return client, listener.protocols[-1]


@pytest_twisted.inlineCallbacks
def test_the_transport_and_port_provide_twisted_s_interfaces(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    verifyObject(IListeningPort, listener.port)
    _client, server = yield connect(net, listener)
    for interface in (ITCPTransport, IPushProducer, IConsumer, IReadWriteDescriptor, IHalfCloseableDescriptor):
        verifyObject(interface, server.transport)


@pytest_twisted.inlineCallbacks
def test_bytes_both_ways_and_the_addresses(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    client.send(b"hello")
    yield until(lambda: bytes(server.received) == b"hello", "the server to read")
    server.transport.write(b"and you")
    yield client.until_contains(b"and you")
    assert server.transport.getPeer() == client.transport.getHost() == server.peer
    assert server.transport.getHost() == client.transport.getPeer()
    assert server.transport.getTcpNoDelay()  # inherited from the listener


@pytest_twisted.inlineCallbacks
def test_a_close_sends_everything_written_first_and_tells_the_protocol_once_later(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    client.transport.pauseProducing()  # the client reads nothing: the server's buffer fills
    server.transport.write(b"x" * BIG)
    server.close()
    assert server.lost == []
    yield until(lambda: held_bytes(server.transport) > 0, "bytes to wait in the server")
    client.transport.resumeProducing()
    yield client.until_closed()
    assert len(client.buf) == BIG
    yield until(lambda: server.lost, "the server's protocol to be told")
    assert len(server.lost) == 1 and server.lost[0].check(ConnectionDone)


@pytest_twisted.inlineCallbacks
def test_a_close_with_nothing_buffered_ends_at_once_and_the_protocol_hears_on_the_next_turn(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    server.transport.write(b"bye")
    server.close()
    assert server.lost == []
    yield client.until_closed()
    assert bytes(client.buf) == b"bye"
    yield until(lambda: server.lost, "the server's protocol to be told")
    server.transport.write(b"after the close")  # ignored, as Twisted's are
    assert len(server.lost) == 1


@pytest_twisted.inlineCallbacks
def test_a_close_sends_the_fin_at_once_so_the_server_closes_first(net, listener_cleanup):
    """
    The FIN leaves with the close, not on the next turn: the server is the
    side that closes first (and keeps the TIME_WAIT, as nginx does), before
    a client that read the response closes its own side.
    """
    listener = yield start(listener_cleanup)
    raw = socket.create_connection(("127.0.0.1", listener.port.getHost().port))
    try:
        yield until(lambda: listener.protocols and listener.protocols[-1].transport, "the server side")
        server = listener.protocols[-1]
        server.transport.write(b"bye")
        server.close()
        # The reactor does not turn while this blocks: only a FIN already sent ends the read.
        raw.settimeout(5)
        got = b""
        while True:
            data = raw.recv(100)
            if not data:
                break
            got += data
        assert got == b"bye"
    finally:
        raw.close()
    yield until(lambda: server.lost, "the server's protocol to be told")


class Pausable:
    """A streaming producer that counts how it was asked."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.stopped = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped += 1


@pytest_twisted.inlineCallbacks
def test_nothing_written_after_an_abort_is_sent(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    server.transport.abortConnection()
    server.transport.write(b"after the abort")
    yield client.until_closed()
    assert client.buf == b""
    yield until(lambda: server.lost, "the server's protocol to be told")
    assert server.lost[0].check(ConnectionAborted)


@pytest_twisted.inlineCallbacks
def test_a_write_after_the_close_while_bytes_wait_goes_out_before_the_close(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    client.transport.pauseProducing()
    server.transport.write(b"x" * BIG)
    yield until(lambda: held_bytes(server.transport) > 0, "bytes to wait in the server")
    server.close()
    server.transport.write(b"last words")
    client.transport.resumeProducing()
    yield client.until_closed()
    assert len(client.buf) == BIG + len(b"last words") and client.buf.endswith(b"last words")


@pytest_twisted.inlineCallbacks
def test_the_descriptor_of_an_ended_connection_stays_open_until_the_next_turn(net, listener_cleanup):
    # Closed at once, its number could go to a connection accepted later in
    # the same turn, and an event this turn's poll returned for the old
    # socket would reach the new one.
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    fd = server.transport.fileno()
    server.close()
    assert server.transport not in reactor.getReaders() and server.transport not in reactor.getWriters()
    os.fstat(fd)  # still open: no one else can have this number yet
    assert server.transport.fileno() == fd
    yield client.until_closed()
    yield until(lambda: server.lost, "the server's protocol to be told")
    assert server.transport.fileno() == -1


@pytest_twisted.inlineCallbacks
def test_a_close_with_a_paused_producer_ends_once_its_next_writes_are_sent(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    client.transport.pauseProducing()

    class Writer(Pausable):
        def resumeProducing(self) -> None:
            super().resumeProducing()
            server.transport.write(b"more")

    producer = Writer()
    server.transport.registerProducer(producer, True)
    while not producer.paused:
        server.transport.write(b"y" * 65536)
        yield until(lambda: True)
    server.close()
    client.transport.resumeProducing()
    # Twisted's transport closes once the buffer, and what the resumed
    # producer wrote into it, is sent; the producer is stopped then.
    yield client.until_closed()
    assert client.buf.endswith(b"more")
    yield until(lambda: server.lost, "the server's protocol to be told")
    assert producer.resumed == 1 and producer.stopped == 1


@pytest_twisted.inlineCallbacks
def test_a_protocol_that_raises_in_connection_lost_does_not_keep_the_others_from_hearing(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    _c1, first = yield connect(net, listener)
    _c2, second = yield connect(net, listener)

    def explode(reason: Any = None) -> None:
        raise RuntimeError("a bug in the first protocol's connectionLost")

    first.connectionLost = explode
    first.close()
    second.close()  # both ended in one turn: told together on the next
    yield until(lambda: second.lost, "the second protocol to be told")
    assert len(second.lost) == 1 and second.lost[0].check(ConnectionDone)
    assert first.transport.fileno() == second.transport.fileno() == -1


@pytest_twisted.inlineCallbacks
def test_a_slow_reader_pauses_a_streaming_producer_and_memory_stays_bounded(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    client.transport.pauseProducing()
    producer = Pausable()
    server.transport.registerProducer(producer, True)
    chunk = b"y" * 16384
    sent = 0
    while not producer.paused:
        server.transport.write(chunk)
        sent += len(chunk)
        yield until(lambda: True)
        if sent > 64 * 1024 * 1024:
            raise AssertionError("the producer was never paused")
    assert held_bytes(server.transport) <= WRITE_HIGH_WATER + len(chunk)
    client.transport.resumeProducing()
    yield until(lambda: producer.resumed, "the producer to be resumed once the buffer drained")
    yield until(lambda: len(client.buf) == sent, "every byte to arrive")
    server.transport.unregisterProducer()
    server.close()
    yield client.until_closed()
    assert producer.stopped == 0


class Counting:
    """A pull producer: writes one chunk each time it is asked, until it has written C{total}."""

    def __init__(self, transport: Any, total: int) -> None:
        self.transport = transport
        self.left = total

    def resumeProducing(self) -> None:
        if self.left <= 0:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            return
        n = min(self.left, 100_000)
        self.left -= n
        self.transport.write(b"z" * n)

    def stopProducing(self) -> None:
        pass


@pytest_twisted.inlineCallbacks
def test_a_pull_producer_is_asked_for_more_each_time_the_buffer_drains(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    server.transport.registerProducer(Counting(server.transport, 3_000_000), False)
    yield client.until_closed()
    assert len(client.buf) == 3_000_000


@pytest_twisted.inlineCallbacks
def test_pausing_the_transport_stops_reading(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    server.transport.pauseProducing()
    client.send(b"held")
    yield until(lambda: True)
    for _ in range(5):
        yield until(lambda: True)
    assert server.received == b""
    server.transport.resumeProducing()
    yield until(lambda: bytes(server.received) == b"held", "reading to resume")


@pytest_twisted.inlineCallbacks
def test_half_close_both_ways(net, listener_cleanup):
    listener = yield start(listener_cleanup, protocol=HalfCloser)
    client, server = yield connect(net, listener)
    client.send(b"question")
    yield until(lambda: server.received == b"question", "the server to read")
    client.transport.loseWriteConnection()
    yield until(lambda: server.read_ended, "the server to see the client's FIN")
    yield client.until_closed()
    assert bytes(client.buf) == b"after your FIN" and server.write_ended
    yield until(lambda: server.lost, "the server's protocol to be told")


@pytest_twisted.inlineCallbacks
def test_an_abort_resets_the_connection(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    client, server = yield connect(net, listener)
    server.transport.write(b"x" * BIG)  # some left in our buffer, dropped
    server.transport.abortConnection()
    yield client.until_closed()
    assert "reset" in str(client.reason.value).lower() or client.reason.check(ConnectionDone) is None
    yield until(lambda: server.lost, "the server's protocol to be told")
    assert server.lost[0].check(ConnectionAborted)


@pytest_twisted.inlineCallbacks
def test_a_connection_that_fails_to_start_does_not_close_the_port(net, listener_cleanup):
    def explode(proto: Any) -> None:
        if len(listener.protocols) == 1:
            raise RuntimeError("a bug in the first connection's protocol")

    listener = yield start(listener_cleanup, on_connect=explode)
    first = yield net.client(listener.port.getHost().port)
    yield first.until_closed()
    client, server = yield connect(net, listener)
    client.send(b"still here")
    yield until(lambda: server.received == b"still here", "the second connection to be served")


@pytest_twisted.inlineCallbacks
def test_a_refused_connection_is_closed(net, listener_cleanup):
    listener = yield start(listener_cleanup)
    listener.port.factory.buildProtocol = lambda addr: None
    client = yield net.client(listener.port.getHost().port)
    yield client.until_closed()
    assert client.buf == b""


def test_out_of_file_descriptors_pauses_accepting_and_tries_again() -> None:
    clock = MemoryReactorClock()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    started: list[Any] = []
    factory = Factory.forProtocol(Protocol)
    factory.noisy = False
    factory.buildProtocol = lambda addr: started.append(addr) or Protocol()  # type: ignore[method-assign]
    port = TCPListeningPort(clock, sock, factory)
    port.startListening()
    client = socket.create_connection(sock.getsockname())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
        while True:  # every free descriptor below the limit taken
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        port.doRead()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert started == [] and port not in clock.readers, "a listener out of descriptors stops reading"
    clock.advance(ACCEPT_PAUSE)
    assert port in clock.readers
    port.doRead()
    assert [a.host for a in started] == ["127.0.0.1"]
    client.close()
    port.stopListening()
    assert port not in clock.readers


def test_tcp_listeners_of_a_real_reactor_get_this_port_and_the_rest_twisted_s() -> None:
    endpoint = server_endpoint(reactor, "tcp:0:interface=127.0.0.1:backlog=64")
    assert isinstance(endpoint, TCPServerEndpoint)
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (0, "127.0.0.1", 64)
    six = server_endpoint(reactor, "tcp6:8443:interface=\\:\\:1")
    assert (six.interface, six.family, six.backlog) == ("::1", socket.AF_INET6, 511)
    assert not isinstance(server_endpoint(reactor, "unix:/tmp/rproxy-test.sock"), TCPServerEndpoint)
    assert not isinstance(server_endpoint(MemoryReactor(), "tcp:0"), TCPServerEndpoint)


@pytest_twisted.inlineCallbacks
def test_the_proxy_s_tcp_listeners_serve_on_this_transport(net):
    from .conftest import proxy_config, request

    origin = yield net.origin()
    proxy = yield net.proxy(proxy_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request())
    [resp] = yield client.until_responses([b"GET"])
    assert resp.status == 200
    [conn] = proxy.factory.connections
    assert isinstance(conn.transport, TCPServerConnection)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest_twisted.inlineCallbacks
def test_a_tcp_listener_on_an_ipv6_interface_listens_on_ipv6(net):
    # As Twisted's tcp: endpoint does: the family follows the interface.
    endpoint = server_endpoint(reactor, "tcp:0:interface=\\:\\:1")
    factory = Factory.forProtocol(Recorder)
    factory.noisy = False
    port = yield endpoint.listen(factory)
    try:
        assert port.getHost().host == "::1"
        client = socket.create_connection(("::1", port.getHost().port), timeout=5)
        client.sendall(b"over six")
        client.close()
    finally:
        port.stopListening()


def _port_on_a_memory_reactor() -> tuple[TCPListeningPort, MemoryReactorClock]:
    clock = MemoryReactorClock()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    factory = Factory.forProtocol(Protocol)
    factory.noisy = False
    port = TCPListeningPort(clock, sock, factory)
    port.startListening()
    return port, clock


def test_an_accept_error_about_one_client_skips_it_and_one_about_the_socket_closes_the_port() -> None:
    port, clock = _port_on_a_memory_reactor()
    errors = [OSError(errno.ECONNABORTED, "gone"), BlockingIOError()]
    calls: list[int] = []

    def accept() -> Any:
        calls.append(1)
        raise errors.pop(0)

    port._accept = accept
    port.doRead()
    assert len(calls) == 2 and port in clock.readers, "an aborted client is skipped, the port goes on"
    port._accept = lambda: (_ for _ in ()).throw(OSError(errno.EBADF, "bad descriptor"))
    # Raised to the reactor, which closes the port (as Twisted's port does),
    # not retried a hundred times every turn.
    with pytest.raises(OSError):
        port.doRead()
    port.stopListening()
