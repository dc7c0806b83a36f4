"""
The rules of a shared HTTP cache (RFC 9111, with RFC 9110's conditional
requests and ranges, and RFC 5861's stale-* extensions), as pure functions
over immutable values: no store, no clock, no socket.

The filter in L{rproxy_tw.cache.filter} asks these functions what to do
(store? serve? revalidate? invalidate?) and does the I/O itself, so that
every rule here is tested by the thousand without a server.
"""

from __future__ import annotations

import calendar
import email.utils
from urllib.parse import urljoin
from typing import Iterable, Mapping, Sequence

import attrs

__all__ = [
    "CacheControl",
    "StoredResponse",
    "Freshness",
    "cache_control",
    "cache_key",
    "current_age",
    "evaluate_conditions",
    "freshness_lifetime",
    "invalidated_uris",
    "merge_304",
    "parse_http_date",
    "response_cache_control",
    "reuse",
    "storable",
    "vary_fields",
    "variant_key",
]

Header = tuple[bytes, bytes]
Headers = Sequence[Header]

DELTA_MAX = 2147483648
"""RFC 9111 1.2.2: a delta-seconds too large to represent is this."""

HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
"""RFC 9110 15.1: heuristically cacheable by default."""

UNDERSTOOD_STATUSES = frozenset({200, 203, 204, 300, 301, 302, 303, 307, 308, 400, 403, 404, 405, 410, 414,
                                 500, 501, 502, 503, 504})
"""Final statuses whose caching rules this cache knows (for C{must-understand}, RFC 9111 5.2.2.3)."""

SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

HEURISTIC_MAX = 86400.0
"""The longest lifetime the Last-Modified heuristic gives (one day), as most caches cap it."""

NOT_MODIFIED_DROPPED = frozenset({b"content-length", b"content-type", b"content-range", b"content-language",
                                  b"transfer-encoding"})
"""Representation metadata a 304 built from a stored response leaves out (RFC 9110 15.4.5)."""

NOT_UPDATED_BY_304 = frozenset({b"content-length", b"content-encoding", b"content-range", b"transfer-encoding",
                                b"content-md5", b"content-digest"})
"""
Fields a 304 must not replace in the stored response (RFC 9111 3.2): the
length, and what the stored bytes depend on (a coding this proxy applied,
a digest of those very bytes).
"""


# ---------------------------------------------------------------------------
# Parsing


@attrs.frozen
class CacheControl:
    """The directives of C{Cache-Control} lines: lower-cased name -> argument (None when it has none)."""

    directives: Mapping[bytes, bytes | None] = attrs.field(factory=dict)
    targeted: bool = False
    """Read from a targeted field (L{TARGETED_FIELDS}): then Expires does not count (RFC 9213 2.1)."""

    def __contains__(self, name: bytes) -> bool:
        return name in self.directives

    def arg(self, name: bytes) -> bytes | None:
        return self.directives.get(name)

    def seconds(self, name: bytes) -> int | None:
        """
        A delta-seconds argument; None when absent; C{-1} when present but
        not a valid number (a response with an invalid max-age is stale,
        RFC 9111 4.2.1 and 5.2).
        """
        if name not in self.directives:
            return None
        return delta_seconds(self.directives[name])


def delta_seconds(value: bytes | None) -> int:
    """RFC 9111 1.2.2; -1 when C{value} is not 1*DIGIT."""
    if value is None or not value.isdigit():
        return -1
    return min(int(value), DELTA_MAX)


def _split_commas(value: bytes) -> list[bytes]:
    """Split on commas outside quoted strings."""
    parts: list[bytes] = []
    current = bytearray()
    quoted = escaped = False
    for byte in value:
        c = bytes((byte,))
        if escaped:
            current += c
            escaped = False
        elif quoted and c == b"\\":
            current += c
            escaped = True
        elif c == b'"':
            current += c
            quoted = not quoted
        elif c == b"," and not quoted:
            parts.append(bytes(current))
            current = bytearray()
        else:
            current += c
    parts.append(bytes(current))
    return parts


def cache_control(headers: Headers) -> CacheControl:
    """
    Every C{Cache-Control} line of C{headers} read as one list.  A
    directive given twice keeps its first value (RFC 9111 4.2.1 allows
    either the first or treating the response as stale).
    """
    directives: dict[bytes, bytes | None] = {}
    for name, value in headers:
        if name.lower() != b"cache-control":
            continue
        for part in _split_commas(value):
            part = part.strip()
            if not part:
                continue
            key, eq, arg = part.partition(b"=")
            key = key.strip().lower()
            if not key or key in directives:
                continue
            if eq:
                arg = arg.strip()
                if len(arg) >= 2 and arg[:1] == b'"' and arg[-1:] == b'"':
                    arg = arg[1:-1].replace(b"\\", b"")
                directives[key] = arg
            else:
                directives[key] = None
    return CacheControl(directives)


TARGETED_FIELDS = (b"cdn-cache-control",)
"""
The targeted cache-control fields this cache obeys, in order (RFC 9213):
C{CDN-Cache-Control} speaks to CDN caches, as this shared cache at the edge is.
"""

_SF_INTEGER_DIRECTIVES = frozenset({b"max-age", b"s-maxage", b"stale-while-revalidate", b"stale-if-error"})


def response_cache_control(headers: Headers) -> CacheControl:
    """
    The caching policy of a response for this cache: the first targeted
    field (RFC 9213) with a valid, non-empty value, with Cache-Control and
    Expires ignored; else Cache-Control.
    """
    for lname in TARGETED_FIELDS:
        values = header_values(headers, lname)
        if not values:
            continue
        members = sf_dictionary(b", ".join(values))
        if not members:
            continue  # invalid or empty: as if absent (RFC 9213 2.1)
        directives: dict[bytes, bytes | None] = {}
        for key, value in members.items():
            # A directive of the wrong type is ignored; a false boolean is as if absent.
            if key in _SF_INTEGER_DIRECTIVES:
                if isinstance(value, int) and not isinstance(value, bool):
                    directives[key] = b"%d" % value
            elif value is True:
                directives[key] = None
            elif isinstance(value, bytes):
                directives[key] = value
            elif isinstance(value, int) and not isinstance(value, bool):
                directives[key] = b"%d" % value
        return CacheControl(directives, targeted=True)
    return cache_control(headers)


_SF_KEY_FIRST = frozenset(b"abcdefghijklmnopqrstuvwxyz*")
_SF_KEY = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_-.*")
_SF_TOKEN_FIRST = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz*")
_SF_TOKEN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~:/")
_SF_BASE64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


class _SFError(ValueError):
    pass


def sf_dictionary(value: bytes) -> dict[bytes, object] | None:
    """
    A Structured Field Dictionary (RFC 8941 4.2.2): key -> bare item (int,
    float, bytes for a string, token or byte sequence, bool) or, for an
    inner list, a list of them; parameters are checked and dropped.  None
    when C{value} does not parse: the whole field is then ignored.
    """
    try:
        return _SFParser(value).dictionary()
    except (_SFError, IndexError):
        return None


class _SFParser:
    """RFC 8941 section 4.2's parsing algorithms, over one field value."""

    def __init__(self, value: bytes) -> None:
        self.data = value.strip(b" \t")
        self.pos = 0

    def peek(self) -> int | None:
        return self.data[self.pos] if self.pos < len(self.data) else None

    def dictionary(self) -> dict[bytes, object]:
        out: dict[bytes, object] = {}
        while self.pos < len(self.data):
            key = self.key()
            if self.peek() == 0x3D:  # "="
                self.pos += 1
                out[key] = self.member_value()
            else:
                out[key] = True
                self.parameters()
            while self.peek() in (0x20, 0x09):
                self.pos += 1
            if self.pos >= len(self.data):
                return out
            if self.peek() != 0x2C:  # ","
                raise _SFError("expected a comma")
            self.pos += 1
            while self.peek() in (0x20, 0x09):
                self.pos += 1
            if self.pos >= len(self.data):
                raise _SFError("a trailing comma")
        return out

    def member_value(self) -> object:
        if self.peek() == 0x28:  # "(": an inner list
            self.pos += 1
            items = []
            while True:
                while self.peek() == 0x20:
                    self.pos += 1
                if self.peek() == 0x29:
                    self.pos += 1
                    self.parameters()
                    return items
                items.append(self.bare_item())
                self.parameters()
                if self.peek() not in (0x20, 0x29):
                    raise _SFError("a bad inner list")
        item = self.bare_item()
        self.parameters()
        return item

    def parameters(self) -> None:
        while self.peek() == 0x3B:  # ";"
            self.pos += 1
            while self.peek() == 0x20:
                self.pos += 1
            self.key()
            if self.peek() == 0x3D:
                self.pos += 1
                self.bare_item()

    def key(self) -> bytes:
        start = self.pos
        if self.peek() not in _SF_KEY_FIRST:
            raise _SFError("a bad key")
        self.pos += 1
        while self.peek() in _SF_KEY:
            self.pos += 1
        return self.data[start:self.pos]

    def bare_item(self) -> object:
        c = self.peek()
        if c is None:
            raise _SFError("an item is missing")
        if c == 0x2D or 0x30 <= c <= 0x39:
            return self.number()
        if c == 0x22:
            return self.string()
        if c == 0x3A:
            return self.byte_sequence()
        if c == 0x3F:
            flag = self.data[self.pos + 1:self.pos + 2]
            if flag not in (b"0", b"1"):
                raise _SFError("a bad boolean")
            self.pos += 2
            return flag == b"1"
        if c in _SF_TOKEN_FIRST:
            start = self.pos
            self.pos += 1
            while self.peek() in _SF_TOKEN:
                self.pos += 1
            return self.data[start:self.pos]
        raise _SFError("an unknown item type")

    def number(self) -> int | float:
        start = self.pos
        if self.peek() == 0x2D:
            self.pos += 1
        digits_start = self.pos
        while self.peek() is not None and 0x30 <= self.peek() <= 0x39:  # type: ignore[operator]
            self.pos += 1
        integer = self.data[digits_start:self.pos]
        if not integer:
            raise _SFError("a number without digits")
        if self.peek() != 0x2E:  # "."
            if len(integer) > 15:
                raise _SFError("an integer too long")
            return int(self.data[start:self.pos])
        self.pos += 1
        fraction_start = self.pos
        while self.peek() is not None and 0x30 <= self.peek() <= 0x39:  # type: ignore[operator]
            self.pos += 1
        fraction = self.data[fraction_start:self.pos]
        if len(integer) > 12 or not 1 <= len(fraction) <= 3:
            raise _SFError("a bad decimal")
        return float(self.data[start:self.pos])

    def string(self) -> bytes:
        self.pos += 1
        out = bytearray()
        while True:
            c = self.peek()
            if c is None:
                raise _SFError("an unterminated string")
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                escaped = self.peek()
                if escaped not in (0x22, 0x5C):
                    raise _SFError("a bad escape")
                self.pos += 1
                out.append(escaped)  # type: ignore[arg-type]
            elif c < 0x20 or c > 0x7E:
                raise _SFError("a bad string character")
            else:
                out.append(c)

    def byte_sequence(self) -> bytes:
        end = self.data.find(b":", self.pos + 1)
        if end < 0:
            raise _SFError("an unterminated byte sequence")
        body = self.data[self.pos + 1:end]
        if any(b not in _SF_BASE64 for b in body):
            raise _SFError("a bad byte sequence")
        self.pos = end + 1
        return body


def header_values(headers: Headers, lname: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == lname]


def first_value(headers: Headers, lname: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == lname:
            return v
    return None


def list_values(headers: Headers, lname: bytes) -> list[bytes]:
    """A list-based field's members, over all its lines, stripped, quoted strings kept whole."""
    out = []
    for value in header_values(headers, lname):
        for part in _split_commas(value):
            part = part.strip()
            if part:
                out.append(part)
    return out


def parse_http_date(value: bytes | None) -> float | None:
    """An HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime forms) as POSIX seconds; None if invalid."""
    if value is None:
        return None
    try:
        text = value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    try:
        parsed = email.utils.parsedate_tz(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None or parsed[0] < 100:
        if parsed is None:
            return None
        # RFC 850's two-digit year: RFC 9110 5.6.7, more than 50 years ahead is the past century.
        parsed = (parsed[0] + 1900 if parsed[0] >= 70 else parsed[0] + 2000, *parsed[1:])
    try:
        return float(calendar.timegm(parsed[:9]) - (parsed[9] or 0))
    except (OverflowError, ValueError):
        return None


# ---------------------------------------------------------------------------
# What is stored


@attrs.frozen
class StoredResponse:
    """
    A response the cache holds (its body is the store's business): what
    RFC 9111 needs to decide whether and how to reuse it.
    """

    key: str
    """The primary cache key (L{cache_key})."""
    variant: tuple[tuple[bytes, bytes], ...]
    """The request's values of the fields the response's Vary names (L{variant_key})."""
    vary: tuple[bytes, ...] | None
    """The Vary field names, lower-cased; None for C{Vary: *} (never matches)."""
    status: int
    reason: bytes
    headers: tuple[Header, ...]
    request_time: float
    response_time: float
    body_size: int
    cc: CacheControl = attrs.field(init=False, eq=False, repr=False)
    """The response's Cache-Control, parsed once (a hit must not parse it again)."""
    lifetime: float = attrs.field(init=False, eq=False, repr=False)
    """L{freshness_lifetime}, worked out once."""
    initial_age: float = attrs.field(init=False, eq=False, repr=False)
    """RFC 9111 4.2.3's corrected_initial_age: the current age is this plus the time since response_time."""
    served_headers: tuple[Header, ...] = attrs.field(init=False, eq=False, repr=False)
    """The headers a hit sends before its own Age (L{with_age}): the stored ones without theirs."""
    served_block: bytes = attrs.field(init=False, eq=False, repr=False)
    """L{served_headers} serialized once, for a client connection that takes a head as bytes."""

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "cc", response_cache_control(self.headers))
        object.__setattr__(self, "lifetime", _freshness_lifetime(self))
        object.__setattr__(self, "initial_age", _initial_age(self))
        served = tuple((n, v) for n, v in self.headers if n.lower() != b"age")
        object.__setattr__(self, "served_headers", served)
        object.__setattr__(self, "served_block", b"".join([b"%s: %s\r\n" % header for header in served]))

    @property
    def cache_control(self) -> CacheControl:
        return self.cc

    def header(self, lname: bytes) -> bytes | None:
        return first_value(self.headers, lname)

    @property
    def etag(self) -> bytes | None:
        value = self.header(b"etag")
        return value.strip() if value is not None else None

    def __len__(self) -> int:
        return self.body_size


def cache_key(scheme: str, host: bytes | None, path: bytes, query: bytes) -> str:
    """The primary key: the target URI (RFC 9111 2), for GET and HEAD alike."""
    authority = (host or b"").lower().decode("latin-1")
    uri = f"{scheme}://{authority}{path.decode('latin-1')}"
    if query:
        uri += "?" + query.decode("latin-1")
    return uri


def vary_fields(headers: Headers) -> tuple[bytes, ...] | None:
    """The request fields a response varies on, lower-cased and sorted; None for C{Vary: *}."""
    names = set()
    for member in list_values(headers, b"vary"):
        member = member.lower()
        if member == b"*":
            return None
        names.add(member)
    return tuple(sorted(names))


def _normalize(value: bytes) -> bytes:
    """Whitespace around list commas does not make a different request (RFC 9111 4.1 allows normalising)."""
    return b",".join(part.strip() for part in value.split(b","))


def _normalize_codings(value: bytes) -> bytes:
    """
    Accept-Encoding with the same meaning spelled one way: codings are
    case-insensitive and their order is not significant (q-values rank them),
    so C{"gzip, br"} and C{"BR,gzip;q=1"} select the same stored response.
    """
    members = []
    for member in value.split(b","):
        coding, _, params = member.strip().partition(b";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q = b"1"
        for param in params.split(b";"):
            key, _, arg = param.strip().partition(b"=")
            if key.strip().lower() == b"q":
                arg = arg.strip().rstrip(b"0").rstrip(b".") if b"." in arg else arg.strip()
                q = arg or b"0"
        members.append(coding if q == b"1" else coding + b";q=" + q)
    return b",".join(sorted(set(members)))


def variant_key(vary: tuple[bytes, ...] | None, request_headers: Headers) -> tuple[tuple[bytes, bytes], ...]:
    """The request's values for the fields in C{vary} (absent fields keep an empty value of their own)."""
    if not vary:
        return ()
    out = []
    for name in vary:
        values = header_values(request_headers, name)
        if not values:
            out.append((name, b"\x00absent"))
        elif name == b"accept-encoding":
            out.append((name, _normalize_codings(b",".join(values))))
        else:
            out.append((name, _normalize(b", ".join(values))))
    return tuple(out)


def variant_matches(stored: StoredResponse, request_headers: Headers) -> bool:
    """RFC 9111 4.1: every field the stored response's Vary names matches the request's."""
    if stored.vary is None:
        return False
    return variant_key(stored.vary, request_headers) == stored.variant


# ---------------------------------------------------------------------------
# Storing (RFC 9111 3)


def storable(method: bytes, status: int, request_headers: Headers, response_headers: Headers) -> bool:
    """Whether a shared cache may store this response to this request."""
    if method != b"GET":
        return False
    if status < 200 or status in (206, 304):
        return False
    request_cc = cache_control(request_headers)
    if b"no-store" in request_cc:
        return False
    cc = response_cache_control(response_headers)
    if b"must-understand" in cc:
        if status not in UNDERSTOOD_STATUSES:
            return False
    elif b"no-store" in cc:
        return False
    if b"private" in cc and cc.arg(b"private") is None:
        return False
    if first_value(request_headers, b"authorization") is not None:
        if not (b"must-revalidate" in cc or b"public" in cc or b"s-maxage" in cc):
            return False
    if status == 416:
        # It answers a Range, not the resource (the key has no Range in it): reusing
        # it for another request would be wrong.  Content-Range on any other non-206
        # status means nothing (RFC 9110 14.4) and does not stop storing.
        return False
    return (
        b"public" in cc
        or (not cc.targeted and first_value(response_headers, b"expires") is not None)
        or b"max-age" in cc
        or b"s-maxage" in cc
        or status in HEURISTIC_STATUSES
    )


def stored_headers(headers: Headers) -> tuple[Header, ...]:
    """
    The headers to keep: the fields a qualified C{private="..."} names are
    for one user only and a shared cache must not store them (RFC 9111
    5.2.2.7); those a qualified C{no-cache="..."} names must not be reused
    without revalidation (5.2.2.4), so they are not stored either and the
    rest is reused as it is.
    """
    cc = response_cache_control(headers)
    names = set()
    for directive in (b"private", b"no-cache"):
        listed = cc.arg(directive)
        if listed:
            names |= {n.strip().lower() for n in listed.split(b",")}
    if not names:
        return tuple(headers)
    return tuple((n, v) for n, v in headers if n.lower() not in names)


# ---------------------------------------------------------------------------
# Freshness and age (RFC 9111 4.2)


def freshness_lifetime(stored: StoredResponse) -> float:
    """RFC 9111 4.2.1, for a shared cache: s-maxage, max-age, Expires minus Date, or the heuristic."""
    return stored.lifetime


def _freshness_lifetime(stored: StoredResponse) -> float:
    headers = stored.headers
    cc = stored.cc
    s_maxage = cc.seconds(b"s-maxage")
    if s_maxage is not None:
        return max(s_maxage, 0)
    max_age = cc.seconds(b"max-age")
    if max_age is not None:
        return max(max_age, 0)
    expires_values = header_values(headers, b"expires") if not cc.targeted else None
    if expires_values:
        expires = parse_http_date(expires_values[0])
        if expires is None:
            return 0.0  # an invalid Expires (such as "0") means already expired
        date = _date_value(stored)
        return max(expires - date, 0.0)
    if b"no-cache" in cc and not cc.arg(b"no-cache"):
        return 0.0
    if stored.status in HEURISTIC_STATUSES or b"public" in cc:
        last_modified = parse_http_date(first_value(headers, b"last-modified"))
        if last_modified is not None:
            age = _date_value(stored) - last_modified
            if age > 0:
                return min(age * 0.1, HEURISTIC_MAX)
    return 0.0


def _date_value(stored: StoredResponse) -> float:
    date = parse_http_date(first_value(stored.headers, b"date"))
    return date if date is not None else stored.response_time


def age_value(headers: Headers) -> int:
    value = first_value(headers, b"age")
    if value is None:
        return 0
    value = value.split(b",", 1)[0].strip()
    if not value.isdigit():
        return 0
    return min(int(value), DELTA_MAX)


def current_age(stored: StoredResponse, now: float) -> float:
    """RFC 9111 4.2.3."""
    return stored.initial_age + now - stored.response_time


def _initial_age(stored: StoredResponse) -> float:
    date_value = _date_value(stored)
    apparent_age = max(0.0, stored.response_time - date_value)
    response_delay = stored.response_time - stored.request_time
    corrected_age_value = age_value(stored.headers) + response_delay
    return max(apparent_age, corrected_age_value)


@attrs.frozen
class Freshness:
    lifetime: float
    age: float

    @property
    def ttl(self) -> float:
        """Seconds the response stays fresh (negative: how long it has been stale)."""
        return self.lifetime - self.age

    @property
    def fresh(self) -> bool:
        return self.lifetime > self.age


def freshness(stored: StoredResponse, now: float) -> Freshness:
    return Freshness(freshness_lifetime(stored), current_age(stored, now))


# ---------------------------------------------------------------------------
# Reuse (RFC 9111 4, 4.2.4, 5.2.1; RFC 5861)

SERVE = "serve"
"""Serve the stored response as it is."""
REVALIDATE = "revalidate"
"""Ask the origin with the stored validators before serving."""
SERVE_STALE_REVALIDATE = "serve-stale-revalidate"
"""Serve it (stale-while-revalidate) and refresh it in the background."""


NO_DIRECTIVES = CacheControl({})

REQUEST_FIELDS = frozenset({b"cache-control", b"pragma", b"range", b"if-none-match", b"if-modified-since", b"if-match",
                            b"if-unmodified-since", b"if-range"})
"""The request fields that change how a stored response is used."""


def plain_request(request_headers: Headers) -> bool:
    """Whether the request has none of L{REQUEST_FIELDS}: then a fresh hit is served as stored, no more questions."""
    fields = REQUEST_FIELDS
    for name, _ in request_headers:
        if name.lower() in fields:
            return False
    return True


def request_no_cache(request_headers: Headers) -> bool:
    """C{Cache-Control: no-cache} or, with no Cache-Control at all, C{Pragma: no-cache} (RFC 9111 5.4)."""
    cc = cache_control(request_headers)
    if b"no-cache" in cc:
        return True
    if not cc.directives:
        for value in header_values(request_headers, b"pragma"):
            if b"no-cache" in value.lower():
                return True
    return False


def may_serve_stale(stored: StoredResponse) -> bool:
    """Whether anything may ever serve this response stale: not with must-revalidate, proxy-revalidate, s-maxage."""
    cc = stored.cc
    return not (b"must-revalidate" in cc or b"proxy-revalidate" in cc or b"s-maxage" in cc)


def reuse(stored: StoredResponse, request_headers: Headers, now: float, request_cc: CacheControl | None = None) -> str:
    """
    What to do with a stored response that matches the request: L{SERVE},
    L{REVALIDATE}, or L{SERVE_STALE_REVALIDATE}.  C{request_cc} is the
    request's Cache-Control when the caller parsed it already.
    """
    cc = stored.cc
    if request_cc is None:
        request_cc = cache_control(request_headers)
    if b"no-cache" in cc and not cc.arg(b"no-cache"):
        return REVALIDATE
    if request_cc.directives:
        if b"no-cache" in request_cc:
            return REVALIDATE
    elif request_cc is not NO_DIRECTIVES and request_no_cache(request_headers):
        return REVALIDATE  # Pragma: no-cache (NO_DIRECTIVES: the caller found neither field)
    age = stored.initial_age + now - stored.response_time
    ttl = stored.lifetime - age
    if request_cc.directives:
        max_age = request_cc.seconds(b"max-age")
        if max_age is not None and (max_age < 0 or age > max_age):
            return REVALIDATE
        min_fresh = request_cc.seconds(b"min-fresh")
        if min_fresh is not None and ttl < max(min_fresh, 0):
            return REVALIDATE
    if ttl > 0:
        return SERVE
    staleness = -ttl
    if not may_serve_stale(stored):
        return REVALIDATE
    if b"max-stale" in request_cc:
        limit = request_cc.arg(b"max-stale")
        if limit is None or (limit.isdigit() and staleness <= int(limit)):
            return SERVE
    swr = cc.seconds(b"stale-while-revalidate")
    if swr is not None and swr >= 0 and staleness <= swr:
        return SERVE_STALE_REVALIDATE
    return REVALIDATE


def may_serve_on_error(stored: StoredResponse, request_headers: Headers, now: float) -> bool:
    """RFC 5861 4: C{stale-if-error} in the response or the request, within its window."""
    if not may_serve_stale(stored):
        return False
    staleness = -freshness(stored, now).ttl
    if staleness <= 0:
        return True
    for cc in (cache_control(request_headers), stored.cc):
        window = cc.seconds(b"stale-if-error")
        if window is not None and window >= 0 and staleness <= window:
            return True
    return False


def may_serve_disconnected(stored: StoredResponse) -> bool:
    """
    Whether a stale response may be served because the origin cannot be
    reached (RFC 9111 4.2.4: a disconnected cache may; must-revalidate,
    proxy-revalidate, s-maxage and no-cache forbid it).
    """
    cc = stored.cc
    return may_serve_stale(stored) and not (b"no-cache" in cc and not cc.arg(b"no-cache"))


def validators(stored: StoredResponse) -> list[Header]:
    """The conditional headers to revalidate C{stored} with (RFC 9111 4.3.1)."""
    out = []
    etag = stored.etag
    if etag:
        out.append((b"If-None-Match", etag))
    last_modified = stored.header(b"last-modified")
    if last_modified:
        out.append((b"If-Modified-Since", last_modified))
    return out


def _opaque(tag: bytes) -> bytes:
    tag = tag.strip()
    return tag[2:] if tag[:2] == b"W/" else tag


def weak_match(a: bytes, b: bytes) -> bool:
    """RFC 9110 8.8.3.2 weak comparison."""
    return _opaque(a) == _opaque(b)


def strong_match(a: bytes, b: bytes) -> bool:
    a, b = a.strip(), b.strip()
    return a[:2] != b"W/" and b[:2] != b"W/" and a == b


def evaluate_conditions(stored: StoredResponse, method: bytes, request_headers: Headers) -> bool:
    """
    Whether the request's own conditions (If-None-Match, else
    If-Modified-Since) are met by C{stored}, so that it is answered 304
    (RFC 9111 4.3.2, RFC 9110 13.2.2).
    """
    if method not in (b"GET", b"HEAD") or stored.status != 200:
        return False
    inm = list_values(request_headers, b"if-none-match")
    if inm:
        etag = stored.etag
        if b"*" in inm:
            return True
        return etag is not None and any(weak_match(tag, etag) for tag in inm)
    ims = parse_http_date(first_value(request_headers, b"if-modified-since"))
    if ims is None:
        return False
    reference = parse_http_date(stored.header(b"last-modified"))
    if reference is None:
        reference = parse_http_date(stored.header(b"date"))
        if reference is None:
            reference = stored.response_time
    return reference <= ims


def has_conditions(request_headers: Headers) -> bool:
    for name, _ in request_headers:
        lname = name.lower()
        if lname in (b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range"):
            return True
    return False


def not_modified_headers(stored: StoredResponse) -> list[Header]:
    """The fields of a 304 made from a stored response (RFC 9110 15.4.5)."""
    return [(n, v) for n, v in stored.headers if n.lower() not in NOT_MODIFIED_DROPPED]


def matches_304(stored: StoredResponse, headers: Headers) -> bool:
    """RFC 9111 4.3.4: whether a 304's validators select C{stored}."""
    etag = first_value(headers, b"etag")
    if etag is not None:
        mine = stored.etag
        return mine is not None and weak_match(etag, mine)
    last_modified = first_value(headers, b"last-modified")
    if last_modified is not None:
        return stored.header(b"last-modified") == last_modified
    # No validator in the 304: it answers the conditional request we sent for this very
    # response (RFC 9111 4.3.4 names the single-response case; origins often omit them).
    return True


def head_updates(stored: StoredResponse, headers: Headers, content_length: int | None) -> bool:
    """
    RFC 9111 4.3.5: whether a 200 answering HEAD describes the stored GET
    response (same validators, same length), so that its fields freshen it.
    """
    if content_length is not None and content_length != stored.body_size:
        return False
    etag, mine = first_value(headers, b"etag"), stored.etag
    if etag is not None or mine is not None:
        return etag is not None and mine is not None and weak_match(etag, mine)
    last_modified, stored_last_modified = first_value(headers, b"last-modified"), stored.header(b"last-modified")
    if last_modified is not None or stored_last_modified is not None:
        return last_modified == stored_last_modified
    # No validator on either side: the one stored response is the one it describes (4.3.4).
    return True


def merge_304(stored: StoredResponse, headers: Headers, request_time: float, response_time: float) -> StoredResponse:
    """
    The stored response freshened by a 304 (RFC 9111 3.2, 4.3.4): the
    304's fields replace the stored ones of the same name, except those
    describing the stored body.
    """
    new = [(n, v) for n, v in headers if n.lower() not in NOT_UPDATED_BY_304]
    mine = stored.etag
    if mine is not None and mine.startswith(b"W/"):
        # A variant this proxy compressed has its ETag weakened: the origin's strong one must not come back.
        new = [(n, mine if n.lower() == b"etag" and weak_match(v, mine) else v) for n, v in new]
    replaced = {n.lower() for n, _ in new}
    kept = [(n, v) for n, v in stored.headers if n.lower() not in replaced]
    return attrs.evolve(stored, headers=tuple(kept + new), request_time=request_time, response_time=response_time)


# ---------------------------------------------------------------------------
# Invalidation (RFC 9111 4.4)


def invalidated_uris(method: bytes, status: int, key: str, response_headers: Headers) -> list[str]:
    """
    The keys an unsafe request's non-error response invalidates: its
    target, and the Location and Content-Location of the same origin.
    """
    if method in SAFE_METHODS or not (200 <= status < 400):
        return []
    out = [key]
    scheme, _, rest = key.partition("://")
    authority = rest.split("/", 1)[0]
    origin = f"{scheme}://{authority}"
    for lname in (b"location", b"content-location"):
        value = first_value(response_headers, lname)
        if not value:
            continue
        uri = _resolve(key, value.strip().decode("latin-1"))
        if uri is not None and uri.startswith(origin + "/") and uri not in out:
            out.append(uri)
    return out


def _resolve(base: str, reference: str) -> str | None:
    """A Location or Content-Location as a key: resolved against the request's URI (RFC 3986 5)."""
    try:
        uri = urljoin(base, reference.split("#", 1)[0])
    except ValueError:
        return None
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return None
    authority, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{authority.lower()}/{path}"


# ---------------------------------------------------------------------------
# Ranges (RFC 9110 14) on a stored full response


def byte_range(request_headers: Headers, stored: StoredResponse) -> tuple[int, int] | str | None:
    """
    The one byte range the request asks of C{stored}: (first, last)
    inclusive, C{"unsatisfiable"} (416), or None to answer the full 200
    (no Range, several ranges, a failed If-Range, a unit we do not know).
    """
    values = header_values(request_headers, b"range")
    if len(values) != 1 or stored.status != 200:
        return None
    if_range = first_value(request_headers, b"if-range")
    if if_range is not None:
        if_range = if_range.strip()
        if if_range.startswith(b'"') or if_range.startswith(b"W/"):
            etag = stored.etag
            if etag is None or not strong_match(if_range, etag):
                return None
        else:
            date = parse_http_date(if_range)
            last_modified = stored.header(b"last-modified")
            if date is None or last_modified is None or parse_http_date(last_modified) != date:
                return None
    unit, eq, spec = values[0].strip().partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":
        return None
    specs = [s.strip() for s in spec.split(b",") if s.strip()]
    if len(specs) != 1:
        return None
    first, dash, last = specs[0].partition(b"-")
    size = stored.body_size
    first, last = first.strip(), last.strip()
    if not dash:
        return None
    if not first:
        if not last.isdigit():
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return (max(size - suffix, 0), size - 1)
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: RFC 9110 14.1.1 says to ignore the field
    if start >= size:
        return "unsatisfiable"
    end = int(last) if last else size - 1
    return (start, min(end, size - 1))


def cache_status(name: str, *, hit: bool = False, fwd: str | None = None, fwd_status: int | None = None,
                 ttl: float | None = None, stored: bool = False, collapsed: bool = False,
                 detail: str | None = None) -> bytes:
    """One member of the C{Cache-Status} field (RFC 9211)."""
    parts = [name]
    if hit:
        parts.append("hit")
    if fwd is not None:
        parts.append(f"fwd={fwd}")
    if fwd_status is not None:
        parts.append(f"fwd-status={fwd_status}")
    if ttl is not None:
        parts.append(f"ttl={int(ttl) if ttl >= 0 else -int(-ttl + 0.999)}")
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if detail is not None:
        parts.append(f"detail={detail}")
    return "; ".join(parts).encode("ascii")


def with_age(headers: Iterable[Header], age: float) -> list[Header]:
    """The headers with C{Age} set to C{age} (RFC 9111 5.1)."""
    out = [(n, v) for n, v in headers if n.lower() != b"age"]
    out.append((b"Age", b"%d" % int(max(age, 0))))
    return out
