"""
The per-request cost of scrubbing, counted rather than timed (bench/scrub.sh times it): one
process runs a trivial origin, rproxy and 10 keep-alive clients sending
C{GET /1k.bin?q=red+shoes&page=2} with a browser User-Agent, N requests in all.
Under callgrind, the instructions of two runs (N=1000 and N=3000) differ by the cost
of 2000 requests, whatever the start-up cost; machine load does not change them.

    python bench/scrub_harness.py direct|plain|waf|rl|waf-rl N [profile]
    bench/scrub_callgrind.sh direct plain waf rl waf-rl   # instructions per request, each variant

(direct: the clients talk to the origin without the proxy, so that plain - direct is the proxy's share.)
"""
import os, sys, time, cProfile, pstats
from twisted.internet import reactor, defer
from twisted.internet.protocol import Protocol, Factory
from rproxy_tw import ProxyService, parse_config

BODY = b"x" * 1024
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nContent-Type: application/octet-stream\r\n\r\n" + BODY

class Origin(Protocol):
    def dataReceived(self, data):
        n = data.count(b"\r\n\r\n")
        self.transport.write(RESP * n)

REQ = (b"GET /1k.bin?q=red+shoes&page=2 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
       b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0\r\n\r\n")

class Client(Protocol):
    def __init__(self, n, done): self.left = n; self.done = done; self.buf = 0
    def connectionMade(self): self.transport.write(REQ)
    def dataReceived(self, data):
        self.buf += data.count(b"HTTP/1.1 200")
        while self.buf:
            self.buf -= 1
            self.left -= 1
            if self.left <= 0:
                self.transport.loseConnection(); self.done.callback(None); return
            self.transport.write(REQ)

@defer.inlineCallbacks
def main(variant, n, profile):
    o = reactor.listenTCP(0, Factory.forProtocol(Origin), interface="127.0.0.1")
    cfg = {"listen": [{"endpoint": "tcp:0:interface=127.0.0.1"}], "route": [{"path": "/", "pool": "p"}],
           "pool": {"p": {"backends": [f"tcp:127.0.0.1:{o.getHost().port}"]}}, "server": {"access_log": "off"}}
    if "waf" in variant: cfg["waf"] = {}
    if "rl" in variant: cfg["rate_limit"] = {"requests": 10**7, "per": 1.0, "burst": 10**7}
    if variant == "direct":
        # No proxy: the clients talk to the origin, so that plain - direct is the proxy's own cost.
        p = o.getHost().port
    else:
        svc = ProxyService(parse_config(cfg), reactor); svc.startService()
        [port] = yield svc.listening()
        p = port.getHost().port
    from twisted.internet.endpoints import TCP4ClientEndpoint
    ds = []
    for _ in range(10):
        d = defer.Deferred(); ds.append(d)
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", p).connect(Factory.forProtocol(lambda d=d: Client(200, d)))
    yield defer.gatherResults(ds)  # warm up
    ds = []
    prof = cProfile.Profile() if profile else None
    t0 = time.process_time()
    if prof: prof.enable()
    for _ in range(10):
        d = defer.Deferred(); ds.append(d)
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", p).connect(Factory.forProtocol(lambda d=d: Client(n // 10, d)))
    yield defer.gatherResults(ds)
    if prof: prof.disable()
    cpu = time.process_time() - t0
    print(f"{variant}: {cpu / n * 1e6:.1f} us CPU per request (client, proxy and origin together)")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(os.environ.get("PROFILE_FILTER", ""), 25)
    reactor.stop()

variant, n = sys.argv[1], int(sys.argv[2])
reactor.callWhenRunning(lambda: main(variant, n, len(sys.argv) > 3))
reactor.run()
