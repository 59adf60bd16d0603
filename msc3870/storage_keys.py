"""Every key the app stores bytes under, and what a key says, in one place (as Synapse's
``MediaFilePaths`` owns its media paths).

- ``incoming/<id>``: where an upload URL writes; only that id's URL can write it.
- ``incoming/<id>@<version>``: one version of it, as the store named it when
  ``/complete`` looked (stores with versions): the upload URL can add versions, never
  change one, so the checks and downloads read these bytes until they are copied away.
- ``media/<id[:2]>/<id>``: this server's media once moved out of the URL's reach, where
  no URL can write; a PUT's own bytes go to that key plus a random suffix
  (``upload``), so that racing requests never write one object.
- ``remote/<server>/<id[:2]>/<id>``: another server's media, under its server name: its
  ids are chosen by that server and may equal ours.
- ``preview/<id[:2]>/<id>``: an image a URL preview fetched (an ``og:image``), ours by
  id but fetched from anywhere: kept apart from what users uploaded.
- ``thumbnails/<id>/<w>x<h>-<method>``, ``remote-thumbnails/<server>/<id>/...`` and
  ``preview-thumbnails/<id>/...``.
"""

from __future__ import annotations

import secrets

INCOMING_PREFIX = "incoming/"
# Media ids and key prefixes never hold it; a store's version id may hold anything else.
VERSION_MARK = "@"


def incoming(media_id: str) -> str:
    return f"{INCOMING_PREFIX}{media_id}"


def pinned(key: str, version_id: str) -> str:
    """The key of one version of the object at ``key``."""
    return f"{key}{VERSION_MARK}{version_id}"


def split_version(key: str) -> tuple[str, str | None]:
    """The object's key and the version a ``pinned`` key names (None: the latest). Only
    upload URLs' objects are ever pinned."""
    if not key.startswith(INCOMING_PREFIX):
        return key, None
    base, mark, version_id = key.partition(VERSION_MARK)
    return base, (version_id if mark else None)


def is_pinned_incoming(key: str) -> bool:
    """Whether ``key`` names one version of an upload URL's object."""
    return key.startswith(INCOMING_PREFIX) and VERSION_MARK in key


def served(server_name: str, media_id: str, *, remote: bool, preview: bool = False) -> str:
    if remote:
        return f"remote/{_key_safe(server_name)}/{media_id[:2]}/{media_id}"
    if preview:
        return f"preview/{media_id[:2]}/{media_id}"
    return f"media/{media_id[:2]}/{media_id}"


def upload(served_key: str) -> str:
    """A new key for the bytes of one upload request: the served key and a random suffix."""
    return f"{upload_prefix(served_key)}{secrets.token_hex(6)}"


def upload_prefix(served_key: str) -> str:
    """What every ``upload`` key of ``served_key`` starts with."""
    return f"{served_key}."


def thumbnail_prefix(
    server_name: str, media_id: str, *, remote: bool, preview: bool = False
) -> str:
    if remote:
        return f"remote-thumbnails/{_key_safe(server_name)}/{media_id}"
    if preview:
        return f"preview-thumbnails/{media_id}"
    return f"thumbnails/{media_id}"


def thumbnail(prefix: str, width: int, height: int, method: str) -> str:
    return f"{prefix}/{width}x{height}-{method}"


def media_id_of(key: str) -> str:
    """The media id a key belongs to (incoming, pinned, served or upload keys)."""
    return split_version(key)[0].rsplit("/", 1)[-1].split(".", 1)[0]


def _key_safe(server_name: str) -> str:
    # Server names hold [A-Za-z0-9.-], brackets and colons; "_" is in none of them, so this
    # is one-to-one, and no name is "." or ".." (a name starts with a letter, digit or "[").
    return server_name.replace(":", "_")
