"""What every ``msc3870.stores.MediaStore`` must do, as one class of tests that each store
runs (as Django's ``SessionTestsMixin``): ``test_stores.py`` runs it on the local disk and
on S3 with moto, ``services/test_stores.py`` on the real SeaweedFS S3 server.

A store's test class inherits ``StoreContract`` and provides the ``store`` fixture (the
configured store: the upload-URL endpoint writes to it), ``broken_store`` (one that cannot
be used now), ``put_to_target`` (what a client does with an upload URL), ``fetch`` (what
a client does with a download URL) and ``leftovers`` (what a failed write could leave
behind), and says what the store keeps: content types, versions that a move can be pinned
to. Keys are under a prefix of the test's own, so that a shared bucket is no problem.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from msc3870 import storage_keys
from msc3870.errors import InvalidParam, TooLarge
from msc3870.stores import MediaStore, SourceChanged, UploadTarget

from .helpers import LyingBody, MatrixClient, media_of, msc3870_settings

MiB = 1024 * 1024
DATA = bytes(range(256)) * 40 + b"the end"  # 10,247 bytes, each offset recognisable


def read(store: MediaStore, key: str) -> bytes:
    """The whole object, through ``read_whole`` (chunks may be views of one buffer)."""
    return b"".join(bytes(chunk) for chunk in store.read_whole(key))


class Unreadable(io.RawIOBase):
    """A body whose client goes away after ``good`` bytes."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        if self.left <= 0:
            raise ConnectionResetError("client went away")
        count = min(len(buffer), self.left)
        buffer[:count] = b"z" * count
        self.left -= count
        return count


class StoreContract:
    #: ``head`` tells the content type an object was written or moved with.
    keeps_content_type = True
    #: ``head`` gives a version tag (``ObjectInfo.etag``) that ``move(if_match=...)`` holds
    #: the source to.
    versioned = True
    #: Why a moved-over source is not refused (the store ignores the condition), if so.
    if_match_not_enforced = ""
    #: Upload URLs' objects keep their versions (``MediaStore.keeps_versions``).
    keeps_versions = False

    # -- provided by each store's test class ---------------------------------------------

    @pytest.fixture
    def store(self) -> MediaStore:
        raise NotImplementedError

    @pytest.fixture
    def broken_store(self) -> MediaStore:
        raise NotImplementedError

    def put_to_target(self, target: UploadTarget, data: bytes) -> int:
        """PUT ``data`` to an upload target as a client would: the status answered."""
        raise NotImplementedError

    def fetch(self, url: str) -> tuple[int, dict[str, str], bytes]:
        """GET a download URL as a client would: status, headers (lower-case), body."""
        raise NotImplementedError

    def leftovers(self, store: MediaStore, prefix: str) -> list[str]:
        """What writes under ``prefix`` left besides objects: partial files, unfinished
        multipart uploads."""
        raise NotImplementedError

    # -- keys of this test's own ---------------------------------------------------------

    @pytest.fixture
    def prefix(self, store: MediaStore) -> Iterator[str]:
        prefix = f"contract-{secrets.token_hex(4)}/"
        yield prefix
        store.delete_many(list(store.list_keys(prefix)))

    def write(self, store: MediaStore, key: str, data: bytes = DATA, **kwargs: Any) -> Any:
        return store.write_stream(key, io.BytesIO(data), max_size=len(data), **kwargs)

    # -- head, read_prefix, head_with_prefix ---------------------------------------------

    def test_head_of_an_object_and_of_none(self, store: MediaStore, prefix: str) -> None:
        assert store.head(prefix + "missing") is None
        self.write(store, prefix + "text", content_type="text/plain")
        info = store.head(prefix + "text")
        assert info is not None and info.size == len(DATA)
        assert info.content_type == ("text/plain" if self.keeps_content_type else None)
        assert (info.etag is not None) == self.versioned

    def test_read_prefix(self, store: MediaStore, prefix: str) -> None:
        self.write(store, prefix + "a")
        assert store.read_prefix(prefix + "a", 100) == DATA[:100]
        assert store.read_prefix(prefix + "a", 1 * MiB) == DATA  # fewer: the object is short
        self.write(store, prefix + "empty", b"")
        assert store.read_prefix(prefix + "empty", 100) == b""

    def test_head_with_prefix(self, store: MediaStore, prefix: str) -> None:
        assert store.head_with_prefix(prefix + "missing", 8192) is None
        self.write(store, prefix + "a")
        found = store.head_with_prefix(prefix + "a", 8192)
        assert found is not None
        info, first = found
        assert (info.size, first) == (len(DATA), DATA[:8192])
        assert info == store.head(prefix + "a")
        self.write(store, prefix + "empty", b"")
        empty = store.head_with_prefix(prefix + "empty", 8192)
        assert empty is not None and (empty[0].size, empty[1]) == (0, b"")

    # -- iter_bytes, read_whole ----------------------------------------------------------

    @pytest.mark.parametrize(
        ("start", "end", "expected"),
        [
            (0, None, DATA),
            (10, 19, DATA[10:20]),  # inclusive, as HTTP ranges are
            (0, 0, DATA[:1]),
            (len(DATA) - 7, None, b"the end"),
            (100, len(DATA) + 500, DATA[100:]),  # past the end: to the end
            (len(DATA), None, b""),  # from the end: nothing
        ],
        ids=["whole", "inclusive", "first byte", "to the end", "past the end", "from the end"],
    )
    def test_iter_bytes_streams_a_range(
        self, store: MediaStore, prefix: str, start: int, end: int | None, expected: bytes
    ) -> None:
        self.write(store, prefix + "a")
        chunks = list(store.iter_bytes(prefix + "a", start, end, chunk_size=1000))
        assert b"".join(chunks) == expected
        assert all(0 < len(chunk) <= 1000 for chunk in chunks)

    def test_iter_bytes_of_an_empty_object(self, store: MediaStore, prefix: str) -> None:
        self.write(store, prefix + "empty", b"")
        assert b"".join(store.iter_bytes(prefix + "empty")) == b""

    def test_read_whole(self, store: MediaStore, prefix: str) -> None:
        data = os.urandom(3 * MiB + 5)
        self.write(store, prefix + "big", data)
        assert read(store, prefix + "big") == data
        with pytest.raises(FileNotFoundError):
            read(store, prefix + "missing")

    # -- write_stream --------------------------------------------------------------------

    def test_write_stream_says_what_it_wrote(self, store: MediaStore, prefix: str) -> None:
        written = self.write(store, prefix + "a", keep_first=100)
        assert (written.size, written.sha256) == (len(DATA), hashlib.sha256(DATA).hexdigest())
        assert written.first_bytes == DATA[:100]
        assert self.write(store, prefix + "b").first_bytes == b""  # none asked for
        assert self.write(store, prefix + "c", keep_first=MiB).first_bytes == DATA
        assert read(store, prefix + "a") == DATA

    def test_write_stream_replaces_an_object(self, store: MediaStore, prefix: str) -> None:
        self.write(store, prefix + "a", b"first")
        self.write(store, prefix + "a", b"second")
        assert read(store, prefix + "a") == b"second"

    def test_write_stream_holds_its_limit(self, store: MediaStore, prefix: str) -> None:
        key = prefix + "limited"
        assert store.write_stream(key, io.BytesIO(b"x" * 10), max_size=10).size == 10
        with pytest.raises(TooLarge):
            store.write_stream(prefix + "over", io.BytesIO(b"x" * 11), max_size=10)
        assert store.head(prefix + "over") is None

    def test_a_write_past_its_limit_mid_stream_leaves_nothing(
        self, store: MediaStore, prefix: str
    ) -> None:
        """Past 8 MiB the S3 store uploads in parts: the limit is found after some were
        sent, and the upload must be abandoned, not completed or left open."""
        key = prefix + "streamed"
        with pytest.raises(TooLarge):
            store.write_stream(key, LyingBody(10 * MiB), max_size=9 * MiB)
        assert store.head(key) is None
        assert list(store.list_keys(prefix)) == []
        assert self.leftovers(store, prefix) == []

    def test_a_body_shorter_than_announced_leaves_nothing(
        self, store: MediaStore, prefix: str
    ) -> None:
        key = prefix + "short"
        with pytest.raises(InvalidParam, match="10 of the 100"):
            store.write_stream(key, io.BytesIO(b"0123456789"), max_size=1000, expected_size=100)
        assert store.head(key) is None
        assert self.leftovers(store, prefix) == []

    def test_a_client_gone_mid_body_leaves_the_object_as_it_was(
        self, store: MediaStore, prefix: str
    ) -> None:
        key = prefix + "a"
        with pytest.raises(InvalidParam):
            store.write_stream(key, Unreadable(5000), max_size=MiB)
        assert store.head(key) is None
        self.write(store, key)
        with pytest.raises(InvalidParam):
            store.write_stream(key, Unreadable(5000), max_size=MiB)
        assert read(store, key) == DATA  # the earlier object, whole: never a partial one
        assert self.leftovers(store, prefix) == []

    # -- move ----------------------------------------------------------------------------

    def test_move(self, store: MediaStore, prefix: str) -> None:
        self.write(store, prefix + "incoming", content_type="application/x-uploader")
        sha256 = store.move(prefix + "incoming", prefix + "served", content_type="image/png")
        assert sha256 in (None, hashlib.sha256(DATA).hexdigest())
        assert store.head(prefix + "incoming") is None
        info = store.head(prefix + "served")
        assert info is not None and info.size == len(DATA)
        # What is served has the type the move gave it, never the uploader's.
        assert info.content_type == ("image/png" if self.keeps_content_type else None)
        assert read(store, prefix + "served") == DATA

    def test_move_with_the_size_known(self, store: MediaStore, prefix: str) -> None:
        self.write(store, prefix + "incoming")
        store.move(prefix + "incoming", prefix + "served", size=len(DATA))
        assert read(store, prefix + "served") == DATA
        assert store.head(prefix + "incoming") is None

    def test_move_in_parts(self, store: MediaStore, prefix: str) -> None:
        """Objects past ``S3_COPY_PART_THRESHOLD`` are copied in parts where the store
        has them; every store moves them whole."""
        data = os.urandom(11 * MiB)
        self.write(store, prefix + "incoming", data)
        with msc3870_settings(S3_COPY_PART_THRESHOLD=6 * MiB, S3_COPY_PART_SIZE=5 * MiB):
            store.move(prefix + "incoming", prefix + "served", content_type="video/mp4")
        assert read(store, prefix + "served") == data
        assert store.head(prefix + "incoming") is None
        assert self.leftovers(store, prefix) == []

    def test_move_of_the_version_looked_at(self, store: MediaStore, prefix: str) -> None:
        self.write(store, prefix + "incoming")
        looked_at = store.head(prefix + "incoming")
        assert looked_at is not None
        store.move(prefix + "incoming", prefix + "served", if_match=looked_at.etag or '"x"')
        assert read(store, prefix + "served") == DATA

    def test_move_of_a_source_written_over_since_it_was_looked_at(
        self, store: MediaStore, prefix: str
    ) -> None:
        if not self.versioned:
            pytest.skip("no versions: if_match is ignored (test_move_of_the_version_looked_at)")
        if self.if_match_not_enforced:
            pytest.skip(self.if_match_not_enforced)
        self.write(store, prefix + "incoming", b"checked bytes")
        looked_at = store.head(prefix + "incoming")
        assert looked_at is not None and looked_at.etag
        self.write(store, prefix + "incoming", b"<html>swapped</html>")
        # As screening moves: with the size and version it looked at.
        pinned = {"size": looked_at.size, "if_match": looked_at.etag}
        with pytest.raises(SourceChanged):
            store.move(prefix + "incoming", prefix + "served", **pinned)
        assert store.head(prefix + "served") is None
        assert read(store, prefix + "incoming") == b"<html>swapped</html>"
        # Gone since: the same refusal, never an outage.
        store.delete(prefix + "incoming")
        with pytest.raises(SourceChanged):
            store.move(prefix + "incoming", prefix + "served", **pinned)

    # -- versions of upload URLs' objects -----------------------------------------------

    @pytest.fixture
    def incoming(self, store: MediaStore) -> Iterator[str]:
        """An upload URL's key of this test's own (they all live under ``incoming/``)."""
        key = storage_keys.incoming(f"contract{secrets.token_hex(6)}")
        yield key
        store.delete(key)

    def test_keeps_versions_as_it_says(self, store: MediaStore) -> None:
        assert store.keeps_versions is self.keeps_versions

    def test_a_pinned_key_reads_the_version_looked_at(
        self, store: MediaStore, incoming: str, prefix: str
    ) -> None:
        self.write(store, incoming, b"checked bytes", content_type="image/png")
        looked_at = store.head(incoming)
        assert looked_at is not None
        if not self.keeps_versions:
            # Nothing to pin to: upload URLs' bytes are moved before they are read.
            assert looked_at.version_id is None
            return
        assert looked_at.version_id
        self.write(store, incoming, b"<html>swapped</html>", content_type="text/html")
        pinned = storage_keys.pinned(incoming, looked_at.version_id)
        assert read(store, incoming) == b"<html>swapped</html>"
        assert read(store, pinned) == b"checked bytes"
        found = store.head_with_prefix(pinned, 7)
        assert found is not None
        assert (found[0].size, found[0].version_id, found[1]) == (
            13,
            looked_at.version_id,
            b"checked",
        )
        assert store.read_prefix(pinned, 7) == b"checked"
        assert b"".join(store.iter_bytes(pinned, 8, 12)) == b"bytes"
        url = store.download_url(
            pinned, content_type="image/png", disposition="inline", lifetime=60
        )
        assert url is not None
        status, headers, body = self.fetch(url)
        assert (status, body) == (200, b"checked bytes")
        assert headers["content-type"] == "image/png"
        store.copy(pinned, prefix + "served", content_type="application/octet-stream")
        assert read(store, prefix + "served") == b"checked bytes"
        assert read(store, pinned) == b"checked bytes"  # a copy leaves its source

    def test_deleting_an_upload_urls_object_deletes_every_version(
        self, store: MediaStore, incoming: str, prefix: str
    ) -> None:
        self.write(store, incoming, b"first")
        first = store.head(incoming)
        assert first is not None
        if not self.keeps_versions:
            store.delete(incoming)
            assert store.head(incoming) is None
            assert list(store.list_keys(incoming)) == []
            return
        assert first.version_id
        self.write(store, incoming, b"second")
        pinned = storage_keys.pinned(incoming, first.version_id)
        assert list(store.list_keys(incoming)) == [incoming]
        store.delete_many([pinned, prefix + "never-written"])
        assert store.head(pinned) is None
        assert store.head(incoming) is None
        assert list(store.list_keys(incoming)) == []
        with pytest.raises(FileNotFoundError):
            store.copy(pinned, prefix + "served")
        assert store.head(prefix + "served") is None
        store.delete(pinned)  # again: missing counts as deleted

    # -- delete, delete_many, list_keys --------------------------------------------------

    def test_delete_and_a_missing_key(self, store: MediaStore, prefix: str) -> None:
        self.write(store, prefix + "a")
        store.delete(prefix + "a")
        assert store.head(prefix + "a") is None
        store.delete(prefix + "a")  # again: missing counts as deleted
        store.delete(prefix + "never-written")

    def test_delete_many_with_missing_keys(self, store: MediaStore, prefix: str) -> None:
        keys = [f"{prefix}media/aa/{index}" for index in range(3)]
        for key in keys:
            self.write(store, key, b"x")
        self.write(store, prefix + "kept")
        store.delete_many([*keys, prefix + "never-written", keys[0]])
        assert [store.head(key) for key in keys] == [None, None, None]
        assert list(store.list_keys(prefix)) == [prefix + "kept"]
        store.delete_many([])

    def test_list_keys_under_a_prefix(self, store: MediaStore, prefix: str) -> None:
        wanted = [f"{prefix}media/ab/{name}" for name in ("one", "two")]
        for key in [*wanted, f"{prefix}media/ac/three", f"{prefix}incoming/four"]:
            self.write(store, key, b"x")
        assert sorted(store.list_keys(f"{prefix}media/ab/")) == wanted
        assert len(list(store.list_keys(prefix))) == 4
        assert list(store.list_keys(f"{prefix}nothing/")) == []

    # -- what clients are given: upload targets, download URLs ---------------------------

    def test_upload_target_takes_the_bytes_of_its_media(
        self, store: MediaStore, alice: MatrixClient
    ) -> None:
        media = media_of(alice.create()["content_uri"])
        target = store.upload_target(media)
        assert target.method == "PUT"
        assert self.put_to_target(target, DATA) == 200
        assert read(store, media.incoming_key) == DATA
        store.delete(media.incoming_key)

    def test_download_url(self, store: MediaStore, prefix: str) -> None:
        self.write(store, prefix + "a", content_type="application/octet-stream")
        url = store.download_url(
            prefix + "a",
            content_type="text/plain",
            disposition="attachment; filename=a.txt",
            lifetime=60,
        )
        if not store.can_redirect:
            assert url is None
            return
        assert url is not None
        status, headers, body = self.fetch(url)
        assert (status, body) == (200, DATA)
        assert headers["content-type"] == "text/plain"
        assert headers["content-disposition"] == "attachment; filename=a.txt"

    # -- probe ---------------------------------------------------------------------------

    def test_probe(self, store: MediaStore, broken_store: MediaStore) -> None:
        store.probe(2)
        with pytest.raises(Exception):  # noqa: B017 - whatever the store raises
            broken_store.probe(2)


class S3StoreContract(StoreContract):
    """The contract on an S3 store: clients reach it over HTTP with ``requests``."""

    @pytest.fixture
    def broken_store(self, store: MediaStore) -> MediaStore:
        """The same server and credentials, a bucket that does not exist."""
        from django.conf import settings
        from storages.backends.s3 import S3Storage

        from msc3870.stores.s3 import S3MediaStore

        options = settings.STORAGES["msc3870"]["OPTIONS"]
        missing = {**options, "bucket_name": f"no-such-bucket-{secrets.token_hex(4)}"}
        return S3MediaStore(S3Storage(**missing))

    def put_to_target(self, target: UploadTarget, data: bytes) -> int:
        import requests

        return requests.request(target.method, target.url, data=data, timeout=60).status_code

    def fetch(self, url: str) -> tuple[int, dict[str, str], bytes]:
        import requests

        response = requests.get(url, timeout=60)
        headers = {name.lower(): value for name, value in response.headers.items()}
        return response.status_code, headers, response.content

    def leftovers(self, store: MediaStore, prefix: str) -> list[str]:
        client, bucket = store.client, store.bucket  # type: ignore[attr-defined]
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        return [upload["Key"] for upload in uploads.get("Uploads", [])]
