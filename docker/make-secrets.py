"""Make this deployment's secrets on its first start; keep them on later starts.

Run by the ``secrets`` service of compose.yaml before anything else starts, so no secret is
kept in the repository and no two deployments share one. Each consumer gets its own volume
holding only what it needs, readable by its user only (mode 0400):

- ``app/credentials.env``: the S3 keys and DATABASE_URL, sourced by the media server's
  entrypoint (MEDIAREPO_ENV_FILE);
- ``app/signing.key``: the federation signing key in Synapse's format
  (``ed25519 <version> <unpadded base64 seed>``), one for every web node and worker
  (MSC3870_SIGNING_KEY_PATH);
- ``seaweedfs/s3.json``: the S3 server's identity with the same keys;
- ``postgres/password``: read by the postgres image (POSTGRES_PASSWORD_FILE).

The values are kept in ``source/secrets.json`` (a volume mounted nowhere else) and the
files above are written from it on every start: PostgreSQL keeps the password it was
initialised with, so regenerating it would lock the server out. To rotate, see README.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import string
import sys
from pathlib import Path

BUCKET = os.environ.get("AWS_STORAGE_BUCKET_NAME", "mediarepo")
# Owners of the files: the media server image's user (docker/Dockerfile) and the users
# the seaweedfs and postgres images read their configuration as (root for both).
APP_UID = int(os.environ.get("APP_UID", "10001"))
SEAWEEDFS_UID = int(os.environ.get("SEAWEEDFS_UID", "0"))
POSTGRES_UID = int(os.environ.get("POSTGRES_UID", "0"))


def _write(path: Path, text: str, uid: int) -> None:
    """Write ``text`` readable by ``uid`` only, replacing the file in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.new")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    if os.geteuid() == 0:  # in the container; a test run as a user keeps its own files
        os.chown(partial, uid, uid)
    os.chmod(partial, 0o400)
    os.replace(partial, path)


def _signing_key_values() -> dict[str, str]:
    """A new Ed25519 signing key: its version (Synapse's shape, ``a_`` and four letters or
    digits) and its 32-byte seed, unpadded base64 (what signedjson reads)."""
    alphabet = string.ascii_letters + string.digits
    return {
        "signing_key_version": "a_" + "".join(secrets.choice(alphabet) for _ in range(4)),
        "signing_key_seed": base64.b64encode(secrets.token_bytes(32)).decode().rstrip("="),
    }


def _values(root: Path) -> dict[str, str]:
    source = root / "source" / "secrets.json"
    if source.exists():
        values = json.loads(source.read_text())
        if "signing_key_seed" not in values:  # made by a version without one
            values.update(_signing_key_values())
            _write(source, json.dumps(values), 0)
        return values
    values = {
        # Access key ids are not secret but are per deployment too; S3 wants [A-Z0-9].
        "s3_access_key": "MR" + secrets.token_hex(9).upper(),
        "s3_secret_key": secrets.token_urlsafe(30),
        # Hex: it goes into a URL unescaped.
        "postgres_password": secrets.token_hex(24),
        **_signing_key_values(),
    }
    _write(source, json.dumps(values), 0)
    return values


def main(root: Path) -> None:
    values = _values(root)
    identity = {
        "name": "mediarepo",
        "credentials": [
            {"accessKey": values["s3_access_key"], "secretKey": values["s3_secret_key"]}
        ],
        # Admin: the server creates its bucket and sets its lifecycle rule at startup.
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    _write(root / "seaweedfs" / "s3.json", json.dumps({"identities": [identity]}), SEAWEEDFS_UID)
    _write(root / "postgres" / "password", values["postgres_password"] + "\n", POSTGRES_UID)
    database_url = f"postgres://mediarepo:{values['postgres_password']}@postgres:5432/mediarepo"
    _write(
        root / "app" / "credentials.env",
        f"AWS_ACCESS_KEY_ID={values['s3_access_key']}\n"
        f"AWS_SECRET_ACCESS_KEY={values['s3_secret_key']}\n"
        f"DATABASE_URL={database_url}\n",
        APP_UID,
    )
    _write(
        root / "app" / "signing.key",
        f"ed25519 {values['signing_key_version']} {values['signing_key_seed']}\n",
        APP_UID,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/secrets"))
