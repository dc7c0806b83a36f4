"""
The proxy's per-request cost without sockets or load: client and origin are
played in memory (C{StringTransport}s on a C{MemoryReactorClock}), so the
figure does not depend on what else runs on the machine.  For before/after
comparisons of one change; the wall-clock benchmarks are bench/*.sh.

Modes:
  - C{h2}: one HTTP/2 connection, C{--streams} requests at a time (h2load's
    C{-m}); the client's frames are made ahead of time, so only the proxy's
    work is measured.  C{H2ServerConnection} directly, no TLS.  Every head
    after the first is the same block (h2load's, all fields indexed).
  - C{h2-paths}: the same, but every request has a path of its own, as a
    browser's do: each head is a new block (literal fields, the path added
    to the dynamic table), so no decoder can have seen it before.
  - C{h1}: C{--streams} kept-alive HTTP/1.1 connections, one request each per round.
  - C{close}: a new HTTP/1.1 connection per request (C{Connection: close}):
    C{buildProtocol}, C{makeConnection}, the request, the close.
  - C{close-tls}: the same over TLS (a full handshake each time; the
    client's share of it is counted too).

Each origin answers as the bench's nginx origin does (9 header fields, a
C{--size} body).  Prints microseconds of CPU per request and, with
C{--profile}, the top of a cProfile.  For instruction counts, run it twice under
callgrind with different C{--requests} and divide the difference:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/inmem.py h2 --requests 2000
"""

from __future__ import annotations

import argparse
import bisect
import cProfile
import gc
import pstats
import sys
import time
from typing import Any

from hpack import Encoder
from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.testing import MemoryReactorClock, StringTransport

from rproxy_tw.config import parse_config
from rproxy_tw.http.h2 import H2ServerConnection
from rproxy_tw.http.server import HTTPProxyFactory
from rproxy_tw.service import ProxyRuntime

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)
SERVER = IPv4Address("TCP", "127.0.0.1", 8443)
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def origin_response(size: int) -> bytes:
    """What the bench's origin nginx sends for a static file."""
    return (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 23:50:00 GMT\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n"
        b"Last-Modified: Sun, 06 Dec 2026 23:49:00 GMT\r\nConnection: keep-alive\r\n"
        b'ETag: "6759a0ec-400"\r\nAccept-Ranges: bytes\r\n\r\n' % size
    ) + b"x" * size


class _HeapLikeClock(MemoryReactorClock):
    """
    C{task.Clock} sorts every pending call on each C{callLater} and each
    call it runs (Python key calls, n log n): a few thousand pending timers
    would cost the driver far more than a reactor's heap costs rproxy.  Here
    calls are kept in time order as they are added (bisect), so pending
    timers cost about what they do in a real reactor.  (A call moved with
    C{reset} or C{delay} would be out of order; none fires in this driver,
    whose clock never moves.)
    """

    def _sortCalls(self) -> None:
        pass

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> Any:
        call = super().callLater(delay, callable, *args, **kw)
        self.calls.pop()
        bisect.insort(self.calls, call, key=DelayedCall.getTime)
        return call


class Proxy:
    """One listener's factory on a memory reactor, and the origins it connected to."""

    def __init__(self, scheme: str) -> None:
        self.reactor = _HeapLikeClock()
        config = parse_config({
            "listen": [{"endpoint": "tcp:0:interface=127.0.0.1"}],
            "route": [{"path": "/", "pool": "p"}],
            "pool": {"p": {"backends": ["tcp:10.0.0.1:8000"]}},
            "server": {"access_log": "off"},
        }, source="inmem.toml")
        self.runtime = ProxyRuntime(config, self.reactor)
        self.factory = HTTPProxyFactory(self.runtime, self.reactor, scheme=scheme)
        self.origins: list[tuple[Any, StringTransport]] = []
        self.accepted = 0

    def serve_origins(self, response: bytes) -> None:
        """Accept new origin connections, and answer every request an origin has received."""
        clients = self.reactor.tcpClients
        while self.accepted < len(clients):
            host, port, factory, _t, _b = clients[self.accepted]
            self.accepted += 1
            proto = factory.buildProtocol(IPv4Address("TCP", host, port))
            transport = StringTransport(peerAddress=IPv4Address("TCP", host, port), lenient=True)
            proto.makeConnection(transport)
            self.origins.append((proto, transport))
        for proto, transport in self.origins:
            if transport.value():
                transport.clear()
                proto.dataReceived(response)

    def turn(self) -> None:
        """The end of a reactor turn: what was scheduled for now runs."""
        self.reactor.advance(0)


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload


def h2_client_bytes(rounds: int, streams: int, size: int) -> tuple[bytes, list[bytes]]:
    """
    The client's preface (SETTINGS with a 16 MiB stream window, a 16 MiB
    connection window, the ACK of the server's SETTINGS), then one chunk of
    frames per round: C{streams} GETs and the window their answers use.
    Made by hand, so that making them costs next to nothing (callgrind counts
    the whole process): the header blocks are hpack's, as a client with a
    dynamic table sends them (h2load does), and from the second request on
    every field is indexed, so one block serves every later request.
    """
    headers = [(b":method", b"GET"), (b":path", b"/1k.bin"), (b":scheme", b"https"),
               (b":authority", b"127.0.0.1:8443"), (b"user-agent", b"h2load nghttp2/1.52.0")]
    encoder = Encoder()
    first, later = encoder.encode(headers), encoder.encode(headers)
    assert encoder.encode(headers) == later
    preface = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
               + _frame(0x4, 0, 0, (0x4).to_bytes(2, "big") + (1 << 24).to_bytes(4, "big"))
               + _frame(0x8, 0, 0, (1 << 24).to_bytes(4, "big"))
               + _frame(0x4, 0x1, 0, b""))
    chunks = []
    sid = 1
    for _ in range(rounds):
        frames = []
        for _ in range(streams):
            frames.append(_frame(0x1, 0x5, sid, first if sid == 1 else later))  # END_STREAM | END_HEADERS
            sid += 2
        frames.append(_frame(0x8, 0, 0, (streams * size).to_bytes(4, "big")))
        chunks.append(b"".join(frames))
    return preface, chunks


def h2_client_bytes_paths(rounds: int, streams: int, size: int) -> tuple[bytes, list[bytes]]:
    """As L{h2_client_bytes}, but each head a new block: see the C{h2-paths} mode."""
    preface, _ = h2_client_bytes(1, 1, size)

    def literal(first: bytes, value: bytes) -> bytes:
        return first + bytes((len(value),)) + value

    chunks = []
    sid = 1
    for _ in range(rounds):
        frames = []
        for _ in range(streams):
            block = (b"\x82\x87" + literal(b"\x01", b"127.0.0.1:8443")  # GET https, :authority (no indexing)
                     + literal(b"\x44", b"/1k.bin?r=%d" % sid)  # :path, added to the dynamic table
                     + literal(b"\x0f\x2b", b"h2load nghttp2/1.52.0"))  # user-agent (no indexing)
            frames.append(_frame(0x1, 0x5, sid, block))
            sid += 2
        frames.append(_frame(0x8, 0, 0, (streams * size).to_bytes(4, "big")))
        chunks.append(b"".join(frames))
    return preface, chunks


def _answers(out: bytes, got: dict[int, list[int]]) -> None:
    """Per stream: [HEADERS seen starting with :status 200, DATA bytes, ended], from raw frames."""
    pos = 0
    while pos < len(out):
        length = int.from_bytes(out[pos:pos + 3], "big")
        kind, flags = out[pos + 3], out[pos + 4]
        sid = int.from_bytes(out[pos + 5:pos + 9], "big")
        payload = out[pos + 9:pos + 9 + length]
        pos += 9 + length
        if not sid:
            continue
        state = got.setdefault(sid, [0, 0, 0])
        if kind == 0x1:
            state[0] = payload[:1] == b"\x88"  # :status 200, indexed
        elif kind == 0x0:
            state[1] += length
        if kind in (0x0, 0x1) and flags & 0x1:
            state[2] = 1


def prepare_h2(rounds: int, streams: int, size: int) -> Any:
    return h2_client_bytes(rounds, streams, size)


def run_h2(proxy: Proxy, rounds: int, streams: int, size: int, check: bool, prepared: Any) -> int:
    preface, chunks = prepared
    conn = H2ServerConnection(proxy.factory)
    transport = StringTransport(peerAddress=CLIENT, hostAddress=SERVER, lenient=True)
    conn.makeConnection(transport)
    conn.dataReceived(preface)
    proxy.turn()
    response = origin_response(size)
    got: dict[int, list[int]] = {}
    for chunk in chunks:
        conn.dataReceived(chunk)
        proxy.turn()
        proxy.serve_origins(response)
        proxy.turn()
        out = transport.value()
        transport.clear()
        if check:
            _answers(out, got)
    if check:
        whole = sum(1 for ok, n, ended in got.values() if ok and n == size and ended)
        if whole != rounds * streams:
            sys.exit(f"h2: {whole} of {rounds * streams} answers whole: {got}")
    return rounds * streams


def run_h1(proxy: Proxy, rounds: int, streams: int, size: int, check: bool, prepared: Any) -> int:
    request = b"GET /1k.bin HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
    conns = []
    for i in range(streams):
        proto = proxy.factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT, hostAddress=SERVER, lenient=True)
        proto.makeConnection(transport)
        conns.append((proto, transport))
    response = origin_response(size)
    for _ in range(rounds):
        for proto, _t in conns:
            proto.dataReceived(request)
        proxy.serve_origins(response)
        proxy.turn()
        for _p, transport in conns:
            out = transport.value()
            transport.clear()
            if check and not (out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"x" * size)):
                sys.exit(f"h1: bad answer {out[:200]!r}")
    return rounds * streams


def run_close(proxy: Proxy, rounds: int, streams: int, size: int, check: bool, prepared: Any) -> int:
    request = b"GET /1k.bin HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\r\n"
    response = origin_response(size)
    n = 0
    for _ in range(rounds):
        conns = []
        for i in range(streams):
            proto = proxy.factory.buildProtocol(CLIENT)
            transport = StringTransport(peerAddress=CLIENT, hostAddress=SERVER, lenient=True)
            proto.makeConnection(transport)
            proto.dataReceived(request)
            conns.append((proto, transport))
        proxy.serve_origins(response)
        proxy.turn()
        for proto, transport in conns:
            out = transport.value()
            if check and not (out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"x" * size)
                              and transport.disconnecting):
                sys.exit(f"close: bad answer {out[:200]!r}")
            proto.connectionLost(None)
            n += 1
        proxy.turn()
    return n


def _certificate() -> tuple[str, str]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 (as bench/h2.sh's), in a temporary directory."""
    import subprocess
    import tempfile

    d = tempfile.mkdtemp(prefix="rproxy-inmem-")
    cert, key = f"{d}/cert.pem", f"{d}/key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


class _TCPStringTransport(StringTransport):
    """What the TLS transport asks of its TCP transport beyond C{StringTransport}."""

    nodelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.nodelay


def prepare_tls(rounds: int, streams: int, size: int) -> Any:
    import ssl

    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_alpn_protocols(["http/1.1"])
    return _certificate(), client


def run_close_tls(proxy: Proxy, rounds: int, streams: int, size: int, check: bool, prepared: Any) -> int:
    """
    A new TLS connection per request (full handshake, TLS 1.3, one GET with
    C{Connection: close}), client side on C{ssl} memory BIOs.  The client's
    share of the handshake is counted too (callgrind counts the process): the
    same for any two versions of rproxy.
    """
    import ssl

    from rproxy_tw.tls import tls_server_factory

    (cert, key), client_ctx = prepared
    config = parse_config({
        "listen": [{"endpoint": "tcp:0:interface=127.0.0.1", "tls": "t"}],
        "tls": {"t": {"certificates": [{"cert": cert, "key": key}]}},
        "route": [{"path": "/", "pool": "p"}],
        "pool": {"p": {"backends": ["tcp:10.0.0.1:8000"]}},
        "server": {"access_log": "off"},
    }, source="inmem.toml")
    tls = tls_server_factory(proxy.reactor, config.tls["t"], proxy.factory, http=True,
                             handshake_timeout=proxy.factory.limits.header_timeout)  # as service.py does
    tls.doStart()
    request = b"GET /1k.bin HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nConnection: close\r\n\r\n"
    response = origin_response(size)
    n = 0
    for _ in range(rounds * streams):
        proto = tls.buildProtocol(CLIENT)
        transport = _TCPStringTransport(peerAddress=CLIENT, hostAddress=SERVER, lenient=True)
        proto.makeConnection(transport)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_ctx.wrap_bio(incoming, outgoing)
        while True:
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                proto.dataReceived(outgoing.read())
                incoming.write(transport.value())
                transport.clear()
        client.write(request)
        proto.dataReceived(outgoing.read())
        proxy.serve_origins(response)
        proxy.turn()
        incoming.write(transport.value())
        transport.clear()
        got = b""
        try:
            while True:
                data = client.read(65536)
                if not data:
                    break
                got += data
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass
        if check and not (got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"x" * size)):
            sys.exit(f"close-tls: bad answer {got[:200]!r}")
        proto.connectionLost(None)
        n += 1
    proxy.turn()
    return n


def prepare_nothing(rounds: int, streams: int, size: int) -> Any:
    return None


MODES = {"h2": ("https", prepare_h2, run_h2), "h2-paths": ("https", h2_client_bytes_paths, run_h2), "h1": ("http", prepare_nothing, run_h1),
         "close": ("http", prepare_nothing, run_close), "close-tls": ("https", prepare_tls, run_close_tls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=sorted(MODES))
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--profile", action="store_true", help="print the top of a cProfile")
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() before the measured run (as tap.py does)")
    args = ap.parse_args()
    scheme, prepare, run = MODES[args.mode]
    rounds = max(1, args.requests // args.streams)
    # A short run that checks every answer, then the measured one (warm caches).
    run(Proxy(scheme), 20, args.streams, args.size, True, prepare(20, args.streams, args.size))
    prepared = prepare(rounds, args.streams, args.size)
    proxy = Proxy(scheme)
    if args.gc_freeze:
        gc.freeze()
    gc_time = [0.0, 0, 0.0]  # seconds in collections, collections, start of the current one
    by_generation = [[0, 0.0], [0, 0.0], [0, 0.0]]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_time[2] = time.process_time()
        else:
            spent = time.process_time() - gc_time[2]
            gc_time[0] += spent
            gc_time[1] += 1
            by_generation[info["generation"]][0] += 1
            by_generation[info["generation"]][1] += spent

    gc.callbacks.append(on_gc)
    profile = cProfile.Profile() if args.profile else None
    t0 = time.process_time()
    if profile is not None:
        profile.enable()
    n = run(proxy, rounds, args.streams, args.size, False, prepared)
    if profile is not None:
        profile.disable()
    spent = time.process_time() - t0
    gc.callbacks.remove(on_gc)
    print(f"{args.mode}: {n} requests, {spent * 1e6 / n:.1f} us CPU per request"
          f"{' (under cProfile)' if profile else ''}; garbage collector: {gc_time[1]} collections,"
          f" {gc_time[0] * 1e6 / n:.1f} us per request (by generation: "
          + ", ".join(f"{c} in {t * 1e3:.0f} ms" for c, t in by_generation) + ")")
    if profile is not None:
        pstats.Stats(profile).sort_stats(args.sort).print_stats(30)


if __name__ == "__main__":
    main()
