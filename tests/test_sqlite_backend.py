"""mediarepo.sqlite: one writer at a time among a process's threads and across processes,
never a lock left held."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest
from django.db import connection, transaction

from msc3870.models import Uploader

pytestmark = pytest.mark.skipif(
    connection.vendor != "sqlite", reason="the SQLite backend of the embedded default"
)


def writer_lock_is_free() -> bool:
    lock = connection._writer_lock  # type: ignore[attr-defined]
    if lock.acquire(blocking=False):
        lock.release()
        return True
    return False


def file_lock_is_free() -> bool:
    """What another process would find: a descriptor of its own on the lock file."""
    descriptor = os.open(f"{connection.settings_dict['NAME']}.writer-lock", os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)  # releases it if taken
    return True


def test_a_transaction_holds_the_lock_until_it_ends(transactional_db: None) -> None:
    with transaction.atomic():
        Uploader.objects.create(user_id="@a:localhost")
        assert not writer_lock_is_free()
        assert not file_lock_is_free()
    assert writer_lock_is_free()
    assert file_lock_is_free()


def test_a_failed_transaction_releases_the_lock(transactional_db: None) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Uploader.objects.create(user_id="@b:localhost")
        raise RuntimeError("boom")
    assert writer_lock_is_free()
    assert file_lock_is_free()
    assert not Uploader.objects.filter(user_id="@b:localhost").exists()


def test_an_autocommit_write_takes_and_releases_it(transactional_db: None) -> None:
    Uploader.objects.create(user_id="@c:localhost")
    assert writer_lock_is_free()


def test_threads_writing_at_once_all_write(transactional_db: None) -> None:
    """Eight threads, each its own connection, writing together: every write lands, in
    transactions and alone, and the lock is free afterwards."""
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            start.wait()
            for i in range(20):
                if i % 2:
                    with transaction.atomic():
                        Uploader.objects.create(user_id=f"@t{n}_{i}:localhost")
                else:
                    Uploader.objects.create(user_id=f"@t{n}_{i}:localhost")
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert Uploader.objects.filter(user_id__startswith="@t").count() == 160
    assert writer_lock_is_free()


def test_another_process_writing_waits_for_the_file_lock(transactional_db: None) -> None:
    """A writer in another process queues on the file lock while a transaction here holds
    it, and writes once it ends."""
    read_end, write_end = os.pipe()
    with transaction.atomic():
        Uploader.objects.create(user_id="@held:localhost")
        pid = os.fork()
        if pid == 0:  # the other process: take the lock as its writers would
            try:
                descriptor = os.open(f"{connection.settings_dict['NAME']}.writer-lock", os.O_RDWR)
                fcntl.flock(descriptor, fcntl.LOCK_EX)  # blocks until the parent commits
                os.write(write_end, b"locked")
            finally:
                os._exit(0)
        os.close(write_end)
        os.set_blocking(read_end, False)
        threading.Event().wait(0.3)
        with pytest.raises(BlockingIOError):
            os.read(read_end, 16)  # still waiting while the transaction is open
    os.set_blocking(read_end, True)
    assert os.read(read_end, 16) == b"locked"
    os.waitpid(pid, 0)
    os.close(read_end)
