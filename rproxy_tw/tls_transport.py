"""
TLS for HTTP listeners on the standard library's C{ssl.SSLObject}.

Why not Twisted's C{TLSMemoryBIOProtocol}: with pyOpenSSL (cffi) under it,
TLS took 40% of the proxy's time per kept-alive request; C{ssl}'s memory-BIO
objects are the same OpenSSL driven from C, and this transport adds no layer
of its own (one C{SSLObject} call per read or write, then straight to the
socket through L{direct_writer}).

L{TLSServerConnection} is both a protocol (of the TCP connection) and a
transport (for the HTTP protocol it wraps).  What it does about the edges:

  - reading: decrypted bytes go to the wrapped protocol as they come, and
    stop while it is paused; bytes already decrypted or received wait in the
    C{SSLObject} (at most one TCP read), and go on when it resumes.
  - writing and producers: a write is encrypted at once and sent; producers
    are registered with the TCP transport, whose buffer holds the ciphertext,
    so backpressure is the TCP transport's own.
  - closing: C{loseConnection} sends C{close_notify}, and the TCP transport
    shuts the write side once everything written has gone to the kernel.
    From then on the connection reads (and discards) until the peer closes,
    or for C{LINGER} seconds, then closes in order: a client still sending
    is not answered with a reset that could destroy the response's tail
    (nginx's lingering close), and a slow reader is never cut while the
    response is still on its way (the linger starts only after it left).
    A peer's C{close_notify} is answered with ours and the connection closed.
    C{loseConnectionWithoutLinger}, for a peer whose last request was read
    whole, sends C{close_notify} and closes once the buffer is sent (as
    nginx does then, and as the plain TCP transport always does).
  - a failed handshake sends OpenSSL's alert, then closes; the wrapped
    protocol's C{connectionLost} gets the C{ssl.SSLError}.
  - deadlines: the handshake and the first bytes after it must come within
    the factory's C{handshake_timeout}; a close has its backstop and its
    linger.  One timer per connection serves them all: each phase sets a
    timestamp, and the timer, when it fires, acts on what is due and waits
    again for the next (a connection per request made five timers here and
    in the HTTP layer, each scheduled and cancelled).

Raw TCP listeners keep C{TLSMemoryBIOProtocol} (see L{rproxy_tw.tcp.tls_halfclose}),
which carries TLS half-close through to the relay.
"""

from __future__ import annotations

import ssl
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    INegotiated,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .tls import ICertificateReload
from .transport import ILingerlessClose, ITimedHandshake, ip_of
from .transport.deadlines import FirstDeadlines
from .transport.fastwrite import direct_writer
from .logs import observer as log_observer

__all__ = ["LINGER", "TLSServerConnection", "StdlibTLSServerFactory"]

LINGER = 5.0
"""
Seconds a closing connection keeps reading for the peer's close, once all it
wrote was sent; also how long what was written may take to drain once the
peer has closed or TLS failed.
"""

CLOSE_TIMEOUT = 60.0
"""
Seconds an orderly close may take in all (the response's tail to a slow
reader, then the linger) before it is cut: a peer that stopped reading would
otherwise hold it open for good (nginx's C{send_timeout} is the same 60).
"""

_READ_SIZE = 256 * 1024

_log = Logger(observer=log_observer)


@implementer(ITCPTransport, ISSLTransport, INegotiated, IPushProducer, IHalfCloseableProtocol, ILingerlessClose,
             ITimedHandshake)
class TLSServerConnection(Protocol):
    """
    One server-side TLS connection: the TCP transport's protocol, and the
    wrapped protocol's transport.

    @ivar negotiatedProtocol: the ALPN protocol (C{b"h2"}, C{b"http/1.1"}) or
        C{None}, once the handshake is over.
    """

    disconnecting: bool
    disconnected: bool
    negotiatedProtocol: bytes | None

    def __init__(self, factory: StdlibTLSServerFactory, wrapped: Any) -> None:
        self.factory = factory
        self.wrappedProtocol = wrapped
        # On the instance, not as class defaults: CPython 3.11 specializes
        # reading an instance's own attribute, not a class default.
        self.disconnecting = self.disconnected = False
        self.negotiatedProtocol = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls: Any = None
        self._send: Any = None
        self._handshaken = False
        self._tickets_held = False
        """TLS 1.3's session tickets wait in the outgoing buffer for the first write (or the close)."""
        self._early: list[bytes] = []
        self._paused = False
        self._reading = False
        self._resume_call: Any = None
        self._failure: Failure | None = None
        self._timer: Any = None
        self._start_by: float | None = None
        """When the handshake and the first bytes after it must have come (C{None}: they came)."""
        self._cut_by: float | None = None
        """When a close under way is cut (aborted)."""
        self._linger_by: float | None = None
        """When a lingering close stops waiting for the peer's and closes in order."""
        self._direct: Any = None
        self._told_lost = False

    # -- the TCP connection's protocol ---------------------------------------------------------

    def connectionMade(self) -> None:
        contexts = self.factory.contexts
        challenges = contexts.challenges
        if challenges is not None and challenges.tls_alpn01:
            self._hello = b""  # a TLS-ALPN-01 challenge is pending: read the ClientHello first
        else:
            self._tls = contexts.wrap(self._incoming, self._outgoing)
        self._send = self._direct = direct_writer(self.transport)
        factory = self.factory
        timeout = factory.handshake_timeout
        if timeout is not None:
            # The listener watches this first deadline (most connections are
            # past it, or gone, long before): the timer is made when it is reached.
            self._start_by = factory.clock.seconds() + timeout
            if not factory.first_deadlines.watch(self, self._start_by, timeout):
                self._timer = factory.clock.callLater(timeout, self._expired)
        # No TCP_NODELAY here: each handshake flight is one write, and the
        # HTTP/1.1 and HTTP/2 connections set it (through us) when they start.
        self.wrappedProtocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self._handshaken:
            if self._tls is None and not self._choose_context(data):
                return
            if not self._handshake():
                return
        self._deliver()

    def _choose_context(self, data: bytes) -> bool:
        """
        While an ACME TLS-ALPN-01 challenge is pending: once the ClientHello
        is in, start TLS on the challenge's context if it is the CA's
        validator asking (SNI a pending name, ALPN C{acme-tls/1}), else on the
        usual one.  The bytes stay in the incoming buffer for OpenSSL.

        @return: whether TLS has started (C{False}: the hello is not whole yet).
        """
        from .acme.challenges import client_hello

        self._hello += data
        hello = client_hello(self._hello)
        if hello is None:
            return False
        self._hello = b""
        challenge = self.factory.contexts.challenges.tls_alpn01_for(hello)
        if challenge is not None:
            self._tls = challenge.stdlib.wrap_bio(self._incoming, self._outgoing, server_side=True)
        else:
            self._tls = self.factory.contexts.wrap(self._incoming, self._outgoing)
        return True

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.disconnected = True
        self.disconnecting = True
        if self._timer is None:
            self.factory.first_deadlines.discard(self)
        for call in (self._timer, self._resume_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._resume_call = None
        self._tell_lost(self._failure or reason)
        # The wrapped protocol holds us as its transport: let go of it (as
        # Twisted's TCP transport lets go of its protocol), so that reference
        # counting frees a closed connection, not the garbage collector.
        self.wrappedProtocol = None

    def _tell_lost(self, reason: Failure) -> None:
        if not self._told_lost:
            self._told_lost = True
            self.wrappedProtocol.connectionLost(reason)

    def readConnectionLost(self) -> None:
        """
        The peer's FIN: after our close, both directions are done; else it
        came without a close_notify, and the connection is over (as a plain
        TCP connection's would be).  Every byte before it was delivered:
        reading resumes only once what was buffered is.
        """
        if self.disconnecting:
            self.transport.loseConnection()
        else:
            self._end(Failure(ConnectionDone("the peer closed its side")))

    def _end(self, reason: Failure) -> None:
        """
        The connection is over for the wrapped protocol: it is told now (its
        producer unregistered, so nothing more is pulled from an origin),
        what was written is sent, then the socket closes; a drain that does
        not end within C{LINGER} seconds is cut.
        """
        self.disconnecting = True
        self._early = []
        self._unregister_tcp_producer()
        self._tell_lost(reason)
        self.transport.loseConnection()
        self._cut_after(LINGER)

    def _unregister_tcp_producer(self) -> None:
        if self.transport.producer is not None:
            self.transport.unregisterProducer()
        self._send = self._direct

    def _cut_after(self, seconds: float) -> None:
        """Abort the connection if it is still open in C{seconds} (or earlier, if already set so)."""
        when = self.factory.clock.seconds() + seconds
        if self._cut_by is None or when < self._cut_by:
            self._cut_by = when
            self._arm(when)

    def writeConnectionLost(self) -> None:
        """Our FIN went out after everything written: linger for the peer's close, then close in order."""
        if self._linger_by is None and not self.disconnected:
            self._linger_by = self.factory.clock.seconds() + LINGER
            self._arm(self._linger_by)

    def _arm(self, when: float) -> None:
        """Have the connection's timer fire by C{when}: made if there is none, moved if it is due later."""
        call, clock = self._timer, self.factory.clock
        if call is None:
            deadlines = self.factory.first_deadlines
            first = deadlines.deadline(self)
            if first is not None and first <= when:
                return  # the listener's watch fires first; _expired arms the timer then
            deadlines.discard(self)
            self._timer = clock.callLater(max(0.0, when - clock.seconds()), self._expired)
        elif call.getTime() > when:
            call.reset(max(0.0, when - clock.seconds()))

    def _expired(self) -> None:
        """The timer fired: act on each deadline that is due, then wait for the next one."""
        self._timer = None
        if self.disconnected:
            return
        now = self.factory.clock.seconds()
        if (self._cut_by is not None and now >= self._cut_by) or (self._start_by is not None and now >= self._start_by):
            # A close that did not end, or a handshake (or its first bytes) that did not come.
            self._cut_by = self._start_by = self._linger_by = None
            self.abortConnection()
            return
        if self._linger_by is not None and now >= self._linger_by:
            self._linger_by = None
            self.transport.loseConnection()
        pending = [t for t in (self._start_by, self._cut_by, self._linger_by) if t is not None]
        if pending:
            self._arm(min(pending))

    def _handshake(self) -> bool:
        """Go on with the handshake.  @return: whether it is over and the connection open."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError as e:
            self.factory.handshakeFailed(self.transport.getPeer(), e)
            self._fail(e)
            return False
        self._handshaken = True
        alpn = self._tls.selected_alpn_protocol()
        if alpn is not None:
            self.negotiatedProtocol = alpn.encode("ascii")
        if self._tls.version() == "TLSv1.3":
            # All OpenSSL wrote now is the session tickets, which no client
            # waits for: they go with the first response, one send fewer per
            # connection.  (TLS 1.2's last flight has the server's Finished.)
            self._tickets_held = True
        else:
            self._flush()
        if self._early:
            early, self._early = b"".join(self._early), []
            self.write(early)
        listener = IHandshakeListener(self.wrappedProtocol, None)
        if listener is not None:
            listener.handshakeCompleted()
        return not self.disconnecting

    def _deliver(self) -> None:
        """Hand decrypted bytes to the wrapped protocol until none are left, or it pauses us."""
        if self._reading:
            return  # re-entered from the wrapped protocol: the outer loop goes on
        self._reading = True
        tls, incoming = self._tls, self._incoming
        read = tls.read
        wrapped = self.wrappedProtocol
        try:
            while not self._paused:
                if not incoming.pending and not tls.pending():
                    # Nothing to decrypt: the read would raise SSLWantReadError,
                    # which costs more than the rest of a read (a few per connection).
                    break
                try:
                    data = read(_READ_SIZE)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    # The peer's close_notify after ours (the ssl module
                    # returns b"" only when the peer closed first).
                    data = b""
                except ssl.SSLError as e:
                    self._fail(e)
                    return
                if not data:
                    self._peer_closed()
                    return
                if self.disconnecting:
                    continue  # closing: read on (for the peer's close) but deliver nothing
                self._start_by = None
                wrapped.dataReceived(data)
        finally:
            self._reading = False
        if self._outgoing.pending and not self._tickets_held:
            self._flush()  # a TLS 1.3 key update, for one

    def _flush(self) -> None:
        self._tickets_held = False
        if self._outgoing.pending:
            self._send(self._outgoing.read())

    def _fail(self, error: ssl.SSLError) -> None:
        """A TLS error: send OpenSSL's alert, close, and tell the wrapped protocol why."""
        _log.debug("tls: {peer}: {error}", peer=self.transport.getPeer(), error=error)
        self._failure = Failure(error)
        self._flush()
        self._end(self._failure)

    def _peer_closed(self) -> None:
        """The peer's close_notify: answer it; the connection is over."""
        if self.disconnecting:
            # Our close is under way and now both sides are done.
            self.transport.loseConnection()
            return
        self._close_notify()
        self._end(Failure(ConnectionDone("the peer sent close_notify")))

    def _close_notify(self) -> None:
        try:
            self._tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass  # the alert is written; waiting for the peer's is the linger's job
        self._flush()

    # -- the wrapped protocol's transport ------------------------------------------------------

    @property
    def times_handshake(self) -> bool:
        """Whether this transport cuts a handshake (or its first bytes) slower than the factory's timeout."""
        return self.factory.handshake_timeout is not None

    def write(self, data: bytes) -> None:
        if self.disconnecting or not data:
            return
        if not self._handshaken:
            self._early.append(data)
            return
        try:
            self._tls.write(data)
        except ssl.SSLError as e:
            self._fail(e)
            return
        self._tickets_held = False
        self._send(self._outgoing.read())

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        self._close(linger=True)

    def loseConnectionWithoutLinger(self) -> None:
        """
        Close when the peer has nothing more to send (its last request was
        read whole): C{close_notify}, then the socket closes once what was
        written is sent, without shutting the write side and waiting for the
        peer's close (nginx closes so when no request bytes are left unread;
        the linger costs a reactor turn, two C{epoll_ctl} and a read per
        connection).  Bytes not yet read from the peer mean it did send
        more, and a paused connection may have some in the kernel (closing
        on them would reset the connection): then the close lingers, as
        L{loseConnection}'s does.
        """
        unread = not self._handshaken or self._paused or self._incoming.pending or self._tls.pending()
        self._close(linger=bool(unread))

    def _close(self, linger: bool) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        self._early = []
        if self._handshaken:
            self._close_notify()
        # Nothing written from now on is sent, so a producer has nothing to do
        # (and a paused one would keep Twisted from shutting the write side).
        self._unregister_tcp_producer()
        self._cut_after(CLOSE_TIMEOUT)
        if not linger or not ITCPTransport.providedBy(self.transport):
            self.transport.loseConnection()
            return
        self.transport.loseWriteConnection()  # then writeConnectionLost, once the buffer is sent
        if self._paused:
            # Read on, to see the peer's close (what arrives is discarded).
            self._paused = False
            self.transport.resumeProducing()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.transport.abortConnection()

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def getPeerCertificate(self) -> None:
        """No client certificates here: mutual-TLS listeners use pyOpenSSL (L{rproxy_tw.tls})."""
        return None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if not streaming:
            # A pull producer is asked for more when Twisted's buffer empties,
            # which it only sees if the writes go through that buffer.
            self._send = self.transport.write
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._send = self._direct
        self.transport.unregisterProducer()

    # Reading is ours to pause: decrypted bytes wait in the SSLObject.
    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._handshaken and (self._tls.pending() or self._incoming.pending):
            # What is buffered goes first, and not from inside the caller's
            # stack (a plain TCP transport delivers on a later reactor turn
            # too); reading resumes after it, so a FIN cannot overtake it.
            if self._resume_call is None:
                self._resume_call = self.factory.clock.callLater(0, self._resumed)
        else:
            self.transport.resumeProducing()

    def _resumed(self) -> None:
        self._resume_call = None
        if self.disconnected:
            return
        self._deliver()
        if not self._paused and not self.disconnected:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abortConnection()

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def getTcpNoDelay(self) -> bool:
        return self.transport.getTcpNoDelay()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self.transport.getTcpKeepAlive()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)


@implementer(ICertificateReload)
class StdlibTLSServerFactory(Factory):
    """
    TLS around an HTTP listener's factory.  Starts the ticket rotation and the
    file watcher with the listener and stops them with it.
    """

    noisy = False

    def __init__(self, contexts: Any, wrapped: IProtocolFactory, clock: IReactorTime, events: Any = None,
                 listener: str = "", handshake_timeout: float | None = None) -> None:
        """
        @param handshake_timeout: seconds a connection has for its handshake
            and its first bytes after it (C{None}: no limit here; the HTTP
            layer's ALPN switch times it then).
        """
        self.contexts = contexts
        self.handshake_timeout = handshake_timeout
        self.wrappedFactory = wrapped
        self.clock = clock
        self.events = events
        self.listener = listener
        self.first_deadlines = FirstDeadlines(clock, TLSServerConnection._expired)
        """Each new connection's handshake deadline, on one timer (L{FirstDeadlines})."""

    def handshakeFailed(self, peer: Any, error: ssl.SSLError) -> None:
        """Tell the observers (metrics count failures by reason); the log has it at debug level."""
        events = self.events
        if events is not None and events.wanted:
            from .events import TLSHandshakeFailed

            reason = error.reason or type(error).__name__
            events.publish(TLSHandshakeFailed(self.listener, ip_of(peer) or "unknown", str(reason)))

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def startFactory(self) -> None:
        self.contexts.start()

    def stopFactory(self) -> None:
        self.contexts.stop()

    def buildProtocol(self, addr: Any) -> Any:
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return TLSServerConnection(self, wrapped)

    def reload(self) -> bool:
        """Re-read the certificate files (for SIGHUP).  @return: whether they are in use."""
        return self.contexts.reload()
