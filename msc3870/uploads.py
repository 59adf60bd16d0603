"""Uploads, the route of one upload from top to bottom.

1. ``create_media`` reserves an ``mxc://`` id (PENDING) and names where its bytes may be
   PUT: a presigned URL of the store, or a signed URL of this server
   (``receive_url_upload``);
2. the bytes arrive, one of three ways:
   - to the upload URL, then ``complete_url_upload`` (MSC3870 ``/complete``) claims the
     id (PENDING -> PROCESSING), refuses what its size and first bytes already tell
     (``verdicts.reject_before_answer``) and answers while the rest of the checks run;
   - through this server, ``upload_to_media`` (MSC2246 PUT) or ``upload_new_media``
     (one-shot POST): the body streams to a key of this request's own
     (``_store_body``);
3. ``msc3870.verdicts`` moves the bytes out of any URL's reach, runs the checks and writes
   the verdict, COMPLETE or REJECTED, in one compare-and-set; without a broker a PUT is
   decided in its own request (``_upload_decided_in_one_write``), with one the task is
   queued (``msc3870.queue``);
4. the answer (``_decision``): the content URI, or the rejection with its reason, which
   only the uploader hears (downloads of rejected media are 404).

Nothing here sees a request: views pass the Matrix user, ids, the body as a readable
stream and the few headers that matter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, NoReturn

from django.db import connection, transaction
from django.utils import timezone

from . import cleanup, lifecycle, logs, metrics, sql, verdicts
from .auth import MatrixUser
from .availability import local_media
from .conf import app_settings
from .errors import (
    CannotOverwrite,
    Codes,
    Forbidden,
    GuestAccessForbidden,
    LimitExceeded,
    MatrixError,
    NotFound,
    NothingUploaded,
    Rejection,
    TooLarge,
    UploadAbandoned,
)
from .models import Media, MediaState, UploadMethod
from .sniffing import SNIFF_BYTES
from .stores import (
    ObjectInfo,
    Readable,
    UploadTarget,
    WrittenObject,
    expiry_within_url_lifetime,
    get_store,
)
from .upload_tokens import read_upload_token
from .validation import check_local, clean_content_type, clean_filename, new_media_id
from .waiting import Deadline, MediaWait

log = logging.getLogger(__name__)
S = MediaState


def _require_member(user: MatrixUser) -> None:
    """Guests may download but not upload (as Synapse decides)."""
    if user.is_guest:
        raise GuestAccessForbidden()


# ---------------------------------------------------------------------------- create


@contextmanager
def _one_create_at_a_time(user_id: str) -> Iterator[None]:
    """What makes a create's pending count exact.

    On SQLite the ``INSERT`` that counts is one statement, and SQLite runs one writing
    statement at a time: nothing is needed around it, where a transaction would hold the
    write lock that every process shares through the Python code between its statements
    (request threads waited on that lock more than on anything else, py-spy at 16
    clients). Elsewhere, or where the insert is two statements (save signals), a
    transaction holding the user's lock."""
    if connection.vendor == "sqlite" and sql.inserts_in_one_statement():
        yield
        return
    with transaction.atomic():
        sql.lock_uploader(user_id, relax_commit=True)
        yield


@dataclass(frozen=True)
class CreatedMedia:
    media: Media
    upload: UploadTarget


def create_media(user: MatrixUser) -> CreatedMedia:
    """Reserve a new mxc:// id for ``user`` (MSC2246 /create, MSC3870 upload URL)."""
    _require_member(user)
    store = get_store()
    now = timezone.now()
    expires = expiry_within_url_lifetime(
        store, now + timedelta(seconds=app_settings.UNUSED_EXPIRATION), now
    )
    with _one_create_at_a_time(user.user_id):
        media = Media(
            server_name=app_settings.SERVER_NAME,
            media_id=new_media_id(),
            user_id=user.user_id,
            unused_expires_at=expires,
        )
        limit = app_settings.MAX_PENDING_UPLOADS
        if not sql.insert_media(media, pending_limit=(now, limit) if limit > 0 else None):
            # Synapse's answer: retry once the oldest pending id has expired.
            oldest = (
                Media.objects.filter(
                    user_id=user.user_id, state=S.PENDING, unused_expires_at__gt=now
                )
                .order_by("unused_expires_at")
                .values_list("unused_expires_at", flat=True)[0]
            )
            retry_after = (oldest - now).total_seconds() * 1000
            raise LimitExceeded("Too many pending uploads", retry_after_ms=int(retry_after))
    metrics.transitioned(S.PENDING)
    logs.annotate(media_id=media.media_id, state=S.PENDING)
    return CreatedMedia(media, store.upload_target(media))


# ---------------------------------------------------------------------------- upload


def _check_can_upload(user: MatrixUser, media: Media) -> None:
    """The checks of an upload in Synapse's order (complement relies on it)."""
    if media.user_id != user.user_id:
        raise Forbidden("You may only upload to media you created")
    if media.state in (S.PROCESSING, S.COMPLETE, S.QUARANTINED, S.REJECTED):
        raise CannotOverwrite()
    if media.state != S.PENDING or media.unused_expires_at <= timezone.now():
        raise NotFound("Media id has expired")


def check_declared_length(content_length: int | None) -> None:
    if content_length is not None and content_length > app_settings.MAX_UPLOAD_SIZE:
        raise TooLarge(
            f"Upload of {content_length} bytes is over the limit of "
            f"{app_settings.MAX_UPLOAD_SIZE} bytes"
        )


def _store_body(
    media: Media, body: Readable, content_length: int | None
) -> tuple[dict[str, Any], bytes]:
    """Stream the body to a key of this request's own (``Media.upload_key``); the fields
    that record them on the row (key, size, hash), and their first bytes as they passed
    (what screening sniffs, not read back from the store)."""
    key = media.upload_key()
    written = get_store().write_stream(
        key,
        body,
        max_size=app_settings.MAX_UPLOAD_SIZE,
        expected_size=content_length,
        content_type=media.declared_content_type or None,
        keep_first=SNIFF_BYTES,
    )
    fields = {"storage_key": key, "size": written.size, "sha256": written.sha256}
    return fields, written.first_bytes


def _record_and_screen(media: Media, received: dict[str, Any], first_bytes: bytes) -> Media:
    """Record the bytes a request stored and have them checked. Without a broker the
    checks run here, on the first bytes as they passed, and one UPDATE records the bytes
    with the verdict; with one, the bytes are recorded, then the task is queued. Either
    write holds only while the row is still this request's claim."""
    claim = lifecycle.same_claim(media)
    if verdicts.screens_in_request():
        screened = verdicts.screen_here(
            media, verdicts.Held(claim=claim), stored=verdicts.StoredBytes(received, first_bytes)
        )
        if screened == verdicts.Outcome.SKIPPED:
            _abandon(received["storage_key"])
        return _decision(media, Deadline.after_seconds(app_settings.COMPLETE_WAIT_SECONDS))
    if not lifecycle.update_if_state(media, S.PROCESSING, extra_where=claim, **received):
        _abandon(received["storage_key"])
    return _screen_and_wait(media)


def _abandon(key: str) -> NoReturn:
    """The stuck sweep (or a moderator) gave up on this upload while it streamed, or its
    uploader sent it again, and the id may have been claimed again since: the row's
    claim is not ours. The bytes this
    request stored (under a key of its own) are deleted."""
    get_store().delete(key)
    raise UploadAbandoned()


def upload_to_media(
    user: MatrixUser,
    server_name: str,
    media_id: str,
    body: Readable,
    *,
    content_length: int | None,
    content_type: str | None,
    filename: str | None,
) -> Media:
    """MSC2246 ``PUT /upload/{serverName}/{mediaId}``: fill a pending id."""
    _require_member(user)
    check_local(server_name, media_id)
    try:
        check_declared_length(content_length)
        declared = clean_content_type(content_type)
        name = clean_filename(filename)
    except MatrixError:
        # What is wrong with the id is said first (Synapse's order).
        _check_can_upload(user, local_media(server_name, media_id))
        raise
    if verdicts.screens_in_request():
        return _upload_decided_in_one_write(
            user, local_media(server_name, media_id), body, content_length, declared, name
        )
    media = _claim_for_put(user, server_name, media_id, declared, name)
    try:
        received, first_bytes = _store_body(media, body, content_length)
    except BaseException:
        # Nothing was kept: the id may be uploaded to again. Only while the claim is still
        # ours: after a stuck-upload reset a newer PUT may hold the row.
        lifecycle.transition(
            media,
            [S.PROCESSING],
            S.PENDING,
            extra_where=lifecycle.same_claim(media),
            upload_method="",
            processing_started_at=None,
        )
        raise
    return _record_and_screen(media, received, first_bytes)


def _claim_for_put(
    user: MatrixUser, server_name: str, media_id: str, declared: str, name: str
) -> Media:
    """PENDING -> PROCESSING for a PUT with a broker (its checks run elsewhere), read and
    claimed in one statement. The claim need not survive a database crash: the PUT it
    belongs to would fail with it, and the verdict's commit makes it durable anyway.

    A PUT sent again by its uploader (its first try answered 503, or its connection was
    cut) takes over the first try's claim while that one's bytes are unrecorded: the
    first try may have died with its process or lost the database, and its claim would
    otherwise hold the id until the stuck sweep gives up on it. A first try still running
    finds its claim gone when it would record its bytes, and deletes them."""
    claim = partial(_claim_pending_for_put, user, server_name, media_id, declared, name)
    media = claim()
    if media is not None:
        return media
    current = local_media(server_name, media_id)
    if _unrecorded_put_of(user, current) and cleanup.give_up_on_body(current):
        media = claim()
        if media is not None:
            return media
        current = local_media(server_name, media_id)  # claimed by another retry meanwhile
    # Missing, another's, expired or already uploaded to: say which.
    _check_can_upload(user, current)
    raise CannotOverwrite()


def _claim_pending_for_put(
    user: MatrixUser, server_name: str, media_id: str, declared: str, name: str
) -> Media | None:
    now = timezone.now()
    return lifecycle.claim(
        server_name,
        media_id,
        [S.PENDING],
        S.PROCESSING,
        user_id=user.user_id,
        unexpired_at=now,
        durable=False,
        upload_method=UploadMethod.PUT,
        declared_content_type=declared,
        filename=name,
        processing_started_at=now,
    )


def _unrecorded_put_of(user: MatrixUser, media: Media) -> bool:
    """``media`` is claimed by a PUT of ``user`` whose bytes are not recorded yet."""
    return (
        media.user_id == user.user_id
        and media.state == S.PROCESSING
        and media.upload_method == UploadMethod.PUT
        and not media.storage_key
    )


def _upload_decided_in_one_write(
    user: MatrixUser,
    media: Media,
    body: Readable,
    content_length: int | None,
    declared: str,
    name: str,
) -> Media:
    """The PUT without a broker: the checks run in this request, so the id is not claimed
    first. The bytes go to a key of this request's own, are screened as they passed, and
    one compare-and-set on the row, still PENDING, records them with their verdict: one
    write where a claim and then a verdict took two (the hot path; on SQLite every write
    waits for the one writer). Requests racing for the id each store their
    bytes; one wins the write, the others delete theirs and answer as a PUT to an id
    already uploaded to. Downloads wait through PENDING as through PROCESSING."""
    _check_can_upload(user, media)
    received: dict[str, Any] = {
        "upload_method": UploadMethod.PUT,
        "declared_content_type": declared,
        "filename": name,
        "processing_started_at": timezone.now(),
    }
    for field, value in received.items():
        setattr(media, field, value)
    stored, first_bytes = _store_body(media, body, content_length)
    received.update(stored)
    screened = verdicts.screen_here(
        media, verdicts.Held(source=S.PENDING), stored=verdicts.StoredBytes(received, first_bytes)
    )
    if screened == verdicts.Outcome.SKIPPED:
        get_store().delete(stored["storage_key"])
        _check_can_upload(user, local_media(media.server_name, media.media_id))
        raise CannotOverwrite()
    return _decision(media, Deadline.after_seconds(app_settings.COMPLETE_WAIT_SECONDS))


def upload_new_media(
    user: MatrixUser,
    body: Readable,
    *,
    content_length: int | None,
    content_type: str | None,
    filename: str | None,
) -> Media:
    """``POST /_matrix/media/v3/upload``: create and fill in one request."""
    _require_member(user)
    check_declared_length(content_length)
    declared = clean_content_type(content_type)
    name = clean_filename(filename)
    now = timezone.now()
    media = Media.objects.create(
        server_name=app_settings.SERVER_NAME,
        media_id=new_media_id(),
        user_id=user.user_id,
        state=S.PROCESSING,
        unused_expires_at=now,
        upload_method=UploadMethod.POST,
        declared_content_type=declared,
        filename=name,
        processing_started_at=now,
    )
    metrics.transitioned(S.PROCESSING)
    logs.annotate(media_id=media.media_id, state=S.PROCESSING)
    try:
        received, first_bytes = _store_body(media, body, content_length)
    except BaseException as exc:
        lifecycle.transition(
            media,
            [S.PROCESSING],
            S.REJECTED,
            rejection_errcode=str(getattr(exc, "errcode", Codes.UNKNOWN)),
            rejection_reason=f"Upload failed: {exc}"[:1000],
            objects_deleted_at=timezone.now(),
        )
        raise
    return _record_and_screen(media, received, first_bytes)


def complete_url_upload(
    user: MatrixUser, server_name: str, media_id: str, *, filename: str | None
) -> Media:
    """MSC3870 ``/complete``: the client says its PUT to the upload URL is done.

    Idempotent for the uploader: a retried or concurrent /complete of an id already
    completed through its URL gets the same answer, not an error.

    The answer comes once what needs only metadata and the first bytes is decided (the
    object exists, its size from a HEAD, its sniffed type); the full-object checks go on
    after it while downloads wait. ``COMPLETE_WAITS_FOR_CHECKS``: wait for the verdict.
    """
    _require_member(user)
    name = clean_filename(filename)
    waits = app_settings.COMPLETE_WAITS_FOR_CHECKS
    for _ in range(3):
        media = local_media(server_name, media_id)
        if media.user_id != user.user_id:
            raise Forbidden("You may only complete media you created")
        if media.upload_method == UploadMethod.URL and media.state != S.DELETED:
            wait = app_settings.COMPLETE_WAIT_SECONDS if waits else 0
            return _decision(media, Deadline.after_seconds(wait))
        _check_can_upload(user, media)
        incoming, prefix = _look_at_incoming(media, with_prefix=not waits)
        if incoming is None:
            if _state_of(media) != S.PENDING:
                # Another /complete claimed the id (and moved the bytes) since this one
                # read the row: look again, and answer as it does.
                continue
            raise NothingUploaded()
        now = timezone.now()
        if lifecycle.transition(
            media,
            [S.PENDING],
            S.PROCESSING,
            unexpired_at=now,
            upload_method=UploadMethod.URL,
            filename=name,
            processing_started_at=now,
            # The version looked at is the one screened and served (stores with versions).
            incoming_version=(incoming.version_id or "") if get_store().keeps_versions else "",
        ):
            if waits:
                return _screen_and_wait(media)
            return _screen_after_answer(media, incoming, prefix)
        # Lost a race (another /complete, a PUT, expiry): look again.
    raise CannotOverwrite()


def _look_at_incoming(media: Media, *, with_prefix: bool) -> tuple[ObjectInfo | None, bytes | None]:
    """What the upload URL holds: its object's size and type, and its first bytes when
    the answer is decided on them (one ranged GET gives both)."""
    store = get_store()
    if not with_prefix:
        return store.head(media.incoming_key), None
    found = store.head_with_prefix(media.incoming_key, SNIFF_BYTES)
    return found if found is not None else (None, None)


def _state_of(media: Media) -> str | None:
    """The row's state now (it may have moved since ``media`` was read)."""
    fresh = sql.media_by_mxc(media.server_name, media.media_id)
    return fresh.state if fresh is not None else None


def receive_url_upload(
    token: str, body: Readable, *, content_length: int | None, content_type: str | None
) -> WrittenObject:
    """A PUT to a signed upload URL (storages that cannot presign): store it as the
    incoming object of its media id. The URL is dead once the id left PENDING."""
    media_id = read_upload_token(token)
    if media_id is None:
        raise Forbidden("Invalid or expired upload URL")
    media = Media.objects.filter(server_name=app_settings.SERVER_NAME, media_id=media_id).first()
    if media is None:
        raise Forbidden("Invalid or expired upload URL")
    logs.annotate(media_id=media.media_id, user=media.user_id)
    if media.state != S.PENDING:
        if media.state in (S.EXPIRED, S.DELETED):
            raise Forbidden("Invalid or expired upload URL")
        raise CannotOverwrite("This media's upload is already complete")
    check_declared_length(content_length)
    declared = clean_content_type(content_type)
    written = get_store().write_stream(
        media.incoming_key,
        body,
        max_size=app_settings.MAX_UPLOAD_SIZE,
        expected_size=content_length,
        content_type=declared,
    )
    # Stores that keep the type with the object (S3) need no row update; the local disk does.
    lifecycle.update_if_state(media, S.PENDING, declared_content_type=declared)
    return written


def _screen_after_answer(media: Media, incoming: ObjectInfo, prefix: bytes | None) -> Media:
    """Decide what metadata and a ranged read can (an oversized object is refused from its
    HEAD and never copied), then answer while the rest of the screening runs."""
    if verdicts.reject_before_answer(media, incoming, prefix):
        return _outcome(media)  # raises the rejection
    verdicts.dispatch(media, background=True, incoming=incoming)
    return media


def _screen_and_wait(media: Media) -> Media:
    verdicts.dispatch(media)
    return _decision(media, Deadline.after_seconds(app_settings.COMPLETE_WAIT_SECONDS))


def _decision(media: Media | None, deadline: Deadline) -> Media:
    """The outcome of the checks, or ``MediaWait`` while they run (bounded)."""
    if media is None:
        raise NotFound()
    if media.state == S.PROCESSING and not deadline.passed:
        raise MediaWait(media.pk, S.PROCESSING, deadline, partial(_decision, deadline=deadline))
    return _outcome(media)


def _outcome(media: Media) -> Media:
    if media.state == S.REJECTED:
        raise Rejection.for_uploader(
            media.rejection_reason, media.rejection_errcode, media.rejection_status
        )
    if media.state in (S.EXPIRED, S.DELETED):
        raise NotFound()
    # COMPLETE, or still PROCESSING after the wait: the bytes are ours and will be decided;
    # downloads wait for them meanwhile (MSC2246 semantics).
    return media
