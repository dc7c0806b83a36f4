"""
HPACK decoding (RFC 7541) of the header blocks a client sends.

Why not hpack's C{Decoder}: per field it slices a memoryview, makes a
C{HeaderTuple}, calls a logger twice and checks the table's bounds in three
places; a browser's request head (sixteen fields, most of them indexed)
cost more to decode than the rest of an HTTP/2 request.  Here an indexed
field is a tuple taken from a list, and a Huffman-coded string a client
repeats is decoded once per connection.

Huffman decoding itself is hpack's C{decode_huffman} (a table-driven state
machine that rejects EOS and bad padding, 5.2).
"""

from __future__ import annotations

from collections import deque

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

__all__ = ["DecodeError", "HeaderListTooLarge", "RequestDecoder"]

_STATIC = ((b"", b""),) + tuple(HeaderTable.STATIC_TABLE)
"""The static table (Appendix A), by its 1-based index."""
_STATIC_COUNT = len(HeaderTable.STATIC_TABLE)

ENTRY_OVERHEAD = 32
"""What an entry costs in the dynamic table beyond its bytes (4.1)."""

HUFFMAN_MEMORY = 256
HUFFMAN_MEMORY_BYTES = 256
"""Huffman-coded strings remembered per connection (those up to this long), with what they decode to."""


class DecodeError(Exception):
    """The block is not valid HPACK: a COMPRESSION_ERROR for the connection."""


class HeaderListTooLarge(DecodeError):
    """The block decodes to more than the connection allows."""


class RequestDecoder:
    """The HPACK decoder of one connection: the dynamic table and its size."""

    __slots__ = ("max_table_size", "max_header_list_size", "table_size", "_limit", "_entries", "_huffman",
                 "changes")

    def __init__(self, max_table_size: int = 4096, max_header_list_size: int = 65536) -> None:
        self.max_table_size = max_table_size
        """SETTINGS_HEADER_TABLE_SIZE as we sent it: what a size update may ask for."""
        self.max_header_list_size = max_header_list_size
        self._limit = max_table_size
        self.table_size = 0
        self._entries: deque[tuple[bytes, bytes]] = deque()
        self._huffman: dict[bytes, bytes] = {}
        self.changes = 0
        """Counts the blocks that changed the dynamic table: equal counts, equal blocks decode equal."""

    def decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        append = headers.append
        entries = self._entries
        static = _STATIC
        n = len(data)
        pos = 0
        size = 0
        limit = self.max_header_list_size
        changed = False
        try:
            while pos < n:
                b = data[pos]
                if b & 0x80:  # indexed (6.1)
                    index = b & 0x7F
                    pos += 1
                    if index == 0x7F:
                        index, pos = _integer(data, pos, 0x7F)
                    if 0 < index <= _STATIC_COUNT:
                        field = static[index]
                    elif index:
                        field = entries[index - _STATIC_COUNT - 1]  # IndexError beyond the table
                    else:
                        raise DecodeError("index 0")
                elif b & 0x40:  # literal with incremental indexing (6.2.1)
                    field, pos = self._literal(data, pos, b & 0x3F, 0x3F)
                    self._add(field)
                    changed = True
                elif b & 0x20:  # dynamic table size update (6.3)
                    if headers:
                        raise DecodeError("a table size update after a field")
                    value = b & 0x1F
                    pos += 1
                    if value == 0x1F:
                        value, pos = _integer(data, pos, 0x1F)
                    if value > self.max_table_size:
                        raise DecodeError(f"a table size of {value} over the {self.max_table_size} allowed")
                    self._limit = value
                    self._evict()
                    changed = True
                    continue
                else:  # literal without indexing, or never indexed (6.2.2, 6.2.3)
                    field, pos = self._literal(data, pos, b & 0x0F, 0x0F)
                append(field)
                size += len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
                if size > limit:
                    raise HeaderListTooLarge(f"a header list over {limit} bytes")
        except IndexError:
            raise DecodeError("a block that ends inside a field, or an index beyond the tables") from None
        finally:
            if changed:
                self.changes += 1
        return headers

    def _literal(self, data: bytes, pos: int, name_index: int, prefix: int) -> tuple[tuple[bytes, bytes], int]:
        pos += 1
        if name_index == prefix:
            name_index, pos = _integer(data, pos, prefix)
        if name_index:
            if name_index <= _STATIC_COUNT:
                name = _STATIC[name_index][0]
            else:
                name = self._entries[name_index - _STATIC_COUNT - 1][0]
        else:
            name, pos = self._string(data, pos)
        value, pos = self._string(data, pos)
        return (name, value), pos

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        b = data[pos]
        length = b & 0x7F
        pos += 1
        if length == 0x7F:
            length, pos = _integer(data, pos, 0x7F)
        end = pos + length
        if end > len(data):
            raise DecodeError("a string longer than its block")
        raw = data[pos:end]
        if not b & 0x80:
            return raw, end
        known = self._huffman.get(raw)
        if known is not None:
            return known, end
        try:
            text = decode_huffman(raw)
        except Exception as e:  # hpack's HPACKDecodingError, or a lookup past its tables
            raise DecodeError(f"Huffman: {e}") from None
        if length <= HUFFMAN_MEMORY_BYTES:
            if len(self._huffman) >= HUFFMAN_MEMORY:
                self._huffman.clear()
            self._huffman[raw] = text
        return text, end

    def _add(self, field: tuple[bytes, bytes]) -> None:
        cost = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        if cost > self._limit:
            self._entries.clear()  # larger than the table: it empties it (4.4)
            self.table_size = 0
            return
        self._entries.appendleft(field)
        self.table_size += cost
        self._evict()

    def _evict(self) -> None:
        entries = self._entries
        while self.table_size > self._limit:
            name, value = entries.pop()
            self.table_size -= len(name) + len(value) + ENTRY_OVERHEAD


def _integer(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """The rest of an integer whose prefix was full (5.1); at most four more bytes (values under 2^28)."""
    shift = 0
    while True:
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise DecodeError("an integer too long")
