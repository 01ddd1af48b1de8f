"""Reading an HTTP/1.1 request body as the Functions host (Kestrel) frames it, for the local host.

A body comes by Content-Length or by `Transfer-Encoding: chunked` (Python's `requests` sends a generator body
chunked); a length that is not a whole number, a request with both headers, a body over the size limit, or a
body that does not arrive in time is refused with a status and a reason, never read as an empty body: an empty
body means "no options" to the API, and `{"dryRun": true}` read as nothing would start a real run.
"""

from __future__ import annotations

import re
import socket
from typing import BinaryIO

_LENGTH = re.compile(r"[0-9]{1,19}", re.ASCII)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r?\n")
MAX_LINE = 4096  # a chunk-size line or a trailer line


class FramingError(Exception):
    """The request's body cannot be read: answer `status` with the reason, and close the connection (what
    follows on it cannot be told from the rest of this body)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def read_body(headers, stream: BinaryIO, connection: socket.socket, limit: int, timeout: float) -> bytes:
    """The request's body, read within `timeout` seconds of silence, at most `limit` bytes."""
    chunked = headers.get("Transfer-Encoding")
    length = headers.get("Content-Length")
    if chunked is not None and length is not None:
        raise FramingError(400, "a request may not carry both Content-Length and Transfer-Encoding")
    if chunked is not None and chunked.strip().lower() != "chunked":
        raise FramingError(501, f"Transfer-Encoding {chunked[:40]!r} is not supported; send chunked or a length")
    if length is not None and not _LENGTH.fullmatch(length.strip()):
        raise FramingError(400, f"Content-Length must be a whole number of bytes, not {length[:40]!r}")
    if length is not None and int(length) > limit:
        raise FramingError(413, f"the body is {int(length)} bytes; at most {limit} are accepted")
    previous = connection.gettimeout()
    connection.settimeout(timeout)
    try:
        if chunked is not None:
            return _chunks(stream, limit)
        return _exactly(stream, int(length or 0))
    except TimeoutError:
        raise FramingError(408, f"the request body did not arrive within {timeout:g} s") from None
    finally:
        connection.settimeout(previous)


def _exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size) if size else b""
    if len(data) < size:
        raise FramingError(400, f"the body ended after {len(data)} of its {size} bytes")
    return data


def _chunks(stream: BinaryIO, limit: int) -> bytes:
    body = bytearray()
    while True:
        line = stream.readline(MAX_LINE + 1)
        found = _CHUNK_SIZE.fullmatch(line)
        if not found:
            raise FramingError(400, "a chunk of the body does not start with its size in hexadecimal")
        size = int(found.group(1), 16)
        if size == 0:
            break
        if len(body) + size > limit:
            raise FramingError(413, f"the body is over {limit} bytes")
        body += _exactly(stream, size)
        if stream.readline(3) not in (b"\r\n", b"\n"):
            raise FramingError(400, "a chunk of the body is longer than its size says")
    while stream.readline(MAX_LINE + 1) not in (b"\r\n", b"\n", b""):  # trailers: read and ignored
        pass
    return bytes(body)
