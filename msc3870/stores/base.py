"""What every media store is: ``MediaStore``, and the values its methods exchange.

Services speak to a ``MediaStore``: where clients upload (a presigned or signed URL),
what an object is, streamed reads and writes with a size limit, server-side moves,
deletes that treat "missing" as done, and signed download URLs where the storage has them.
Failures of the storage itself raise ``StorageUnavailable`` (503 to clients, retried by
tasks). ``msc3870.stores.get_store`` picks the implementation.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from ..errors import InvalidParam, TooLarge

if TYPE_CHECKING:
    from ..models import Media

CHUNK_SIZE = 1024 * 1024
# Whole-object reads (hash, scan) ask for chunks this large: fewer calls per byte.
WHOLE_READ_CHUNK = 8 * 1024 * 1024


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


@dataclass(frozen=True)
class UploadTarget:
    method: str
    url: str


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    content_type: str | None
    #: The store's version tag of the object (S3's ETag, quotes kept), where it has one.
    etag: str | None = None
    #: The id the store gave this version of the object, where it keeps versions (S3
    #: with versioning on): a later write makes a new version, never changes this one.
    version_id: str | None = None


class SourceChanged(Exception):
    """A move asked for one version of its source (``if_match``) and the source is no
    longer that version: it was written over since it was looked at."""


@dataclass(frozen=True)
class WrittenObject:
    size: int
    sha256: str
    #: The first bytes written, up to the ``keep_first`` asked of ``write_stream``.
    first_bytes: bytes = b""


class ChunkReader:
    """A ``Readable`` over an iterator of chunks (a response body being received)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def read(self, size: int = -1, /) -> bytes:
        # As a file's read(): ``size`` bytes unless the body ends first (stores may take a
        # short read for the end, the S3 store's part uploads do).
        want = size if size is not None and size > 0 else 1024 * 1024
        while len(self._pending) < want:
            chunk = next(self._chunks, b"")
            if not chunk:
                break
            self._pending += chunk
        out, self._pending = self._pending[:want], self._pending[want:]
        return out


class MeteredReader:
    """Wraps a request body: counts and hashes what passes, stops past ``max_size``."""

    def __init__(
        self,
        reader: Readable,
        max_size: int,
        expected_size: int | None = None,
        *,
        keep_first: int = 0,
    ) -> None:
        self._reader = reader
        self.max_size = max_size
        self.expected_size = expected_size
        self.size = 0
        self._digest = hashlib.sha256()
        self._keep_first = keep_first
        self._first = bytearray()

    def read(self, size: int = CHUNK_SIZE, /) -> bytes:
        try:
            chunk = self._reader.read(size if size and size > 0 else CHUNK_SIZE)
        except OSError as exc:  # the client went away (UnreadablePostError, NoMoreData, ...)
            raise _unreadable(exc) from exc
        self._passed(chunk)
        return chunk

    def readinto(self, buffer: memoryview, /) -> int:
        """Fill ``buffer`` (fewer bytes only at the end of the body), through the body's
        own ``readinto`` where it has one: no bytes object made per read."""
        fill = getattr(self._reader, "readinto", None)
        filled = 0
        while filled < len(buffer):
            rest = buffer[filled:]
            try:
                if fill is not None:
                    count = fill(rest) or 0
                else:
                    chunk = self._reader.read(len(rest))
                    count = len(chunk)
                    rest[:count] = chunk
            except OSError as exc:
                raise _unreadable(exc) from exc
            self._passed(rest[:count])
            if not count:
                break
            filled += count
        return filled

    def _passed(self, chunk: bytes | memoryview) -> None:
        """Count and hash what was read, and hold the body to its limits (an empty chunk
        is the end of the body)."""
        self.size += len(chunk)
        if self.size > self.max_size:
            raise TooLarge(f"Upload is larger than the limit of {self.max_size} bytes")
        if self.expected_size is not None and self.size > self.expected_size:
            raise InvalidParam(f"The body is longer than the {self.expected_size} bytes announced")
        if not chunk and self.expected_size is not None and self.size != self.expected_size:
            # The client went away mid-body: keeping a truncated object would corrupt it.
            raise InvalidParam(
                f"Body ended after {self.size} of the {self.expected_size} bytes announced"
            )
        self._digest.update(chunk)
        if len(self._first) < self._keep_first:
            self._first += chunk[: self._keep_first - len(self._first)]

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def result(self) -> WrittenObject:
        return WrittenObject(self.size, self.sha256, bytes(self._first))


def _unreadable(exc: OSError) -> InvalidParam:
    return InvalidParam(f"The request body could not be read: {exc}")


class MediaStore(ABC):
    #: Whether downloads can be answered with a redirect to a signed URL.
    can_redirect: bool = False
    #: Longest life an upload URL can have, in seconds (None = no limit).
    max_upload_url_lifetime: int | None = None
    #: Whether listing up to 1,000 keys costs less than deleting them (a remote store,
    #: where each batched delete is a request that does work per key): the expiry sweep
    #: then deletes only the upload URL objects that exist.
    lists_cheaper_than_deletes: bool = False
    #: Whether an upload URL's object keeps its versions: ``head`` then gives a
    #: ``version_id``, every read takes a ``storage_keys.pinned`` key (that version only),
    #: ``copy`` exists, and deleting an upload URL's object deletes all its versions.
    #: Stores without versions move the bytes out of the URL's reach before checking them.
    keeps_versions: bool = False

    @abstractmethod
    def upload_target(self, media: Media) -> UploadTarget:
        """The URL a client PUTs the bytes of ``media`` to, valid until its expiry."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and stored content type of an object, or None if it does not exist."""

    @abstractmethod
    def read_prefix(self, key: str, length: int) -> bytes:
        """The first ``length`` bytes (fewer if the object is shorter)."""

    @abstractmethod
    def iter_bytes(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = CHUNK_SIZE
    ) -> Iterator[bytes]:
        """Stream bytes ``start``..``end`` (inclusive; None = to the end)."""

    def head_with_prefix(self, key: str, length: int) -> tuple[ObjectInfo, bytes] | None:
        """``head`` and ``read_prefix`` together (stores that can answer both with one
        request override this); None if there is no object."""
        info = self.head(key)
        if info is None:
            return None
        try:
            return info, self.read_prefix(key, length) if info.size else b""
        except FileNotFoundError:
            return None  # deleted or moved away since the HEAD

    def read_whole(self, key: str) -> Iterator[bytes | memoryview]:
        """The whole object, in large chunks, for hashing and scanning. A chunk may be a
        view of a buffer reused for the next one: use it before asking for the next.
        Raises FileNotFoundError if there is no object."""
        yield from self.iter_bytes(key, chunk_size=WHOLE_READ_CHUNK)

    @abstractmethod
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
        """Store what ``reader`` yields at ``key``; raise ``TooLarge`` past ``max_size`` and
        ``InvalidParam`` if it ends before ``expected_size``.

        A failed write leaves nothing at ``key``. Returns the size and SHA-256 written, and
        the first ``keep_first`` bytes as they passed (no read back to sniff them).
        """

    @abstractmethod
    def move(
        self,
        source: str,
        destination: str,
        *,
        size: int | None = None,
        content_type: str | None = None,
        if_match: str | None = None,
    ) -> str | None:
        """Server-side move: afterwards ``source`` is gone and ``destination`` has the bytes,
        with ``content_type`` and none of the metadata the uploader sent with them.
        ``size``: the source's, if the caller already knows it. ``if_match``: move only
        the version of the source with this ``ObjectInfo.etag``, else raise
        ``SourceChanged`` (stores without versions ignore it). Returns the SHA-256 (hex)
        of the bytes where the store computed it during the move, else None."""

    def copy(self, source: str, destination: str, *, content_type: str | None = None) -> None:
        """Server-side copy of ``source`` (a ``pinned`` key: that version) to
        ``destination``, with ``content_type`` and none of the uploader's metadata; the
        source stays. Raises FileNotFoundError if there is no source. Only stores that
        ``keeps_versions`` need it."""
        raise NotImplementedError(f"{type(self).__name__} keeps no versions")

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete an object; a missing object counts as deleted."""

    def delete_many(self, keys: list[str]) -> None:
        """Delete several objects (stores with a batch API override this)."""
        for key in keys:
            self.delete(key)

    @abstractmethod
    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (for cleanup of orphans)."""

    @abstractmethod
    def probe(self, timeout: float) -> None:
        """Raise if the store cannot be used now, within about ``timeout`` seconds (the
        health check; never retried)."""

    def download_url(
        self,
        key: str,
        *,
        content_type: str,
        disposition: str,
        lifetime: int,
        cache_control: str | None = None,
    ) -> str | None:
        """A signed GET URL that answers with these headers, or None if unsupported."""
        return None


def expiry_within_url_lifetime(store: MediaStore, wanted: datetime, now: datetime) -> datetime:
    """Cap an id's expiry to what its upload URL can cover (S3: 7 days)."""
    if store.max_upload_url_lifetime is None:
        return wanted
    return min(wanted, now + timedelta(seconds=store.max_upload_url_lifetime))
