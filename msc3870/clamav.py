"""A minimal clamd client: the INSTREAM command over TCP or a Unix socket.

(The ``clamd`` package on PyPI has not been released since 2014; the protocol is small.)
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable
from urllib.parse import urlsplit

# clamd's StreamMaxLength defaults to 25 MiB; chunks must be smaller than that.
CHUNK = 64 * 1024


class ScannerError(Exception):
    """clamd could not be reached or answered nonsense (retryable)."""


def _connect(url: str, timeout: float) -> socket.socket:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(parts.path)
        return sock
    if parts.scheme == "tcp" and parts.hostname:
        return socket.create_connection((parts.hostname, parts.port or 3310), timeout=timeout)
    raise ScannerError(f"CLAMAV_URL {url!r} must be tcp://host:port or unix:///path")


class ClamdStream:
    """One INSTREAM scan fed chunk by chunk, so the bytes read once for the SHA-256 can be
    scanned in the same pass (``msc3870.screening.check_sha256``)."""

    def __init__(self, url: str, timeout: float) -> None:
        try:
            self._sock = _connect(url, timeout)
            self._sock.sendall(b"zINSTREAM\0")
        except OSError as exc:
            raise ScannerError(f"clamd unreachable: {exc}") from exc

    def send(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        try:
            for start in range(0, len(view), CHUNK):
                piece = view[start : start + CHUNK]
                # Two sends, no concatenation: the piece is not copied.
                self._sock.sendall(struct.pack("!L", len(piece)))
                self._sock.sendall(piece)
        except OSError as exc:
            self.close()
            raise ScannerError(f"clamd unreachable: {exc}") from exc

    def verdict(self) -> str | None:
        """End the stream; None if clean, else the signature clamd found."""
        try:
            self._sock.sendall(struct.pack("!L", 0))
            reply = b""
            while not reply.endswith(b"\0"):
                data = self._sock.recv(4096)
                if not data:
                    break
                reply += data
        except OSError as exc:
            raise ScannerError(f"clamd unreachable: {exc}") from exc
        finally:
            self.close()
        answer = reply.rstrip(b"\0").decode(errors="replace").strip()
        if answer.endswith(": OK"):
            return None
        if answer.endswith(" FOUND"):
            return answer.split(":", 1)[-1].removesuffix(" FOUND").strip()
        raise ScannerError(f"clamd answered {answer!r}")

    def close(self) -> None:
        self._sock.close()


def scan_stream(url: str, chunks: Iterable[bytes], timeout: float) -> str | None:
    """Stream the bytes to clamd; None if clean, else the signature it found."""
    stream = ClamdStream(url, timeout)
    try:
        for chunk in chunks:
            stream.send(chunk)
    except BaseException:
        stream.close()
        raise
    return stream.verdict()
