"""
rproxy embedded in an application of your own: run with

    twistd -n -y etc/embedded.py

The application's Site on :8090 serves its own page at / and mounts the proxy's
Resource tree at /proxy/; the proxy's own listener (:8080, from etc/rproxy.toml)
serves the application's /status resource next to its proxied routes.
"""

import os

from twisted.application import service, strports
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from rproxy_tw import ProxyService, load_config

application = service.Application("embedded rproxy")
app = service.MultiService()
app.setServiceParent(application)

proxy = ProxyService(load_config(os.path.join(os.path.dirname(__file__), "rproxy.toml")), reactor)
proxy.setServiceParent(app)
proxy.mount("/status", Data(b"application status: ok\n", "text/plain"))

root = Resource()
root.putChild(b"", Data(b"the application's own page; the proxy is under /proxy/\n", "text/plain"))
root.putChild(b"proxy", proxy.resource)
strports.service("tcp:8090:interface=127.0.0.1", Site(root)).setServiceParent(app)
