"""
What operations features cost per request, in instructions (callgrind) or
CPU time, on the in-memory HTTP/1.1 path: a wrk-like kept-alive 1 KiB GET
through HTTPServerConnection and UpstreamConnection on StringTransports.

    python bench/ops_cost.py VARIANT N [WARMUP]  # run N requests after WARMUP (for callgrind)
    bench/ops_cost.sh                            # every variant under callgrind: instructions per request

With OPS_COST_CALLGRIND set to the path of a library built from
bench/callgrind_marks.c (ops_cost.sh builds it), only the N requests after
the warm-up are counted: start-up and imports are not, nor the first requests.

Variants: bare (no request ids, no log, no metrics), ids (request ids),
events (ids + an observer that does nothing: the cost of the events themselves),
metrics (ids + the admin's event observer), log (ids + access log to a file),
stdout (ids + access log "-", stdout sent to /dev/null), ops (ids + log + metrics).
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from rproxy_tw.config import parse_config
from rproxy_tw.http.server import HTTPProxyFactory
from rproxy_tw.service import ProxyRuntime

REQUEST = b"GET /1k.bin HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
BODY = os.urandom(1024)
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 07 Dec 2026 00:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n\r\n" + BODY)


def build(variant: str) -> tuple[MemoryReactorClock, HTTPProxyFactory, ProxyRuntime]:
    server: dict[str, object] = {"access_log": "off"}
    if variant == "bare":
        server["request_id_header"] = ""
    if variant in ("log", "ops"):
        server["access_log"] = os.path.join(tempfile.mkdtemp(), "access.log")
    if variant == "stdout":
        server["access_log"] = "-"
    data = {
        "listen": [{"endpoint": "tcp:8080"}],
        "route": [{"path": "/", "pool": "p"}],
        "pool": {"p": {"backends": ["tcp:10.0.0.1:8000"]}},
        "server": server,
    }
    reactor = MemoryReactorClock()
    runtime = ProxyRuntime(parse_config(data), reactor)
    if variant in ("metrics", "ops"):
        from rproxy_tw.admin.api import LocalSource

        class _Service:
            pass

        service = _Service()
        service.runtime = runtime  # type: ignore[attr-defined]
        service._slots = []  # type: ignore[attr-defined]
        runtime.events.subscribe(LocalSource(service).counters)
    if variant == "events":
        from zope.interface import implementer

        from rproxy_tw.events import IRequestObserver

        @implementer(IRequestObserver)
        class _Nothing:
            """Handed each finished request as the access log and metrics are (observe_request)."""

            def observe(self, event: object) -> None:
                pass

            def observe_request(self, event: object) -> None:
                pass

        runtime.events.subscribe(_Nothing())
    return reactor, HTTPProxyFactory(runtime, reactor), runtime


def run(variant: str, n: int, warmup: int = 0) -> None:
    marks = os.environ.get("OPS_COST_CALLGRIND")
    counting = ctypes.CDLL(marks) if marks else None
    reactor, factory, runtime = build(variant)
    addr = IPv4Address("TCP", "127.0.0.1", 40000)
    client = factory.buildProtocol(addr)
    ct = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
    client.makeConnection(ct)
    client.dataReceived(REQUEST)
    host, port, ofactory, _t, _b = reactor.tcpClients[0]
    origin = ofactory.buildProtocol(IPv4Address("TCP", host, port))
    ot = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    origin.makeConnection(ot)
    origin.dataReceived(RESPONSE)
    for i in range(warmup + n - 1):
        if i == warmup and counting is not None:
            counting.count_start()
        ct.clear()
        ot.clear()
        reactor.advance(0.0001)
        client.dataReceived(REQUEST)
        origin.dataReceived(RESPONSE)
    if counting is not None:
        counting.count_stop()
    assert ct.value().endswith(BODY), ct.value()[:200]
    if runtime.access_log is not None:
        runtime.access_log.close()


if __name__ == "__main__":
    if sys.argv[1] == "stdout":
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
    run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
