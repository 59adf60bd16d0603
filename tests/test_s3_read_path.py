"""The S3 store's reads over a real HTTP body (the whole-object read of screening, the
chunks of a download): from the http.client response beneath urllib3, with the length
checked in botocore's place. moto's bodies are not HTTP responses, so this uses a local
socket server."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3
from botocore.response import StreamingBody

from msc3870.errors import StorageUnavailable
from msc3870.stores.s3 import S3MediaStore, _readable

MiB = 1024 * 1024


class OneShotServer:
    """Answers each connection's request with ``head`` and ``body``, then closes it."""

    def __init__(self, head: bytes, body: bytes) -> None:
        self.head, self.body = head, body
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            with contextlib.suppress(OSError):  # a client that stops reading
                conn.sendall(self.head + self.body)

    def close(self) -> None:
        self.sock.close()


def http_body(server: OneShotServer) -> StreamingBody:
    """A GetObject body as botocore makes one (raw bytes, length left to botocore)."""
    pool = urllib3.HTTPConnectionPool("127.0.0.1", server.port, retries=False)
    raw = pool.urlopen(
        "GET", "/", preload_content=False, decode_content=False, enforce_content_length=False
    )
    return StreamingBody(raw, raw.headers.get("Content-Length"))


class FakeClient:
    def __init__(self, server: OneShotServer, length: int) -> None:
        self.server, self.length = server, length

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        return {"Body": http_body(self.server), "ContentLength": self.length}


class FakeStorage:
    bucket_name = "media-test"
    location = ""


def store_reading_from(server: OneShotServer, length: int) -> S3MediaStore:
    store = S3MediaStore(FakeStorage())  # type: ignore[arg-type]
    store.__dict__["client"] = FakeClient(server, length)
    return store


@pytest.fixture
def served() -> Iterator[tuple[OneShotServer, bytes]]:
    body = os.urandom(3 * MiB + 12345)
    server = OneShotServer(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Encoding: gzip\r\n\r\n" % len(body),
        body,
    )
    yield server, body
    server.close()


def test_whole_read_fills_the_buffer_beneath_urllib3(served: tuple[OneShotServer, bytes]) -> None:
    server, body = served
    unread = http_body(server)
    assert isinstance(_readable(unread), http.client.HTTPResponse)
    unread.close()
    digest = hashlib.sha256()
    for chunk in store_reading_from(server, len(body)).read_whole("k"):
        digest.update(chunk)
    # Every byte as sent, not decoded although the response says gzip: what was stored.
    assert digest.hexdigest() == hashlib.sha256(body).hexdigest()


def test_whole_read_cut_short_is_a_storage_failure_not_short_bytes() -> None:
    body = os.urandom(MiB)
    server = OneShotServer(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (3 * MiB), body
    )  # says 3 MiB, sends 1 MiB and closes
    try:
        received = 0
        with pytest.raises(StorageUnavailable) as raised:
            for chunk in store_reading_from(server, 3 * MiB).read_whole("k"):
                received += len(chunk)
        assert received == MiB
        assert "IncompleteReadError" in str(raised.value)
    finally:
        server.close()


def test_whole_read_longer_than_the_object_said_is_a_storage_failure(
    served: tuple[OneShotServer, bytes],
) -> None:
    server, body = served
    with pytest.raises(StorageUnavailable):
        for _ in store_reading_from(server, len(body) + 1).read_whole("k"):
            pass


def test_a_body_urllib3_has_read_from_is_left_to_botocore(
    served: tuple[OneShotServer, bytes],
) -> None:
    server, body = served
    streaming = http_body(server)
    first = streaming.read(10)
    assert _readable(streaming) is streaming
    assert first + streaming.read() == body


def test_a_body_that_is_no_http_response_is_left_to_botocore() -> None:
    import io

    streaming = StreamingBody(io.BytesIO(b"abc"), 3)
    assert _readable(streaming) is streaming


def test_download_chunks_are_the_bytes_in_order(served: tuple[OneShotServer, bytes]) -> None:
    server, body = served
    chunks = list(store_reading_from(server, len(body)).iter_bytes("k", chunk_size=MiB))
    assert [len(c) for c in chunks] == [MiB, MiB, MiB, 12345]
    assert b"".join(chunks) == body


def test_download_cut_short_is_a_storage_failure() -> None:
    server = OneShotServer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * MiB), b"x" * 100)
    try:
        with pytest.raises(StorageUnavailable):
            list(store_reading_from(server, 2 * MiB).iter_bytes("k"))
    finally:
        server.close()
