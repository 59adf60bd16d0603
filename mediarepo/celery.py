"""The Celery app: ``celery -A mediarepo worker`` and ``celery -A mediarepo beat``."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mediarepo.settings")

app = Celery("mediarepo")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
