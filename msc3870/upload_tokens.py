"""Signed upload URLs for storages that cannot presign (the local disk).

The token is the credential: it names one media id and its expiry, and is signed with
HMAC-SHA256 over ``SECRET_KEY``. It needs no Matrix access token, so it must be
unguessable (the signature), scoped (the media id) and dead after ``unused_expires_at``.
"""

from __future__ import annotations

from datetime import datetime

from django.core import signing
from django.utils import timezone

SALT = "msc3870.upload-url"


def make_upload_token(media_id: str, expires_at: datetime) -> str:
    return signing.dumps({"m": media_id, "e": int(expires_at.timestamp())}, salt=SALT)


def read_upload_token(token: str) -> str | None:
    """The media id the token is for, or None if it is forged, malformed or expired."""
    try:
        payload = signing.loads(token, salt=SALT)
    except signing.BadSignature:
        return None
    if not isinstance(payload, dict):
        return None
    media_id, expires = payload.get("m"), payload.get("e")
    if not isinstance(media_id, str) or not isinstance(expires, int):
        return None
    if expires <= timezone.now().timestamp():
        return None
    return media_id
