"""
rproxy_tw: a streaming reverse proxy and TLS terminator on Twisted.

Embedding::

    from rproxy_tw import ProxyService, load_config
    proxy = ProxyService(load_config("rproxy.toml"), reactor)
    proxy.setServiceParent(application_multiservice)   # as an IService
    site_root.putChild(b"proxy", proxy.resource)        # or mount its Resource tree
    proxy.mount("/status", my_resource)                 # and ours can serve yours
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("rproxy_tw")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

from .config import ConfigError, ProxyConfig, load_config, parse_config, quick_config
from .routing import HostRouter, ProxyRoute
from .service import ListenError, ProxyRuntime, ProxyService, service_from_file

__all__ = [
    "ConfigError",
    "HostRouter",
    "ListenError",
    "ProxyConfig",
    "ProxyRoute",
    "ProxyRuntime",
    "ProxyService",
    "load_config",
    "parse_config",
    "quick_config",
    "service_from_file",
    "__version__",
]
