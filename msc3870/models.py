"""Media rows, local access tokens and the moderators' audit trail.

State changes never happen in ``save()``: they go through ``msc3870.lifecycle``, which
updates the row with a compare-and-set on ``state``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.db import models
from django.utils import timezone

from . import storage_keys


class MediaState(models.TextChoices):
    PENDING = "pending", "Pending (id created, waiting for bytes)"
    PROCESSING = "processing", "Processing (bytes arrived, being checked)"
    COMPLETE = "complete", "Complete (served)"
    REJECTED = "rejected", "Rejected (failed a check or by a moderator)"
    EXPIRED = "expired", "Expired (no upload before unused_expires_at)"
    QUARANTINED = "quarantined", "Quarantined (held by a moderator)"
    DELETED = "deleted", "Deleted (tombstone)"


S = MediaState

#: States whose bytes may be needed again; any other state has objects to delete.
LIVE_STATES = frozenset({S.PENDING, S.PROCESSING, S.COMPLETE, S.QUARANTINED})
#: The states a download waits through (an id that expires unused stops waiting at once).
AWAITING_UPLOAD_STATES = frozenset({S.PENDING, S.PROCESSING})
#: The states whose bytes count against their uploader's quota.
QUOTA_STATES = frozenset({S.COMPLETE, S.QUARANTINED})
#: Tombstones: rows kept after their objects went, so that an id is never reused.
TOMBSTONE_STATES = frozenset({S.EXPIRED, S.DELETED, S.REJECTED})


class UploadMethod(models.TextChoices):
    URL = "url", "Upload URL + /complete"
    PUT = "put", "PUT to the media server"
    POST = "post", "One-shot POST"
    REMOTE = "remote", "Fetched from another server"
    PREVIEW = "preview", "Fetched for a URL preview"


class MediaQuerySet(models.QuerySet["Media"]):
    """The filters the app applies in more than one place, each written once."""

    def live(self) -> MediaQuerySet:
        return self.filter(state__in=LIVE_STATES)

    def dead_uncleaned(self) -> MediaQuerySet:
        """Media that will never be served again whose objects are not deleted yet."""
        return self.filter(objects_deleted_at__isnull=True).exclude(state__in=LIVE_STATES)

    def awaiting_upload(self) -> MediaQuerySet:
        return self.filter(state__in=AWAITING_UPLOAD_STATES)

    def counted_for_quota(self, user_id: str) -> MediaQuerySet:
        return self.filter(user_id=user_id, state__in=QUOTA_STATES)

    def remote(self) -> MediaQuerySet:
        """Other servers' media (fetched here)."""
        return self.filter(upload_method=UploadMethod.REMOTE)

    def possible_twins(self, size: int, prefix_sha256: str) -> MediaQuerySet:
        """Media that may hold the same bytes as content of ``size`` bytes whose first
        bytes hash to ``prefix_sha256``: the same size and first bytes, or first bytes not
        recorded but a SHA-256 that is (hashed before first bytes were recorded)."""
        return self.filter(size=size).filter(
            models.Q(prefix_sha256=prefix_sha256)
            | (models.Q(prefix_sha256="") & ~models.Q(sha256=""))
        )


class Media(models.Model):
    """One mxc:// id and what is known about its bytes."""

    server_name = models.CharField(max_length=255)
    media_id = models.CharField(max_length=64)
    user_id = models.CharField(max_length=255, help_text="Matrix user who created the id.")
    state = models.CharField(max_length=16, choices=MediaState.choices, default=MediaState.PENDING)
    created_at = models.DateTimeField(default=timezone.now)
    state_changed_at = models.DateTimeField(default=timezone.now)
    unused_expires_at = models.DateTimeField(
        help_text="The id (and its upload URL) is dead after this unless bytes arrived."
    )
    upload_method = models.CharField(max_length=8, choices=UploadMethod.choices, blank=True)
    declared_content_type = models.CharField(max_length=255, blank=True)
    sniffed_content_type = models.CharField(max_length=255, blank=True)
    content_type = models.CharField(
        max_length=255, blank=True, help_text="The type downloads are served with."
    )
    filename = models.CharField(max_length=255, blank=True)
    size = models.BigIntegerField(null=True, blank=True)
    sha256 = models.CharField(
        max_length=64,
        blank=True,
        help_text="SHA-256 of the bytes; blank where nothing else could share them "
        "(MSC3870['SHA256_WHEN'] = 'needed').",
    )
    prefix_sha256 = models.CharField(
        max_length=64,
        blank=True,
        help_text="SHA-256 of the first 8 KiB: with the size, what identical bytes share.",
    )
    storage_key = models.CharField(
        max_length=512,
        blank=True,
        help_text="Key of the served bytes: written only by the server, never by a URL. "
        "incoming/<id>@<version>: one version of the upload URL's object, served until it "
        "is copied to media/ (S3_INCOMING_BUCKET).",
    )
    # db_default too: rows inserted by code that does not know the column (a node of the
    # previous release during a rolling upgrade, raw SQL) get a blank one.
    incoming_version = models.CharField(
        max_length=1024,
        blank=True,
        default="",
        db_default="",
        help_text="The version of the upload URL's object /complete looked at, where the "
        "store keeps versions: the only bytes the checks read and downloads serve; blank: "
        "none recorded.",
    )
    incoming_copied_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the row switched from a version of its upload URL's object to its "
        "copy, while those versions wait to be deleted (downloads of them may be in flight); "
        "empty: none wait.",
    )
    processing_started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    rejection_errcode = models.CharField(max_length=64, blank=True)
    # The HTTP status the uploader gets (a check's ``Rejection.status``); empty: the
    # errcode's usual one.
    rejection_status = models.PositiveSmallIntegerField(null=True, blank=True)
    rejection_reason = models.TextField(blank=True)
    last_error = models.TextField(blank=True, help_text="Last failure of background work.")
    attempts = models.PositiveIntegerField(default=0, help_text="Screening attempts so far.")
    objects_deleted_at = models.DateTimeField(
        null=True, blank=True, help_text="When storage objects of dead media were deleted."
    )
    moderated_by = models.CharField(max_length=255, blank=True)
    last_accessed_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When it was last served (to the hour; empty: never): the remote cache "
        "evicts the least recently served, and deletion by date spares what is still read.",
    )
    protected = models.BooleanField(
        default=False,
        help_text="Safe from quarantine by user or by content and from deletion by date "
        "(Synapse's safe_from_quarantine); a moderator can still act on it by itself.",
    )

    objects = MediaQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "media"
        # Checked by every moderation action; view/change alone only let staff look.
        permissions = [
            ("moderate_media", "Can moderate media (quarantine, approve, reject, purge)")
        ]
        constraints = [
            models.UniqueConstraint(fields=["server_name", "media_id"], name="msc3870_unique_mxc"),
        ]
        indexes = [
            models.Index(fields=["state", "unused_expires_at"], name="msc3870_state_expiry"),
            models.Index(fields=["user_id", "state"], name="msc3870_user_state"),
            models.Index(fields=["sha256"], name="msc3870_sha256"),
            # Screening asks whether anything else could hold the same bytes.
            models.Index(fields=["size", "prefix_sha256"], name="msc3870_size_prefix"),
            # Cleanup asks which live media still serve a key (identical content is shared).
            models.Index(
                fields=["storage_key"],
                condition=~models.Q(storage_key=""),
                name="msc3870_storage_key",
            ),
            # Dead media whose objects are not deleted yet: the cleanup sweep's work list.
            models.Index(
                fields=["state"],
                condition=models.Q(objects_deleted_at__isnull=True),
                name="msc3870_uncleaned",
            ),
            # Other servers' media by state: the fetches in flight (counted before a new
            # one starts), the cache in least recently served order (eviction) and failed
            # fetches (deleted by the cleanup sweep).
            models.Index(
                fields=["state", "last_accessed_at"],
                condition=models.Q(upload_method="remote"),
                name="msc3870_remote_state_access",
            ),
            # The moderators' list, newest first (the admin orders by created_at, then
            # pk): all media, one state, one uploader. Each page is an index range, never
            # a sort of the table. (On PostgreSQL, filenames also have a trigram index:
            # migration 0013.)
            models.Index(fields=["created_at", "id"], name="msc3870_created"),
            models.Index(fields=["state", "created_at", "id"], name="msc3870_state_created"),
            models.Index(fields=["user_id", "created_at", "id"], name="msc3870_user_created"),
        ]

    def __str__(self) -> str:
        return f"{self.mxc_uri} ({self.state})"

    @property
    def mxc_uri(self) -> str:
        return f"mxc://{self.server_name}/{self.media_id}"

    @property
    def incoming_key(self) -> str:
        """Where an upload URL writes. Only this media id's URL can write it."""
        return storage_keys.incoming(self.media_id)

    @property
    def is_remote(self) -> bool:
        return self.upload_method == UploadMethod.REMOTE

    @property
    def is_preview(self) -> bool:
        """The image of a URL preview (or, without bytes, the row its fetch is waited on)."""
        return self.upload_method == UploadMethod.PREVIEW

    @property
    def is_fetched(self) -> bool:
        """Bytes this server fetched itself, not a user's upload: no upload URL, no quota."""
        return self.is_remote or self.is_preview

    @property
    def served_key(self) -> str:
        """Where the bytes are moved before they are checked; no URL can write it."""
        return storage_keys.served(
            self.server_name, self.media_id, remote=self.is_remote, preview=self.is_preview
        )

    def upload_key(self) -> str:
        """A new key for the bytes of one upload request. Requests racing for one id never
        write the same object; the row records the key of the one that wins, and the
        others delete theirs."""
        return storage_keys.upload(self.served_key)

    @property
    def thumbnail_prefix(self) -> str:
        """The thumbnails of this media are stored under this prefix."""
        return storage_keys.thumbnail_prefix(
            self.server_name, self.media_id, remote=self.is_remote, preview=self.is_preview
        )


class URLPreview(models.Model):
    """The preview of a URL for one time bucket: the answer, cached, and the fetch that
    makes it, claimed once (the unique (URL digest, bucket) picks the request that starts
    it). ``media`` is the row the fetch is waited on, as for another server's media: it
    leaves PROCESSING once the answer is written, and holds the ``og:image`` bytes if the
    page had one (COMPLETE once screened), none otherwise."""

    url = models.TextField()
    url_sha256 = models.CharField(max_length=64, help_text="SHA-256 of the URL (the key).")
    bucket = models.BigIntegerField(
        help_text="The time bucket (seconds since the epoch // URL_PREVIEW_CACHE_SECONDS)."
    )
    media = models.OneToOneField(Media, on_delete=models.CASCADE, related_name="url_preview")
    requester = models.CharField(max_length=255, help_text="The user whose request fetched it.")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(help_text="Answered from this row until then.")
    # The answer: Open Graph fields (with the image's mxc:// if one was kept), or the
    # error clients hear (fixed words; the detail is in ``last_error``).
    og = models.JSONField(null=True, blank=True)
    error_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error_errcode = models.CharField(max_length=64, blank=True)
    error_message = models.CharField(max_length=255, blank=True)
    last_error = models.TextField(blank=True, help_text="Why the fetch failed (moderators).")

    class Meta:
        verbose_name = "URL preview"
        constraints = [
            models.UniqueConstraint(
                fields=["url_sha256", "bucket"], name="msc3870_url_preview_bucket"
            ),
        ]
        indexes = [models.Index(fields=["expires_at"], name="msc3870_url_preview_expiry")]

    def __str__(self) -> str:
        return f"preview of {self.url[:80]} ({self.bucket})"


def digest_token(token: str) -> str:
    """Tokens are stored as SHA-256 digests: a database leak does not leak tokens."""
    return hashlib.sha256(token.encode()).hexdigest()


class AccessToken(models.Model):
    """A local access token (used when no homeserver is configured)."""

    user_id = models.CharField(max_length=255)
    token_digest = models.CharField(max_length=64, unique=True, editable=False)
    label = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked = models.BooleanField(default=False)
    last_used_at = models.DateTimeField(null=True, blank=True)
    is_appservice = models.BooleanField(
        default=False,
        help_text="May act as other users with ?user_id= (application-service masquerading).",
    )
    masquerade_regex = models.CharField(
        max_length=255,
        blank=True,
        help_text=(
            "Users an application-service token may act as (full match on the user id; "
            "users of other servers only if it names their server); empty = nobody."
        ),
    )

    class Meta:
        indexes = [models.Index(fields=["user_id"], name="msc3870_token_user")]

    def __str__(self) -> str:
        return f"token of {self.user_id} ({self.label or self.pk})"

    def is_usable(self) -> bool:
        return not self.revoked and (self.expires_at is None or self.expires_at > timezone.now())


class Uploader(models.Model):
    """One row per Matrix user that uploads: locked to serialise per-user limits."""

    user_id = models.CharField(max_length=255, primary_key=True)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.user_id


class ModerationAction(models.TextChoices):
    QUARANTINE = "quarantine", "Quarantine"
    APPROVE = "approve", "Approve"
    REJECT = "reject", "Reject"
    PURGE = "purge", "Purge"
    # No state change: the record says the state the media was in.
    PROTECT = "protect", "Protect"
    UNPROTECT = "unprotect", "Unprotect"
    # The checks run again: a pass keeps the state, a refusal quarantines.
    RESCREEN = "rescreen", "Re-screen"


class AppendOnlyError(RuntimeError):
    """Raised on an attempt to change or delete a moderation record."""


class ModerationRecordQuerySet(models.QuerySet["ModerationRecord"]):
    """Records cannot be changed or deleted through the default manager; the database
    refuses changes too (migration ``0009``), for anything that reaches the table
    another way. Deleting a media row still sets its records' ``media`` to NULL: Django's
    deletion collector does that through the base manager, a plain queryset, and the
    database allows that one change."""

    def delete(self) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("Moderation records are append-only: they cannot be deleted")

    def update(self, **kwargs: Any) -> int:
        raise AppendOnlyError("Moderation records are append-only: they cannot be changed")

    def bulk_update(self, objs: Any, fields: Any, batch_size: int | None = None) -> int:
        raise AppendOnlyError("Moderation records are append-only: they cannot be changed")


class ModerationRecord(models.Model):
    """One moderator action that changed a media's state. Append-only: written by
    ``msc3870.moderation`` in the same transaction as the transition, never changed.

    ``media`` becomes NULL when the old-tombstone sweep deletes a purged row (the only
    change a record ever sees); ``mxc_uri`` keeps saying which media it was.
    """

    media = models.ForeignKey(
        Media,
        null=True,
        on_delete=models.SET_NULL,
        related_name="moderation_records",
        db_index=False,  # the (media, at) index serves lookups by media
    )
    # mxc:// + server name (255) + / + id (64)
    mxc_uri = models.CharField("mxc URI", max_length=330)
    actor = models.CharField(
        max_length=255, help_text="Who acted: a staff username, a Matrix user id, a process."
    )
    action = models.CharField(max_length=16, choices=ModerationAction.choices)
    reason = models.TextField(blank=True)
    state_before = models.CharField(max_length=16, choices=MediaState.choices)
    state_after = models.CharField(max_length=16, choices=MediaState.choices)
    at = models.DateTimeField("time", default=timezone.now, help_text="When the state changed.")

    objects = ModerationRecordQuerySet.as_manager()

    class Meta:
        ordering = ("-at", "-pk")
        # No add/change/delete permissions exist to be granted: records are written by
        # the domain layer only.
        default_permissions = ("view",)
        indexes = [
            models.Index(fields=["media", "at"], name="msc3870_modrec_media"),
            models.Index(fields=["actor", "at"], name="msc3870_modrec_actor"),
            models.Index(fields=["action", "at"], name="msc3870_modrec_action"),
            models.Index(fields=["at"], name="msc3870_modrec_at"),
        ]

    def __str__(self) -> str:
        return f"{self.action} of {self.mxc_uri} by {self.actor} at {self.at:%Y-%m-%d %H:%M:%S}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AppendOnlyError("Moderation records are append-only: they cannot be changed")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise AppendOnlyError("Moderation records are append-only: they cannot be deleted")


class BlockedHashQuerySet(models.QuerySet["BlockedHash"]):
    def active(self) -> BlockedHashQuerySet:
        return self.filter(unblocked_at__isnull=True)


class BlockedHash(models.Model):
    """Content a moderator blocked by its SHA-256: uploads and fetches of it are refused
    (``check_not_blocked``) whether or not any media with it is still stored.

    A block is lifted by setting ``unblocked_*``, never by deleting the row: the rows are
    the history of blocks. At most one active block per hash (partial unique constraint).
    ``size`` and ``prefix_sha256`` are those of the blocked bytes where known: with
    ``SHA256_WHEN = "needed"`` an upload is hashed only if it may share its bytes with
    something, and these make a blocked hash such a thing.
    """

    sha256 = models.CharField(max_length=64)
    size = models.BigIntegerField(null=True, blank=True)
    prefix_sha256 = models.CharField(max_length=64, blank=True)
    reason = models.TextField(blank=True)
    actor = models.CharField(max_length=255, help_text="Who blocked it.")
    blocked_at = models.DateTimeField(default=timezone.now)
    unblocked_at = models.DateTimeField(null=True, blank=True)
    unblocked_by = models.CharField(max_length=255, blank=True)
    unblock_reason = models.TextField(blank=True)

    objects = BlockedHashQuerySet.as_manager()

    class Meta:
        verbose_name = "blocked hash"
        verbose_name_plural = "blocked hashes"
        ordering = ("-blocked_at", "-pk")
        constraints = [
            models.UniqueConstraint(
                fields=["sha256"],
                condition=models.Q(unblocked_at__isnull=True),
                name="msc3870_blocked_sha256_active",
            ),
        ]
        indexes = [
            # Screening asks whether an upload's size and first bytes are those of
            # blocked content (SHA256_WHEN "needed").
            models.Index(
                fields=["size", "prefix_sha256"],
                condition=models.Q(unblocked_at__isnull=True),
                name="msc3870_blocked_size_prefix",
            ),
        ]

    def __str__(self) -> str:
        state = "blocked" if self.unblocked_at is None else "unblocked"
        return f"{self.sha256} ({state})"


class Heartbeat(models.Model):
    """Proof of life of a process that must keep running, one row each: the periodic
    scheduler (celery beat, or the in-process one) writes ``beat`` every few seconds
    (``msc3870.beat``), and the health check reads it."""

    name = models.CharField(max_length=64, primary_key=True)
    at = models.DateTimeField()

    class Meta:
        default_permissions = ()

    def __str__(self) -> str:
        return f"{self.name} at {self.at:%Y-%m-%d %H:%M:%S}"


class DashboardSnapshot(models.Model):
    """The moderation dashboard's whole-table figures (counts and bytes per state, uploads
    per day, top uploaders), computed by the periodic rollup (``msc3870.dashboard``): a
    view of the dashboard reads this row instead of counting every media row."""

    name = models.CharField(max_length=32, primary_key=True)
    computed_at = models.DateTimeField()
    seconds = models.FloatField(default=0.0, help_text="How long the rollup took.")
    figures = models.JSONField(default=dict)

    class Meta:
        default_permissions = ()

    def __str__(self) -> str:
        return f"{self.name} at {self.computed_at:%Y-%m-%d %H:%M:%S}"

    @property
    def media_count(self) -> int:
        """Media rows counted, in every state."""
        return sum(
            origin["count"]
            for origins in self.figures.get("states", {}).values()
            for origin in origins.values()
        )
