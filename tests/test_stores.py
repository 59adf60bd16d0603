"""The store contract (``store_contract.py``) on the local disk and on S3 with moto's
in-process mock. Each store's own behaviour: ``test_local_store.py``, ``test_s3_store.py``,
``test_s3_read_path.py``; on SeaweedFS: ``services/test_stores.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.files.storage import FileSystemStorage

from msc3870.stores import MediaStore, UploadTarget, get_store
from msc3870.stores.local import LocalMediaStore
from msc3870.stores.s3 import S3MediaStore

from .helpers import INCOMING_BUCKET, MatrixClient, files_under, msc3870_settings
from .store_contract import S3StoreContract, StoreContract


class TestLocalStore(StoreContract):
    keeps_content_type = False  # the row says what is served
    versioned = False

    @pytest.fixture
    def store(self) -> MediaStore:
        store = get_store()
        assert isinstance(store, LocalMediaStore)
        return store

    @pytest.fixture
    def broken_store(self, tmp_path: Path) -> MediaStore:
        """Its directory would be made under a file."""
        (tmp_path / "a-file").write_bytes(b"")
        return LocalMediaStore(FileSystemStorage(location=str(tmp_path / "a-file" / "media")))

    def put_to_target(self, target: UploadTarget, data: bytes) -> int:
        response = MatrixClient.in_process().put_to_url(target.url, data)
        return int(response.status_code)

    def leftovers(self, store: MediaStore, prefix: str) -> list[str]:
        root = Path(store.storage.location)  # type: ignore[attr-defined]
        return [name for name in files_under(root) if name.endswith(".part")]


class TestS3StoreOnMoto(S3StoreContract):
    if_match_not_enforced = "moto ignores CopySourceIfMatch (test_s3_upload_url.py fakes a 412)"

    @pytest.fixture
    def store(self, s3: Any) -> MediaStore:
        store = get_store()
        assert isinstance(store, S3MediaStore)
        return store


class TestS3StoreOnMotoWithAnIncomingBucket(TestS3StoreOnMoto):
    """Upload URLs write to a bucket of their own, with versioning on."""

    keeps_versions = True

    @pytest.fixture
    def store(self, s3: Any) -> Iterator[MediaStore]:
        with msc3870_settings(S3_INCOMING_BUCKET=INCOMING_BUCKET):
            store = get_store()
            assert isinstance(store, S3MediaStore)
            store.ensure_bucket()
            yield store
