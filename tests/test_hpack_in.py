"""
The HPACK decoder of HTTP/2 requests (L{rproxy_tw.http.hpack_in}) against
hpack's encoder and decoder: every block hpack encodes (with and without
Huffman coding, indexed, never indexed, table size updates) decodes to what
hpack's decoder says, with the same dynamic table after; and whatever the
bytes, the decoder answers or raises L{DecodeError}, never anything else.
"""

from __future__ import annotations

from typing import Any

import pytest
from hpack import Decoder, Encoder
from hypothesis import given, settings
from hypothesis import strategies as st

from rproxy_tw.http.hpack_in import DecodeError, HeaderListTooLarge, RequestDecoder

names = st.one_of(
    st.sampled_from([b":method", b":path", b":authority", b"cookie", b"user-agent", b"accept", b"x-custom",
                     b"content-length", b"authorization"]),
    st.binary(min_size=1, max_size=30).map(lambda b: bytes(0x61 + c % 26 for c in b)),
)
values = st.one_of(st.sampled_from([b"GET", b"/", b"", b"gzip, deflate", b"/index.html"]),
                   st.binary(max_size=300))
fields = st.lists(st.tuples(names, values, st.booleans()), max_size=20)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.tuples(fields, st.booleans(), st.one_of(st.none(), st.integers(0, 4096))), min_size=1,
                max_size=8))
def test_decodes_what_hpack_encodes_as_hpack_decodes_it(blocks: list[tuple[list[Any], bool, int | None]]) -> None:
    encoder, reference, decoder = Encoder(), Decoder(), RequestDecoder()
    for block, huffman, table_size in blocks:
        if table_size is not None:
            encoder.header_table_size = table_size  # a size update starts the next block
        data = encoder.encode(block, huffman=huffman)
        assert decoder.decode(data) == [tuple(f) for f in reference.decode(data, raw=True)]
        assert decoder.table_size == reference.header_table._current_size


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.binary(max_size=40), max_size=4))
def test_any_bytes_decode_or_raise_decode_error(blocks: list[bytes]) -> None:
    decoder = RequestDecoder()
    for data in blocks:
        try:
            decoder.decode(data)
        except DecodeError:
            return


def test_a_header_list_over_the_limit() -> None:
    block = Encoder().encode([(b"x-a", b"y" * 100)] * 10)
    assert len(RequestDecoder(max_header_list_size=1350).decode(block)) == 10
    with pytest.raises(HeaderListTooLarge):
        RequestDecoder(max_header_list_size=1349).decode(block)


def test_an_entry_larger_than_the_table_empties_it() -> None:
    encoder, decoder = Encoder(), RequestDecoder()
    decoder.decode(encoder.encode([(b"x-a", b"1")]))
    assert decoder.table_size == 36
    decoder.decode(encoder.encode([(b"x-b", b"y" * 5000)]))
    assert decoder.table_size == 0


@pytest.mark.parametrize("block, why", [
    (b"\x80", "index 0"),
    (b"\xbe", "index 62, the dynamic table empty"),
    (b"\xff\x80\x80\x80\x80\x01", "an integer too long"),
    (b"\x82\x20", "a size update after a field"),
    (b"\x3f\xe2\x1f", "a size update above 4096"),
    (b"\x40\x03ab", "a string longer than its block"),
    (b"\x00\x81\xff\x01a", "Huffman: eight bits of padding"),
    (b"\x00\x82\x1f\xff\x01a", "Huffman: padding longer than 7 bits"),
    (b"\x00\x81\x18\x01a", "Huffman: padding of zeros"),
    (b"\x00\x84\xff\xff\xff\xff\x01a", "Huffman: EOS"),
    (b"\x82\x84\x00", "a block that ends inside a field"),
])
def test_invalid_blocks(block: bytes, why: str) -> None:
    with pytest.raises(DecodeError):
        RequestDecoder().decode(block)


def test_repeated_huffman_strings_are_decoded_once_and_right() -> None:
    encoder, decoder = Encoder(), RequestDecoder()
    for i in range(3):
        block = encoder.encode([(b":path", b"/some/long/path/%d" % (i % 2))], huffman=True)
        assert decoder.decode(block) == [(b":path", b"/some/long/path/%d" % (i % 2))]
