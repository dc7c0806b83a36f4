"""
The floor for an HTTP proxy on Twisted: a minimal pair of protocols with the
httptools parser and nothing else (no routing, no header rewriting, no
timeouts, one origin connection per client connection, Content-Length
responses only).  It is not a proxy anyone should run; it measures what the
reactor, the parser and the system calls cost, so that rproxy's numbers can
be read against it.

    python bench/minimal_relay.py LISTEN_PORT ORIGIN_PORT
"""

import sys

import httptools
from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol


class Upstream(Protocol):
    def __init__(self, client):
        self.client = client
        self.parser = httptools.HttpResponseParser(self)

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.client.upstream = self
        for data in self.client.pending:
            self.transport.write(data)
        self.client.pending = []

    def dataReceived(self, data):
        self.client.transport.write(data)


class Client(Protocol):
    def __init__(self, origin_port):
        self.origin_port = origin_port
        self.upstream = None
        self.pending = []
        self.parser = httptools.HttpRequestParser(self)

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        factory = ClientFactory()
        factory.noisy = False
        factory.buildProtocol = lambda addr: Upstream(self)
        reactor.connectTCP("127.0.0.1", self.origin_port, factory)

    def on_url(self, url):
        self.url = url

    def on_message_complete(self):
        method = self.parser.get_method()
        request = b"%s %s HTTP/1.1\r\nHost: origin\r\n\r\n" % (method, self.url)
        if self.upstream is None:
            self.pending.append(request)
        else:
            self.upstream.transport.write(request)

    def dataReceived(self, data):
        self.parser.feed_data(data)

    def connectionLost(self, reason):
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


def main():
    listen_port, origin_port = int(sys.argv[1]), int(sys.argv[2])
    factory = Factory()
    factory.noisy = False
    factory.buildProtocol = lambda addr: Client(origin_port)
    reactor.listenTCP(listen_port, factory, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
