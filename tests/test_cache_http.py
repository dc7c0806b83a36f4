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
import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults

from rproxy_tw.events import CacheHit, CacheMiss, CacheStored, EventRecorder

from .conftest import proxy_config, request, until
from .test_tls import pki  # noqa: F401 - a fixture

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


@inline
def test_concurrent_misses_make_exactly_one_origin_request(net):
    held = []
    origin = yield net.origin(held.append)
    proxy = yield net.proxy(cached_config(origin.backend))
    pending = [get(net, proxy, b"/slow") for _ in range(5)]
    yield origin.until_requests(1)
    yield until(lambda: len(proxy.service.cache._fills[next(iter(proxy.service.cache._fills))].waiters) == 4,
                "four requests waiting")
    held[0].respond(200, b"one answer", [(b"Cache-Control", b"max-age=60")])
    responses = yield gatherResults(pending)
    assert [(r.status, r.body) for r in responses] == [(200, b"one answer")] * 5
    assert len(origin.requests) == 1
    assert sum(b"collapsed" in r.one(b"Cache-Status") for r in responses) == 4


@inline
def test_an_uncacheable_answer_releases_the_waiters_to_the_origin(net):
    held = []
    origin = yield net.origin(held.append)
    proxy = yield net.proxy(cached_config(origin.backend))
    pending = [get(net, proxy, b"/private") for _ in range(3)]
    yield origin.until_requests(1)
    yield until(lambda: proxy.service.cache._fills and
                len(next(iter(proxy.service.cache._fills.values())).waiters) == 2, "two waiting")
    held[0].respond(200, b"mine", [(b"Cache-Control", b"private")])
    yield origin.until_requests(3)
    for req in held[1:]:
        req.respond(200, b"yours", [(b"Cache-Control", b"private")])
    responses = yield gatherResults(pending)
    assert sorted(r.body for r in responses) == [b"mine", b"yours", b"yours"]


@inline
def test_a_stale_response_is_revalidated_and_a_304_refreshes_it(net):
    def handler(req: Any) -> None:
        if req.one(b"If-None-Match") == b'"v1"':
            req.respond(304, b"", [(b"ETag", b'"v1"'), (b"Cache-Control", b"max-age=60"), (b"X-Fresh", b"yes")])
        else:
            req.respond(200, b"body v1", [(b"ETag", b'"v1"'), (b"Cache-Control", b"max-age=0")])
    origin = yield net.origin(handler)
    proxy = yield net.proxy(cached_config(origin.backend))
    first = yield get(net, proxy)
    second = yield get(net, proxy)
    third = yield get(net, proxy)
    assert [r.body for r in (first, second, third)] == [b"body v1"] * 3
    assert len(origin.requests) == 2 and origin.requests[1].one(b"If-None-Match") == b'"v1"'
    assert second.status == 200 and second.one(b"X-Fresh") == b"yes"
    assert second.one(b"Cache-Status").startswith(b"rproxy; fwd=stale; fwd-status=304")
    assert third.one(b"Cache-Status").startswith(b"rproxy; hit")
    # The client's own conditional request is answered 304 from the fresh entry.
    fourth = yield get(net, proxy, headers=[(b"If-None-Match", b'"v1"')])
    assert (fourth.status, fourth.body, len(origin.requests)) == (304, b"", 2)
    assert fourth.one(b"Content-Length") is None and fourth.one(b"ETag") == b'"v1"'
    assert fourth.one(b"Cache-Status").startswith(b"rproxy; hit")


@inline
def test_a_304_naming_another_validator_never_reaches_an_unconditional_client(net):
    """RFC 9111 4.3.4: a 304 whose ETag selects no stored response updates nothing; the client still gets a 200."""
    def handler(req: Any) -> None:
        if req.one(b"If-None-Match") is not None:
            req.respond(304, b"", [(b"ETag", b'"v2"'), (b"Cache-Control", b"max-age=60"), (b"X-Fresh", b"yes")])
        else:
            req.respond(200, b"body v1", [(b"ETag", b'"v1"'), (b"Cache-Control", b"max-age=0")])
    origin = yield net.origin(handler)
    proxy = yield net.proxy(cached_config(origin.backend))
    first = yield get(net, proxy)
    # A client's Cache-Control that asks nothing conditional changes nothing.
    second = yield get(net, proxy, headers=[(b"Cache-Control", b"x-unknown"), (b"Pragma", b"foo")])
    assert (first.status, first.body) == (200, b"body v1")
    assert origin.requests[1].one(b"If-None-Match") == b'"v1"'
    assert (second.status, second.body, second.one(b"ETag")) == (200, b"body v1", b'"v1"')
    assert second.one(b"X-Fresh") is None, "the 304 updated a stored response it does not select"
    third = yield get(net, proxy)
    assert len(origin.requests) == 3, "the stored response was freshened by a 304 that did not select it"
    assert (third.status, third.body) == (200, b"body v1")


@inline
def test_stale_if_error_serves_while_the_origin_is_down(net):
    origin = yield net.origin(answer(body=b"kept", headers=[(b"Cache-Control", b"max-age=0, stale-if-error=600")]))
    proxy = yield net.proxy(cached_config(origin.backend))
    first = yield get(net, proxy)
    yield origin.listening.stopListening()
    for conn in origin.connections:
        conn.transport.abortConnection()
    second = yield get(net, proxy)
    assert (first.body, second.status, second.body) == (b"kept", 200, b"kept")
    assert b"detail=stale-if-error" in second.one(b"Cache-Status")


@inline
def test_stale_if_error_serves_over_an_origin_500(net):
    answers = iter([(200, b"good"), (500, b"broken")])

    def handler(req: Any) -> None:
        status, body = next(answers)
        req.respond(status, body, [(b"Cache-Control", b"max-age=0, stale-if-error=600")])
    origin = yield net.origin(handler)
    proxy = yield net.proxy(cached_config(origin.backend))
    yield get(net, proxy)
    second = yield get(net, proxy)
    assert (second.status, second.body, len(origin.requests)) == (200, b"good", 2)


@inline
def test_must_revalidate_answers_504_when_the_origin_is_down(net):
    origin = yield net.origin(answer(body=b"strict", headers=[(b"Cache-Control", b"max-age=0, must-revalidate")]))
    proxy = yield net.proxy(cached_config(origin.backend))
    yield get(net, proxy)
    yield origin.listening.stopListening()
    for conn in origin.connections:
        conn.transport.abortConnection()
    second = yield get(net, proxy, headers=[(b"Cache-Control", b"max-stale")])
    assert second.status == 504 and b"strict" not in second.body


@inline
def test_only_if_cached_is_504_on_a_miss_and_a_hit_otherwise(net):
    origin = yield net.origin(answer())
    proxy = yield net.proxy(cached_config(origin.backend))
    miss = yield get(net, proxy, headers=[(b"Cache-Control", b"only-if-cached")])
    assert miss.status == 504 and not origin.requests
    yield get(net, proxy)
    hit = yield get(net, proxy, headers=[(b"Cache-Control", b"only-if-cached")])
    assert (hit.status, hit.body, len(origin.requests)) == (200, b"hello", 1)


@inline
def test_purge_from_a_trusted_address_and_the_admin_call(net):
    origin = yield net.origin(answer())
    proxy = yield net.proxy(cached_config(origin.backend))
    yield get(net, proxy, b"/p/1")
    yield get(net, proxy, b"/p/2")
    purged = yield get(net, proxy, b"/p/1", method=b"PURGE")
    assert (purged.status, purged.body) == (200, b"purged 1\n")
    yield get(net, proxy, b"/p/1")
    assert len(origin.requests) == 3
    assert proxy.service.cache.purge("http://www.example.test/p/*") == 2
    yield get(net, proxy, b"/p/2")
    assert len(origin.requests) == 4


@inline
def test_purge_from_an_untrusted_address_is_refused(net):
    origin = yield net.origin(answer())
    config = cached_config(origin.backend)
    config["server"]["trusted_proxies"] = []
    proxy = yield net.proxy(config)
    yield get(net, proxy)
    refused = yield get(net, proxy, method=b"PURGE")
    again = yield get(net, proxy)
    assert refused.status == 403 and len(origin.requests) == 1 and again.one(b"Cache-Status").startswith(b"rproxy; hit")


@inline
def test_a_successful_post_invalidates_the_target_and_its_location(net):
    def handler(req: Any) -> None:
        if req.method == b"POST":
            req.respond(201, b"", [(b"Location", b"/b")])
        else:
            req.respond(200, req.target, [(b"Cache-Control", b"max-age=60")])
    origin = yield net.origin(handler)
    proxy = yield net.proxy(cached_config(origin.backend))
    yield get(net, proxy, b"/a")
    yield get(net, proxy, b"/b")
    yield get(net, proxy, b"/a", method=b"POST")
    yield get(net, proxy, b"/a")
    yield get(net, proxy, b"/b")
    assert [r.method for r in origin.requests] == [b"GET", b"GET", b"POST", b"GET", b"GET"]


@inline
def test_head_and_ranges_are_served_from_a_stored_get(net):
    origin = yield net.origin(answer(body=b"0123456789"))
    proxy = yield net.proxy(cached_config(origin.backend))
    yield get(net, proxy)
    head = yield get(net, proxy, method=b"HEAD")
    part = yield get(net, proxy, headers=[(b"Range", b"bytes=2-5")])
    tail = yield get(net, proxy, headers=[(b"Range", b"bytes=-3")])
    bad = yield get(net, proxy, headers=[(b"Range", b"bytes=50-")])
    assert (head.status, head.body, head.one(b"Content-Length")) == (200, b"", b"10")
    assert (part.status, part.body, part.one(b"Content-Range")) == (206, b"2345", b"bytes 2-5/10")
    assert (tail.status, tail.body) == (206, b"789")
    assert (bad.status, bad.one(b"Content-Range")) == (416, b"bytes */10")
    assert len(origin.requests) == 1


@inline
def test_vary_keeps_one_entry_per_variant(net):
    def handler(req: Any) -> None:
        req.respond(200, b"lang=" + (req.one(b"X-Lang") or b"-"), [(b"Cache-Control", b"max-age=60"),
                                                                  (b"Vary", b"X-Lang")])
    origin = yield net.origin(handler)
    proxy = yield net.proxy(cached_config(origin.backend))
    bodies = []
    for lang in (b"en", b"fr", b"en", b"fr"):
        r = yield get(net, proxy, headers=[(b"X-Lang", lang)])
        bodies.append(r.body)
    assert bodies == [b"lang=en", b"lang=fr", b"lang=en", b"lang=fr"] and len(origin.requests) == 2


@inline
def test_what_must_not_be_stored_is_not(net):
    cases = {b"/no-store": [(b"Cache-Control", b"no-store")], b"/private": [(b"Cache-Control", b"private")],
             b"/vary-star": [(b"Cache-Control", b"max-age=60"), (b"Vary", b"*")]}

    def handler(req: Any) -> None:
        req.respond(200, b"x", cases[req.target])
    origin = yield net.origin(handler)
    proxy = yield net.proxy(cached_config(origin.backend))
    for target in cases:
        yield get(net, proxy, target)
        yield get(net, proxy, target)
    yield get(net, proxy, b"/no-store", headers=[(b"Authorization", b"Basic eDp5")])
    assert len(origin.requests) == 7 and proxy.service.cache.store.keys() == []


@inline
def test_a_response_larger_than_max_object_bytes_streams_uncached(net):
    big = b"z" * 5000
    origin = yield net.origin(answer(body=big))
    proxy = yield net.proxy(cached_config(origin.backend, cache={"max_object_bytes": 4096}))
    first = yield get(net, proxy)
    second = yield get(net, proxy)
    assert first.body == big == second.body and len(origin.requests) == 2


@inline
def test_a_response_cut_short_is_never_stored(net):
    count = []

    def handler(req: Any) -> None:
        count.append(1)
        if len(count) == 1:
            req.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 100\r\n\r\n" + b"half" * 5)
            req.conn.transport.loseConnection()
        else:
            req.respond(200, b"whole", [(b"Cache-Control", b"max-age=60")])
    origin = yield net.origin(handler)
    proxy = yield net.proxy(cached_config(origin.backend))
    client = yield net.client(proxy.port)
    client.send(request(b"GET", b"/a", host=b"www.example.test"))
    yield client.until_closed()
    second = yield get(net, proxy)
    assert (second.body, len(origin.requests)) == (b"whole", 2)


@inline
def test_stale_while_revalidate_serves_at_once_and_refreshes_in_the_background(net):
    versions = iter([b"old", b"new"])

    def handler(req: Any) -> None:
        req.respond(200, next(versions), [(b"Cache-Control", b"max-age=0, stale-while-revalidate=600")])
    origin = yield net.origin(handler)
    proxy = yield net.proxy(cached_config(origin.backend))
    yield get(net, proxy)
    stale = yield get(net, proxy)
    assert stale.body == b"old" and b"detail=stale-while-revalidate" in stale.one(b"Cache-Status")
    yield origin.until_requests(2)
    yield until(lambda: proxy.service.cache.store.variants("http://www.example.test/a")[0].headers and
                not proxy.service.cache._fills, "the background refresh to be stored")
    fresh = yield get(net, proxy)
    assert fresh.body == b"new"


@inline
def test_gzip_and_brotli_round_trip_and_are_cached_as_their_own_entries(net):
    origin = yield net.origin(answer(body=TEXT, headers=[(b"Cache-Control", b"max-age=60"),
                                                         (b"Content-Type", b"text/html"), (b"ETag", b'"t1"')]))
    proxy = yield net.proxy(cached_config(origin.backend, cache={"compress": ["gzip", "br"]}))
    plain = yield get(net, proxy)
    gz = yield get(net, proxy, headers=[(b"Accept-Encoding", b"gzip")])
    br = yield get(net, proxy, headers=[(b"Accept-Encoding", b"gzip;q=0.5, br")])
    gz_hit = yield get(net, proxy, headers=[(b"Accept-Encoding", b"gzip")])
    refused = yield get(net, proxy, headers=[(b"Accept-Encoding", b"gzip;q=0, br;q=0")])
    assert plain.body == TEXT and plain.one(b"Content-Encoding") is None
    assert gz.one(b"Content-Encoding") == b"gzip" and gzip.decompress(gz.body) == TEXT
    assert br.one(b"Content-Encoding") == b"br" and brotli.decompress(br.body) == TEXT
    assert gzip.decompress(gz_hit.body) == TEXT and gz_hit.one(b"Cache-Status").startswith(b"rproxy; hit")
    assert refused.body == TEXT
    assert gz.one(b"ETag") == b'W/"t1"' and plain.one(b"ETag") == b'"t1"'
    assert all(b"Accept-Encoding" in r.one(b"Vary") for r in (plain, gz, br))
    assert len(origin.requests) == 4


@inline
def test_the_disk_store_survives_a_restart_and_streams_bodies_from_files(net, tmp_path):
    big = bytes(range(256)) * 800  # 200 KiB: several reads from the file
    origin = yield net.origin(answer(body=big))
    folder = str(tmp_path / "cache")
    config = cached_config(origin.backend, cache={"store": "disk", "path": folder, "max_disk_bytes": 1 << 22})
    first_proxy = yield net.proxy(config)
    yield first_proxy.service.cache.store.ready
    first = yield get(net, first_proxy)
    yield first_proxy.service.cache.store.flushed()
    assert first.body == big and len(origin.requests) == 1
    yield first_proxy.service.stopService()

    second_proxy = yield net.proxy(config)  # a new process would see the same: nothing in memory, files on disk
    store = second_proxy.service.cache.store
    yield store.ready
    assert store.keys() == ["http://www.example.test/a"] and not store.hot.keys()
    again = yield get(net, second_proxy)
    part = yield get(net, second_proxy, headers=[(b"Range", b"bytes=70000-70009")])
    assert again.body == big and part.body == big[70000:70010] and len(origin.requests) == 1
    assert again.one(b"Cache-Status").startswith(b"rproxy; hit")
    assert store.hot.keys() == ["http://www.example.test/a"]  # read whole once: now in the hot tier too
    assert second_proxy.service.cache.purge("http://www.example.test/a") == 1
    yield store.flushed()
    assert [name for _, _, names in __import__("os").walk(folder) for name in names] == []


@pytest.mark.parametrize("entry", ["http/1.1", "http/2", "embedded"])
@inline
def test_hits_stream_on_every_entry_point(net, pki, entry):
    from .test_pipeline import Proxy

    big = bytes(range(256)) * 1600  # 400 KiB: kept as the pieces it arrived in, written as the client takes them
    origin = yield net.origin(answer(body=big))
    proxy = yield Proxy(net, pki, origin, {"routes": [{"path": "/", "pool": "p", "cache": True}]}).start()
    first = yield proxy.send(entry, b"GET", b"/big")
    second = yield proxy.send(entry, b"GET", b"/big")
    assert first[:2] == (200, big) and second[:2] == (200, big)
    statuses = [dict((n.lower(), v) for n, v in r[2]).get(b"cache-status") for r in (first, second)]
    assert statuses[0] == b"rproxy; fwd=uri-miss; stored" and statuses[1].startswith(b"rproxy; hit")
    assert len(origin.requests) == 1


@inline
def test_a_stale_response_is_served_while_the_origin_is_unreachable_unless_forbidden(net):
    def handler(req: Any) -> None:
        cc = b"max-age=0, no-cache" if req.target == b"/strict" else b"max-age=0"
        req.respond(200, req.target, [(b"Cache-Control", cc), (b"ETag", b'"e"')])
    origin = yield net.origin(handler)
    proxy = yield net.proxy(cached_config(origin.backend))
    yield get(net, proxy, b"/loose")
    yield get(net, proxy, b"/strict")
    yield origin.listening.stopListening()
    for conn in origin.connections:
        conn.transport.abortConnection()
    loose = yield get(net, proxy, b"/loose")
    strict = yield get(net, proxy, b"/strict")
    assert (loose.status, loose.body) == (200, b"/loose") and b"detail=origin-unreachable" in loose.one(b"Cache-Status")
    assert strict.status == 502


@inline
def test_an_applications_request_filter_runs_before_the_cache_answers(net):
    from zope.interface import implementer

    from rproxy_tw.pipeline import IRequestFilter, LocalAnswer

    @implementer(IRequestFilter)
    class Refuse:
        def filterRequest(self, request: Any, exchange: Any) -> Any:
            return LocalAnswer(403, b"no\n") if request.path == b"/secret" else None

    origin = yield net.origin(answer())
    proxy = yield net.proxy(cached_config(origin.backend))
    yield get(net, proxy, b"/secret")
    proxy.service.add_filter(Refuse())
    refused = yield get(net, proxy, b"/secret")
    assert refused.status == 403 and len(origin.requests) == 1


@inline
def test_a_waiting_request_goes_to_the_origin_itself_when_the_wait_is_over(net):
    held = []
    origin = yield net.origin(held.append)
    proxy = yield net.proxy(cached_config(origin.backend))
    proxy.service.cache.collapse_timeout = 0.2  # the bound (5 s by default), short for the test
    slow = get(net, proxy, b"/slow")
    yield origin.until_requests(1)
    impatient = get(net, proxy, b"/slow")
    yield origin.until_requests(2)  # after its bounded wait, it asked the origin itself
    held[1].respond(200, b"second", [(b"Cache-Control", b"max-age=60")])
    held[0].respond(200, b"first", [(b"Cache-Control", b"max-age=60")])
    results = yield gatherResults([slow, impatient])
    assert [r.body for r in results] == [b"first", b"second"]


@inline
def test_after_an_unstorable_answer_misses_no_longer_queue_behind_each_other(net):
    held = []
    origin = yield net.origin(held.append)
    proxy = yield net.proxy(cached_config(origin.backend))
    first = get(net, proxy, b"/private")
    yield origin.until_requests(1)
    held[0].respond(200, b"one", [(b"Cache-Control", b"private")])
    yield first
    both = [get(net, proxy, b"/private"), get(net, proxy, b"/private")]
    yield origin.until_requests(3)  # side by side: neither waits for the other
    for req in held[1:]:
        req.respond(200, b"two", [(b"Cache-Control", b"private")])
    yield gatherResults(both)


@inline
def test_when_the_fetching_client_leaves_the_waiters_go_to_the_origin_at_once(net):
    held = []
    origin = yield net.origin(held.append)
    proxy = yield net.proxy(cached_config(origin.backend))
    cache = proxy.service.cache
    leaving = yield net.client(proxy.port)
    leaving.send(request(b"GET", b"/a", host=b"www.example.test"))
    yield origin.until_requests(1)
    held[0].write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 10\r\n\r\nhalf")
    yield until(lambda: cache.filling_bytes == 4, "the first piece to be kept")
    waiting = get(net, proxy)
    yield until(lambda: cache._fills and next(iter(cache._fills.values())).waiters, "a waiter")
    leaving.abort()
    yield origin.until_requests(2)  # long before the 5 s bound
    held[1].respond(200, b"whole body", [(b"Cache-Control", b"max-age=60")])
    resp = yield waiting
    assert resp.body == b"whole body" and cache.filling_bytes == 0


@inline
def test_a_reload_keeps_the_cache_unless_its_section_changes(net):
    from rproxy_tw import parse_config

    origin = yield net.origin(answer())
    config = cached_config(origin.backend)
    proxy = yield net.proxy(config)
    yield get(net, proxy)
    first = proxy.service.cache
    config["listen"] = [{"endpoint": proxy.service.config.listen[0].endpoint}]
    proxy.service.reload(parse_config(config, source="test.toml"))
    kept = yield get(net, proxy)
    assert proxy.service.cache is first and kept.one(b"Cache-Status").startswith(b"rproxy; hit")
    config["cache"]["max_bytes"] = 1 << 21
    proxy.service.reload(parse_config(config, source="test.toml"))
    fresh = yield get(net, proxy)
    assert proxy.service.cache is not first and fresh.one(b"Cache-Status") == b"rproxy; fwd=uri-miss; stored"
    assert len(origin.requests) == 2


@inline
def test_a_head_answer_freshens_the_stored_get(net):
    def handler(req: Any) -> None:
        if req.method == b"HEAD":
            req.write(b"HTTP/1.1 200 OK\r\nETag: \"h\"\r\nCache-Control: max-age=60\r\nX-Seen: head\r\n"
                      b"Content-Length: 4\r\n\r\n")
        else:
            req.respond(200, b"body", [(b"ETag", b'"h"'), (b"Cache-Control", b"max-age=0")])
    origin = yield net.origin(handler)
    proxy = yield net.proxy(cached_config(origin.backend))
    yield get(net, proxy)
    yield get(net, proxy, method=b"HEAD")
    after = yield get(net, proxy)
    assert (after.body, after.one(b"X-Seen"), len(origin.requests)) == (b"body", b"head", 2)
    assert after.one(b"Cache-Status").startswith(b"rproxy; hit")


@inline
def test_cdn_cache_control_rules_over_cache_control(net):
    """RFC 9213: CDN-Cache-Control targets this cache; Cache-Control still reaches the client as sent."""
    origin = yield net.origin(answer(headers=[(b"Cache-Control", b"no-store"),
                                              (b"CDN-Cache-Control", b"max-age=60")]))
    proxy = yield net.proxy(cached_config(origin.backend))
    first = yield get(net, proxy)
    second = yield get(net, proxy)
    assert (first.status, second.status, second.body, len(origin.requests)) == (200, 200, b"hello", 1)
    assert second.one(b"Cache-Control") == b"no-store"
    assert second.one(b"CDN-Cache-Control") == b"max-age=60"
    assert second.one(b"Cache-Status").startswith(b"rproxy; hit")
