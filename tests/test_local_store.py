"""The local-disk store under races: an object moved away while it is looked at."""

from __future__ import annotations

from pathlib import Path

import pytest

from msc3870.stores import get_store
from msc3870.stores.local import LocalMediaStore


def test_an_object_moved_between_its_size_and_its_first_bytes_is_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Racing /complete calls: one looks at the incoming file while another moves it.
    The look is one open file: it sees the bytes it opened, or no object, never a
    FileNotFoundError (a 500)."""
    store = get_store()
    assert isinstance(store, LocalMediaStore)
    path = store._path("incoming/raced")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"raced bytes")
    real_stat = Path.stat

    def stat_then_moved(self: Path, *args: object, **kwargs: object) -> object:
        result = real_stat(self, *args, **kwargs)
        if self == path:
            path.unlink()  # the other /complete's move
        return result

    monkeypatch.setattr(Path, "stat", stat_then_moved)
    found = store.head_with_prefix("incoming/raced", 8192)
    assert found is None or found[1] == b"raced bytes"


def test_a_missing_object_has_no_size_and_no_first_bytes() -> None:
    assert get_store().head_with_prefix("incoming/never-written", 8192) is None
