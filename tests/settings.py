"""Test settings: mediarepo's, with media in a throw-away directory and fast hashing."""

import os
import tempfile

os.environ.setdefault("MEDIAREPO_DATA_DIR", tempfile.mkdtemp(prefix="mediarepo-test-"))

from mediarepo.settings import *  # noqa: E402,F403
from mediarepo.settings import DATA_DIR, MSC3870  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    **STORAGES,  # noqa: F405
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
MSC3870 = {**MSC3870, "COMPLETE_WAIT_SECONDS": 5, "CREATE_RATE": None}
MEDIA_DIR = DATA_DIR / "media"
