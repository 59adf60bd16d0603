"""Secrets out of the logs: access tokens and upload URLs are credentials.

A client may send its access token in the query string (``?access_token=``, deprecated
but accepted), and an upload URL (``.../upload_url/<signed token>``) lets whoever holds it
write the bytes of a media id. Request lines carry both, and the access log (uvicorn's,
written through gunicorn's), Django's request warnings (``Not Found: <path>``) and our
own error logs print request lines or paths. ``RedactSecrets`` rewrites a record's
message and arguments before any handler formats it.
"""

from __future__ import annotations

import logging
import re

REDACTED = "<redacted>"

_SECRETS = (
    # The query parameter, wherever it is in the query string, however it is cased
    # (Django's QueryDict is case-sensitive, but a log must not bet on it), up to the next
    # parameter, space or quote.
    re.compile(r"(?i)([?&;]access_token=)[^&;\s\"']*"),
    # The path segment of an upload URL (and anything that follows it in the segment).
    re.compile(r"(/upload_url/)[^/?#\s\"']*"),
)


def redact(text: str) -> str:
    for pattern in _SECRETS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def _redact_arg(arg: object) -> object:
    return redact(arg) if isinstance(arg, str) else arg


class RedactSecrets(logging.Filter):
    """Rewrite the record's message and string arguments; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _redact_arg(value) for key, value in record.args.items()}
        return True


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
