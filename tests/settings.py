"""Test settings: mediarepo's, with media in a throw-away directory and fast hashing."""

import os
import tempfile

os.environ.setdefault("MEDIAREPO_DATA_DIR", tempfile.mkdtemp(prefix="mediarepo-test-"))

from mediarepo.settings import *  # noqa: F403
from mediarepo.settings import DATA_DIR, MSC3870

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    **STORAGES,  # noqa: F405
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
MSC3870 = {**MSC3870, "COMPLETE_WAIT_SECONDS": 5, "CREATE_RATE": None}
MEDIA_DIR = DATA_DIR / "media"

# A file, not :memory:, so the live server's threads each get their own connection.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}  # noqa: F405

MIDDLEWARE = [m for m in MIDDLEWARE if "whitenoise" not in m]  # noqa: F405
