"""The protobuf wire format, for answers written as bytes rather than built as messages
(https://protobuf.dev/programming-guides/encoding/).

Building a message object and serialising it copies every large field at least twice; the
writers of :mod:`cellexplain.service.v1` and the Open Inference Protocol's gRPC answer
(:mod:`cellexplain.service.grpc.oip_converters`) join ready pieces instead. A message's
serialisation followed by more fields is the message with those fields too (repeated fields
append), which lets a small message be built the usual way and large fields be added after it.
"""

from __future__ import annotations

#: wire types
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


def varint(n: int) -> bytes:
    """``n`` (non-negative) as a base-128 varint."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(field: int, wire: int) -> bytes:
    """A field's key: its number and wire type."""
    return varint(field << 3 | wire)


def length_prefix(field: int, size: int) -> bytes:
    """What precedes ``size`` bytes of a length-delimited field (bytes, string, message)."""
    return key(field, LEN) + varint(size)


def string(field: int, text: str) -> bytes:
    """A string field, whole."""
    raw = text.encode()
    return length_prefix(field, len(raw)) + raw
