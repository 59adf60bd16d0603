"""Post-upload checks.

A check is a callable ``check(ctx: ScreeningContext) -> None`` named by import string in
``MSC3870["CHECKS"]``. It passes by returning, refuses the upload by raising ``Rejection``
(``msc3870.errors.Rejection``, importable from here: the uploader is told its reason,
errcode, a ``msc3870.errors.Codes``, and status), and fails by raising anything else:
failures are retried and recorded, never treated as a pass. Checks read the object at
``ctx.key``, which no upload URL can write, and record what they learn in
``ctx.findings``; the findings are written to the row in the same update that completes
it.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.db import models

from .conf import app_settings
from .content_types import UNDECLARED_TYPES, UNKNOWN_TYPE, base_type, types_agree
from .errors import Codes, Rejection
from .sniffing import SNIFF_BYTES, sniff

if TYPE_CHECKING:
    from .models import Media
    from .stores import MediaStore, ObjectInfo


@dataclass(frozen=True)
class QuotaClaim:
    """An upload's claim on its user's quota, decided when it completes."""

    user_id: str
    size: int
    quota: int


@dataclass
class ScreeningContext:
    media: Media
    store: MediaStore
    key: str
    info: ObjectInfo
    findings: dict[str, Any] = field(default_factory=dict)
    _prefix: bytes | None = None
    #: Whether other media has the same SHA-256 (None: not asked yet).
    twins: bool | None = None
    #: The SHA-256 (hex) the store computed while copying the bytes here, if it did.
    store_sha256: str | None = None
    #: Set by ``read_whole``: the object's SHA-256 and clamd's verdict (when scanned).
    whole_sha256: str | None = None
    scanned: bool = False
    scan_verdict: str | None = None

    def read_whole(self) -> None:
        """Read the object once, in large chunks, feeding the SHA-256 and (when
        ``check_clamav`` will run) clamd in the same pass: no byte is read twice."""
        if self.whole_sha256 is not None:
            return
        scan = None
        if app_settings.CLAMAV_URL and check_clamav in app_settings.CHECKS:
            from .clamav import ClamdStream

            scan = ClamdStream(app_settings.CLAMAV_URL, app_settings.CLAMAV_TIMEOUT_SECONDS)
        digest = hashlib.sha256()
        try:
            for chunk in self.store.read_whole(self.key):
                digest.update(chunk)
                if scan is not None:
                    scan.send(chunk)
        except BaseException:
            if scan is not None:
                scan.close()
            raise
        if scan is not None:
            self.scan_verdict = scan.verdict()
            self.scanned = True
        self.whole_sha256 = digest.hexdigest()

    def prefix_sha256(self) -> str:
        """The SHA-256 of the first ``SNIFF_BYTES`` (all of a shorter object); blank if
        the prefix at hand is not exactly those bytes."""
        prefix = self.prefix()[:SNIFF_BYTES]
        if len(prefix) != min(self.info.size, SNIFF_BYTES):
            return ""
        return hashlib.sha256(prefix).hexdigest()

    def may_have_twins(self) -> bool:
        """Whether other media may hold these bytes: the same size and first bytes. Those
        of them not hashed yet are hashed now, so that ``has_twins`` can tell; each is
        hashed once, its SHA-256 recorded on every row serving its key."""
        from . import sql
        from .models import BlockedHash, Media

        prefix_sha256 = self.prefix_sha256()
        if not prefix_sha256:
            return True  # cannot tell: hash
        possible = Media.objects.possible_twins(self.info.size, prefix_sha256).exclude(
            pk=self.media.pk
        )
        unhashed = (
            possible.filter(sha256="", objects_deleted_at__isnull=True)
            .exclude(storage_key="")
            .exclude(storage_key=self.key)
            .values_list("storage_key", flat=True)
            .distinct()
        )
        for key in unhashed:
            record_sha256(self.store, key)  # None: deleted since, nothing to share or match
        # Blocked content counts as a possible twin: it must be hashed to be matched, and
        # the block outlives the media it was found in.
        blocked = BlockedHash.objects.active().filter(
            size=self.info.size, prefix_sha256=prefix_sha256
        )
        return sql.any_exists(possible, blocked)

    #: The quota to decide again at completion, under the user's lock (check_user_quota).
    quota_claim: QuotaClaim | None = None

    @property
    def declared_type(self) -> str:
        return self.media.declared_content_type or self.info.content_type or ""

    #: Whether a moderator blocked this content's SHA-256 (None: not asked yet).
    hash_blocked: bool | None = None

    def has_twins(self) -> bool:
        """Whether other media has the same content, asked once (with ``hash_is_blocked``):
        most content is new, and then neither the twins' states nor deduplication needs
        another query."""
        sha256 = self.findings.get("sha256")
        if not sha256:
            return False
        if self.twins is None:
            self._look_up_hash(sha256)
        return bool(self.twins)

    def hash_is_blocked(self) -> bool:
        """Whether the block list (``BlockedHash``) holds this content's SHA-256."""
        sha256 = self.findings.get("sha256")
        if not sha256:
            return False
        if self.hash_blocked is None:
            self._look_up_hash(sha256)
        return bool(self.hash_blocked)

    def _look_up_hash(self, sha256: str) -> None:
        from . import sql

        twins, blocked = sql.twin_and_block(sha256, self.media.pk)
        if self.twins is None:
            self.twins = twins
        self.hash_blocked = blocked

    def prefix(self) -> bytes:
        """The first bytes of the object, read once with a ranged read."""
        if self._prefix is None:
            self._prefix = self.store.read_prefix(self.key, SNIFF_BYTES)
        return self._prefix


def check_size(ctx: ScreeningContext) -> None:
    limit = app_settings.MAX_UPLOAD_SIZE
    if ctx.info.size > limit:
        raise Rejection(
            f"Upload is {ctx.info.size} bytes, over the limit of {limit}",
            errcode=Codes.TOO_LARGE,
            status=413,
        )
    ctx.findings["size"] = ctx.info.size


def check_content_type(ctx: ScreeningContext) -> None:
    """Decide the served type from the bytes, the declaration and the type lists."""
    candidates = sniff(ctx.prefix())
    declared = ctx.declared_type
    declared_base = base_type(declared)
    sniffed = candidates[0] if candidates else ""
    if declared_base in UNDECLARED_TYPES:
        served = sniffed or UNKNOWN_TYPE
    elif not candidates or types_agree(declared_base, candidates):
        served = declared
    else:
        policy = app_settings.TYPE_MISMATCH
        if policy == "reject":
            raise Rejection(
                f"Declared type {declared_base} does not match the content ({sniffed})",
                errcode=Codes.INVALID_PARAM,
                status=400,
            )
        served = declared if policy == "declared" else sniffed
    served_base = base_type(served)
    if not any(fnmatch.fnmatch(served_base, p) for p in app_settings.ALLOWED_CONTENT_TYPES) or any(
        fnmatch.fnmatch(served_base, p) for p in app_settings.DENIED_CONTENT_TYPES
    ):
        raise Rejection(f"Content of type {served_base} is not allowed here")
    ctx.findings["sniffed_content_type"] = sniffed
    ctx.findings["content_type"] = served


def record_sha256(store: MediaStore, key: str) -> str | None:
    """Hash the object at ``key`` and record the SHA-256 on every row serving it that
    has none; None if there is no object."""
    from .models import Media

    digest = hashlib.sha256()
    try:
        for chunk in store.read_whole(key):
            digest.update(chunk)
    except FileNotFoundError:
        return None
    sha256 = digest.hexdigest()
    Media.objects.filter(storage_key=key, sha256="").update(sha256=sha256)
    return sha256


def check_sha256(ctx: ScreeningContext) -> None:
    """The SHA-256 that deduplication and the block list match on. Known already if this
    server hashed the bytes while receiving them, or the store while copying them
    (CopyObject with ChecksumAlgorithm). Else, with ``SHA256_WHEN`` "needed", only bytes
    that other media may hold (the same size and first bytes) are read and hashed:
    identical bytes always share both, so no twin is missed, and unique content (most
    of it) is never read whole."""
    ctx.findings["prefix_sha256"] = ctx.prefix_sha256()
    if ctx.media.sha256:
        ctx.findings["sha256"] = ctx.media.sha256
        return
    if ctx.store_sha256:
        ctx.findings["sha256"] = ctx.store_sha256
        return
    if app_settings.SHA256_WHEN == "needed" and not ctx.may_have_twins():
        ctx.twins = False
        return
    ctx.read_whole()
    ctx.findings["sha256"] = ctx.whole_sha256


def check_not_blocked(ctx: ScreeningContext) -> None:
    """Refuse content a moderator has blocked (the block list: ``BlockedHash``), or
    quarantined or rejected (other media with the same SHA-256 in those states)."""
    from .models import Media, MediaState

    sha256 = ctx.findings.get("sha256")
    if not sha256:
        return
    if ctx.hash_is_blocked():
        raise Rejection("This content has been blocked by a moderator")
    if not ctx.has_twins():
        return
    blocked = (
        Media.objects.filter(sha256=sha256)
        .exclude(pk=ctx.media.pk)
        .filter(
            models.Q(state=MediaState.QUARANTINED)
            | models.Q(state=MediaState.REJECTED, moderated_by__gt="")
        )
        .exists()
    )
    if blocked:
        raise Rejection("This content has been blocked by a moderator")


def check_user_quota(ctx: ScreeningContext) -> None:
    """Refuse an upload that would take its user past ``USER_QUOTA_BYTES`` of live media.

    This early look spares the later checks (a virus scan) for uploads already over; it
    is not the decision. Uploads of one user checked at the same time all see the same
    total here, so the quota is decided again by ``enforce_user_quota`` when the upload
    completes, in the transaction and under the lock that complete it."""
    quota = app_settings.USER_QUOTA_BYTES
    if quota is None or ctx.media.is_fetched:
        return  # another server's media, or a preview's image, is nobody's upload here
    claim = QuotaClaim(user_id=ctx.media.user_id, size=ctx.info.size, quota=quota)
    _refuse_over_quota(claim, exclude_pk=ctx.media.pk)
    ctx.quota_claim = claim


def enforce_user_quota(claim: QuotaClaim, *, exclude_pk: int) -> None:
    """Decide ``claim`` for good. Call it inside the transaction that completes the upload:
    the user's lock, taken here, is held until that transaction ends, so racing completes
    of one user are decided one after the other, each counting every upload completed
    before it (media still being checked is counted once it is decided, under this lock).
    Raises ``Rejection``."""
    from .sql import lock_uploader

    lock_uploader(claim.user_id)
    _refuse_over_quota(claim, exclude_pk=exclude_pk)


def _refuse_over_quota(claim: QuotaClaim, *, exclude_pk: int) -> None:
    from .models import Media

    used = (
        Media.objects.counted_for_quota(claim.user_id)
        .exclude(pk=exclude_pk)
        .aggregate(total=models.Sum("size"))["total"]
        or 0
    )
    if used + claim.size > claim.quota:
        raise Rejection(
            f"Storage quota exceeded: {used} of {claim.quota} bytes used, upload is {claim.size}",
            errcode=Codes.TOO_LARGE,
            status=413,
        )


def check_clamav(ctx: ScreeningContext) -> None:
    """Scan with clamd (INSTREAM) when ``CLAMAV_URL`` is set; a finding rejects."""
    url = app_settings.CLAMAV_URL
    if not url:
        return
    if not ctx.scanned and ctx.whole_sha256 is None:
        ctx.read_whole()  # scans, and hashes in the same pass
        ctx.findings.setdefault("sha256", ctx.whole_sha256)
    if ctx.scanned:
        verdict = ctx.scan_verdict
    else:
        from .clamav import scan_stream

        verdict = scan_stream(
            url, ctx.store.read_whole(ctx.key), app_settings.CLAMAV_TIMEOUT_SECONDS
        )
    if verdict is not None:
        raise Rejection(f"Upload rejected by the virus scanner: {verdict}")


def run_checks(ctx: ScreeningContext) -> dict[str, Any]:
    """Run every configured check in order; return the findings. Raises ``Rejection``."""
    for check in app_settings.CHECKS:
        check(ctx)
    return ctx.findings


def metadata_checks() -> list[Callable[[ScreeningContext], None]]:
    """The configured checks that need only the object's metadata (HEAD) and its first
    bytes: ``/complete`` runs these before it answers (COMPLETE_WAITS_FOR_CHECKS off);
    every check, these again included, runs on the copy that will be served."""
    return [check for check in app_settings.CHECKS if check in METADATA_CHECKS]


METADATA_CHECKS = frozenset({check_size, check_content_type, check_user_quota})
