"""
Instructions per proxied request on the HTTP/1.1 path, in memory: a kept-alive
client connection and a kept-alive origin connection on StringTransports, a
1 KiB response.  Run under callgrind at two counts and take the difference
(the imports and set-up cancel out); PYTHONHASHSEED=0 keeps dict layouts equal:

    for n in 200 1200; do PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python bench/hotpath_callgrind.py $n 2>&1 | grep Collected; done
    # (second - first) / 1000 = instructions per request
"""
import sys

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from rproxy_tw.config import parse_config
from rproxy_tw.http.server import HTTPProxyFactory
from rproxy_tw.service import ProxyRuntime

N = int(sys.argv[1])
reactor = MemoryReactorClock()
config = parse_config({"listen": [{"endpoint": "tcp:0"}], "route": [{"path": "/", "pool": "p"}],
                       "pool": {"p": {"backends": ["tcp:10.0.0.1:8000"]}}, "server": {"access_log": "off"}},
                      source="bench")
runtime = ProxyRuntime(config, reactor)
factory = HTTPProxyFactory(runtime, reactor)
addr = IPv4Address("TCP", "127.0.0.1", 40000)
proto = factory.buildProtocol(addr)
client = StringTransport(peerAddress=addr, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), lenient=True)
proto.makeConnection(client)
REQ = b"GET /index.html HTTP/1.1\r\nHost: localhost\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1024
origin = origin_transport = None
for i in range(N):
    proto.dataReceived(REQ)
    if origin is None:
        host, port, f, _, _ = reactor.tcpClients[0]
        origin = f.buildProtocol(IPv4Address("TCP", host, port))
        origin_transport = StringTransport(lenient=True)
        origin.makeConnection(origin_transport)
    assert origin_transport.value().startswith(b"GET /index.html"), origin_transport.value()
    origin_transport.clear()
    origin.dataReceived(RESP)
    assert client.value().endswith(b"x" * 1024), client.value()[:200]
    client.clear()
assert len(reactor.tcpClients) == 1
print("ok", N)
