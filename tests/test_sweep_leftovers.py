"""Issue 8, item 15 leftovers: the orphan sweep deletes what killed uploads leave and
reaches every key, however many wait before them."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from django.conf import settings

from msc3870 import maintenance
from msc3870.models import Media, MediaState
from msc3870.stores import get_store

from .helpers import MatrixClient, media_of

S = MediaState


def _age(path: Path, seconds: float) -> None:
    """Set a file's modification time ``seconds`` in the past."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_partial_files_of_killed_uploads_are_swept_after_an_hour() -> None:
    root = Path(settings.MEDIA_DIR)
    (root / "media" / "ab").mkdir(parents=True)
    (root / "incoming").mkdir(parents=True)
    # What a process killed with SIGKILL inside LocalMediaStore.write_stream leaves.
    stale = root / "media" / "ab" / ".abcdef.0123456789abcdef.part"
    stale_incoming = root / "incoming" / ".xyz.0123456789abcdef.part"
    young = root / "media" / "ab" / ".abghij.fedcba9876543210.part"
    for path in (stale, stale_incoming, young):
        path.write_bytes(b"half a body")
    _age(stale, 2 * 3600)
    _age(stale_incoming, 2 * 3600)
    _age(young, 60)  # may still be streaming in a live process

    maintenance.delete_orphaned_uploads()

    assert not stale.exists()
    assert not stale_incoming.exists()
    assert young.exists()


def test_orphan_sweep_resumes_past_its_window(alice: MatrixClient) -> None:
    """Waiting uploads filling the first ``limit`` keys must not hide later orphans."""
    created = [alice.create() for _ in range(3)]
    medias = sorted((media_of(c["content_uri"]) for c in created), key=lambda m: m.incoming_key)
    store = get_store()
    for media in medias:
        store.write_stream(media.incoming_key, io.BytesIO(b"bytes"), max_size=100)
    # The last key in listing order belongs to media no longer waiting for it.
    orphan = medias[-1]
    Media.objects.filter(pk=orphan.pk).update(state=S.EXPIRED)

    assert maintenance.delete_orphaned_uploads(limit=2) == 0  # two waiting keys fill it
    assert maintenance.delete_orphaned_uploads(limit=2) == 1  # resumes after them
    assert store.head(orphan.incoming_key) is None
    for waiting in medias[:-1]:
        assert store.head(waiting.incoming_key) is not None
    # The walk starts again from the beginning once it reached the end.
    assert maintenance.delete_orphaned_uploads(limit=2) == 0
    for waiting in medias[:-1]:
        assert store.head(waiting.incoming_key) is not None
