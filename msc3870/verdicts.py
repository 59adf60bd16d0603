"""Deciding an upload: move its bytes out of the client's reach (or pin the version looked
at), run the checks, and write the verdict with one compare-and-set.

The route of one screening, top to bottom:

1. ``dispatch`` queues it (``msc3870.queue``): to a Celery worker, whose task body is
   ``screen``, or without a broker to this process (``screen_here``);
2. ``screen_row`` starts from what the row says: a URL upload's bytes are first moved to
   a key no upload URL can write (``_move_out_of_reach``), or, where the store keeps
   versions of upload URLs' objects (``S3_INCOMING_BUCKET``), read where they are, as the
   version ``/complete`` recorded (``pinned_key``);
3. ``_screen_stored`` runs the checks (``msc3870.screening``) on the bytes that will be
   served;
4. ``_complete`` or ``_reject`` writes the verdict, with everything else the screening
   learnt, in the one UPDATE that moves the row out of the state it is held in (``Held``);
   a pinned version is then copied to the media's key in the background
   (``msc3870.served_copies``).

Why bytes written to the upload URL after ``/complete`` are never served unchecked:

- Where the store keeps versions: ``/complete`` records the ``VersionId`` of the object it
  looked at (``Media.incoming_version``), which the store assigns and a PUT cannot choose:
  a later PUT to the URL makes another version and changes none. The checks read that
  version only, the verdict serves it (``incoming/<id>@<version>``: every read, presigned
  GET and copy names it), and the background copy copies that version and switches the
  row only where it still serves that version. A store that answers no version of its own
  (S3's "null", versioning off or suspended) is never pinned: its bytes are moved.
- Else: the checks read the copy at ``served_key``, which no upload URL can write, and the
  verdict serves that key. The copy is pinned to the ETag ``/complete`` read
  (``if_match``) only to spare a HEAD: an ETag is an MD5 for a single PUT, and two objects
  can share one, so nothing here rests on it. Checks that read the incoming object
  instead, pinned by its ETag, while it is copied would rest on it; so would serving the
  incoming object. The copy is most of the wait before a URL upload's first download
  (``move_ms`` on the screening's line; ``docs/benchmarks.md``, *Time to downloadable*),
  which is what serving the version takes off the path.

Every step is a compare-and-set or safe to repeat, so a redelivered or re-dispatched task
does no harm. A screening that fails (storage down, a check's own error) records why on
the row and leaves it where it was: the stuck sweep screens it again.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from . import cleanup, lifecycle, logs, metrics, queue, storage_keys
from .conf import app_settings
from .content_types import UNKNOWN_TYPE
from .errors import Codes
from .models import Media, MediaState, UploadMethod
from .screening import (
    QuotaClaim,
    Rejection,
    ScreeningContext,
    enforce_user_quota,
    metadata_checks,
    run_checks,
)
from .signals import send_state_signal
from .sniffing import SNIFF_BYTES
from .stores import MediaStore, ObjectInfo, SourceChanged, get_store

log = logging.getLogger(__name__)
S = MediaState


class Outcome(enum.StrEnum):
    """What one screening did."""

    COMPLETE = "complete"
    REJECTED = "rejected"
    #: The row was not, or no longer, this screening's to decide (another won the race).
    SKIPPED = "skipped"
    #: A PUT is still streaming the bytes: nothing to screen yet.
    RECEIVING = "receiving"
    #: No verdict: the reason is recorded on the row, and the row screened again later.
    FAILED = "failed"


@dataclass(frozen=True)
class Held:
    """How a screening holds its row, and what it writes with the verdict.

    ``source``: the state the row is held in (PROCESSING; PENDING for a PUT decided in
    one write, whose bytes were stored without a claim). ``claim``: a condition the row
    must still meet (a PUT's own claim: a newer one may hold the id since). ``fields``:
    written in the update that decides (the bytes a request stored, what the move learnt).
    ``attempt_counted``: a task counts its attempt before it starts (it may die); in this
    process the count goes with the verdict."""

    source: str = S.PROCESSING
    claim: Q | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    attempt_counted: bool = False

    def writes(self, **more: Any) -> dict[str, Any]:
        """The fields of the deciding update."""
        attempts = {} if self.attempt_counted else {"attempts": F("attempts") + 1}
        return {**self.fields, **attempts, **more}


@dataclass(frozen=True)
class StoredBytes:
    """Bytes a request has just stored, not yet on the row: the fields that record them
    (key, size, SHA-256, and the upload's own), and their first bytes as they passed (what
    the checks sniff, not read back from the store)."""

    fields: dict[str, Any]
    first_bytes: bytes


# ---------------------------------------------------------------------------- dispatch


def dispatch(media: Media, *, background: bool = False, incoming: ObjectInfo | None = None) -> None:
    """Queue the screening of ``media`` once the transaction that claimed it commits.

    If the broker refuses, the reason is kept on the row: media left in PROCESSING is
    queued again by the stuck sweep, so an outage delays screening but loses nothing.
    Without a broker, screening runs in this thread, or with ``background`` (the caller
    answers before the verdict) on the process's background pool. ``incoming``: the upload
    URL's object as /complete read it, which spares the screening a look at it."""

    def refused(exc: Exception) -> None:
        Media.objects.filter(pk=media.pk).update(last_error=f"queueing failed: {exc}"[:1000])

    queue.send(
        "msc3870.screen_media",
        media.pk,
        kwargs={"incoming": asdict(incoming) if incoming else None},
        here=InProcessScreening(media, incoming) if screens_in_request() else None,
        background=background,
        refused=refused,
    )


def screens_in_request() -> bool:
    """Whether screening runs in the process that asks for it (no broker)."""
    return not queue.has_broker()


@dataclass(frozen=True)
class InProcessScreening:
    """The screening of a row at hand, run in this process: no query to read it again."""

    media: Media
    incoming: ObjectInfo | None = None

    def __call__(self) -> None:
        screen_here(self.media, incoming=self.incoming)


def screen(pk: int, incoming: ObjectInfo | None = None) -> Outcome:
    """The screening task's body: screen one row in PROCESSING. Its attempt is counted
    first (a task may die)."""
    media = Media.objects.filter(pk=pk).first()
    if media is None or media.state != S.PROCESSING:
        return Outcome.SKIPPED
    Media.objects.filter(pk=pk).update(attempts=F("attempts") + 1)
    return screen_row(media, Held(attempt_counted=True), incoming=incoming)


def screen_here(
    media: Media,
    held: Held = Held(),
    *,
    stored: StoredBytes | None = None,
    incoming: ObjectInfo | None = None,
) -> Outcome:
    """Screen a row at hand in this process (no broker). If the screening fails, the
    bytes a request stored are recorded alone (a PENDING row moves to PROCESSING, so that
    the stuck sweep screens them and never takes them for an upload still arriving) and
    the failure with them."""
    try:
        return screen_row(media, held, stored=stored, incoming=incoming)
    except Exception as exc:
        log.exception("Screening of %s failed", media.mxc_uri)
        if stored is not None:
            if held.source == S.PROCESSING:
                recorded = lifecycle.update_if_state(
                    media, S.PROCESSING, extra_where=held.claim, **stored.fields
                )
            else:
                recorded = lifecycle.transition(
                    media, [held.source], S.PROCESSING, extra_where=held.claim, **stored.fields
                )
            if not recorded:
                return Outcome.SKIPPED
        record_failure(media.pk, exc)
        return Outcome.FAILED


def record_failure(pk: int, exc: BaseException) -> None:
    """Background work failed (retryable): keep the reason on the row, not only in logs."""
    Media.objects.filter(pk=pk).update(last_error=f"{type(exc).__name__}: {exc}"[:1000])


# ---------------------------------------------------------------------------- screening


def screen_row(
    media: Media,
    held: Held = Held(),
    *,
    stored: StoredBytes | None = None,
    incoming: ObjectInfo | None = None,
) -> Outcome:
    """Screen a row already read, held as ``held`` says; ``stored``: bytes this request
    has just stored; ``incoming``: the upload URL's object as /complete read it. Timed,
    counted by outcome and written as one line (media id, user, the state it left)."""
    fields = {"media_id": media.media_id, "user": media.user_id}
    if media.is_remote:
        fields["server_name"] = media.server_name
    outcome = Outcome.FAILED
    step: logs.Step | None = None
    try:
        with logs.step("screening", **fields) as step:
            outcome = _screen_row(media, held, stored, incoming)
            step.fields.update(outcome=str(outcome), state=media.state)
            return outcome
    finally:
        if step is not None:
            metrics.screened(outcome, step.seconds)


def _screen_row(
    media: Media, held: Held, stored: StoredBytes | None, incoming: ObjectInfo | None
) -> Outcome:
    if media.state != held.source:
        return Outcome.SKIPPED
    if stored is not None:
        held = Held(held.source, held.claim, {**held.fields, **stored.fields}, held.attempt_counted)
        for name, value in stored.fields.items():
            setattr(media, name, value)
    store = get_store()
    store_sha256 = None
    if not media.storage_key:
        if media.upload_method != UploadMethod.URL:
            return Outcome.RECEIVING  # a PUT is still streaming its body
        if pinned := pinned_key(media, store):
            # The version /complete looked at is checked and served where it is: a later
            # PUT to the URL makes another version, never changes this one.
            media.storage_key = pinned
            held = _with(held, {"storage_key": pinned})
        else:
            # On the screening's line as move_ms: the copy out of the URL's reach is most
            # of the wait between a URL upload's /complete and its first download.
            with logs.step("move"):
                moved = _move_out_of_reach(media, store, held, incoming)
            if isinstance(moved, Outcome):
                return moved
            held, store_sha256 = moved
    try:
        return _screen_stored(media, store, held, stored, store_sha256)
    except Exception:
        # No verdict: what the move learnt is kept for the attempt that screens these bytes
        # again (the incoming object, and the type its PUT declared, are gone).
        if learnt := {k: held.fields[k] for k in MOVE_FIELDS if k in held.fields}:
            lifecycle.update_if_state(media, S.PROCESSING, **learnt)
        raise


#: What moving a URL upload's bytes learns, recorded with the verdict.
MOVE_FIELDS = ("declared_content_type", "storage_key")

#: ``Media.storage_key``'s length: a version id that does not fit is moved instead.
STORAGE_KEY_MAX = 512


def pinned_key(media: Media, store: MediaStore) -> str | None:
    """The key of the version of the upload URL's object that /complete looked at, if the
    store keeps versions and it recorded one; else None (the bytes are moved)."""
    if not (store.keeps_versions and media.incoming_version):
        return None
    key = storage_keys.pinned(media.incoming_key, media.incoming_version)
    return key if len(key) <= STORAGE_KEY_MAX else None


def _move_out_of_reach(
    media: Media, store: MediaStore, held: Held, incoming: ObjectInfo | None
) -> tuple[Held, str | None] | Outcome:
    """Move a URL upload's bytes to its served key, which no URL can write, before anyone
    looks at them: the ``Held`` that records what the move learnt and the SHA-256 the store
    computed while copying (or None), or the outcome if it ends the screening here.

    The object as /complete read it spares a HEAD: only that version is copied
    (``if_match``), and one written over (or moved by an earlier attempt) since is looked
    at again. A store without versions is looked at anyway (a stat, on the local disk)."""
    learnt: dict[str, Any] = {}
    store_sha256 = None
    if incoming is not None and not incoming.etag:
        incoming = None
    for looked_again in (False, True):
        if incoming is None or looked_again:
            incoming = store.head(media.incoming_key)
        if incoming is None:
            break
        if incoming.content_type and not media.declared_content_type:
            # S3 keeps the Content-Type of the client's PUT with the object.
            media.declared_content_type = learnt["declared_content_type"] = incoming.content_type[
                :255
            ]
        if incoming.size > app_settings.MAX_UPLOAD_SIZE:
            # Refused from its HEAD: an oversized object is never copied.
            return _reject(media, too_large(incoming.size), _with(held, learnt))
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
        nothing = Rejection("Nothing was uploaded", errcode=Codes.NOT_YET_UPLOADED)
        return _reject(media, nothing, _with(held, learnt))
    # (else: an earlier attempt moved the bytes and died before deciding). The key is
    # recorded with the verdict: the id's keys are known without it (``object_keys``).
    media.storage_key = learnt["storage_key"] = media.served_key
    return _with(held, learnt), store_sha256


def _with(held: Held, fields: dict[str, Any]) -> Held:
    return Held(held.source, held.claim, {**held.fields, **fields}, held.attempt_counted)


def _screen_stored(
    media: Media,
    store: MediaStore,
    held: Held,
    stored: StoredBytes | None,
    store_sha256: str | None,
) -> Outcome:
    """Run the checks on the bytes at ``media.storage_key``; one write decides."""
    if stored is not None:
        # Stored by this request: its size and first bytes were seen as they passed.
        found: tuple[ObjectInfo, bytes] | None = (
            ObjectInfo(
                size=stored.fields["size"], content_type=media.declared_content_type or None
            ),
            stored.first_bytes,
        )
    else:
        # Its size and first bytes (for the type) in one request where the store can (S3:
        # one ranged GET, not a HEAD and then a GET).
        found = store.head_with_prefix(media.storage_key, SNIFF_BYTES)
    if found is None:
        missing = Rejection("The stored object is missing", errcode=Codes.UNKNOWN)
        return _reject(media, missing, held)
    info, prefix = found
    pinned = storage_keys.is_pinned_incoming(media.storage_key)
    if pinned and info.content_type and not media.declared_content_type:
        # S3 keeps the Content-Type of the client's PUT with each version.
        media.declared_content_type = info.content_type[:255]
        held = _with(held, {"declared_content_type": media.declared_content_type})
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
        return _reject(media, rejection, held)
    return _complete(media, findings, held, twins=ctx.twins, quota=ctx.quota_claim)


def reject_before_answer(media: Media, info: ObjectInfo, prefix: bytes | None = None) -> bool:
    """The checks that need only metadata and a ranged read (``metadata_checks``), run on
    the incoming object of a URL upload before ``/complete`` answers. True if they
    rejected it (then its bytes are deleted, never copied, and the row is REJECTED).
    They run again on the copy that will be served: the client can still overwrite the
    incoming object until it is moved. ``prefix``: its first bytes, if already read."""
    store = get_store()
    key = pinned_key(media, store) or media.incoming_key
    ctx = ScreeningContext(media=media, store=store, key=key, info=info, _prefix=prefix)
    try:
        for check in metadata_checks():
            check(ctx)
    except Rejection as rejection:
        _reject(media, rejection, Held(attempt_counted=True))
        return True
    return False


def too_large(size: int) -> Rejection:
    limit = app_settings.MAX_UPLOAD_SIZE
    return Rejection(
        f"Upload is {size} bytes, over the limit of {limit}", errcode=Codes.TOO_LARGE, status=413
    )


# ---------------------------------------------------------------------------- verdicts


def _complete(
    media: Media,
    findings: dict[str, object],
    held: Held,
    *,
    twins: bool | None = None,
    quota: QuotaClaim | None = None,
) -> Outcome:
    """The held state -> COMPLETE; identical content already served is stored once.
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
            # A version still served from the upload URL's bucket is copied to its own
            # media's key, then deleted with every version of that key: never shared.
            .exclude(storage_key__startswith=storage_keys.INCOMING_PREFIX)
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
                key = donor.storage_key if donor else own_key
                won = _mark_complete(media, key, findings, held)
        except Rejection as rejection:
            # Decided under the lock; the row is still held (the transaction rolled
            # back), so it is rejected as a failed check would be.
            return _reject(media, rejection, held)
    else:
        # No quota and nothing to share (the common case): no lock, no transaction.
        won = _mark_complete(media, own_key, findings, held)
    if not won:
        return Outcome.SKIPPED
    _completed(media, own_key)
    return Outcome.COMPLETE


def _completed(media: Media, own_key: str) -> None:
    """What follows a won COMPLETE: ``own_key`` is where the screening found the bytes."""
    if not media.is_fetched:
        metrics.uploaded(media.upload_method, media.size or 0)
    if media.storage_key != own_key:
        get_store().delete(own_key)  # a fresh key of this media only: nobody else serves it
    elif storage_keys.is_pinned_incoming(own_key):
        # Served already; the copy to the media bucket is off the uploader's path.
        queue.send("msc3870.copy_to_served_key", media.pk, background=True)
    send_state_signal(S.COMPLETE, [media.pk])


def _mark_complete(media: Media, storage_key: str, findings: dict[str, object], held: Held) -> bool:
    values = held.writes(
        **findings, completed_at=timezone.now(), last_error="", storage_key=storage_key
    )
    return lifecycle.transition(
        media, [held.source], S.COMPLETE, send_signal=False, extra_where=held.claim, **values
    )


def _reject(media: Media, rejection: Rejection, held: Held) -> Outcome:
    """The held state -> REJECTED, the bytes deleted before the uploader hears of it."""
    reason = {
        "rejection_errcode": str(rejection.errcode),
        "rejection_status": rejection.status,
        "rejection_reason": rejection.reason[:1000],
    }
    store = get_store()
    if held.source == S.PENDING:
        # The request's own bytes go first; the id's other keys only once the row is
        # ours to reject (until then a concurrent /complete may be moving its bytes).
        store.delete(media.storage_key)
        values = held.writes(**reason)
        if not lifecycle.transition(
            media, [held.source], S.REJECTED, extra_where=held.claim, **values
        ):
            return Outcome.SKIPPED
        try:
            cleanup.delete_objects(media.pk)
        except Exception as exc:  # the verdict stands; the cleanup sweep deletes them later
            log.warning("Could not delete the objects of rejected %s: %s", media.mxc_uri, exc)
    else:
        # Delete first, while the row is still PROCESSING (never served): by the time the
        # uploader hears of the rejection, the bytes are gone. These keys are this media's
        # own (sharing happens only on completion). If the storage fails, the task is
        # retried.
        store.delete_many(sorted(cleanup.keys_of(media)))
        values = held.writes(objects_deleted_at=timezone.now(), **reason)
        if not lifecycle.transition(
            media, [held.source], S.REJECTED, extra_where=held.claim, **values
        ):
            return Outcome.SKIPPED
    log.info("Rejected %s: %s", media.mxc_uri, rejection.reason)
    return Outcome.REJECTED
