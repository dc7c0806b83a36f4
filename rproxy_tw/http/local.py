"""
Serving an application's own twisted.web resources mounted in rproxy's tree.

When the routing walk on one of rproxy's listeners ends on a resource that is
not a proxy route (a status page, an app's API mounted with
C{ProxyService.mount}), the request is handed to twisted.web as it is: a real
C{twisted.web.server.Request} rendered through a real C{Site} whose root is
the proxy's router, so sessions, C{NOT_DONE_YET}, producers and child lookup
all behave as in any twisted.web server.  twisted.web needs the body whole
before C{render()}, so it is collected here, up to a bound.
"""

from __future__ import annotations

import io
from typing import Any

from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site
from zope.interface import implementer

from .exchange import IExchange

__all__ = ["LocalResourceExchange", "LOCAL_BODY_LIMIT"]

LOCAL_BODY_LIMIT = 16 * 1024 * 1024
"""The most a local resource's request body may hold (twisted.web reads it whole)."""


class _Channel:
    """What a twisted.web Request needs of its channel, written to our connection."""

    factory = None

    def __init__(self, conn: Any, exchange: LocalResourceExchange, site: Site) -> None:
        self.conn = conn
        self.exchange = exchange
        self.site = site
        self.transport = conn.transport
        self.requestFinished = False

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def isSecure(self) -> bool:
        return self.conn.factory.scheme == "https"

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        server = self.conn.factory.server_header
        if server:
            headers.setRawHeaders(b"Server", [server])
        else:
            headers.removeHeader(b"Server")
        ex = self.exchange
        chunked = headers.hasHeader(b"Transfer-Encoding")
        length = headers.hasHeader(b"Content-Length")
        if not ex.keep_alive or (not chunked and not length and ex.method != b"HEAD" and int(code) not in (204, 304)):
            self.conn.closeAfterResponse()
        if self.conn.closesAfterResponse:
            headers.setRawHeaders(b"Connection", [b"close"])
        elif ex.http_version == b"1.0":
            headers.setRawHeaders(b"Connection", [b"keep-alive"])
        ex.status = int(code)
        seq = [b"HTTP/1.1 ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                seq.extend((name, b": ", value, b"\r\n"))
        seq.append(b"\r\n")
        self.conn.writeResponseHead(b"".join(seq))

    def write(self, data: bytes) -> None:
        self.conn.writeResponseBody(data)

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        # The resource's own producer stands in for the connection's while it writes.
        self.transport.unregisterProducer()
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()
        if not self.conn.disconnected and not self.conn.closing:
            self.transport.registerProducer(self.conn.flow, True)

    def requestDone(self, request: Any) -> None:
        self.exchange.finished = True
        self.conn.exchangeDone(self.exchange)

    def loseConnection(self) -> None:
        self.transport.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.conn.writeLocal(400, "Bad Request", True)
        self.requestDone(None)


@implementer(IExchange)
class LocalResourceExchange:
    """A request answered by a twisted.web resource in the proxy's tree."""

    backend = None
    pool = None
    head_at = None
    attempts = 0
    body_seen = 0
    headSent = False
    upgrade = False

    def __init__(self, conn: Any, site: Site, request: Any, started_at: float | None = None) -> None:
        """
        @param request: the L{rproxy_tw.http.request.ProxyRequest} the
            listener read; twisted.web gets it as the client sent it.
        """
        self.conn = conn
        self.site = site
        self.request = request
        self.method = request.method
        self.url = request.target
        self.http_version = request.http_version
        self.keep_alive = request.keep_alive
        self.started_at = started_at
        self.route_name = None
        self.content = io.BytesIO()
        self.status = 0
        self.started = False
        self.finished = False
        self.requestComplete = False
        self.web_request: Request | None = None

    def start(self) -> None:
        self.started = True
        if self.requestComplete:
            self._render()

    def requestBodyData(self, data: bytes) -> None:
        from .exchange import RequestRejected

        if self.content.tell() + len(data) > LOCAL_BODY_LIMIT:
            raise RequestRejected(413, "Content Too Large")
        self.content.write(data)

    def requestBodyEnd(self) -> None:
        self.requestComplete = True
        if self.started and self.web_request is None:
            self._render()

    def _render(self) -> None:
        request = Request(_Channel(self.conn, self, self.site))
        self.web_request = request
        for name, value in self.request.headers:
            request.requestHeaders.addRawHeader(name, value)
        self.content.seek(0)
        request.content = self.content
        request.requestReceived(self.method, self.url, b"HTTP/" + self.http_version)

    def cancel(self) -> None:
        if self.finished:
            return
        self.finished = True
        request = self.web_request
        if request is not None and not request.finished:
            request.connectionLost(_gone())


def _gone() -> Any:
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    return Failure(ConnectionLost("client went away"))
