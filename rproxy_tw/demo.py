"""
The demo origin that the sample config starts next to the proxy, so that
C{twistd -n rproxy --config etc/rproxy.toml} serves something out of the box.

A plain twisted.web static site plus C{/healthz}; it is an origin like any
other and reaches clients only through the proxy.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data, File

from .config import DemoOriginConfig

__all__ = ["demo_origin_service"]


class _Echo(Resource):
    """Shows what the origin received: the proof that the proxy forwarded it."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        lines = [f"{request.method.decode()} {request.uri.decode('latin-1')} {request.clientproto.decode()}"]
        for name, values in request.requestHeaders.getAllRawHeaders():
            for value in values:
                lines.append(f"{name.decode('latin-1')}: {value.decode('latin-1')}")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return ("\n".join(lines) + "\n").encode("utf-8")


def demo_origin_service(reactor: Any, config: DemoOriginConfig) -> IService:
    root = File(config.root)
    root.putChild(b"healthz", Data(b"ok\n", "text/plain"))
    root.putChild(b"echo", _Echo())
    site = Site(root)
    site.displayTracebacks = False
    service = StreamServerEndpointService(serverFromString(reactor, config.endpoint), site)
    service.setName("demo origin")
    return service
