"""
The HPACK encoder of HTTP/2 responses (L{rproxy_tw.http.hpack_out}) against
hpack's own decoder: whatever it encodes decodes to the same fields, and
encoding has no side effect (the dynamic table is never used), which is what
lets it remember encoded fields.
"""

from __future__ import annotations

from hpack import Decoder
from hypothesis import given, settings
from hypothesis import strategies as st

from rproxy_tw.http.hpack_out import NEVER_INDEXED, ResponseEncoder, encode_field

names = st.one_of(
    st.sampled_from([b":status", b"server", b"date", b"content-type", b"content-length", b"set-cookie",
                     b"authorization", b"etag", b"x-custom", b"accept-ranges", b"cache-control"]),
    st.binary(min_size=1, max_size=30).map(lambda b: bytes(0x61 + c % 26 for c in b)),
)
values = st.one_of(st.sampled_from([b"200", b"404", b"", b"bytes", b"gzip, deflate"]),
                   st.binary(max_size=300).map(lambda b: bytes(0x20 + c % 95 for c in b)))
fields = st.lists(st.tuples(names, values), max_size=20)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(fields, min_size=1, max_size=5))
def test_blocks_decode_to_the_same_fields(blocks: list[list[tuple[bytes, bytes]]]) -> None:
    encoder, decoder = ResponseEncoder(), Decoder()
    for block in blocks:
        assert decoder.decode(encoder.encode(block), raw=True) == block
    assert len(decoder.header_table.dynamic_entries) == 0


@settings(max_examples=100, deadline=None, derandomize=True)
@given(names, values)
def test_a_field_encodes_to_the_same_bytes_every_time(name: bytes, value: bytes) -> None:
    encoder = ResponseEncoder()
    assert encoder.encode([(name, value)]) == encode_field(name, value) == encoder.encode([(name, value)])


def test_credentials_are_never_indexed() -> None:
    for name in NEVER_INDEXED:
        encoded = encode_field(name, b"secret")
        assert encoded[0] & 0xF0 == 0x10
        [(decoded_name, value)] = Decoder().decode(encoded, raw=True)
        assert (decoded_name, value) == (name, b"secret")


def test_common_fields_use_the_static_table() -> None:
    assert encode_field(b":status", b"200") == b"\x88"  # index 8
    assert encode_field(b"content-type", b"text/plain")[0] == 0x0F  # 4-bit prefix full: name index 31 follows
    assert encode_field(b"server", b"rproxy")[0] == 0x0F


def test_a_smaller_table_size_is_acknowledged_at_the_start_of_the_next_block() -> None:
    encoder, decoder = ResponseEncoder(), Decoder()
    encoder.header_table_size = 0
    encoder.header_table_size = 1024
    block = encoder.encode([(b":status", b"200")])
    assert block[:1] == b"\x20"  # size update to 0 (the smallest), then 1024
    assert decoder.decode(block, raw=True) == [(b":status", b"200")]
    assert decoder.header_table.maxsize == 1024
    assert encoder.encode([(b":status", b"200")]) == b"\x88"  # once only
