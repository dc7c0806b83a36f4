"""The RFC 9111 rules as pure functions: storability, freshness, age, Vary, reuse, validation, invalidation, ranges."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings, strategies as st
from zope.interface.verify import verifyObject

from rproxy_tw.cache import rules
from rproxy_tw.cache.rules import StoredResponse
from rproxy_tw.cache.store import ChunkSource, IBodySource, ICacheStore, MemoryStore, entry_cost
from rproxy_tw.compress import accepted_codings, choose_encoding, compressible_type

NOW = 1_700_000_000.0
DATE = b"Tue, 14 Nov 2023 22:13:20 GMT"  # NOW as an HTTP-date


def stored(*headers: tuple[bytes, bytes], status: int = 200, request_time: float = NOW, response_time: float = NOW,
           vary: tuple[bytes, ...] | None = (), variant: tuple = (), size: int = 10) -> StoredResponse:
    return StoredResponse(key="http://h/a", variant=variant, vary=vary, status=status, reason=b"OK",
                          headers=tuple(headers), request_time=request_time, response_time=response_time,
                          body_size=size)


def test_http_dates_in_all_three_forms():
    assert rules.parse_http_date(DATE) == NOW
    assert rules.parse_http_date(b"Tuesday, 14-Nov-23 22:13:20 GMT") == NOW
    assert rules.parse_http_date(b"Tue Nov 14 22:13:20 2023") == NOW
    assert rules.parse_http_date(b"0") is None and rules.parse_http_date(b"soon") is None


def test_cache_control_reads_every_line_keeps_the_first_value_and_unquotes():
    cc = rules.cache_control([(b"Cache-Control", b'max-age=10, private="Set-Cookie, X"'),
                              (b"cache-control", b"Max-Age=99, no-transform")])
    assert cc.seconds(b"max-age") == 10 and cc.arg(b"private") == b"Set-Cookie, X" and b"no-transform" in cc
    assert rules.cache_control([(b"Cache-Control", b"max-age=ten")]).seconds(b"max-age") == -1
    assert rules.cache_control([(b"Cache-Control", b"max-age=99999999999")]).seconds(b"max-age") == rules.DELTA_MAX


STORABLE = [
    (b"GET", 200, [], [(b"Cache-Control", b"max-age=60")], True),
    (b"GET", 200, [], [], True),  # heuristically cacheable status
    (b"GET", 302, [], [], False),  # not heuristically cacheable, no explicit freshness
    (b"GET", 302, [], [(b"Cache-Control", b"max-age=60")], True),
    (b"GET", 500, [], [(b"Expires", DATE)], True),
    (b"POST", 200, [], [(b"Cache-Control", b"max-age=60")], False),
    (b"HEAD", 200, [], [(b"Cache-Control", b"max-age=60")], False),
    (b"GET", 206, [], [(b"Cache-Control", b"max-age=60")], False),
    (b"GET", 304, [], [(b"Cache-Control", b"max-age=60")], False),
    (b"GET", 200, [], [(b"Cache-Control", b"no-store, max-age=60")], False),
    (b"GET", 200, [(b"Cache-Control", b"no-store")], [(b"Cache-Control", b"max-age=60")], False),
    (b"GET", 200, [], [(b"Cache-Control", b"private, max-age=60")], False),
    (b"GET", 200, [], [(b"Cache-Control", b'private="Set-Cookie", max-age=60')], True),
    (b"GET", 200, [(b"Authorization", b"x")], [(b"Cache-Control", b"max-age=60")], False),
    (b"GET", 200, [(b"Authorization", b"x")], [(b"Cache-Control", b"s-maxage=60")], True),
    (b"GET", 200, [(b"Authorization", b"x")], [(b"Cache-Control", b"public")], True),
    (b"GET", 200, [(b"Authorization", b"x")], [(b"Cache-Control", b"must-revalidate, max-age=5")], True),
    (b"GET", 200, [], [(b"Cache-Control", b"must-understand, no-store, max-age=60")], True),
    (b"GET", 299, [], [(b"Cache-Control", b"must-understand, no-store, max-age=60")], False),
    # Content-Range means nothing on a 200 (RFC 9110 14.4): the response is complete and storable.
    (b"GET", 200, [], [(b"Cache-Control", b"max-age=60"), (b"Content-Range", b"bytes 0-1/2")], True),
    # A 416 answers a Range, not the resource: reused for a plain GET it would be wrong.
    (b"GET", 416, [(b"Range", b"bytes=50-")], [(b"Cache-Control", b"max-age=60"),
                                                (b"Content-Range", b"bytes */10")], False),
]


@pytest.mark.parametrize("method,status,request_headers,response_headers,expected", STORABLE)
def test_storable(method, status, request_headers, response_headers, expected):
    assert rules.storable(method, status, request_headers, response_headers) is expected


def test_qualified_private_fields_are_not_stored():
    kept = rules.stored_headers([(b"Cache-Control", b'private="set-cookie"'), (b"Set-Cookie", b"a=b"),
                                 (b"X", b"y")])
    assert [n for n, _ in kept] == [b"Cache-Control", b"X"]


@pytest.mark.parametrize("headers,lifetime", [
    ([(b"Cache-Control", b"s-maxage=5, max-age=50"), (b"Date", DATE)], 5),
    ([(b"Cache-Control", b"max-age=50"), (b"Expires", b"Tue, 14 Nov 2023 23:13:20 GMT"), (b"Date", DATE)], 50),
    ([(b"Expires", b"Tue, 14 Nov 2023 23:13:20 GMT"), (b"Date", DATE)], 3600),
    ([(b"Expires", b"0"), (b"Date", DATE)], 0),
    ([(b"Cache-Control", b"max-age=abc")], 0),
    ([(b"Last-Modified", b"Tue, 14 Nov 2023 12:13:20 GMT"), (b"Date", DATE)], 3600),  # 10% of 10 hours
    ([(b"Last-Modified", b"Tue, 14 Nov 2013 12:13:20 GMT"), (b"Date", DATE)], rules.HEURISTIC_MAX),
    ([], 0),
])
def test_freshness_lifetime(headers, lifetime):
    assert rules.freshness_lifetime(stored(*headers)) == lifetime


def test_no_heuristic_for_a_status_that_does_not_allow_it():
    lm = (b"Last-Modified", b"Tue, 14 Nov 2023 12:13:20 GMT")
    assert rules.freshness_lifetime(stored(lm, (b"Date", DATE), status=302)) == 0
    assert rules.freshness_lifetime(stored(lm, (b"Date", DATE), (b"Cache-Control", b"public"), status=302)) == 3600


def test_current_age_follows_section_4_2_3():
    # Date says 10 s before the response arrived; the origin said Age 30; the request took 2 s.
    r = stored((b"Date", b"Tue, 14 Nov 2023 22:13:10 GMT"), (b"Age", b"30"), request_time=NOW - 2, response_time=NOW)
    assert rules.current_age(r, NOW + 5) == 30 + 2 + 5
    # A Date in the future never makes the age negative; an invalid Age is ignored.
    r = stored((b"Date", b"Tue, 14 Nov 2023 23:13:20 GMT"), (b"Age", b"x"))
    assert rules.current_age(r, NOW) == 0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(age=st.integers(0, 10**6), delay=st.floats(0, 100), resident=st.floats(0, 10**6),
       skew=st.integers(-1000, 1000))
def test_current_age_is_never_below_the_age_header_plus_resident_time(age, delay, resident, skew):
    date = rules.parse_http_date(DATE)
    r = stored((b"Date", DATE), (b"Age", b"%d" % age), request_time=date + skew - delay, response_time=date + skew)
    assert rules.current_age(r, date + skew + resident) >= age + resident - 1e-6


def test_vary_fields_and_variant_matching():
    assert rules.vary_fields([(b"Vary", b"Accept-Encoding, x-lang"), (b"vary", b"Accept")]) == \
        (b"accept", b"accept-encoding", b"x-lang")
    assert rules.vary_fields([(b"Vary", b"a, *")]) is None
    vary = (b"accept-encoding",)
    r = stored(vary=vary, variant=rules.variant_key(vary, [(b"Accept-Encoding", b"gzip,  br")]))
    assert rules.variant_matches(r, [(b"accept-encoding", b"gzip, br")])
    assert not rules.variant_matches(r, [(b"Accept-Encoding", b"br")])
    assert not rules.variant_matches(r, [])
    assert rules.variant_matches(r, [(b"Accept-Encoding", b"BR;q=1.0"), (b"Accept-Encoding", b"gzip")])
    assert not rules.variant_matches(r, [(b"Accept-Encoding", b"br;q=0.5, gzip")])
    half = stored(vary=vary, variant=rules.variant_key(vary, [(b"Accept-Encoding", b"gzip;q=0.50, br")]))
    assert rules.variant_matches(half, [(b"Accept-Encoding", b"br, gzip;q=0.5")])
    absent = stored(vary=vary, variant=rules.variant_key(vary, []))
    assert rules.variant_matches(absent, []) and not rules.variant_matches(absent, [(b"Accept-Encoding", b"")])
    assert not rules.variant_matches(stored(vary=None), [])


def test_cache_keys_are_the_target_uri():
    assert rules.cache_key("https", b"WWW.Example.test", b"/a", b"b=1") == "https://www.example.test/a?b=1"
    assert rules.cache_key("http", b"h", b"/", b"") == "http://h/"


FRESH = (b"Cache-Control", b"max-age=100")


@pytest.mark.parametrize("response_headers,request_headers,now,decision", [
    ([FRESH], [], NOW + 50, rules.SERVE),
    ([FRESH], [], NOW + 150, rules.REVALIDATE),
    ([FRESH], [(b"Cache-Control", b"no-cache")], NOW, rules.REVALIDATE),
    ([FRESH], [(b"Pragma", b"no-cache")], NOW, rules.REVALIDATE),
    ([FRESH], [(b"Pragma", b"no-cache"), (b"Cache-Control", b"max-stale")], NOW, rules.SERVE),
    ([(b"Cache-Control", b"max-age=100, no-cache")], [], NOW, rules.REVALIDATE),
    ([FRESH], [(b"Cache-Control", b"max-age=10")], NOW + 50, rules.REVALIDATE),
    ([FRESH], [(b"Cache-Control", b"min-fresh=60")], NOW + 50, rules.REVALIDATE),
    ([FRESH], [(b"Cache-Control", b"min-fresh=40")], NOW + 50, rules.SERVE),
    ([FRESH], [(b"Cache-Control", b"max-stale")], NOW + 1000, rules.SERVE),
    ([FRESH], [(b"Cache-Control", b"max-stale=10")], NOW + 105, rules.SERVE),
    ([FRESH], [(b"Cache-Control", b"max-stale=10")], NOW + 120, rules.REVALIDATE),
    ([(b"Cache-Control", b"max-age=100, must-revalidate")], [(b"Cache-Control", b"max-stale")], NOW + 150,
     rules.REVALIDATE),
    ([(b"Cache-Control", b"s-maxage=100")], [(b"Cache-Control", b"max-stale")], NOW + 150, rules.REVALIDATE),
    ([(b"Cache-Control", b"max-age=100, stale-while-revalidate=60")], [], NOW + 150, rules.SERVE_STALE_REVALIDATE),
    ([(b"Cache-Control", b"max-age=100, stale-while-revalidate=60")], [], NOW + 170, rules.REVALIDATE),
])
def test_reuse(response_headers, request_headers, now, decision):
    assert rules.reuse(stored((b"Date", DATE), *response_headers), request_headers, now) == decision


def test_stale_if_error_windows():
    r = stored((b"Date", DATE), (b"Cache-Control", b"max-age=10, stale-if-error=60"))
    assert rules.may_serve_on_error(r, [], NOW + 60) and not rules.may_serve_on_error(r, [], NOW + 80)
    plain = stored((b"Date", DATE), (b"Cache-Control", b"max-age=10"))
    assert not rules.may_serve_on_error(plain, [], NOW + 20)
    assert rules.may_serve_on_error(plain, [(b"Cache-Control", b"stale-if-error=30")], NOW + 20)
    strict = stored((b"Date", DATE), (b"Cache-Control", b"max-age=10, must-revalidate, stale-if-error=60"))
    assert not rules.may_serve_on_error(strict, [], NOW + 20)


def test_validators_and_conditional_requests():
    r = stored((b"ETag", b'"x"'), (b"Last-Modified", DATE))
    assert rules.validators(r) == [(b"If-None-Match", b'"x"'), (b"If-Modified-Since", DATE)]
    assert rules.evaluate_conditions(r, b"GET", [(b"If-None-Match", b'"a", W/"x"')])
    assert rules.evaluate_conditions(r, b"HEAD", [(b"If-None-Match", b"*")])
    assert not rules.evaluate_conditions(r, b"GET", [(b"If-None-Match", b'"y"'), (b"If-Modified-Since", DATE)])
    assert rules.evaluate_conditions(r, b"GET", [(b"If-Modified-Since", DATE)])
    assert not rules.evaluate_conditions(r, b"GET", [(b"If-Modified-Since", b"Tue, 14 Nov 2023 22:13:19 GMT")])
    assert not rules.evaluate_conditions(r, b"POST", [(b"If-None-Match", b"*")])
    assert not rules.evaluate_conditions(stored((b"ETag", b'"x"'), status=404), b"GET", [(b"If-None-Match", b'"x"')])


def test_a_304_freshens_the_stored_headers_but_not_the_body_description():
    r = stored((b"ETag", b'"x"'), (b"Content-Length", b"10"), (b"Cache-Control", b"max-age=0"), (b"X-Old", b"1"))
    assert rules.matches_304(r, [(b"ETag", b'W/"x"')]) and not rules.matches_304(r, [(b"ETag", b'"y"')])
    new = rules.merge_304(r, [(b"Cache-Control", b"max-age=60"), (b"Content-Length", b"0"), (b"ETag", b'"x"')],
                          NOW + 1, NOW + 2)
    assert dict(new.headers) == {b"Content-Length": b"10", b"X-Old": b"1", b"Cache-Control": b"max-age=60",
                                 b"ETag": b'"x"'}
    assert (new.request_time, new.response_time, new.body_size) == (NOW + 1, NOW + 2, 10)


def test_a_304_never_replaces_a_digest_of_the_stored_bytes():
    """Content-MD5 / Content-Digest describe the stored body, which a 304 does not replace."""
    r = stored((b"ETag", b'"x"'), (b"Content-MD5", b"rL0Y20zC+Fzt72VPzMSk2A=="), (b"Content-Digest", b"sha-256=:a:"))
    new = rules.merge_304(r, [(b"ETag", b'"x"'), (b"Content-MD5", b"N7UdGUp1E+RbVvZSTy1R8g=="),
                              (b"Content-Digest", b"sha-256=:b:"), (b"X-New", b"2")], NOW + 1, NOW + 2)
    assert dict(new.headers) == {b"ETag": b'"x"', b"Content-MD5": b"rL0Y20zC+Fzt72VPzMSk2A==",
                                 b"Content-Digest": b"sha-256=:a:", b"X-New": b"2"}


def test_a_head_answer_updates_the_stored_get_it_describes():
    """RFC 9111 4.3.5 with 4.3.4: matching validators and length, or no validator on either side."""
    r = stored((b"Content-Length", b"10"))
    assert rules.head_updates(r, [(b"Cache-Control", b"max-age=60")], None)
    assert rules.head_updates(r, [], 10)
    assert not rules.head_updates(r, [], 9)
    assert not rules.head_updates(r, [(b"ETag", b'"x"')], None)
    assert not rules.head_updates(r, [(b"Last-Modified", DATE)], None)
    tagged = stored((b"ETag", b'"x"'), (b"Last-Modified", DATE))
    assert rules.head_updates(tagged, [(b"ETag", b'W/"x"')], None)
    assert not rules.head_updates(tagged, [], None)
    assert not rules.head_updates(tagged, [(b"ETag", b'"y"')], None)
    dated = stored((b"Last-Modified", DATE))
    assert rules.head_updates(dated, [(b"Last-Modified", DATE)], None)
    assert not rules.head_updates(dated, [], None)


def test_invalidation_covers_the_target_and_same_origin_locations():
    key = "http://h/a"
    assert rules.invalidated_uris(b"GET", 200, key, []) == []
    assert rules.invalidated_uris(b"POST", 500, key, []) == []
    assert rules.invalidated_uris(b"POST", 201, key, [(b"Location", b"/b"), (b"Content-Location", b"http://H/c")]) \
        == [key, "http://h/b", "http://h/c"]
    assert rules.invalidated_uris(b"DELETE", 204, key, [(b"Location", b"http://other/b")]) == [key]
    assert rules.invalidated_uris(b"PATCH", 302, key, []) == [key]
    assert rules.invalidated_uris(b"M-SEARCH", 200, "http://h/dir/a", [(b"Location", b"b?x=1#f")]) == \
        ["http://h/dir/a", "http://h/dir/b?x=1"]


def test_qualified_no_cache_drops_the_fields_and_reuses_the_rest():
    headers = [(b"Cache-Control", b'no-cache="a, b", max-age=60'), (b"a", b"1"), (b"b", b"2"), (b"c", b"3")]
    kept = rules.stored_headers(headers)
    assert [n for n, _ in kept] == [b"Cache-Control", b"c"]
    assert rules.reuse(stored((b"Date", DATE), *kept), [], NOW + 10) == rules.SERVE
    assert rules.reuse(stored((b"Date", DATE), (b"Cache-Control", b"no-cache, max-age=60")), [], NOW + 10) == \
        rules.REVALIDATE


@pytest.mark.parametrize("value,expected", [
    (b"bytes=0-4", (0, 4)), (b"bytes=5-", (5, 9)), (b"bytes=-3", (7, 9)), (b"bytes=8-100", (8, 9)),
    (b"bytes=10-", "unsatisfiable"), (b"bytes=4-2", None), (b"bytes=0-1,3-4", None), (b"items=0-1", None),
    (b"bytes=-0", "unsatisfiable"), (b"bytes=a-b", None),
])
def test_byte_ranges_on_a_stored_full_response(value, expected):
    assert rules.byte_range([(b"Range", value)], stored(size=10)) == expected


def test_if_range_needs_a_strong_match():
    r = stored((b"ETag", b'"x"'), size=10)
    assert rules.byte_range([(b"Range", b"bytes=0-1"), (b"If-Range", b'"x"')], r) == (0, 1)
    assert rules.byte_range([(b"Range", b"bytes=0-1"), (b"If-Range", b'"y"')], r) is None
    assert rules.byte_range([(b"Range", b"bytes=0-1"), (b"If-Range", b'W/"x"')], r) is None


def test_cache_status_members():
    assert rules.cache_status("rproxy", hit=True, ttl=12.7) == b"rproxy; hit; ttl=12"
    assert rules.cache_status("rproxy", fwd="stale", fwd_status=304, stored=True) == \
        b"rproxy; fwd=stale; fwd-status=304; stored"
    assert rules.cache_status("rproxy", hit=True, ttl=-0.5, detail="stale-if-error") == \
        b"rproxy; hit; ttl=-1; detail=stale-if-error"


# ---------------------------------------------------------------------------
# Compression choices


def test_accept_encoding_with_q_values():
    assert accepted_codings(b"gzip;q=0.5, br, identity;q=0") == {"gzip": 0.5, "br": 1.0, "identity": 0.0}
    assert choose_encoding(b"gzip, br", ("gzip", "br")) == "br"
    assert choose_encoding(b"gzip;q=1, br;q=0.4", ("gzip", "br")) == "gzip"
    assert choose_encoding(b"gzip;q=0", ("gzip", "br")) is None
    assert choose_encoding(b"*", ("gzip",)) == "gzip"
    assert choose_encoding(b"*;q=0, identity", ("gzip", "br")) is None
    assert choose_encoding(None, ("gzip", "br")) is None
    assert choose_encoding(b"br", ("gzip",)) is None
    assert choose_encoding(b"gzip;q=bad", ("gzip",)) is None


def test_compressible_types():
    assert compressible_type(b"text/html; charset=utf-8") and compressible_type(b"application/vnd.x+json")
    assert not compressible_type(b"image/png") and not compressible_type(None)


# ---------------------------------------------------------------------------
# The memory store


def _entry(key: str, size: int) -> StoredResponse:
    return attrs.evolve(stored(size=size), key=key)


def test_the_memory_store_evicts_the_least_recently_used_within_its_bound():
    evicted = []
    store = MemoryStore(3 * entry_cost(_entry("k0", 1000)), on_evict=lambda r, why: evicted.append((r.key, why)))
    verifyObject(ICacheStore, store)
    for i in range(3):
        assert store.put(_entry(f"k{i}", 1000), [b"x" * 1000])
    store.body(store.variants("k0")[0])  # k0 is now the most recently used
    store.put(_entry("k3", 1000), [b"x" * 1000])
    assert evicted == [("k1", "lru")] and sorted(store.keys()) == ["k0", "k2", "k3"]
    assert store.size <= store.max_bytes
    assert not store.put(_entry("huge", 10**6), [b"x" * 10**6])
    assert store.purge("k") == 3 and store.size == 0 and len(store) == 0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(0, 5000), max_size=60))
def test_the_memory_store_never_holds_more_than_its_bound(sizes):
    store = MemoryStore(20000)
    for i, size in enumerate(sizes):
        store.put(_entry(f"k{i % 17}", size), [b"y" * size])
        assert store.size <= store.max_bytes
        assert store.size == sum(entry_cost(v) for k in store.keys() for v in store.variants(k))


class _Sink:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.source = None

    def writeBody(self, data: bytes) -> None:
        self.data.append(data)
        self.source.gate.pause("client")

    def registerUpstream(self, source) -> None:
        pass

    def unregisterUpstream(self, source) -> None:
        pass


def test_a_chunk_source_waits_for_the_client_and_slices_ranges():
    sink = _Sink()
    source = ChunkSource([b"abc", b"def", b"ghi"], 2, 6)
    verifyObject(IBodySource, source)
    sink.source = source
    done = []
    source.streamTo(sink, done.append)
    assert sink.data == [b"c"] and not done
    source.gate.resume("client")
    source.gate.resume("client")
    assert sink.data == [b"c", b"def", b"g"] and done == [None]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(pieces=st.lists(st.binary(max_size=40), max_size=8), first=st.integers(0, 300), span=st.integers(0, 300))
def test_a_chunk_source_range_is_the_same_bytes_as_slicing_the_body(pieces, first, span):
    body = b"".join(pieces)
    last = first + span
    sink = _Sink()
    sink.writeBody = sink.data.append  # a client that never pushes back
    source = ChunkSource(pieces, first, last)
    sink.source = source
    source.streamTo(sink, lambda failure: None)
    assert b"".join(sink.data) == body[first : last + 1]


@settings(max_examples=100, deadline=None, derandomize=True)
@given(body=st.binary(min_size=300, max_size=3000), cuts=st.lists(st.integers(1, 2999), max_size=6),
       coding=st.sampled_from(["gzip", "br"]))
def test_compression_decompresses_to_the_same_bytes_however_the_body_is_cut(body, cuts, coding):
    import gzip

    import brotli

    from .test_compress import Exchange, Sink
    from rproxy_tw.compress import Compression

    sink = Sink()
    wrapper = Compression((coding,)).wrap(Exchange(coding.encode()), sink)
    wrapper.writeHead(200, b"OK", [(b"Content-Type", b"text/plain")], None, True)
    at = 0
    for cut in sorted(set(c for c in cuts if c < len(body))):
        wrapper.writeBody(body[at:cut])
        wrapper.flush()
        at = cut
    wrapper.writeBody(body[at:])
    wrapper.finishBody(())
    decode = gzip.decompress if coding == "gzip" else brotli.decompress
    assert decode(sink.body) == body


# ---------------------------------------------------------------------------
# CDN-Cache-Control (RFC 9213)

CDN_FUTURE = b"Tue, 14 Nov 2023 23:13:20 GMT"  # an hour after DATE


@pytest.mark.parametrize("response_headers,storable,lifetime", [
    # A valid CDN-Cache-Control rules, and Cache-Control and Expires are ignored.
    ([(b"Cache-Control", b"no-store"), (b"CDN-Cache-Control", b"max-age=600")], True, 600),
    ([(b"Cache-Control", b"max-age=600"), (b"CDN-Cache-Control", b"no-store")], False, None),
    ([(b"Cache-Control", b"max-age=600"), (b"CDN-Cache-Control", b"private")], False, None),
    ([(b"Cache-Control", b"max-age=3600"), (b"CDN-Cache-Control", b"max-age=1")], True, 1),
    ([(b"Date", DATE), (b"Expires", CDN_FUTURE), (b"CDN-Cache-Control", b"max-age=0")], True, 0),
    ([(b"CDN-Cache-Control", b"foobar, max-age=60"), (b"Expires", b"0")], True, 60),
    ([(b"CDN-Cache-Control", b"no-cache"), (b"Cache-Control", b"max-age=600")], True, 0),
    # A value of the wrong type is ignored, the rest of the field still rules.
    ([(b"CDN-Cache-Control", b'max-age="600"'), (b"Cache-Control", b"max-age=600")], True, 0),
    # An invalid Structured Field, or an empty one, is as if absent: Cache-Control rules.
    ([(b"CDN-Cache-Control", b"max-age=600, &&&&&"), (b"Cache-Control", b"no-store")], False, None),
    ([(b"CDN-Cache-Control", b"max-age =600"), (b"Cache-Control", b"max-age=5")], True, 5),
    ([(b"CDN-Cache-Control", b"MaX-aGe=600"), (b"Cache-Control", b"max-age=5")], True, 5),
    ([(b"CDN-Cache-Control", b""), (b"Cache-Control", b"max-age=5")], True, 5),
])
def test_cdn_cache_control_targets_this_cache(response_headers, storable, lifetime):
    assert rules.storable(b"GET", 200, [], response_headers) is storable
    if lifetime is not None:
        assert rules.freshness_lifetime(stored(*response_headers)) == lifetime


@pytest.mark.parametrize("value,expected", [
    (b"a, b=1, c=?0, d=\"x\\\"y\", e=tok/1, f=:YQ==:, g=1.5, h=(1 2);p", {
        b"a": True, b"b": 1, b"c": False, b"d": b'x"y', b"e": b"tok/1", b"f": b"YQ==", b"g": 1.5, b"h": [1, 2]}),
    (b"  max-age=60 ;  x  ", None),  # a space before the parameter's ";"
    (b"max-age=60;x=1, s", {b"max-age": 60, b"s": True}),
    (b"max-age=60,", None),
    (b"Max-Age=60", None),
    (b"a=1234567890123456", None),  # an integer longer than 15 digits
    (b"a=\"unterminated", None),
    (b"", {}),
])
def test_structured_field_dictionaries(value, expected):
    assert rules.sf_dictionary(value) == expected
