"""A streamed write to S3: the body read into part buffers that are used again and again,
each part sent as one request body.

s3transfer's ``upload_fileobj`` (what this replaces) joins each part of a stream into new
bytes, which botocore then wraps in a file that urllib3 sends 16 KiB at a time: a fresh
allocation, two copies and 512 Python-level reads and system calls per 8 MiB part. Here a
part is read straight into a ``bytearray`` (``readinto``: one copy, from the received
chunks) that is sent whole (botocore sends a ``bytearray`` body as it is, one ``sendall``),
then filled again with a later part.

As with s3transfer: multipart past one part, ``concurrency`` parts sent at once, reading
waits while that many are in flight (at most ``concurrency + 1`` part buffers per write),
a failed multipart upload is aborted (no part left behind) and a failed single PUT
writes nothing; where the client sends checksums (``request_checksum_calculation`` of
"when_supported", over HTTPS), each part and the upload say CRC32 as s3transfer says it.
"""

from __future__ import annotations

import contextlib
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

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

    def write(self, reader: MeteredReader, concurrency: int, expected_size: int | None) -> None:
        """Read the body to its end and store it: one PUT if it fits in one part, else a
        multipart upload. ``expected_size`` sizes the first buffer of a small body (one
        byte more: the read that does not fill it is the one that saw the end)."""
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


def _note_failure(failed: list[BaseException], future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        failed.append(future.exception())  # type: ignore[arg-type]
