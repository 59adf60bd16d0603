"""The store contract (``tests/store_contract.py``) on the real S3 server of the services
suite (SeaweedFS, ``scripts/s3-server``), in the bucket the stack uses: every key is under
a prefix of the test's own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from msc3870.stores import MediaStore, get_store
from msc3870.stores.s3 import S3MediaStore

from ..helpers import msc3870_settings
from ..store_contract import S3StoreContract

pytestmark = pytest.mark.services


class TestS3StoreOnSeaweedFS(S3StoreContract):
    @pytest.fixture
    def store(self) -> MediaStore:
        store = get_store()
        assert isinstance(store, S3MediaStore)
        return store


class TestS3StoreOnSeaweedFSWithAnIncomingBucket(TestS3StoreOnSeaweedFS):
    """Upload URLs write to a bucket of their own, with versioning on
    (``S3_INCOMING_BUCKET``, made by ``ensure_bucket``)."""

    keeps_versions = True

    @pytest.fixture
    def store(self) -> Iterator[MediaStore]:
        bucket = f"{os.environ['AWS_STORAGE_BUCKET_NAME']}-incoming"
        with msc3870_settings(S3_INCOMING_BUCKET=bucket):
            store = get_store()
            assert isinstance(store, S3MediaStore)
            store.ensure_bucket()
            yield store
