"""The protobuf wire format, for answers written as bytes rather than built as messages
(https://protobuf.dev/programming-guides/encoding/).

Building a message object and serialising it copies every large field at least twice; the
writers of :mod:`cellexplain.service.v1` and the Open Inference Protocol's gRPC answer
(:mod:`cellexplain.service.grpc.oip_converters`) join ready pieces instead. A message's
serialisation followed by more fields is the message with those fields too (repeated fields
append), which lets a small message be built the usual way and large fields be added after it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

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


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it.

    Raises:
        ValueError: truncated, or longer than 10 bytes.
    """
    n = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        b = data[i]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i + 1
        shift += 7
    raise ValueError("a truncated or over-long varint")


def fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """The top-level fields of a serialised message, in order, as ``(number, wire type,
    start, end)`` of each value (for ``LEN`` fields, the bytes after the length), without
    parsing them: one step per field, whatever it holds.

    Raises:
        ValueError: bytes that are not the wire format (parsing would refuse them too).
    """
    pos, size = 0, len(data)
    while pos < size:
        tag, pos = read_varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == VARINT:
            _, end = read_varint(data, pos)
            start = pos
        elif wire == LEN:
            length, start = read_varint(data, pos)
            end = start + length
        elif wire in (FIXED64, FIXED32):
            start, end = pos, pos + (8 if wire == FIXED64 else 4)
        else:
            raise ValueError(f"wire type {wire} (groups are not used)")
        if end > size or number == 0:
            raise ValueError("a field runs past the end of the message")
        yield number, wire, start, end
        pos = end


def count_field(data: bytes | memoryview, number: int, stop_after: int) -> int:
    """How many times field ``number`` occurs at the top level of a message, counting no
    further than ``stop_after + 1`` (so that a message of millions of tiny entries costs at
    most ``stop_after`` steps)."""
    n = 0
    for field, _, _, _ in fields(data):
        if field == number:
            n += 1
            if n > stop_after:
                break
    return n


class TooManyFieldsError(ValueError):
    """A field occurs more often than its bound (``number`` ``None``: fields outside the
    bounds, unknown ones included, more than allowed)."""

    def __init__(self, number: int | None, bound: int) -> None:
        super().__init__(f"field {number} occurs more than {bound} times")
        self.number = number
        self.bound = bound
        self.path: str  # set by Bounds.check: the field's place in the message


def bounded_fields(
    data: bytes | memoryview, bounds: Mapping[int, int], others: int = 64
) -> Iterator[tuple[int, int, int, int]]:
    """:func:`fields`, raising :class:`TooManyFieldsError` as soon as a field number occurs more
    often than ``bounds`` allows, or more than ``others`` fields outside ``bounds`` occur: the
    walk costs at most ``sum(bounds) + others`` steps, however many tiny fields a message
    packs (twenty million unknown ones are 60 MB, and ~4 GB once protobuf holds them)."""
    seen: dict[int, int] = {}
    extra = 0
    for item in fields(data):
        number = item[0]
        bound = bounds.get(number)
        if bound is None:
            extra += 1
            if extra > others:
                raise TooManyFieldsError(None, others)
        else:
            n = seen[number] = seen.get(number, 0) + 1
            if n > bound:
                raise TooManyFieldsError(number, bound)
        yield item


@dataclass(frozen=True)
class Bounds:
    """How often each field of a message may occur (``limits``), the bounds of the messages
    its fields hold (``children``), and how many fields it does not define may occur."""

    limits: Mapping[int, int]
    children: Mapping[int, Bounds]
    names: Mapping[int, str]
    others: int = 64

    @classmethod
    def of(
        cls,
        descriptor: Any,
        overrides: Mapping[str, int] | None = None,
        repeated: int = 64,
        singular: int = 4,
    ) -> Bounds:
        """Bounds for a message type from its descriptor: a list field (map entries included)
        ``repeated`` times, any other ``singular`` times (protobuf merges repeats of those),
        ``overrides`` by field name (``"inputs"``, or ``"InferInputTensor.shape"``); every
        message-typed field bounded the same way, all the way down."""
        overrides = overrides or {}
        limits: dict[int, int] = {}
        children: dict[int, Bounds] = {}
        for f in descriptor.fields:
            is_list = getattr(f, "is_repeated", None)  # protobuf >= 6.31; label() before
            if is_list is None:
                is_list = f.label == f.LABEL_REPEATED
            default = repeated if is_list else singular
            limit = overrides.get(f"{descriptor.name}.{f.name}", overrides.get(f.name, default))
            limits[f.number] = limit
            if f.message_type is not None:
                children[f.number] = cls.of(f.message_type, overrides, repeated, singular)
        names = {f.number: f.name for f in descriptor.fields}
        return cls(limits, children, names)

    def check(self, data: bytes | memoryview, path: str = "") -> None:
        """Walk ``data`` within these bounds.

        Raises:
            TooManyFieldsError: with ``path`` (``inputs.contents.bytes_contents``) set.
            ValueError: bytes that are not the wire format.
        """
        try:
            for number, wire, start, end in bounded_fields(data, self.limits, self.others):
                child = self.children.get(number)
                if child is not None and wire == LEN:
                    child.check(memoryview(data)[start:end], f"{path}{self.names[number]}.")
        except TooManyFieldsError as e:
            if not hasattr(e, "path"):
                name = self.names.get(e.number, "") if e.number is not None else ""
                e.path = f"{path}{name}" if name else (path.rstrip(".") or "the message")
            raise
