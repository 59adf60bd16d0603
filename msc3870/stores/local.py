"""Media on the local disk (the embedded default): a Django ``FileSystemStorage``; upload
URLs point at a signed endpoint of this server."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from django.core.files.storage import FileSystemStorage
from django.urls import reverse

from ..conf import app_settings
from ..upload_tokens import make_upload_token
from .base import (
    CHUNK_SIZE,
    MediaStore,
    MeteredReader,
    ObjectInfo,
    Readable,
    UploadTarget,
    WrittenObject,
)

if TYPE_CHECKING:
    from ..models import Media


class LocalMediaStore(MediaStore):
    """Media on the local disk; upload URLs point at a signed endpoint of this server."""

    def __init__(self, storage: FileSystemStorage) -> None:
        self.storage = storage

    def _path(self, key: str) -> Path:
        # FileSystemStorage.path() refuses keys that would escape its location.
        return Path(self.storage.path(key))

    def upload_target(self, media: Media) -> UploadTarget:
        token = make_upload_token(media.media_id, media.unused_expires_at)
        path = reverse("msc3870:upload-url", kwargs={"token": token})
        return UploadTarget("PUT", app_settings.PUBLIC_BASEURL + path)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            return ObjectInfo(size=self._path(key).stat().st_size, content_type=None)
        except FileNotFoundError:
            return None

    def read_prefix(self, key: str, length: int) -> bytes:
        with open(self._path(key), "rb") as handle:
            return handle.read(length)

    def head_with_prefix(self, key: str, length: int) -> tuple[ObjectInfo, bytes] | None:
        # One open file gives both: a racing /complete may move the object away between a
        # stat and an open of the path, never from under an open file.
        try:
            with open(self._path(key), "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                return ObjectInfo(size=size, content_type=None), handle.read(length)
        except FileNotFoundError:
            return None

    def iter_bytes(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = CHUNK_SIZE
    ) -> Iterator[bytes]:
        with open(self._path(key), "rb") as handle:
            handle.seek(start)
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                chunk = handle.read(chunk_size if remaining is None else min(chunk_size, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

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
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename: readers never see a partial object.
        partial = final.with_name(f".{final.name}.{secrets.token_hex(8)}.part")
        metered = MeteredReader(reader, max_size, expected_size, keep_first=keep_first)
        try:
            with open(partial, "wb") as handle:
                while chunk := metered.read(CHUNK_SIZE):
                    handle.write(chunk)
            os.replace(partial, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise
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
        # Files keep no metadata (the row says what is served) and no versions.
        target = self._path(destination)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(source), target)
        return None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def list_keys(self, prefix: str) -> Iterator[str]:
        root = Path(self.storage.location)
        base = self._path(prefix)
        if not base.exists():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.endswith(".part"):
                yield path.relative_to(root).as_posix()

    def probe(self, timeout: float) -> None:
        # Where media goes: its nearest existing directory must be one we can write to
        # (FileSystemStorage makes the rest on the first upload).
        path = Path(self.storage.location)
        while not path.exists() and path != path.parent:
            path = path.parent
        if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not a writable directory")

    def delete_stale_partials(self, older_than: timedelta) -> int:
        """Delete the ``.part`` files of ``write_stream`` not written to for ``older_than``.

        A process killed (SIGKILL, OOM, power loss) while writing never reaches the
        ``except`` that removes its partial file; nothing else would. A live upload writes
        every chunk, so its file's modification time stays recent. Returns how many went.
        """
        root = Path(self.storage.location)
        if not root.exists():
            return 0
        cutoff = (datetime.now() - older_than).timestamp()
        deleted = 0
        for path in root.rglob(".*.part"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    deleted += 1
            except FileNotFoundError:
                continue  # renamed into place or removed by its writer meanwhile
        return deleted
