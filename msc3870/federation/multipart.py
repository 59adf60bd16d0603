"""The ``multipart/mixed`` body of the federation media endpoints (spec v1.11, MSC3916).

Two parts: the metadata (``Content-Type: application/json``, ``{}`` until linked media
defines fields), then either the bytes with their ``Content-Type`` and
``Content-Disposition``, or only a ``Location`` header that the requester follows without
authentication::

    --<boundary>\\r\\n
    Content-Type: application/json\\r\\n
    \\r\\n
    {}\\r\\n
    --<boundary>\\r\\n
    Content-Type: image/png\\r\\n                  (or only: Location: https://...\\r\\n)
    Content-Disposition: inline; filename=cat.png\\r\\n
    \\r\\n
    <bytes>\\r\\n
    --<boundary>--\\r\\n

Readers this must suit, as Synapse's (``synapse/http/client.py``,
``_MultipartParserProtocol``): the response's ``Content-Type`` is split on ``boundary=``
and the rest taken as the boundary, so it is unquoted and last; the first header of the
first part must be exactly ``application/json``; in a ``Location`` part every header value
after ``Location`` would be read as the URL, so that part has no other header.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator

CRLF = b"\r\n"
METADATA = b"{}"


class MultipartMedia:
    """One response body's framing: a fresh random boundary (32 hex digits, as Synapse's:
    the chance that it occurs in the bytes is negligible, and the bytes are never
    scanned)."""

    def __init__(self) -> None:
        self.boundary = uuid.uuid4().hex
        self._delimiter = b"--" + self.boundary.encode("ascii")

    @property
    def content_type(self) -> str:
        return f"multipart/mixed; boundary={self.boundary}"

    def _head(self, headers: list[tuple[str, str]]) -> bytes:
        return b"".join(
            [
                self._delimiter + CRLF,
                _header("Content-Type", "application/json"),
                CRLF,
                METADATA + CRLF,
                self._delimiter + CRLF,
                *(_header(name, value) for name, value in headers),
                CRLF,
            ]
        )

    @property
    def _tail(self) -> bytes:
        return CRLF + self._delimiter + b"--" + CRLF

    def file(
        self, content_type: str, disposition: str, chunks: Iterable[bytes], size: int
    ) -> tuple[Iterator[bytes], int]:
        """The body around the streamed bytes of a file of ``size`` bytes, and its length
        (the bytes are passed through as they come, never gathered)."""
        head = self._head([("Content-Type", content_type), ("Content-Disposition", disposition)])
        tail = self._tail

        def body() -> Iterator[bytes]:
            yield head
            yield from chunks
            yield tail

        return body(), len(head) + size + len(tail)

    def location(self, url: str) -> bytes:
        """The whole body pointing at ``url``."""
        return self._head([("Location", url)]) + self._tail


def _header(name: str, value: str) -> bytes:
    # Values come from stored media (content type, file name, a signed URL); one holding a
    # line break would start a header or a part of its own. The file name is already
    # percent-encoded by content_disposition() and HTTP cannot carry a CR or LF in the
    # declared type, so this only guards against a bug upstream.
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"Refusing a line break in the {name} header of a multipart part")
    return f"{name}: {value}".encode() + CRLF
