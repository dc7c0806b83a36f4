"""
The shared cache and compression through a real proxy, against a real
origin on 127.0.0.1 that counts what it receives: hits that never reach the
origin, collapsing, revalidation, stale on error, purge, invalidation, and
compressed bodies that decompress to the origin's bytes.
"""

from __future__ import annotations

import gzip
from typing import Any

import brotli
import pytest_twisted
from twisted.internet.defer import gatherResults

from rproxy_tw.events import CacheEvicted, CacheHit, CacheMiss, CacheStored, EventRecorder

from .conftest import proxy_config, request, until

inline = pytest_twisted.inlineCallbacks

TEXT = b"".join(b"line %d of a compressible page\n" % i for i in range(400))


def cached_config(backend: str, cache: dict[str, Any] | None = None, **route: Any) -> dict[str, Any]:
    config = proxy_config(backend, routes=[{"path": "/", "pool": "p", "cache": True, **route}],
                          server={"trusted_proxies": ["127.0.0.1/32"]})
    config["cache"] = {"max_bytes": 1 << 20, **(cache or {})}
    return config


def answer(status: int = 200, body: bytes = b"hello", headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    def handler(req: Any) -> None:
        req.respond(status, body, headers if headers is not None else [(b"Cache-Control", b"max-age=60"),
                                                                       (b"Content-Type", b"text/plain")])
    return handler


@inline
def get(net: Any, proxy: Any, target: bytes = b"/a", headers: list[tuple[bytes, bytes]] = (),
        method: bytes = b"GET") -> Any:
    client = yield net.client(proxy.port)
    client.send(request(method, target, host=b"www.example.test", headers=list(headers)))
    [resp] = yield client.until_responses([method])
    client.abort()
    return resp


@inline
def test_a_hit_makes_no_origin_request(net):
    origin = yield net.origin(answer())
    proxy = yield net.proxy(cached_config(origin.backend))
    recorder = EventRecorder()
    proxy.service.runtime.events.subscribe(recorder)
    first = yield get(net, proxy)
    second = yield get(net, proxy)
    assert (first.status, first.body, second.status, second.body) == (200, b"hello", 200, b"hello")
    assert len(origin.requests) == 1
    assert first.one(b"Cache-Status") == b"rproxy; fwd=uri-miss; stored"
    assert second.one(b"Cache-Status").startswith(b"rproxy; hit; ttl=")
    assert second.one(b"Age") is not None
    assert [type(e) for e in recorder.events if isinstance(e, (CacheHit, CacheMiss, CacheStored))] == \
        [CacheMiss, CacheStored, CacheHit]
