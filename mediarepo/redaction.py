"""Secrets out of the logs: access tokens and upload URLs are credentials.

A client may send its access token in the query string (``?access_token=``, deprecated
but accepted), and an upload URL (``.../upload_url/<signed token>``) lets whoever holds it
write the bytes of a media id. Request lines carry both, and the request log
(``msc3870.requests``), uvicorn's loggers (through gunicorn's), Django's request warnings
(``Not Found: <path>``) and our own error logs print request lines or paths.
``RedactSecrets`` (``msc3870.logs``, where the app's own lines are redacted too) rewrites a
record's message, arguments and structured fields before any handler formats it.
"""

from __future__ import annotations

import logging

from msc3870.logs import REDACTED, RedactSecrets, redact

__all__ = ["REDACTED", "SERVER_LOGGERS", "RedactSecrets", "install", "redact"]

# uvicorn's loggers: gunicorn's handlers, no propagation, configured by the worker (the
# filter is added there: mediarepo.server). Django's and the app's records are filtered
# by mediarepo.settings.LOGGING (on ``django.request`` and on the root handler).
SERVER_LOGGERS = ("uvicorn.access", "uvicorn.error")


def install(logger_names: tuple[str, ...] = SERVER_LOGGERS) -> None:
    """Add the filter to these loggers (once). A logger's filters see the records logged
    on it, before its own handlers and its parents' handlers (not its children's)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
