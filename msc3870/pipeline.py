"""Post-upload work: move the bytes out of the client's reach, check them, decide.

``screen_media`` is the body of the screening task. It takes a primary key, starts from
what the row says, and every step is a compare-and-set or safe to repeat, so a
redelivered or re-dispatched task does no harm.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from django.db import close_old_connections, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from . import lifecycle, logs, metrics
from .conf import app_settings
from .models import Media, MediaState, UploadMethod
from .screening import (
    SNIFF_BYTES,
    UNKNOWN_TYPE,
    QuotaClaim,
    Rejection,
    ScreeningContext,
    enforce_user_quota,
    metadata_checks,
    record_sha256,
    run_checks,
)
from .signals import send_state_signal
from .storage import MediaStore, ObjectInfo, SourceChanged, get_store
from .thumbnails import thumbnail_keys

log = logging.getLogger(__name__)
S = MediaState


def dispatch_screening(
    media: Media, *, background: bool = False, incoming: ObjectInfo | None = None
) -> None:
    """Queue the screening task once the transaction that claimed the row has committed.

    If the broker refuses, the reason is kept on the row: media left in PROCESSING is
    queued again by the stuck sweep, so an outage delays screening but loses nothing.
    Without a broker, screening runs in this thread, or with ``background`` (the caller
    answers before the verdict) on a small pool of this process's threads; ``incoming``:
    the upload URL's object as /complete read it, which spares the screening a look at it
    (``screen_loaded``).
    """
    from .tasks import screen_media_task

    if screens_in_request():
        if background:
            transaction.on_commit(lambda: _screen_in_background(media, incoming))
        else:
            transaction.on_commit(lambda: screen_in_process(media))
        return

    def send() -> None:
        try:
            screen_media_task.delay(media.pk, incoming=asdict(incoming) if incoming else None)
        except Exception as exc:  # broker down, connection refused, ...
            log.warning("Could not queue screening of %s: %s", media.mxc_uri, exc)
            Media.objects.filter(pk=media.pk).update(last_error=f"queueing failed: {exc}"[:1000])

    transaction.on_commit(send)


def screen_in_process(
    media: Media,
    *,
    received: dict[str, Any] | None = None,
    claim: Q | None = None,
    first_bytes: bytes | None = None,
    source: str = S.PROCESSING,
    incoming: ObjectInfo | None = None,
) -> str:
    """No broker: screen now, in the request's thread, on the row it already holds (its
    state is then known without another query). A failure is recorded on the row; the
    stuck sweep screens it again.

    ``received``: the fields of bytes a PUT has just stored (key, size, SHA-256), not yet
    on the row; the UPDATE that decides records them too, one write where a record and
    then a verdict took two. ``claim``: both hold only while the row is still that PUT's
    ("skipped" otherwise). ``first_bytes``: those bytes' first ``SNIFF_BYTES``, kept as the
    PUT stored them (the object is not read back). ``source``: the state the row is held
    in, PROCESSING, or PENDING for a PUT that stored its bytes unclaimed and is decided
    by this one write. If screening fails, the bytes are recorded alone (a PENDING row
    moves to PROCESSING), so that the stuck sweep screens them (and never takes them for
    an upload still arriving)."""
    try:
        return screen_loaded(
            media,
            count_attempt=False,
            claim=claim,
            received=received,
            first_bytes=first_bytes,
            source=source,
            incoming=incoming,
        )
    except Exception as exc:
        log.exception("Screening of %s failed", media.mxc_uri)
        if received:
            if source == S.PROCESSING:
                recorded = lifecycle.update_if_state(
                    media, S.PROCESSING, extra_where=claim, **received
                )
            else:  # a PUT decided in one write: its row moves to PROCESSING with the bytes
                recorded = lifecycle.transition(
                    media, [source], S.PROCESSING, extra_where=claim, **received
                )
            if not recorded:
                return "skipped"
        record_failure(media.pk, exc)
        return "failed"


def screens_in_request() -> bool:
    """Whether screening runs in the process that asks for it (no broker)."""
    from .tasks import screen_media_task

    return bool(screen_media_task.app.conf.task_always_eager)


_background: ThreadPoolExecutor | None = None
_background_lock = threading.Lock()


def _screen_in_background(media: Media, incoming: ObjectInfo | None = None) -> None:
    """Screen on a background thread of this process (no broker, and the request answers
    before the verdict). Inside an atomic block (a caller's transaction, or a test's) a
    thread's own connection could not see the row: screen here instead. A process that
    dies mid-screening leaves the row PROCESSING: the stuck sweep screens it again."""
    global _background
    if connection.in_atomic_block:
        screen_in_process(media, incoming=incoming)
        return
    with _background_lock:
        if _background is None:
            # Screening is mostly waiting on storage; two threads leave a process's CPU to
            # its requests.
            _background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="screening")

    def run() -> None:
        # The thread keeps its connection between screenings, as a request thread does
        # (CONN_MAX_AGE); one that is broken or too old is replaced.
        close_old_connections()
        try:
            screen_in_process(media, incoming=incoming)
        finally:
            close_old_connections()

    _background.submit(run)


def reject_before_answer(media: Media, info: ObjectInfo, prefix: bytes | None = None) -> bool:
    """The checks that need only metadata and a ranged read (``metadata_checks``), run on
    the incoming object of a URL upload before ``/complete`` answers. True if they
    rejected it (then its bytes are deleted, never copied, and the row is REJECTED).
    They run again on the copy that will be served: the client can still overwrite the
    incoming object until it is moved. ``prefix``: its first bytes, if already read."""
    store = get_store()
    ctx = ScreeningContext(
        media=media, store=store, key=media.incoming_key, info=info, _prefix=prefix
    )
    try:
        for check in metadata_checks():
            check(ctx)
    except Rejection as rejection:
        _reject(media, rejection)
        return True
    return False


def screen_media(pk: int, incoming: ObjectInfo | None = None) -> str:
    """Screen one media row in PROCESSING; returns what happened (for logs and tests).
    ``incoming``: see ``dispatch_screening``."""
    media = Media.objects.filter(pk=pk).first()
    if media is None:
        return "skipped"
    return screen_loaded(media, incoming=incoming)


def screen_loaded(media: Media, **options: Any) -> str:
    """``screen_media`` of a row already read (``_screen_loaded``), timed, counted by
    outcome and written as one line (media id, user, the state it left the row in)."""
    fields = {"media_id": media.media_id, "user": media.user_id}
    if media.is_remote:
        fields["server_name"] = media.server_name
    outcome = "failed"
    step: logs.Step | None = None
    try:
        with logs.step("screening", **fields) as step:
            outcome = _screen_loaded(media, **options)
            step.fields.update(outcome=outcome, state=media.state)
            return outcome
    finally:
        if step is not None:
            metrics.screened(outcome, step.seconds)


def _screen_loaded(
    media: Media,
    *,
    count_attempt: bool = True,
    claim: Q | None = None,
    received: dict[str, Any] | None = None,
    first_bytes: bytes | None = None,
    source: str = S.PROCESSING,
    incoming: ObjectInfo | None = None,
) -> str:
    """``screen_media`` of a row already read. A task counts its attempt first (it may
    die); in-process screening counts it in the update that decides. ``received``: fields
    of the bytes not yet on the row (``screen_in_process``), written by that update too,
    and ``first_bytes`` their start as the request stored them (not read back);
    ``claim``: the update decides only while the row holds this claim, in state
    ``source`` (PENDING: a PUT's bytes, stored unclaimed, see ``screen_in_process``).
    ``incoming``: the upload URL's object as /complete read it (``dispatch_screening``)."""
    if media.state != source:
        return "skipped"
    pk = media.pk
    decided: dict[str, Any] = dict(received or {})
    for name, value in decided.items():
        setattr(media, name, value)
    if claim is not None:
        decided["claim"] = claim
    if source != S.PROCESSING:
        decided["source"] = source
    if count_attempt:
        Media.objects.filter(pk=pk).update(attempts=F("attempts") + 1)
    else:
        decided["attempts"] = F("attempts") + 1
    store = get_store()
    store_sha256 = None
    if not media.storage_key:
        if media.upload_method != UploadMethod.URL:
            return "receiving"  # a PUT is still streaming its body
        # Move the bytes out of the upload URL's reach before looking at them. The object
        # as /complete read it spares a HEAD: only that version is copied (``if_match``),
        # and one written over (or moved by an earlier attempt) since is looked at again.
        # A store without versions is looked at anyway (a stat, on the local disk).
        if incoming is not None and not incoming.etag:
            incoming = None
        for looked_again in (False, True):
            if incoming is None or looked_again:
                incoming = store.head(media.incoming_key)
            if incoming is None:
                break
            if incoming.content_type and not media.declared_content_type:
                # S3 keeps the Content-Type of the client's PUT with the object.
                media.declared_content_type = incoming.content_type[:255]
                decided["declared_content_type"] = media.declared_content_type
            if incoming.size > app_settings.MAX_UPLOAD_SIZE:
                # Refused from its HEAD: an oversized object is never copied.
                return _reject(media, _too_large(incoming.size), **decided)
            try:
                # Served with our type only (never the uploader's metadata); downloads and
                # redirects set the decided type themselves.
                store_sha256 = store.move(
                    media.incoming_key,
                    media.served_key,
                    size=incoming.size,
                    content_type=UNKNOWN_TYPE,
                    if_match=incoming.etag,
                )
                break
            except SourceChanged:
                if looked_again:
                    raise  # written over twice while looked at: screened again later
        if incoming is None and store.head(media.served_key) is None:
            return _reject(
                media, Rejection("Nothing was uploaded", errcode="M_NOT_YET_UPLOADED"), **decided
            )
        # (else: an earlier attempt moved the bytes and died before deciding). The key is
        # recorded with the verdict: the id's keys are known without it (``object_keys``).
        media.storage_key = decided["storage_key"] = media.served_key
    try:
        return _screen_stored(media, store, decided, received, first_bytes, store_sha256)
    except Exception:
        # No verdict: what the move learnt is kept for the attempt that screens these bytes
        # again (the incoming object, and the type its PUT declared, are gone).
        if learnt := {k: decided[k] for k in MOVE_FIELDS if k in decided}:
            lifecycle.update_if_state(media, S.PROCESSING, **learnt)
        raise


#: What moving a URL upload's bytes learns, recorded with the verdict.
MOVE_FIELDS = ("declared_content_type", "storage_key")


def _screen_stored(
    media: Media,
    store: MediaStore,
    decided: dict[str, Any],
    received: dict[str, Any] | None,
    first_bytes: bytes | None,
    store_sha256: str | None,
) -> str:
    """Run the checks on the bytes at ``media.storage_key``; one write decides, with
    ``decided``'s fields."""
    if received and first_bytes is not None:
        # Stored by this request: its size and first bytes were seen as they passed.
        found: tuple[ObjectInfo, bytes] | None = (
            ObjectInfo(size=received["size"], content_type=media.declared_content_type or None),
            first_bytes,
        )
    else:
        # Its size and first bytes (for the type) in one request where the store can (S3:
        # one ranged GET, not a HEAD and then a GET).
        found = store.head_with_prefix(media.storage_key, SNIFF_BYTES)
    if found is None:
        return _reject(
            media, Rejection("The stored object is missing", errcode="M_UNKNOWN"), **decided
        )
    info, prefix = found
    ctx = ScreeningContext(
        media=media,
        store=store,
        key=media.storage_key,
        info=info,
        store_sha256=store_sha256,
        _prefix=prefix,
    )
    try:
        findings = run_checks(ctx)
    except Rejection as rejection:
        return _reject(media, rejection, **decided)
    return _complete(media, findings, twins=ctx.twins, quota=ctx.quota_claim, **decided)


def _too_large(size: int) -> Rejection:
    limit = app_settings.MAX_UPLOAD_SIZE
    return Rejection(
        f"Upload is {size} bytes, over the limit of {limit}", errcode="M_TOO_LARGE", status=413
    )


def _complete(
    media: Media,
    findings: dict[str, object],
    *,
    twins: bool | None = None,
    quota: QuotaClaim | None = None,
    claim: Q | None = None,
    source: str = S.PROCESSING,
    **fields: Any,
) -> str:
    """``source`` (PROCESSING, or PENDING for a PUT decided in one write) -> COMPLETE;
    identical content already served is stored once.
    ``twins=False``: the checks found no other media with this content. ``quota``: the
    user's quota, decided in the same transaction as the transition (else racing
    completes of one user would each pass against the same total)."""
    own_key = media.storage_key
    sharing = Media.objects.none()
    if findings.get("sha256") and twins is not False:
        sharing = (
            Media.objects.filter(
                sha256=findings["sha256"], size=findings.get("size"), state=S.COMPLETE
            )
            .exclude(pk=media.pk)
            .exclude(storage_key="")
            .order_by("pk")
        )
    if quota is not None or (twins is not False and sharing.exists()):
        try:
            with transaction.atomic():
                if quota is not None:
                    enforce_user_quota(quota, exclude_pk=media.pk)
                # Locking the donor row orders this against a purge of the donor: either
                # the purge waits and then sees this row sharing the key (and keeps the
                # object), or it ran first and the donor is no longer COMPLETE here.
                donor = sharing.select_for_update().first()
                won = _mark_complete(
                    media, donor.storage_key if donor else own_key, findings, fields, claim, source
                )
        except Rejection as rejection:
            # Decided under the lock; the row is still in ``source`` (the transaction
            # rolled back), so it is rejected as a failed check would be.
            return _reject(media, rejection, claim=claim, source=source, **fields)
    else:
        # No quota and nothing to share (the common case): no lock, no transaction.
        won = _mark_complete(media, own_key, findings, fields, claim, source)
    if not won:
        return "skipped"
    if not media.is_remote:
        metrics.uploaded(media.upload_method, media.size or 0)
    if media.storage_key != own_key:
        get_store().delete(own_key)  # a fresh key of this media only: nobody else serves it
    send_state_signal(S.COMPLETE, [media.pk])
    return "complete"


def _mark_complete(
    media: Media,
    storage_key: str,
    findings: dict[str, object],
    fields: dict[str, Any],
    claim: Q | None,
    source: str,
) -> bool:
    values = {
        **fields,
        **findings,
        "completed_at": timezone.now(),
        "last_error": "",
        "storage_key": storage_key,
    }
    return lifecycle.transition(
        media, [source], S.COMPLETE, send_signal=False, extra_where=claim, **values
    )


def _reject(
    media: Media,
    rejection: Rejection,
    *,
    claim: Q | None = None,
    source: str = S.PROCESSING,
    **fields: Any,
) -> str:
    """``source`` -> REJECTED, the bytes deleted before the uploader hears of it."""
    reason = {
        "rejection_errcode": rejection.errcode,
        "rejection_status": rejection.status,
        "rejection_reason": rejection.reason[:1000],
    }
    if source == S.PENDING:
        # The request's own bytes go first; the id's other keys only once the row is
        # ours to reject (until then a concurrent /complete may be moving its bytes).
        get_store().delete(media.storage_key)
        if not lifecycle.transition(
            media, [source], S.REJECTED, extra_where=claim, **reason, **fields
        ):
            return "skipped"
        try:
            delete_objects(media.pk)
        except Exception as exc:  # the verdict stands; the cleanup sweep deletes them later
            log.warning("Could not delete the objects of rejected %s: %s", media.mxc_uri, exc)
    else:
        # Delete first, while the row is still PROCESSING (never served): by the time the
        # uploader hears of the rejection, the bytes are gone. These keys are this media's
        # own (sharing happens only on completion). If the storage fails, the task is
        # retried.
        get_store().delete_many(
            sorted(
                object_keys(
                    media.media_id, media.storage_key, media.upload_method, None, media.server_name
                )
            )
        )
        if not lifecycle.transition(
            media,
            [source],
            S.REJECTED,
            extra_where=claim,
            objects_deleted_at=timezone.now(),
            **reason,
            **fields,
        ):
            return "skipped"
    log.info("Rejected %s: %s", media.mxc_uri, rejection.reason)
    return "rejected"


def schedule_object_deletion(pk: int) -> None:
    """Delete a dead media's objects in the background once this transaction commits. If
    that cannot be queued, the cleanup sweep deletes them later."""
    from .tasks import delete_objects_task

    def send() -> None:
        try:
            delete_objects_task.delay(pk)
        except Exception as exc:
            log.warning("Could not queue deletion of media %s: %s", pk, exc)

    transaction.on_commit(send)


def record_failure(pk: int, exc: BaseException) -> None:
    """Background work failed (retryable): keep the reason on the row, not only in logs."""
    Media.objects.filter(pk=pk).update(last_error=f"{type(exc).__name__}: {exc}"[:1000])


def delete_objects(pk: int) -> bool:
    """Delete the storage objects of media that will never be served again. Idempotent."""
    return delete_objects_of([pk]) == 1


def hash_blocked_content(pks: list[int]) -> None:
    """Content a moderator rejected stays blocked by its SHA-256 (``check_not_blocked``)
    once its bytes are gone: hash, before they go, what was never hashed
    (``SHA256_WHEN`` "needed" hashes only content that other media may share)."""
    keys = (
        Media.objects.filter(pk__in=pks, state=S.REJECTED, sha256="")
        .exclude(moderated_by="")
        .exclude(storage_key="")
        .values_list("storage_key", flat=True)
        .distinct()
    )
    store = get_store()
    for key in keys:
        if record_sha256(store, key) is None:
            log.warning("Rejected content at %s is gone before it was hashed", key)


def object_keys(
    media_id: str,
    storage_key: str,
    upload_method: str,
    completed_at: object,
    server_name: str = "",
) -> set[str]:
    """Only the keys a row's history can have made: an id that expired unused has at most
    its incoming object, so an expiry batch is one batched delete. Another server's media
    has no incoming object (its id may be one of ours: never touch our upload's)."""
    probe = Media(server_name=server_name, media_id=media_id, upload_method=upload_method)
    keys = set() if probe.is_remote else {probe.incoming_key}
    if upload_method or storage_key:
        keys.add(probe.served_key)
    if storage_key:
        keys.add(storage_key)
    if completed_at:
        keys.update(thumbnail_keys(probe))
    return keys


def delete_objects_of(pks: list[int]) -> int:
    """Batch form: one query, one batched delete in storage, one update.

    Only rows that are dead (not live) and not yet cleaned are touched; a missing object
    counts as deleted. Returns how many rows this call marked as cleaned.
    """
    rows = list(
        Media.objects.filter(pk__in=pks, objects_deleted_at__isnull=True)
        .exclude(state__in=lifecycle.LIVE_STATES)
        .values_list(
            "pk", "media_id", "storage_key", "upload_method", "completed_at", "server_name"
        )
    )
    if not rows:
        return 0
    hash_blocked_content([row[0] for row in rows])
    keys: set[str] = set()
    for _, *history in rows:
        keys |= object_keys(*history)
    # Identical content is stored once: keep objects that live media still serve.
    # (The blank-key exclusion repeats the partial index's condition, so PostgreSQL uses
    # the index for a long IN list too.)
    keys -= set(
        Media.objects.filter(storage_key__in=keys, state__in=lifecycle.LIVE_STATES)
        .exclude(storage_key="")
        .values_list("storage_key", flat=True)
    )
    get_store().delete_many(sorted(keys))
    return (
        Media.objects.filter(pk__in=[row[0] for row in rows], objects_deleted_at__isnull=True)
        .exclude(state__in=lifecycle.LIVE_STATES)
        .update(objects_deleted_at=timezone.now())
    )
