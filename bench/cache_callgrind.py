"""
Instructions per request on the HTTP/1.1 path, in memory, for a cache hit
against the same 1 KiB response proxied uncached: a kept-alive client
connection (and, uncached, a kept-alive origin connection) on StringTransports.
Load on the machine does not change instruction counts.  Run under callgrind
at two counts and take the difference (imports and set-up cancel out):

    for mode in proxy hit; do for n in 200 1200; do PYTHONHASHSEED=0 valgrind --tool=callgrind \
        --callgrind-out-file=/dev/null .venv/bin/python bench/cache_callgrind.py $mode $n 2>&1 | grep Collected
    done; done
    # (second - first) / 1000 = instructions per request

Mode C{plain} is C{proxy} with no C{Cache-Control} in the response: the
plain HTTP/1.1 hot path that other changes are measured on.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's rproxy_tw

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from rproxy_tw.config import parse_config
from rproxy_tw.http.server import HTTPProxyFactory
from rproxy_tw.service import ProxyRuntime

MODE, N = sys.argv[1], int(sys.argv[2])
reactor = MemoryReactorClock()
reactor.advance(1_800_000_000)
config = parse_config({"listen": [{"endpoint": "tcp:0"}], "route": [{"path": "/", "pool": "p", "cache": MODE == "hit"}],
                       "pool": {"p": {"backends": ["tcp:10.0.0.1:8000"]}}, "server": {"access_log": "off"}},
                      source="bench")
runtime = ProxyRuntime(config, reactor)
factory = HTTPProxyFactory(runtime, reactor)
addr = IPv4Address("TCP", "127.0.0.1", 40000)
proto = factory.buildProtocol(addr)
client = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), lenient=True)
proto.makeConnection(client)
REQ = b"GET /index.html HTTP/1.1\r\nHost: localhost\r\n\r\n"
CACHE_CONTROL = b"" if MODE == "plain" else b"Cache-Control: max-age=86400\r\n"
RESP = b"HTTP/1.1 200 OK\r\n" + CACHE_CONTROL + b"Content-Length: 1024\r\n\r\n" + b"x" * 1024
origin = origin_transport = None
for i in range(N):
    proto.dataReceived(REQ)
    if origin is None:
        host, port, f, _, _ = reactor.tcpClients[0]
        origin = f.buildProtocol(IPv4Address("TCP", host, port))
        origin_transport = StringTransport(lenient=True)
        origin.makeConnection(origin_transport)
    if MODE != "hit" or i == 0:
        assert origin_transport.value().startswith(b"GET /index.html"), origin_transport.value()
        origin_transport.clear()
        origin.dataReceived(RESP)
    else:
        assert not origin_transport.value()
    assert client.value().endswith(b"x" * 1024), client.value()[:300]
    if MODE == "hit" and i == 1:
        assert b"Cache-Status: rproxy; hit" in client.value(), client.value()[:300]
    client.clear()
print("ok", MODE, N)
