"""
HPACK encoding (RFC 7541) of the header blocks an HTTP/2 connection sends.

Why not hpack's C{Encoder}: it searches the static and the dynamic table for
every field, in Python, and logs twice a field; it was two thirds of the cost
of sending a response head.  A proxy's response fields repeat (the same
server, content types, cache and security headers, the date of this second),
so here each field's encoded form is remembered.  That is only sound if
encoding a field has no side effect, so nothing ever goes into the dynamic
table: a field is either a static-table entry (indexed) or a literal without
indexing (with the static table's index of its name when it has one) - what
nginx does.  The price: a repeated field costs its literal bytes each time
instead of one byte (about 100 bytes more per response head; measured in
bench/README.md), and the client's decoder memory goes unused.

Credentials are sent never-indexed (RFC 7541 7.1.3), as h2's own encoder
does, and never remembered.

An instance is an L{rproxy_tw.http.h2session.H2Session}'s C{encoder}: the
session calls C{encode(headers)} for every header block and sets
C{header_table_size} when the client's SETTINGS_HEADER_TABLE_SIZE changes,
which the next block acknowledges with a dynamic table size update (RFC 7541
4.2, 6.3), as a decoder such as nghttp2's insists.
"""

from __future__ import annotations

from typing import Iterable

from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

__all__ = ["ResponseEncoder", "encode_field", "encode_fields"]

_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode

_STATIC_FIELD: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELD.setdefault((_name, _value), _index)
    _STATIC_NAME.setdefault(_name, _index)

NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
"""Sent as never-indexed literals, and never kept in the cache of encoded fields."""

CACHE_SIZE = 4096
"""Encoded fields remembered (process-wide); the cache starts over when full."""

CACHE_VALUE_BYTES = 128
"""Longer values are encoded each time: the cache stays under a megabyte."""

_cache: dict[tuple[bytes, bytes], bytes] = {}


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) in a C{prefix_bits}-bit prefix, C{first} holding the byte's other bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    """A string literal (RFC 7541 5.2): Huffman-coded when that is shorter."""
    coded = _huffman(data)
    if len(coded) < len(data):
        return _integer(len(coded), 7, 0x80) + coded
    return _integer(len(data), 7, 0x00) + data


def encode_field(name: bytes, value: bytes) -> bytes:
    """One field's representation; the same bytes every time, since the dynamic table is never touched."""
    index = _STATIC_FIELD.get((name, value))
    if index is not None:
        return bytes((0x80 | index,))  # indexed (6.1); the static table has 61 entries
    first = 0x10 if name in NEVER_INDEXED else 0x00  # never indexed (6.2.3) | without indexing (6.2.2)
    name_index = _STATIC_NAME.get(name, 0)
    head = _integer(name_index, 4, first)
    if not name_index:
        head += _string(name)
    return head + _string(value)


class ResponseEncoder:
    """The header block encoder of one HTTP/2 connection (see the module docstring)."""

    __slots__ = ("_table_size", "_smallest")

    def __init__(self) -> None:
        self._table_size = 4096
        self._smallest: int | None = None
        """The smallest table size set since the last block, if one was set."""

    @property
    def header_table_size(self) -> int:
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._table_size = value
        if self._smallest is None or value < self._smallest:
            self._smallest = value

    def encode(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """The next header block of the connection: C{headers} encoded, after any table size update due."""
        return self.block(encode_fields(headers))

    def block(self, encoded: bytes) -> bytes:
        """
        C{encoded} (fields as L{encode_fields} gives them, perhaps remembered from
        an earlier head) as the connection's next header block: the dynamic table
        size updates due go first (6.3): the smallest size set, then the last.
        """
        smallest = self._smallest
        if smallest is None:
            return encoded
        self._smallest = None
        update = _integer(smallest, 5, 0x20)
        if smallest != self._table_size:
            update += _integer(self._table_size, 5, 0x20)
        return update + encoded


def encode_fields(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """
    C{headers} encoded, field after field (each one's form remembered, see
    L{CACHE_SIZE}); the same bytes on every connection, since no field goes
    into the dynamic table.
    """
    parts = []
    cache = _cache
    for field in headers:
        name, value = field[0], field[1]
        encoded = cache.get((name, value))
        if encoded is None:
            encoded = encode_field(name, value)
            if len(value) <= CACHE_VALUE_BYTES and name not in NEVER_INDEXED:
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                cache[(name, value)] = encoded
        parts.append(encoded)
    return b"".join(parts)
