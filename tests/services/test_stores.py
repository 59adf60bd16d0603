"""The store contract (``tests/store_contract.py``) on the real S3 server of the services
suite (SeaweedFS, ``scripts/s3-server``), in the bucket the stack uses: every key is under
a prefix of the test's own."""

from __future__ import annotations

import pytest

from msc3870.stores import MediaStore, get_store
from msc3870.stores.s3 import S3MediaStore

from ..store_contract import S3StoreContract

pytestmark = pytest.mark.services


class TestS3StoreOnSeaweedFS(S3StoreContract):
    @pytest.fixture
    def store(self) -> MediaStore:
        store = get_store()
        assert isinstance(store, S3MediaStore)
        return store
