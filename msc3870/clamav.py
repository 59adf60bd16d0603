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


def scan_stream(url: str, chunks: Iterable[bytes], timeout: float) -> str | None:
    """Stream the bytes to clamd; None if clean, else the signature it found."""
    try:
        with _connect(url, timeout) as sock:
            sock.sendall(b"zINSTREAM\0")
            for chunk in chunks:
                for start in range(0, len(chunk), CHUNK):
                    piece = chunk[start : start + CHUNK]
                    sock.sendall(struct.pack("!L", len(piece)) + piece)
            sock.sendall(struct.pack("!L", 0))
            reply = b""
            while not reply.endswith(b"\0"):
                data = sock.recv(4096)
                if not data:
                    break
                reply += data
    except OSError as exc:
        raise ScannerError(f"clamd unreachable: {exc}") from exc
    answer = reply.rstrip(b"\0").decode(errors="replace").strip()
    if answer.endswith(": OK"):
        return None
    if answer.endswith(" FOUND"):
        return answer.split(":", 1)[-1].removesuffix(" FOUND").strip()
    raise ScannerError(f"clamd answered {answer!r}")
