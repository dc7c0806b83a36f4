"""The compression response filter, driven directly: which responses it compresses and what it does to their headers."""

from __future__ import annotations

import gzip
from typing import Any

import brotli
import pytest
from zope.interface.verify import verifyObject

from rproxy_tw.compress import Compression
from rproxy_tw.pipeline import IResponseFilter

TEXT = b"The quick brown fox jumps over the lazy dog. " * 100


class Sink:
    """An IDownstream that records what reaches the client."""

    gate = None
    wants_block = False
    http_version = b"1.1"

    def __init__(self) -> None:
        self.head: Any = None
        self.body = b""
        self.finished = False

    def writeHead(self, status, reason, headers, content_length, has_body):
        self.head = (status, list(headers), content_length, has_body)

    def writeBody(self, data):
        self.body += data

    def flush(self):
        pass

    def finishBody(self, trailers):
        self.finished = True


class Exchange:
    def __init__(self, accept: bytes | None) -> None:
        class Request:
            headers = [(b"Accept-Encoding", accept)] if accept is not None else []
        self.request = Request()


def run(headers, accept=b"gzip, br", status=200, body=TEXT, length=True, pieces=3, has_body=True):
    sink = Sink()
    wrapper = Compression(("gzip", "br")).wrap(Exchange(accept), sink)
    wrapper.writeHead(status, b"OK", headers, len(body) if length else None, has_body)
    if has_body:
        step = max(len(body) // pieces, 1)
        for i in range(0, len(body), step):
            wrapper.writeBody(body[i : i + step])
            wrapper.flush()
    wrapper.finishBody(())
    return sink


def names(sink: Sink) -> dict[bytes, bytes]:
    return {n.lower(): v for n, v in sink.head[1]}


def test_it_provides_the_response_filter_interface():
    verifyObject(IResponseFilter, Compression(("gzip",)))


@pytest.mark.parametrize("accept,coding,decode", [(b"gzip", b"gzip", gzip.decompress),
                                                  (b"br;q=1, gzip;q=0.9", b"br", brotli.decompress)])
def test_a_text_response_is_compressed_as_it_streams_and_decompresses_to_the_same_bytes(accept, coding, decode):
    sink = run([(b"Content-Type", b"text/html"), (b"ETag", b'"v1"'), (b"Accept-Ranges", b"bytes")], accept)
    h = names(sink)
    assert h[b"content-encoding"] == coding and h[b"vary"] == b"Accept-Encoding" and h[b"etag"] == b'W/"v1"'
    assert b"accept-ranges" not in h and sink.head[2] is None
    assert decode(sink.body) == TEXT and sink.finished


@pytest.mark.parametrize("why,headers,kw", [
    ("not a compressible type", [(b"Content-Type", b"image/png")], {}),
    ("already encoded", [(b"Content-Type", b"text/plain"), (b"Content-Encoding", b"gzip")], {}),
    ("no-transform", [(b"Content-Type", b"text/plain"), (b"Cache-Control", b"max-age=5, no-transform")], {}),
    ("a 206", [(b"Content-Type", b"text/plain"), (b"Content-Range", b"bytes 0-9/100")], {"status": 206}),
    ("a 304", [(b"Content-Type", b"text/plain")], {"status": 304, "has_body": False}),
    ("a 204", [(b"Content-Type", b"text/plain")], {"status": 204, "has_body": False}),
    ("too small", [(b"Content-Type", b"text/plain")], {"body": b"tiny"}),
    ("the client refuses it", [(b"Content-Type", b"text/plain")], {"accept": b"gzip;q=0, br;q=0"}),
    ("the client asks for nothing", [(b"Content-Type", b"text/plain")], {"accept": None}),
])
def test_left_alone_when(why, headers, kw):
    body = kw.get("body", TEXT)
    sink = run(headers, **kw)
    assert names(sink).get(b"content-encoding") == {n.lower(): v for n, v in headers}.get(b"content-encoding")
    if kw.get("has_body", True):
        assert sink.body == body


def test_vary_is_added_even_when_the_client_gets_identity_and_never_twice():
    assert names(run([(b"Content-Type", b"text/plain")], accept=None))[b"vary"] == b"Accept-Encoding"
    sink = run([(b"Content-Type", b"text/plain"), (b"Vary", b"accept-encoding")])
    assert [v for n, v in sink.head[1] if n.lower() == b"vary"] == [b"accept-encoding"]


def test_a_head_response_says_the_coding_a_get_would_have():
    sink = run([(b"Content-Type", b"text/plain")], has_body=False)
    assert names(sink)[b"content-encoding"] == b"br" and sink.body == b"" and sink.head[2] is None


def test_a_response_of_unknown_length_is_compressed():
    sink = run([(b"Content-Type", b"application/json")], accept=b"gzip", length=False, body=b"{}" * 10)
    assert gzip.decompress(sink.body) == b"{}" * 10
