"""The unit suite never touches real data or real services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

ROOT = Path(__file__).resolve().parents[1]
REAL = {
    "MEDIAREPO_DATA_DIR": "/srv/real-media",
    "DATABASE_URL": "postgres://prod@db.example/mediarepo",
    "CELERY_BROKER_URL": "redis://broker.example:6379/0",
    "REDIS_URL": "redis://cache.example:6379/1",
    "AWS_STORAGE_BUCKET_NAME": "real-bucket",
    "AWS_ACCESS_KEY_ID": "AKIAREAL",
    "MATRIX_HOMESERVER_URL": "https://hs.example",
}
PROBE = """
import json, django
django.setup()
from django.conf import settings
print(json.dumps({
    "data_dir": str(settings.DATA_DIR),
    "engine": settings.DATABASES["default"]["ENGINE"],
    "broker": settings.CELERY_BROKER_URL,
    "cache": settings.CACHES["default"]["BACKEND"],
    "storage": settings.STORAGES["msc3870"]["BACKEND"],
    "homeserver": settings.MSC3870.get("HOMESERVER_URL"),
}))
"""


def settings_seen_with(**extra: str) -> dict[str, str]:
    env = {
        **{k: v for k, v in os.environ.items() if k != "MEDIAREPO_TEST_SERVICES"},
        **REAL,
        **extra,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_unit_tests_ignore_real_data_and_services() -> None:
    seen = settings_seen_with()
    assert seen["data_dir"] != REAL["MEDIAREPO_DATA_DIR"]
    assert Path(seen["data_dir"]).name.startswith("mediarepo-test-")
    assert seen["engine"] == "mediarepo.sqlite"  # SQLite (mediarepo/sqlite: one writer per process)
    assert seen["broker"] is None
    assert seen["cache"].endswith("LocMemCache")
    assert seen["storage"].endswith("FileSystemStorage")
    assert seen["homeserver"] is None
    assert not Path(seen["data_dir"]).exists()  # removed when the process ends


def test_the_services_suite_keeps_its_services_but_not_the_data_dir() -> None:
    seen = settings_seen_with(MEDIAREPO_TEST_SERVICES="1")
    assert seen["engine"] == "mediarepo.postgresql"
    assert seen["broker"] == REAL["CELERY_BROKER_URL"]
    assert seen["storage"] == "storages.backends.s3.S3Storage"
    assert seen["data_dir"] != REAL["MEDIAREPO_DATA_DIR"]


def test_this_run_uses_a_temporary_data_dir() -> None:
    assert Path(settings.DATA_DIR).name.startswith("mediarepo-test-")
