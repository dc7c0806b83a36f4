from twisted.application.service import ServiceMaker

rproxy = ServiceMaker("rproxy", "rproxy_tw.tap", "Streaming reverse proxy and TLS terminator", "rproxy")
