"""Test settings: mediarepo's, with media in a throw-away directory and fast hashing.

Tests never touch real data: the data directory is always a fresh temporary one (an
autouse fixture empties its media after each test; pointed at a real one, it wiped it),
and the unit suite drops the service variables it could inherit from a developer's shell
(a real database, broker, cache, bucket or homeserver). The services suite
(``scripts/services-test`` exports ``MEDIAREPO_TEST_SERVICES=1``) keeps them: it runs
against those services on purpose. ``MEDIAREPO_TEST_DATABASE_URL`` runs the unit suite on
another database (pytest-django makes and drops its own ``test_`` database there).
"""

import atexit
import os
import shutil
import tempfile

SERVICE_VARIABLES = ("DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL", "MATRIX_HOMESERVER_URL")

if os.environ.get("MEDIAREPO_TEST_SERVICES") != "1":
    for _name in list(os.environ):
        if _name in SERVICE_VARIABLES or _name.startswith("AWS_"):
            del os.environ[_name]
    if os.environ.get("MEDIAREPO_TEST_DATABASE_URL"):
        os.environ["DATABASE_URL"] = os.environ["MEDIAREPO_TEST_DATABASE_URL"]

_data_dir = tempfile.mkdtemp(prefix="mediarepo-test-")
atexit.register(shutil.rmtree, _data_dir, ignore_errors=True)
os.environ["MEDIAREPO_DATA_DIR"] = _data_dir  # never setdefault: not even a given one

from mediarepo.settings import *  # noqa: E402, F403
from mediarepo.settings import DATA_DIR, MSC3870  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    **STORAGES,  # noqa: F405
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Unit tests never reach other servers: a download of mxc://matrix.org/... is 404 here.
# Tests of remote media turn fetching on against servers of their own on 127.0.0.1.
MSC3870 = {**MSC3870, "COMPLETE_WAIT_SECONDS": 5, "CREATE_RATE": None, "FETCH_REMOTE_MEDIA": False}
MEDIA_DIR = DATA_DIR / "media"

# A file, not :memory:, so the live server's threads each get their own connection.
if DATABASES["default"]["ENGINE"] in ("django.db.backends.sqlite3", "mediarepo.sqlite"):  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}  # noqa: F405

MIDDLEWARE = [m for m in MIDDLEWARE if "whitenoise" not in m]  # noqa: F405
