"""ASGI entry point: ``gunicorn -c mediarepo/gunicorn.conf.py mediarepo.asgi`` (what
``make run`` and the container start), or any ASGI server."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mediarepo.settings")

from msc3870.asgi import get_asgi_application

application = get_asgi_application()
