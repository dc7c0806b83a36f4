"""
The shared HTTP cache (RFC 9111): the rules as pure functions
(L{rproxy_tw.cache.rules}), the stores (L{rproxy_tw.cache.store},
L{rproxy_tw.cache.disk}) and the pipeline filter that joins them
(L{HTTPCache}, whose C{purge(url_or_prefix)} the admin API calls).
"""

from __future__ import annotations

from typing import Any

from .filter import HTTPCache
from .store import IBodySource, ICacheStore, MemoryStore

__all__ = ["HTTPCache", "IBodySource", "ICacheStore", "MemoryStore", "build_cache"]

DEFAULT_MAX_DISK_BYTES = 1 << 30


def build_cache(config: Any, reactor: Any, events: Any = None, name: str = "rproxy") -> HTTPCache:
    """The cache a C{[cache]} section describes (an L{rproxy_tw.config.CacheConfig})."""
    if config.store == "disk":
        from .disk import DiskStore

        store: Any = DiskStore(config.path, config.max_disk_bytes or DEFAULT_MAX_DISK_BYTES, reactor,
                               hot=MemoryStore(config.max_bytes))
    else:
        store = MemoryStore(config.max_bytes)
    return HTTPCache(store, reactor, events, max_object_bytes=config.max_object_bytes, name=name,
                     fill_budget=config.max_bytes)
