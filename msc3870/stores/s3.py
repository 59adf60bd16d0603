"""Media in S3 (or anything S3-compatible) through django-storages' ``S3Storage``.

Clients upload straight to the bucket with a SigV4 presigned PUT for a key only their
media id uses (``incoming/<id>``). The server moves the bytes with a server-side copy to
a key no URL can write before checking them, reads only what it needs (a ranged read to
sniff the type), streams downloads in chunks or redirects to a short-lived presigned GET.

With ``S3_INCOMING_BUCKET``, upload URLs write to that bucket (versioning on) instead:
every read of a ``storage_keys.pinned`` key names its version (``VersionId``), which a
later PUT to the URL cannot change, so the checks and downloads read the version
``/complete`` looked at without waiting for a copy; deleting an upload URL's object
deletes all its versions.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from email.utils import parsedate_to_datetime
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, IncompleteReadError
from botocore.utils import parse_timestamp
from django.utils import timezone
from urllib3.response import HTTPResponse as Urllib3Response

from .. import metrics, storage_keys
from ..conf import app_settings
from ..errors import StorageUnavailable
from .base import (
    CHUNK_SIZE,
    MediaStore,
    MeteredReader,
    ObjectInfo,
    Readable,
    SourceChanged,
    UploadTarget,
    WrittenObject,
)
from .s3_parts import PartWriter

if TYPE_CHECKING:
    from storages.backends.s3 import S3Storage

    from ..models import Media

# S3 refuses presigned URLs that live longer than 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
MiB = 1024 * 1024
# Whole-object reads fill this buffer again and again.
WHOLE_READ_BUFFER = MiB
# S3's multipart limits: at most 10,000 parts, each at least 5 MiB (but the last).
MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * MiB
# What stores answer to a CopyObject ChecksumAlgorithm they do not implement.
CHECKSUM_REFUSED_CODES = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest"}
LIFECYCLE_UNSUPPORTED_CODES = {"NotImplemented", "501", "MethodNotAllowed", "405"}
INCOMING_RULE_ID = "msc3870-expire-incoming"
SIGV4 = Config(signature_version="s3v4")
# Over plain HTTP a CRC32 of each body is one more pass over the bytes, which botocore
# would also hash if S3_SIGN_PAYLOAD is on: checksums only where S3 requires one
# (DeleteObjects). Over HTTPS the CRC32 is what spares the SHA-256 (botocore signs the
# payload of a request without a checksum), so the default stays.
CHECKSUMS_WHEN_REQUIRED = Config(request_checksum_calculation="when_required")
# The health probe's client: it answers within seconds or counts as down.
PROBE_CONFIG = Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})
# Connections kept by the process's one client: a web process's view threads, its
# screening threads and a move's part-copy threads may all use it at once (botocore's
# default is 10; past it a connection is dropped after use, not waited for).
POOL_CONNECTIONS = 64
# Keys in one DeleteObjects request, at most (S3's limit).
DELETE_OBJECTS_MAX = 1000
# From this many upload URLs' objects at once, the incoming bucket's versions are listed
# under their common prefix instead of key by key (see ``_list_versions_together``).
VERSIONS_LISTED_TOGETHER_MIN = 10
NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchVersion"}
#: A conditional copy's source is no longer the version asked for (or is gone).
PRECONDITION_FAILED_CODES = {"412", "PreconditionFailed"}


log = logging.getLogger(__name__)
Chunk = TypeVar("Chunk", bytes, memoryview)


def _unavailable(exc: Exception) -> StorageUnavailable:
    """The store's own words (endpoint, bucket, key, request ids, credentials' names) are
    for the operator's log; clients get the fixed message of a 503."""
    return _logged(f"{type(exc).__name__}: {exc}", type(exc).__name__)


def _logged(detail: str, error: str = "refused") -> StorageUnavailable:
    log.warning("Media storage failed: %s", detail)
    metrics.store_error(error)
    error = StorageUnavailable()  # its message, the body of the 503, is the fixed one
    # str() keeps the detail for logs, retries and the row's last_error (record_failure).
    error.args = (f"Media storage failed: {detail}",)
    return error


def _readable(body: Any) -> Any:
    """What to read a GetObject body from (``read(n)``, ``readinto(buffer)``). urllib3
    reads each chunk into a new bytes object and copies it again (``readinto``) or queues
    it (``read``); the http.client response beneath it reads straight into the buffer:
    0.22 against 0.89 CPU-s per GiB read from SeaweedFS with a 1 MiB buffer
    (``bench/read_path.py``). That one only while urllib3 has read nothing
    (``tell() == 0``): botocore asks urllib3 for the raw bytes (``decode_content=False``)
    and checks the length itself, which ``_exactly`` does in its place. Any other body
    (moto's, a future urllib3's) is read through botocore."""
    raw = getattr(body, "_raw_stream", None)
    under = getattr(raw, "_fp", None)
    if (
        isinstance(raw, Urllib3Response)
        and isinstance(under, http.client.HTTPResponse)
        and raw.tell() == 0
    ):
        return under
    return body


def _exactly(response: dict[str, Any], chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """Pass on the chunks read from ``response``'s body, closing it at the end; a body
    that ends before or after its ``ContentLength`` is a storage failure, never short
    bytes."""
    expected, total = response.get("ContentLength"), 0
    try:
        for chunk in chunks:
            total += len(chunk)
            yield chunk
        if expected is not None and total != expected:
            raise IncompleteReadError(actual_bytes=total, expected_bytes=expected)
    except (BotoCoreError, http.client.HTTPException, OSError) as exc:
        raise _unavailable(exc) from exc
    finally:
        response["Body"].close()


def parse_s3_timestamp(value: Any) -> datetime:
    """The two forms S3 answers in, read by the standard library: HTTP dates in headers
    (``Last-Modified``) and ISO 8601 in XML bodies. botocore's own parser goes through
    dateutil, which cost 0.5 ms of a 3 ms ranged GET here (A/B, 6 rounds of 300); it still
    reads anything else."""
    if isinstance(value, str):
        try:
            if "," in value:
                parsed = parsedate_to_datetime(value)
            else:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except (TypeError, ValueError):
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:  # "-0000" dates come naive
            return parsed
    return parse_timestamp(value)


class S3MediaStore(MediaStore):
    can_redirect = True
    max_upload_url_lifetime = MAX_PRESIGN_SECONDS
    lists_cheaper_than_deletes = True

    def __init__(self, storage: S3Storage) -> None:
        self.storage = storage
        self.bucket = storage.bucket_name

    # -- clients ------------------------------------------------------------------------

    @cached_property
    def client(self) -> Any:
        """One client for every thread of the process, made with the storage's own
        settings. django-storages makes a boto3 resource per thread, and a resource with
        its client costs 0.1 to 0.3 s of CPU here: paid by each of a process's web and
        screening threads on its first upload. boto3 clients are thread-safe; the pool
        holds a connection for each thread that may use it at once."""
        return self._new_client(Config(max_pool_connections=POOL_CONNECTIONS))

    @cached_property
    def delete_client(self) -> Any:
        """DeleteObjects' client: as ``client``, without botocore's parameter validation,
        which walks each of up to 1,000 keys of every request in Python. The parameters
        are built here from keys this server made, never from a request's input."""
        return self._new_client(
            Config(max_pool_connections=POOL_CONNECTIONS, parameter_validation=False)
        )

    @cached_property
    def _session(self) -> Any:
        """The storage's boto3 session, shared by ``client`` and ``delete_client``: the
        second client of a session reuses its loaded service model."""
        session = self.storage._create_session()
        with contextlib.suppress(AttributeError):  # the botocore session beneath boto3's
            session._session.get_component("response_parser_factory").set_parser_defaults(
                timestamp_parser=parse_s3_timestamp
            )
        return session

    # boto3 sessions are not thread-safe: the first uses of the clients may race.
    _client_lock = threading.Lock()

    def _new_client(self, extra: Config) -> Any:
        storage = self.storage
        config = storage.client_config.merge(extra)
        if str(storage.endpoint_url or "").startswith("http://"):
            config = config.merge(CHECKSUMS_WHEN_REQUIRED)
            if not app_settings.S3_SIGN_PAYLOAD:
                s3_options = {**(config.s3 or {}), "payload_signing_enabled": False}
                config = config.merge(Config(s3=s3_options))
        with self._client_lock:
            return self._session.client(
                "s3",
                region_name=storage.region_name,
                use_ssl=storage.use_ssl,
                endpoint_url=storage.endpoint_url,
                config=config,
                verify=storage.verify,
            )

    @cached_property
    def signing_client(self) -> Any:
        """Signs URLs handed to clients: always SigV4, and for the public endpoint (a CDN
        or transfer-acceleration host) when one is configured. boto3 clients are
        thread-safe, so one is shared."""
        storage = self.storage
        return boto3.session.Session().client(
            "s3",
            endpoint_url=app_settings.S3_PUBLIC_ENDPOINT_URL or storage.endpoint_url,
            region_name=storage.region_name,
            aws_access_key_id=storage.access_key,
            aws_secret_access_key=storage.secret_key,
            aws_session_token=storage.security_token,
            config=storage.client_config.merge(SIGV4),
        )

    @cached_property
    def probe_client(self) -> Any:
        """The health check's client: short timeouts, no retries (the main client waits
        a minute and retries, as a transfer should)."""
        storage = self.storage
        return storage._create_session().client(
            "s3",
            region_name=storage.region_name,
            use_ssl=storage.use_ssl,
            endpoint_url=storage.endpoint_url,
            config=storage.client_config.merge(PROBE_CONFIG),
            verify=storage.verify,
        )

    def _key(self, key: str) -> str:
        location = (self.storage.location or "").strip("/")
        return f"{location}/{key}" if location else key

    @property
    def incoming_bucket(self) -> str | None:
        """The bucket upload URLs write to, if not the media bucket (read on access)."""
        return app_settings.S3_INCOMING_BUCKET

    @property
    def keeps_versions(self) -> bool:  # type: ignore[override]
        return bool(self.incoming_bucket)

    def _where(self, key: str) -> dict[str, str]:
        """The bucket, key and version (a ``pinned`` key's) of an app key, as S3's
        parameters (and a ``CopySource``): upload URLs' objects are in the incoming
        bucket where there is one."""
        base, version_id = storage_keys.split_version(key)
        bucket = self.bucket
        if self.incoming_bucket and base.startswith(storage_keys.INCOMING_PREFIX):
            bucket = self.incoming_bucket
        where = {"Bucket": bucket, "Key": self._key(base)}
        if version_id:
            where["VersionId"] = version_id
        return where

    def _in_incoming_bucket(self, key: str) -> bool:
        return bool(self.incoming_bucket) and self._where(key)["Bucket"] == self.incoming_bucket

    # -- MediaStore ---------------------------------------------------------------------

    def upload_target(self, media: Media) -> UploadTarget:
        lifetime = int((media.unused_expires_at - timezone.now()).total_seconds())
        # Only the key and the expiry are signed: no header a client cannot know.
        url = self.signing_client.generate_presigned_url(
            "put_object",
            Params=self._where(media.incoming_key),
            ExpiresIn=max(1, min(lifetime, MAX_PRESIGN_SECONDS)),
            HttpMethod="PUT",
        )
        return UploadTarget("PUT", url)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            head = self.client.head_object(**self._where(key))
        except ClientError as exc:
            if _code(exc) in NOT_FOUND_CODES:
                return None
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc
        return ObjectInfo(
            size=int(head["ContentLength"]),
            content_type=head.get("ContentType"),
            etag=head.get("ETag"),
            version_id=_version_of(head),
        )

    def read_prefix(self, key: str, length: int) -> bytes:
        try:
            response = self.client.get_object(**self._where(key), Range=f"bytes=0-{length - 1}")
            return response["Body"].read()
        except ClientError as exc:
            if _code(exc) == "InvalidRange":  # an empty object has no byte 0
                return b""
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc

    def head_with_prefix(self, key: str, length: int) -> tuple[ObjectInfo, bytes] | None:
        # One ranged GET answers both: Content-Range carries the object's size. /complete
        # waits for this, so one round trip to the store instead of two.
        try:
            response = self.client.get_object(**self._where(key), Range=f"bytes=0-{length - 1}")
            prefix = response["Body"].read()
        except ClientError as exc:
            if _code(exc) in NOT_FOUND_CODES:
                return None
            if _code(exc) == "InvalidRange":  # an empty object has no byte 0
                info = self.head(key)
                return None if info is None else (info, b"")
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc
        total = str(response.get("ContentRange", "")).rpartition("/")[2]
        size = int(total) if total.isdigit() else int(response["ContentLength"])
        info = ObjectInfo(
            size=size,
            content_type=response.get("ContentType"),
            etag=response.get("ETag"),
            version_id=_version_of(response),
        )
        return info, prefix

    def iter_bytes(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = CHUNK_SIZE
    ) -> Iterator[bytes]:
        byte_range = f"bytes={start}-{'' if end is None else end}"
        try:
            response = self.client.get_object(**self._where(key), Range=byte_range)
        except ClientError as exc:
            if _code(exc) == "InvalidRange":
                return
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc
        read = partial(_readable(response["Body"]).read, chunk_size)
        yield from _exactly(response, iter(read, b""))

    def read_whole(self, key: str) -> Iterator[bytes | memoryview]:
        # readinto one reused buffer: no new bytes object per chunk.
        try:
            response = self.client.get_object(**self._where(key))
        except ClientError as exc:
            if _code(exc) in NOT_FOUND_CODES:
                raise FileNotFoundError(key) from exc  # as the local store says it
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc
        buffer = bytearray(WHOLE_READ_BUFFER)
        view = memoryview(buffer)
        fill = partial(_readable(response["Body"]).readinto, buffer)
        yield from _exactly(response, (view[:read] for read in iter(fill, 0)))

    def write_stream(
        self,
        key: str,
        reader: Readable,
        *,
        max_size: int,
        expected_size: int | None = None,
        content_type: str | None = None,
        keep_first: int = 0,
    ) -> WrittenObject:
        metered = MeteredReader(reader, max_size, expected_size, keep_first=keep_first)
        extra = {"ContentType": content_type} if content_type else {}
        part_size = upload_part_size(expected_size if expected_size is not None else max_size)
        try:
            # Multipart past one part; a failed multipart upload is aborted (no part left
            # behind), and a failed single PUT writes nothing.
            writer = PartWriter(self.client, self._where(key), extra, part_size)
            writer.write(
                metered,
                app_settings.S3_UPLOAD_CONCURRENCY,
                expected_size,
                app_settings.S3_UPLOAD_SINGLE_PUT_LIMIT,
            )
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc
        return metered.result()

    def move(
        self,
        source: str,
        destination: str,
        *,
        size: int | None = None,
        content_type: str | None = None,
        if_match: str | None = None,
    ) -> str | None:
        sha256 = self._copy(
            source, destination, size=size, content_type=content_type, if_match=if_match
        )
        self.delete(source)
        return sha256

    def copy(self, source: str, destination: str, *, content_type: str | None = None) -> None:
        info = self.head(source)  # its size picks one CopyObject or parts
        if info is None:
            raise FileNotFoundError(source)
        self._copy(source, destination, size=info.size, content_type=content_type)

    def _copy(
        self,
        source: str,
        destination: str,
        *,
        size: int | None,
        content_type: str | None,
        if_match: str | None = None,
    ) -> str | None:
        """CopyObject (parts past ``S3_COPY_PART_THRESHOLD``) with our metadata only."""
        if size is None:
            info = self.head(source)
            if info is None:
                raise _logged(f"no object at {source}")
            size = info.size
        # REPLACE: nothing the uploader sent with its PUT (Content-Encoding, Cache-Control,
        # Expires, Content-Disposition, x-amz-meta-*) survives into what is served.
        metadata = {
            "MetadataDirective": "REPLACE",
            "ContentType": content_type or "application/octet-stream",
        }
        condition = {"CopySourceIfMatch": if_match} if if_match else {}
        try:
            if size > app_settings.S3_COPY_PART_THRESHOLD:
                sha256 = self._copy_in_parts(source, destination, size, metadata, condition)
            else:
                sha256 = self._copy_object(source, destination, metadata, condition)
        except ClientError as exc:
            if if_match and _code(exc) in PRECONDITION_FAILED_CODES | NOT_FOUND_CODES:
                raise SourceChanged(source) from exc
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc
        return sha256

    #: Set once a store refused CopyObject's ChecksumAlgorithm (R2 answers 501): the
    #: process stops asking.
    copy_checksum_refused = False

    def _copy_object(
        self, source: str, destination: str, metadata: dict[str, str], condition: dict[str, str]
    ) -> str | None:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(destination),
            "CopySource": self._where(source),
            **metadata,
            **condition,
        }
        if app_settings.S3_COPY_CHECKSUM and not S3MediaStore.copy_checksum_refused:
            try:
                response = self.client.copy_object(**params, ChecksumAlgorithm="SHA256")
                return sha256_of_copy(response.get("CopyObjectResult", {}))
            except ClientError as exc:
                if _code(exc) not in CHECKSUM_REFUSED_CODES:
                    raise
                S3MediaStore.copy_checksum_refused = True
        self.client.copy_object(**params)
        return None

    def _copy_in_parts(
        self,
        source: str,
        destination: str,
        size: int,
        metadata: dict[str, str],
        condition: dict[str, str],
    ) -> None:
        """Multipart copy (UploadPartCopy), parts copied in parallel: above 5 GiB S3 has no
        other way. A multipart object has no whole-object SHA-256 from the store (only a
        checksum of checksums)."""
        part_size = max(app_settings.S3_COPY_PART_SIZE, -(-size // MAX_PARTS), MIN_PART_SIZE)
        ranges = [(start, min(start + part_size, size) - 1) for start in range(0, size, part_size)]
        key = self._key(destination)
        # The process's client, shared with the part threads (boto3 clients are
        # thread-safe).
        client = self.client
        # The metadata of a multipart object is given when the upload is created.
        upload_id = client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=metadata["ContentType"]
        )["UploadId"]
        copy_source = self._where(source)

        def copy_part(numbered: tuple[int, tuple[int, int]]) -> dict[str, Any]:
            number, (first, last) = numbered
            result = client.upload_part_copy(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource=copy_source,
                CopySourceRange=f"bytes={first}-{last}",
                **condition,
            )
            return {"PartNumber": number, "ETag": result["CopyPartResult"]["ETag"]}

        try:
            with ThreadPoolExecutor(
                max_workers=min(app_settings.S3_COPY_CONCURRENCY, len(ranges)),
                thread_name_prefix="s3-copy",
            ) as pool:
                parts = list(pool.map(copy_part, enumerate(ranges, start=1)))
            client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Parts already copied cost storage until the upload is aborted.
            with contextlib.suppress(ClientError, BotoCoreError):
                client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def delete(self, key: str) -> None:
        if self._in_incoming_bucket(key):
            self._delete_versions([key])
            return
        try:
            # S3 answers 204 for a missing key: deleting twice is fine.
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in NOT_FOUND_CODES:
                return
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc

    def delete_many(self, keys: list[str]) -> None:
        # Up to a sweep's thousands of keys: the settings are read once, not per key.
        if self.incoming_bucket:
            prefix = storage_keys.INCOMING_PREFIX
            if incoming := [key for key in keys if key.startswith(prefix)]:
                self._delete_versions(incoming)
                keys = [key for key in keys if not key.startswith(prefix)]
        location = self._key("")
        self._delete_in_batches(self.bucket, [{"Key": location + key} for key in keys])

    def _delete_in_batches(self, bucket: str, objects: list[dict[str, str]]) -> None:
        # DeleteObjects takes at most 1,000 keys; a store spends most of a request on its
        # own bookkeeping per key, so several requests run at once.
        batches = [
            objects[start : start + DELETE_OBJECTS_MAX]
            for start in range(0, len(objects), DELETE_OBJECTS_MAX)
        ]
        if len(batches) <= 1:
            for batch in batches:
                self._delete_objects(bucket, batch)
            return
        workers = min(app_settings.DELETE_CONCURRENCY, len(batches))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-delete") as pool:
            for _ in pool.map(partial(self._delete_objects, bucket), batches):
                pass

    def _delete_objects(self, bucket: str, batch: list[dict[str, str]]) -> None:
        """One DeleteObjects request; a missing key counts as deleted."""
        try:
            response = self.delete_client.delete_objects(
                Bucket=bucket, Delete={"Objects": batch, "Quiet": True}
            )
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc
        errors = [e for e in response.get("Errors", []) if e.get("Code") not in NOT_FOUND_CODES]
        if errors:
            raise _logged(f"refused deletes: {errors[:3]}")

    def _delete_versions(self, keys: list[str]) -> None:
        """Delete every version (and delete marker) of upload URLs' objects in the
        incoming bucket: a plain delete there would only hide the versions behind a
        marker, and a pinned key's version is never the only one a URL may have made."""
        bucket = str(self.incoming_bucket)
        names = sorted({self._where(key)["Key"] for key in keys})
        objects: list[dict[str, str]] = []
        try:
            if len(names) >= VERSIONS_LISTED_TOGETHER_MIN:
                names = self._list_versions_together(bucket, names, objects)
            for name in names:
                self._list_versions(bucket, name, {name}, objects)
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc
        self._delete_in_batches(bucket, objects)

    def _list_versions(
        self,
        bucket: str,
        prefix: str,
        wanted: set[str],
        objects: list[dict[str, str]],
        max_pages: int | None = None,
    ) -> str | None:
        """Add the versions and delete markers of the ``wanted`` keys under ``prefix`` to
        ``objects``; None once all are listed, else (``max_pages`` listed) the key from
        which versions are still unlisted."""
        paginator = self.client.get_paginator("list_object_versions")
        pages = paginator.paginate(Bucket=bucket, Prefix=prefix)
        for number, page in enumerate(pages, start=1):
            for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                if item["Key"] in wanted:
                    objects.append({"Key": item["Key"], "VersionId": item["VersionId"]})
            if page.get("IsTruncated") and max_pages is not None and number >= max_pages:
                return str(page["NextKeyMarker"])
        return None

    def _list_versions_together(
        self, bucket: str, names: list[str], objects: list[dict[str, str]]
    ) -> list[str]:
        """List the versions under the common prefix of many ``names`` (sorted) in one
        walk, a page holding up to 1,000 versions instead of a request per key; returns
        the names still to list one by one. A bucket holding many more versions than
        wanted would make that walk long: it stops after ``len(names) //
        VERSIONS_LISTED_TOGETHER_MIN`` pages, and the names from where it stopped on
        (its last key included, whose versions may go on in the next page) are left."""
        # Character by character, not by path component; of all names: they are sorted.
        prefix = os.path.commonprefix([names[0], names[-1]])  # noqa: RUF071
        max_pages = max(1, len(names) // VERSIONS_LISTED_TOGETHER_MIN)
        stopped_at = self._list_versions(bucket, prefix, set(names), objects, max_pages)
        if stopped_at is None:
            return []
        # The wanted versions listed so far of the names left are listed again with them.
        objects[:] = [item for item in objects if item["Key"] < stopped_at]
        return [name for name in names if name >= stopped_at]

    def probe(self, timeout: float) -> None:
        # The bucket answers: the credentials, the endpoint and the bucket all hold.
        # The client's own timeouts are PROBE_CONFIG's; the health check waits no longer
        # than ``timeout`` for them anyway.
        self.probe_client.head_bucket(Bucket=self.bucket)
        if self.incoming_bucket:
            self.probe_client.head_bucket(Bucket=self.incoming_bucket)

    def list_keys(self, prefix: str) -> Iterator[str]:
        location = self._key("")
        where = self._where(prefix)
        try:
            if where["Bucket"] == self.incoming_bucket:
                names = self._names_with_versions(where["Bucket"], where["Key"])
            else:
                names = self._names(where["Bucket"], where["Key"])
            for name in names:
                yield name[len(location) :]
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc) from exc

    def _names(self, bucket: str, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    def _names_with_versions(self, bucket: str, prefix: str) -> Iterator[str]:
        """Keys with any version or delete marker, once each, in ascending order: in a
        versioned bucket a deleted key keeps its older versions."""
        last = None
        paginator = self.client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            items = page.get("Versions", []) + page.get("DeleteMarkers", [])
            for name in sorted({item["Key"] for item in items}):
                if name != last:
                    last = name
                    yield name

    def download_url(
        self,
        key: str,
        *,
        content_type: str,
        disposition: str,
        lifetime: int,
        cache_control: str | None = None,
    ) -> str | None:
        # The signed target answers with the same type, disposition and caching as we
        # would, whatever metadata the object carries (objects copied before the copy
        # replaced the uploader's metadata may still carry its Cache-Control).
        params = {
            **self._where(key),
            "ResponseContentType": content_type,
            "ResponseContentDisposition": disposition,
            "ResponseCacheControl": cache_control or f"private, max-age={lifetime}",
        }
        if storage_keys.is_pinned_incoming(key):
            # A version served where it was uploaded keeps the uploader's headers: a
            # Content-Encoding would have clients decode other bytes than were checked.
            params["ResponseContentEncoding"] = "identity"
        return self.signing_client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=lifetime
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (for development and tests), and the incoming
        bucket with versioning on if there is one."""
        for bucket in [self.bucket, self.incoming_bucket]:
            if not bucket:
                continue
            try:
                self.client.head_bucket(Bucket=bucket)
            except ClientError:
                self.client.create_bucket(Bucket=bucket)
        if self.incoming_bucket:
            self.client.put_bucket_versioning(
                Bucket=self.incoming_bucket, VersioningConfiguration={"Status": "Enabled"}
            )

    def ensure_incoming_expiry(self, days: int) -> bool:
        """Install a lifecycle rule that expires ``incoming/`` objects after ``days`` (and
        aborts multipart uploads left there), keeping the bucket's other rules. The sweeps
        delete abandoned uploads; this catches what they miss (a sweep that never ran, a
        row deleted by hand). False if the store does not support lifecycle rules."""
        where = self._where(storage_keys.INCOMING_PREFIX)
        bucket = where["Bucket"]
        rule: dict[str, Any] = {
            "ID": INCOMING_RULE_ID,
            "Filter": {"Prefix": where["Key"]},
            "Status": "Enabled",
            "Expiration": {"Days": days},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
        }
        if bucket == self.incoming_bucket:
            # Versioned: an expired object only gets a delete marker; its versions too.
            rule["NoncurrentVersionExpiration"] = {"NoncurrentDays": days}
        try:
            try:
                rules = self.client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
            except ClientError as exc:
                if _code(exc) != "NoSuchLifecycleConfiguration":
                    raise
                rules = []
            rules = [r for r in rules if r.get("ID") != INCOMING_RULE_ID] + [rule]
            self.client.put_bucket_lifecycle_configuration(
                Bucket=bucket, LifecycleConfiguration={"Rules": rules}
            )
        except ClientError as exc:
            if _code(exc) in LIFECYCLE_UNSUPPORTED_CODES:
                return False
            raise _unavailable(exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(exc) from exc
        return True


def upload_part_size(largest: int) -> int:
    """The parts of a streamed upload of at most ``largest`` bytes: ``S3_UPLOAD_PART_SIZE``,
    larger if 10,000 of them would not hold it (multipart past one part, written by
    ``s3_parts.PartWriter``, ``S3_UPLOAD_CONCURRENCY`` parts sent at once)."""
    return max(app_settings.S3_UPLOAD_PART_SIZE, -(-largest // MAX_PARTS), MIN_PART_SIZE)


def _version_of(response: dict[str, Any]) -> str | None:
    """The version id S3 answered with, if the object has one of its own: "null" is the
    version of a bucket without versioning (or with it suspended), which the next write
    replaces."""
    version_id = response.get("VersionId")
    return version_id if version_id and version_id != "null" else None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def sha256_of_copy(result: dict[str, Any]) -> str | None:
    """The hex SHA-256 a CopyObject answered with, if it is one of the whole object: a
    multipart source can carry a checksum of part checksums ("...-N", COMPOSITE)."""
    value = result.get("ChecksumSHA256")
    if not value or result.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 32 else None
