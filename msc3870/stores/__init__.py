"""Where media bytes live: the ``MediaStore`` of the configured Django storage.

``get_store()`` builds one store per Django storage, the class named by
``MSC3870["STORE"]`` (an import string) or, by default, the one made for the storage's
own class (``STORE_FOR_STORAGE``): the local disk for ``FileSystemStorage`` (the embedded
default), S3 for django-storages' ``S3Storage``. Classes are resolved by import string,
as Django picks session engines, so this package imports no backend until it is used.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import Storage, storages
from django.utils.module_loading import import_string

from ..conf import app_settings
from .base import (
    CHUNK_SIZE,
    WHOLE_READ_CHUNK,
    ChunkReader,
    MediaStore,
    MeteredReader,
    ObjectInfo,
    Readable,
    SourceChanged,
    UploadTarget,
    WrittenObject,
    expiry_within_url_lifetime,
)

__all__ = [
    "CHUNK_SIZE",
    "STORE_FOR_STORAGE",
    "WHOLE_READ_CHUNK",
    "ChunkReader",
    "MediaStore",
    "MeteredReader",
    "ObjectInfo",
    "Readable",
    "SourceChanged",
    "UploadTarget",
    "WrittenObject",
    "expiry_within_url_lifetime",
    "get_store",
]

#: The store made for each kind of Django storage (subclasses included), first match wins.
STORE_FOR_STORAGE: dict[str, str] = {
    "django.core.files.storage.FileSystemStorage": "msc3870.stores.local.LocalMediaStore",
    "storages.backends.s3.S3Storage": "msc3870.stores.s3.S3MediaStore",
}


def get_store(alias: str | None = None) -> MediaStore:
    """The store over ``STORAGES[alias]`` (default ``MSC3870["STORAGE_ALIAS"]``), made
    once per storage object."""
    storage: Storage = storages[alias or app_settings.STORAGE_ALIAS]
    cached = getattr(storage, "_msc3870_store", None)
    if cached is not None:
        return cached
    store: MediaStore = store_class(storage)(storage)  # type: ignore[call-arg]
    storage._msc3870_store = store  # type: ignore[attr-defined]
    return store


def store_class(storage: Storage) -> type[MediaStore]:
    """``MSC3870["STORE"]`` if set, else the class made for ``storage``'s kind."""
    if app_settings.STORE:
        return app_settings.STORE
    for storage_path, store_path in STORE_FOR_STORAGE.items():
        try:
            kind = import_string(storage_path)
        except ImportError:
            continue  # that backend's package is not installed: not this storage
        if isinstance(storage, kind):
            store: type[MediaStore] = import_string(store_path)
            return store
    raise ImproperlyConfigured(
        f"No media store for STORAGES[{app_settings.STORAGE_ALIAS!r}] "
        f"({type(storage).__module__}.{type(storage).__qualname__}): use a FileSystemStorage "
        "or django-storages' S3Storage, or name a store class in MSC3870['STORE']."
    )
