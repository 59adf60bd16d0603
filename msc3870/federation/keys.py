"""This server's Ed25519 signing key and the answer of ``GET /_matrix/key/v2/server``.

The key lives in ``MSC3870["SIGNING_KEY_PATH"]``, in Synapse's signing key file format (one
``ed25519 <version> <unpadded base64 seed>`` line per key, as signedjson writes it), so the
same file can be handed to a homeserver that publishes our keys. It is made once: by
``manage.py generate_signing_key``, or on first use when the file does not exist. It is
never shipped in the repository.

The first key in the file signs our requests; every key in it is published and signs the
key server answer (so a key can be rotated in by adding it first and keeping the old one
published until other servers' caches of it expire).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import string
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    read_signing_keys,
    write_signing_keys,
)
from signedjson.sign import sign_json
from signedjson.types import SigningKey, VerifyKey

from ..conf import app_settings

_ALPHANUMERIC = string.ascii_letters + string.digits
_lock = threading.Lock()
# path -> (mtime_ns, keys): the file is read once per change, not once per request.
_loaded: dict[str, tuple[int, list[SigningKey]]] = {}


class SigningKeyExists(FileExistsError):
    pass


def key_id(key: SigningKey | VerifyKey) -> str:
    return f"{key.alg}:{key.version}"


def new_key_version() -> str:
    """Synapse's shape (``a_`` and four random characters); versions are ``[A-Za-z0-9_]``."""
    return "a_" + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(4))


def signing_key_path() -> Path:
    path = app_settings.SIGNING_KEY_PATH
    if not path:
        raise ImproperlyConfigured(
            "MSC3870['SIGNING_KEY_PATH'] is not set: federation needs a signing key file."
        )
    return Path(path)


def write_new_signing_key(path: Path, version: str | None = None) -> SigningKey:
    """Generate a key and write it to ``path`` (mode 0600), never replacing a file.

    The key is written to a private temporary file that is then hard-linked into place:
    the link fails if ``path`` exists, and a reader never sees a half-written file, so two
    processes starting at once end with one key and both use it."""
    key = generate_signing_key(version or new_key_version())
    buffer = io.StringIO()
    write_signing_keys(buffer, [key])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".signing-key-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as stream:
            stream.write(buffer.getvalue())
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise SigningKeyExists(f"{path} already exists; not overwriting it") from exc
        except OSError:
            # A filesystem without hard links: an exclusive create still never replaces.
            _write_exclusive(path, buffer.getvalue())
    finally:
        os.unlink(tmp)
    return key


def _write_exclusive(path: Path, content: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SigningKeyExists(f"{path} already exists; not overwriting it") from exc
    with os.fdopen(fd, "w") as stream:
        stream.write(content)


def read_keys(path: Path) -> list[SigningKey]:
    with path.open() as stream:
        # Blank lines and comments are allowed around the key lines (signedjson is not).
        lines = [line for line in stream if line.strip() and not line.lstrip().startswith("#")]
    try:
        keys = read_signing_keys(lines)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{path} is not a signing key file: {exc}") from exc
    if not keys:
        raise ImproperlyConfigured(f"{path} holds no signing key")
    return keys


def signing_keys() -> list[SigningKey]:
    """Every key in the key file, the signing one first; the file is made if missing."""
    path = signing_key_path()
    with _lock:
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            # Another process may make it first: then we use theirs.
            with contextlib.suppress(SigningKeyExists):
                write_new_signing_key(path)
            mtime = path.stat().st_mtime_ns
        cached = _loaded.get(str(path))
        if cached is None or cached[0] != mtime:
            cached = (mtime, read_keys(path))
            _loaded[str(path)] = cached
        return cached[1]


def signing_key() -> SigningKey:
    """The key our requests are signed with."""
    return signing_keys()[0]


def verify_keys() -> dict[str, VerifyKey]:
    """Our own public keys by key id (a request from ourselves needs no fetch)."""
    return {key_id(key): get_verify_key(key) for key in signing_keys()}


def key_server_response(now_ms: int | None = None) -> dict[str, Any]:
    """The body of ``GET /_matrix/key/v2/server``: our keys, signed by each of them."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    keys = signing_keys()
    server_name = app_settings.SERVER_NAME
    body: dict[str, Any] = {
        "server_name": server_name,
        "valid_until_ts": now_ms + app_settings.SIGNING_KEY_VALIDITY_SECONDS * 1000,
        "verify_keys": {
            key_id(key): {"key": encode_verify_key_base64(get_verify_key(key))} for key in keys
        },
        # Retired keys are not kept: a rotated-out key stays in the file until unused.
        "old_verify_keys": {},
    }
    for key in keys:
        body = sign_json(body, server_name, key)
    return body
