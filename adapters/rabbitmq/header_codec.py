"""AMQP headers the broker delivers but pika cannot decode.

RabbitMQ accepts header values that pika's decoder cannot turn into Python values (a timestamp
past the year 9999, a double that is NaN, ...). pika decodes a message's properties while it
reads the frame, before any callback of ours, so the exception tears the connection down; the
broker then delivers the message again, at the head of the queue, to the next consumer: one such
message starves the whole fleet.

``install_tolerant_header_decoding()`` wraps ``pika.spec.BasicProperties.decode`` (pika's frame
reader looks it up on the class for every content header): when decoding fails and the
properties carry a headers table, the table is skipped whole by its own 4-byte length prefix,
the other properties are decoded as usual, and the headers become
``{UNDECODABLE_HEADERS: "<reason>"}``. The message is then delivered like any other and its
body decides what becomes of it. Only the properties of messages are affected: the tables of
methods (queue arguments, server properties) are decoded as before.

Some headers decode but cannot be encoded again: pika reads a double of 2**63 or more as an int,
which its encoder then refuses (``struct.error``). ``encoding_problem()`` says so before a copy
of the message is published with them.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Mapping
from typing import Any

import pika.data
import pika.spec

log = logging.getLogger(__package__)  # one logger for the whole adapter: adapters.rabbitmq

UNDECODABLE_HEADERS = "x-undecodable-headers"
"""The only header of a message whose headers table could not be decoded: why it could not."""
ORIGINAL_HEADERS_DROPPED = "x-original-headers-dropped"
"""On a re-published copy, in place of the original's headers when they could not be decoded
(``UNDECODABLE_HEADERS``) or cannot be encoded again: they were lost, and why; the copy carries
only the headers the worker set."""
MAX_REASON_CHARS = 200
_EMPTY_TABLE = struct.pack(">I", 0)
_INSTALLED_MARK = "_tolerates_undecodable_headers"

Decode = Callable[[pika.spec.BasicProperties, bytes, int], pika.spec.BasicProperties]


def install_tolerant_header_decoding() -> None:
    """Make pika deliver messages whose headers it cannot decode (idempotent)."""
    original: Decode = pika.spec.BasicProperties.decode
    if getattr(original, _INSTALLED_MARK, False):
        return

    def decode(
        self: pika.spec.BasicProperties, encoded: bytes, offset: int = 0
    ) -> pika.spec.BasicProperties:
        try:
            return original(self, encoded, offset)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            span = headers_table_span(encoded, offset)
            if span is None:
                raise
            start, end = span
            original(self, bytes(encoded[:start]) + _EMPTY_TABLE + bytes(encoded[end:]), offset)
            reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]
            self.headers = {UNDECODABLE_HEADERS: reason}
            log.warning(
                "a message's AMQP headers (%d bytes) cannot be decoded and were dropped: %s",
                end - start - 4,
                reason,
            )
            return self

    decode.__doc__ = original.__doc__
    setattr(decode, _INSTALLED_MARK, True)
    setattr(pika.spec.BasicProperties, "decode", decode)


def headers_table_span(encoded: Any, offset: int = 0) -> tuple[int, int] | None:
    """Where the headers table lies in encoded basic properties, length prefix included:
    ``(start, end)``, or None when there is none or it does not fit the data."""
    properties = pika.spec.BasicProperties
    try:
        flags, word = 0, 0
        while True:
            partial = struct.unpack_from(">H", encoded, offset)[0]
            offset += 2
            flags |= partial << (word * 16)
            if not partial & 1:
                break
            word += 1
        if not flags & properties.FLAG_HEADERS:
            return None
        for flag in (properties.FLAG_CONTENT_TYPE, properties.FLAG_CONTENT_ENCODING):
            if flags & flag:  # a short string: one length byte, then the bytes
                offset += 1 + struct.unpack_from("B", encoded, offset)[0]
        size = struct.unpack_from(">I", encoded, offset)[0]
    except struct.error:
        return None
    end = offset + 4 + size
    return (offset, end) if end <= len(encoded) else None


def encoding_problem(headers: Mapping[str, Any]) -> str | None:
    """Why pika cannot encode ``headers`` as a headers table, naming the headers at fault (at
    most ``MAX_REASON_CHARS``); None when it can."""
    error = _encoding_error(headers)
    if error is None:
        return None
    culprits = [name for name, value in headers.items() if _encoding_error({name: value})]
    named = ", ".join(repr(name) for name in culprits) or "the headers"
    return f"{named} cannot be encoded again: {error}"[:MAX_REASON_CHARS]


def _encoding_error(headers: Mapping[str, Any]) -> str | None:
    """The error pika's encoder raises on ``headers`` (into a scratch list), or None."""
    try:
        pika.data.encode_table([], dict(headers))
    # struct.error, pika's UnsupportedAMQPFieldException, a header name that is not text...
    except Exception as exc:  # pylint: disable=broad-exception-caught
        return f"{type(exc).__name__}: {exc}"
    return None
