"""Every key the app stores bytes under, and what a key says, in one place (as Synapse's
``MediaFilePaths`` owns its media paths).

- ``incoming/<id>``: where an upload URL writes; only that id's URL can write it.
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


def incoming(media_id: str) -> str:
    return f"{INCOMING_PREFIX}{media_id}"


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
    """The media id a key belongs to (incoming, served or upload keys)."""
    return key.rsplit("/", 1)[-1].split(".", 1)[0]


def _key_safe(server_name: str) -> str:
    # Server names hold [A-Za-z0-9.-], brackets and colons; "_" is in none of them, so this
    # is one-to-one, and no name is "." or ".." (a name starts with a letter, digit or "[").
    return server_name.replace(":", "_")
