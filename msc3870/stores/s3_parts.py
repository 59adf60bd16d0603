"""A streamed write to S3: the body read into part buffers that are used again and again,
each part sent as one request body.

s3transfer's ``upload_fileobj`` (what this replaces) joins each part of a stream into new
bytes, which botocore then wraps in a file that urllib3 sends 16 KiB at a time: a fresh
allocation, two copies and 512 Python-level reads and system calls per 8 MiB part. Here a
part is read straight into a ``bytearray`` (``readinto``: one copy, from the received
chunks) that is sent whole (botocore sends a ``bytearray`` body as it is, one ``sendall``),
then filled again with a later part.

A body whose length is known and at most ``single_put_limit`` goes as one PUT whose body
leaves as it arrives (``PutBody``): no part is held back until it is whole, and no
multipart upload's extra requests are made. That needs a body botocore sends as it is
(no checksum of it in a header, no payload hash in the signature: a streamed body cannot
be read twice), so it is done where the client sends bodies so; elsewhere, parts.

As with s3transfer: multipart past one part, ``concurrency`` parts sent at once, reading
waits while that many are in flight (at most ``concurrency + 1`` part buffers per write),
a failed multipart upload is aborted (no part left behind) and a failed single PUT
writes nothing; where the client sends checksums (``request_checksum_calculation`` of
"when_supported", over HTTPS), each part and the upload say CRC32 as s3transfer says it.
"""

from __future__ import annotations

import contextlib
import io
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ..errors import BodyTooSlow
from .base import MeteredReader


class PartBuffers:
    """Part buffers for one write: made when needed, at most ``most``, each returned by
    the thread that sent its part, and taken again by the reader (who waits for one when
    all are in use)."""

    def __init__(self, size: int, most: int) -> None:
        self.size, self.most = size, most
        self.made = 0
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()

    def take(self, size: int | None = None) -> bytearray:
        with contextlib.suppress(queue.Empty):
            return self._free.get_nowait()
        if self.made < self.most:
            self.made += 1
            return bytearray(self.size if size is None else size)
        return self._free.get()

    def give(self, buffer: bytearray) -> None:
        self._free.put(buffer)


def read_part(reader: MeteredReader, buffer: bytearray) -> tuple[bytearray, bool]:
    """The next part of the body, in ``buffer``, and whether the body ended within it
    (then ``buffer`` is cut to the part's length: shrunk in place, not copied)."""
    with memoryview(buffer) as view:
        count = reader.readinto(view)
    if count == len(buffer):
        return buffer, False
    del buffer[count:]
    return buffer, True


class PartWriter:
    """One streamed write (``write``), from a ``MeteredReader`` to ``Bucket``/``Key``."""

    def __init__(
        self, client: Any, where: dict[str, str], extra: dict[str, str], part_size: int
    ) -> None:
        self.client, self.where, self.part_size = client, where, part_size
        self.checksum: dict[str, str] = {}
        if client.meta.config.request_checksum_calculation == "when_supported":
            self.checksum = {"ChecksumAlgorithm": "CRC32"}
        self.extra = {**extra, **self.checksum}

    def write(
        self,
        reader: MeteredReader,
        concurrency: int,
        expected_size: int | None,
        single_put_limit: int = 0,
    ) -> None:
        """Read the body to its end and store it: one PUT sent as it is read if its
        length is known, at most ``single_put_limit`` and at least one ``PUT_BUFFER``
        (and the client sends bodies as they are); else one PUT if it fits in one part,
        else a multipart upload. ``expected_size`` sizes the first buffer of a small body
        (one byte more: the read that does not fill it is the one that saw the end)."""
        if (
            expected_size is not None
            and PUT_BUFFER <= expected_size <= single_put_limit
            and self.sends_bodies_as_they_are
        ):
            self._put_as_read(reader, expected_size)
            return
        buffers = PartBuffers(self.part_size, concurrency + 1)
        first_size = self.part_size
        if expected_size is not None and expected_size < self.part_size:
            first_size = expected_size + 1
        first, ended = read_part(reader, buffers.take(first_size))
        if ended:
            self.client.put_object(**self.where, Body=first, **self.extra)
            return
        upload_id = self.client.create_multipart_upload(**self.where, **self.extra)["UploadId"]
        try:
            parts = self._send_parts(reader, buffers, upload_id, first, concurrency)
            self.client.complete_multipart_upload(
                **self.where, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Parts already stored cost storage until the upload is aborted.
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(**self.where, UploadId=upload_id)
            raise

    @property
    def sends_bodies_as_they_are(self) -> bool:
        """Whether botocore sends a body without reading it first: no checksum of it in a
        header, no payload hash in the signature."""
        signing = (self.client.meta.config.s3 or {}).get("payload_signing_enabled")
        return not self.checksum and signing is False

    def _put_as_read(self, reader: MeteredReader, length: int) -> None:
        """One PUT of ``length`` bytes, sent by a thread of its own while this one reads
        (and hashes) the next buffer. A body that fails to arrive fails the PUT mid-body:
        the store keeps nothing, and the reader's error is raised (not botocore's)."""
        body = PutBody(length, PUT_BUFFERS, PUT_BUFFER)
        with ThreadPoolExecutor(1, thread_name_prefix="s3-put") as pool:
            sending = pool.submit(
                self.client.put_object, **self.where, Body=body, ContentLength=length, **self.extra
            )
            sending.add_done_callback(lambda _: body.stop())  # no reader waits for a buffer
            try:
                while not sending.done() and (buffer := body.take()) is not None:
                    with memoryview(buffer) as view:
                        count = reader.readinto(view)
                    body.give(buffer, count)
                    if count < len(buffer):
                        break
            except BaseException as exc:
                body.fail(exc)
                with contextlib.suppress(Exception):
                    sending.result()
                raise
            try:
                sending.result()
            except Exception as exc:
                if body.last_pause < PAUSE_BLAMED_SECONDS:
                    raise
                raise BodyTooSlow(
                    f"The request body paused for {body.last_pause:.0f} s, longer than the "
                    "storage waits for it; send it again"
                ) from exc

    def _send_parts(
        self,
        reader: MeteredReader,
        buffers: PartBuffers,
        upload_id: str,
        first: bytearray,
        concurrency: int,
    ) -> list[dict[str, Any]]:
        """Send ``first``, then every later part as it is read, ``concurrency`` at once;
        the parts' numbers, ETags (and checksums) in order."""
        sent: list[Future[dict[str, Any]]] = []
        failed: list[BaseException] = []
        with ThreadPoolExecutor(concurrency, thread_name_prefix="s3-part") as pool:
            try:
                part, ended = first, False
                while part:
                    number = len(sent) + 1
                    sent.append(pool.submit(self._send, buffers, upload_id, number, part))
                    sent[-1].add_done_callback(partial(_note_failure, failed))
                    if failed:  # a part that could not be stored stops the reading
                        raise failed[0]
                    if ended:
                        break
                    part, ended = read_part(reader, buffers.take())
            except BaseException:
                for future in sent:
                    future.cancel()
                raise
        return [future.result() for future in sent]

    def _send(
        self, buffers: PartBuffers, upload_id: str, number: int, part: bytearray
    ) -> dict[str, Any]:
        try:
            response = self.client.upload_part(
                **self.where, UploadId=upload_id, PartNumber=number, Body=part, **self.checksum
            )
        finally:
            buffers.give(part)
        stored = {"PartNumber": number, "ETag": response["ETag"]}
        if "ChecksumCRC32" in response:
            stored["ChecksumCRC32"] = response["ChecksumCRC32"]
        return stored


#: A PUT sent as it is read: this many buffers of this size (one being read into while
#: another is sent).
PUT_BUFFERS = 3
PUT_BUFFER = 1024 * 1024
#: A PUT sent as it is read holds the store's request open while the client pauses, and a
#: store drops a request idle for its own timeout (AWS: about 20 s), shorter than
#: ``UPLOAD_IDLE_TIMEOUT_SECONDS``: a PUT that failed when its body came back from a pause
#: this long failed because of the pause, and the client hears 408, not 503.
PAUSE_BLAMED_SECONDS = 5.0


class PutBody(io.RawIOBase):
    """The body of one PUT sent as it is read: buffers filled by the reading thread
    (``take``, ``give``), read by the thread that sends the request (http.client reads a
    block at a time and sends it before it reads the next). The reader holds the body to
    ``length`` (``MeteredReader``), or the send fails."""

    def __init__(self, length: int, count: int, size: int) -> None:
        super().__init__()
        self.length = length
        self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[memoryview | BaseException | None] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(size))
        self._current = memoryview(b"")
        self._buffer: bytearray | None = None  # the one ``_current`` is of
        self._sent = 0
        self._ended = False
        #: Seconds the sender last waited for the reader's next buffer.
        self.last_pause = 0.0

    def __len__(self) -> int:
        return self.length

    def readable(self) -> bool:
        return True

    # -- the reading thread's side

    def take(self) -> bytearray | None:
        """A buffer to read into; None once the PUT is over (answered, or failed)."""
        return self._free.get()

    def give(self, buffer: bytearray, count: int) -> None:
        """The first ``count`` bytes of ``buffer`` were read; fewer than it holds: the end."""
        self._full.put(memoryview(buffer)[:count])
        if count < len(buffer):
            self._full.put(None)

    def fail(self, exc: BaseException) -> None:
        """The reading failed: the send fails with it."""
        self._full.put(exc)

    def stop(self) -> None:
        self._free.put(None)

    # -- the sending thread's side

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # botocore rewinds a body before it retries: possible while none of it was sent.
        if offset == 0 and whence == io.SEEK_SET and self._sent == 0:
            return 0
        raise io.UnsupportedOperation("a body sent as it is read cannot be sent again")

    def read(self, size: int = -1, /) -> bytes | memoryview:  # type: ignore[override]
        if size is None or size < 0:  # the rest, copied (its buffers are read into again)
            rest = bytearray()
            while chunk := self.read(PUT_BUFFER):
                rest += chunk
            return bytes(rest)
        while not self._current:
            if self._ended:
                return b""
            if self._buffer is not None:  # sent: the reader may fill it again
                self._free.put(self._buffer)
                self._buffer = None
            waiting = time.monotonic()
            item = self._full.get()
            self.last_pause = time.monotonic() - waiting
            if isinstance(item, BaseException):
                raise item
            if item is None:
                self._ended = True
                return b""
            self._current, self._buffer = item, item.obj  # type: ignore[assignment]
        chunk, self._current = self._current[:size], self._current[size:]
        self._sent += len(chunk)
        return chunk


def _note_failure(failed: list[BaseException], future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        failed.append(future.exception())  # type: ignore[arg-type]
