"""
On-the-fly compression (gzip, brotli) as a response filter.

A response is compressed as it streams (a streaming compressor per
response, flushed at each read from the origin so that a slow stream is
not held back), only where that is safe and useful: a compressible type,
above a minimum size, no encoding already, not a 206, not
C{Cache-Control: no-transform}, and a coding the client accepts
(C{Accept-Encoding} with q-values).  Such a response always says
C{Vary: Accept-Encoding}, so that a cache keeps each coding as its own
entry; its strong ETag is weakened, since the bytes are not the origin's.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

from zope.interface import implementer

from .pipeline import DownstreamWrapper, IResponseFilter

__all__ = ["Compression", "choose_encoding", "compressible_type", "DEFAULT_MIN_SIZE"]

Header = tuple[bytes, bytes]
Headers = Sequence[Header]

DEFAULT_MIN_SIZE = 256
"""Bodies smaller than this are sent as they are: the gzip header and trailer would eat the gain."""

COMPRESSIBLE = frozenset({
    b"application/javascript", b"application/json", b"application/xml", b"application/xhtml+xml",
    b"application/rss+xml", b"application/atom+xml", b"application/x-javascript", b"application/ld+json",
    b"application/manifest+json", b"application/wasm", b"application/x-yaml", b"application/yaml",
    b"application/graphql", b"application/vnd.api+json", b"image/svg+xml", b"image/x-icon",
    b"image/vnd.microsoft.icon", b"image/bmp", b"font/ttf", b"font/otf", b"application/x-font-ttf",
    b"application/vnd.ms-fontobject",
})

COMPRESSED_STATUSES = frozenset({200, 203, 404, 410})

PREFERENCE = {"br": 2, "gzip": 1}
"""Between codings the client accepts equally, the smaller output wins."""


def compressible_type(content_type: bytes | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media.startswith(b"text/") or media in COMPRESSIBLE or media.endswith(b"+json") or \
        media.endswith(b"+xml")


def accepted_codings(accept_encoding: bytes | None) -> dict[str, float]:
    """C{Accept-Encoding} as coding -> q (RFC 9110 12.5.3); a bad q-value counts as 0."""
    out: dict[str, float] = {}
    if accept_encoding is None:
        return out
    for member in accept_encoding.split(b","):
        coding, *params = member.strip().split(b";")
        name = coding.strip().lower().decode("latin-1")
        if not name:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.strip().partition(b"=")
            if key.strip().lower() == b"q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        out[name] = q
    return out


def choose_encoding(accept_encoding: bytes | None, offered: Sequence[str]) -> str | None:
    """The coding to send among C{offered}, or None for identity."""
    if accept_encoding is None:
        return None
    codings = accepted_codings(accept_encoding)
    star = codings.get("*")
    best: tuple[float, int] | None = None
    chosen = None
    for name in offered:
        q = codings.get(name, codings.get("x-gzip") if name == "gzip" and "x-gzip" in codings else star)
        if not q:
            continue
        rank = (q, PREFERENCE.get(name, 0))
        if best is None or rank > best:
            best, chosen = rank, name
    return chosen


class _Gzip:
    def __init__(self, level: int) -> None:
        self.z = zlib.compressobj(level, zlib.DEFLATED, 31, 8)

    def process(self, data: bytes) -> bytes:
        return self.z.compress(data)

    def flush(self) -> bytes:
        return self.z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self.z.flush(zlib.Z_FINISH)


class _Brotli:
    def __init__(self, quality: int) -> None:
        import brotli

        self.c = brotli.Compressor(quality=quality, lgwin=20)

    def process(self, data: bytes) -> bytes:
        return self.c.process(data)  # type: ignore[no-any-return]

    def flush(self) -> bytes:
        return self.c.flush()  # type: ignore[no-any-return]

    def finish(self) -> bytes:
        return self.c.finish()  # type: ignore[no-any-return]


def _has_token(headers: Headers, lname: bytes, token: bytes) -> bool:
    for name, value in headers:
        if name.lower() == lname:
            for member in value.split(b","):
                if member.strip().lower() == token:
                    return True
    return False


def _first(headers: Headers, lname: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == lname:
            return value
    return None


@implementer(IResponseFilter)
class Compression:
    """The C{compress} response filter of a route: which codings, from what size, at what level."""

    def __init__(self, encodings: Sequence[str], min_size: int = DEFAULT_MIN_SIZE, gzip_level: int = 5,
                 brotli_quality: int = 4) -> None:
        self.encodings = tuple(encodings)
        self.min_size = min_size
        self.gzip_level = gzip_level
        self.brotli_quality = brotli_quality

    def wrap(self, exchange: Any, downstream: Any) -> Any:
        return _Compressing(downstream, self, exchange)

    def compressor(self, coding: str) -> Any:
        return _Gzip(self.gzip_level) if coding == "gzip" else _Brotli(self.brotli_quality)


class _Compressing(DownstreamWrapper):
    def __init__(self, inner: Any, config: Compression, exchange: Any) -> None:
        super().__init__(inner)
        self.config = config
        self.exchange = exchange
        self.coder: Any = None

    def writeHead(self, status: int, reason: bytes, headers: Headers, content_length: int | None,
                  has_body: bool) -> None:
        if status not in COMPRESSED_STATUSES or not compressible_type(_first(headers, b"content-type")):
            self.inner.writeHead(status, reason, headers, content_length, has_body)
            return
        encoding = _first(headers, b"content-encoding")
        if (encoding is not None and encoding.strip().lower() not in (b"", b"identity")) or \
                _has_token(headers, b"cache-control", b"no-transform") or \
                _first(headers, b"content-range") is not None:
            self.inner.writeHead(status, reason, headers, content_length, has_body)
            return
        out = list(headers)
        if not (_has_token(out, b"vary", b"accept-encoding") or _has_token(out, b"vary", b"*")):
            out.append((b"Vary", b"Accept-Encoding"))
        if content_length is not None and content_length < self.config.min_size:
            self.inner.writeHead(status, reason, out, content_length, has_body)
            return
        request = self.exchange.request
        coding = choose_encoding(_first(request.headers, b"accept-encoding"), self.config.encodings)
        if coding is None:
            self.inner.writeHead(status, reason, out, content_length, has_body)
            return
        out = [(n, v) for n, v in out if n.lower() not in (b"content-encoding", b"content-md5", b"accept-ranges")]
        out = [(n, b"W/" + v.strip() if n.lower() == b"etag" and not v.strip().startswith(b"W/") else v)
               for n, v in out]
        out.append((b"Content-Encoding", coding.encode("ascii")))
        if has_body:
            self.coder = self.config.compressor(coding)
        self.inner.writeHead(status, reason, out, None, has_body)

    def writeBody(self, data: bytes) -> None:
        coder = self.coder
        if coder is None:
            self.inner.writeBody(data)
            return
        out = coder.process(data)
        if out:
            self.inner.writeBody(out)

    def flush(self) -> None:
        coder = self.coder
        if coder is not None:
            out = coder.flush()
            if out:
                self.inner.writeBody(out)
        self.inner.flush()

    def finishBody(self, trailers: Headers) -> None:
        coder = self.coder
        if coder is not None:
            self.coder = None
            out = coder.finish()
            if out:
                self.inner.writeBody(out)
        self.inner.finishBody(trailers)
