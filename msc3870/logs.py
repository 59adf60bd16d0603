"""Structured log lines: one per request, one per background step.

Every line is a standard ``logging`` record whose structured fields are in
``record.fields`` (a dict), so that one formatter serves every library that logs through
``logging`` (Django, gunicorn, uvicorn, celery) as well as these lines:

- ``TextFormatter`` (the default): ``<time> <level> <logger>: <message> key=value ...``;
- ``JSONFormatter``: one JSON object per line, the fields beside ``time``, ``level``,
  ``logger`` and ``message``.

Where the fields come from:
- ``msc3870.asgi`` writes the request line (logger ``msc3870.requests``) once the answer
  is sent: the request line as an access log has it, status, route, duration, and the
  fields the request's work noted with ``annotate`` (user, media id, the state it moved
  the media to);
- ``step`` wraps a background step (screening, a remote fetch, a sweep; logger
  ``msc3870.steps``) and writes its line when it ends, with its duration and outcome.

Secrets stay out: access tokens in query strings and upload URL tokens are replaced by
``<redacted>`` wherever a record carries them (``RedactSecrets``, on the handlers), and
the request line is redacted where it is made, so that a host project's own handlers
never see them either.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

REDACTED = "<redacted>"

_SECRETS = (
    # The query parameter, wherever it is in the query string, however it is cased
    # (Django's QueryDict is case-sensitive, but a log must not bet on it), up to the next
    # parameter, space or quote.
    re.compile(r"(?i)([?&;]access_token=)[^&;\s\"']*"),
    # The path segment of an upload URL (and anything that follows it in the segment).
    re.compile(r"(/upload_url/)[^/?#\s\"']*"),
)

requests_log = logging.getLogger("msc3870.requests")
steps_log = logging.getLogger("msc3870.steps")

# The fields of the unit of work running in this context (a request on its pool thread,
# or a step): what ``annotate`` adds to.
_fields: ContextVar[dict[str, Any] | None] = ContextVar("msc3870_log_fields", default=None)
# Fields a step hands on to the unit around it (a PUT screened in its own request).
_HANDED_ON = ("media_id", "user", "state")


def redact(text: str) -> str:
    if "=" not in text and "/upload_url/" not in text:
        return text  # neither secret can be in it: no pattern to run
    for pattern in _SECRETS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def _redact_value(value: object) -> object:
    return redact(value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """Rewrite the record's message, string arguments and fields; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_value(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _redact_value(value) for key, value in record.args.items()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = {key: _redact_value(value) for key, value in fields.items()}
        return True


# ------------------------------------------------------------------------- fields


def annotate(**fields: Any) -> None:
    """Add fields to the line of the request or step running here (nothing otherwise)."""
    current = _fields.get()
    if current is not None:
        current.update(fields)


@contextmanager
def collecting(fields: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Make ``fields`` what ``annotate`` adds to while the block runs (a request's work on
    a pool thread: the thread's context outlives the request, so it is reset after)."""
    token = _fields.set(fields)
    try:
        yield fields
    finally:
        _fields.reset(token)


class Step:
    """A background step being timed: its ``fields`` (the line's), ``seconds`` once done."""

    __slots__ = ("fields", "seconds")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.seconds = 0.0


@contextmanager
def step(event: str, **fields: Any) -> Iterator[Step]:
    """Time a step and write its line when it ends (``outcome=error`` if it raised). A step
    inside a request or another step (a PUT screened in its own request, a fetch's
    screening) writes no line of its own: its duration and outcome go on the line around
    it (``<event>_ms``, ``<event>_outcome``), with the media id, user and state it noted."""
    outer = _fields.get()
    current = Step(dict(fields))
    token = _fields.set(current.fields)
    started = time.perf_counter()
    raised = True
    try:
        yield current
        raised = False
    finally:
        _fields.reset(token)
        current.seconds = time.perf_counter() - started
        line = current.fields
        if raised:
            line.setdefault("outcome", "error")
        duration_ms = round(current.seconds * 1000, 1)
        if outer is None:
            line["duration_ms"] = duration_ms
            steps_log.info(event, extra={"fields": line})
        else:
            outer.update({key: line[key] for key in _HANDED_ON if line.get(key)})
            outer[f"{event}_ms"] = duration_ms
            if "outcome" in line:
                outer[f"{event}_outcome"] = line["outcome"]


def log_request(
    client: str,
    method: str,
    path: str,
    query: bytes,
    http_version: str,
    status: int,
    fields: dict[str, Any],
) -> None:
    """The request line (as an access log writes it, then the fields)."""
    target = path + "?" + query.decode("latin-1") if query else path
    requests_log.info(
        '%s "%s %s HTTP/%s" %d',
        client,
        method,
        redact(target),
        http_version,
        status,
        extra={"fields": fields},
    )


# ----------------------------------------------------------------------- formatters


def formatter_name(log_format: str | None) -> str:
    """``LOG_FORMAT`` (mediarepo's variable): "json", else "text"."""
    return "json" if (log_format or "").strip().lower() == "json" else "text"


#: dictConfig entries of both formatters, by the names ``formatter_name`` gives.
FORMATTERS = {
    "text": {"()": "msc3870.logs.TextFormatter"},
    "json": {"()": "msc3870.logs.JSONFormatter"},
}


_NEEDS_QUOTES = re.compile(r'[ "=\\\n]')


def _text_value(value: object) -> str:
    text = str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """``<time> <level> <logger>: <message>``, then the record's fields as ``key=value``
    (quoted where they hold spaces), before any traceback."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None) -> None:
        super().__init__(
            fmt or "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s", datefmt
        )

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """As ``logging.Formatter``'s, with the text of the current second made once: a
        busy server writes many lines a second, and the date is most of their cost."""
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if self._second[0] != second:
            self._second = (second, time.strftime(self.default_time_format, self.converter(second)))
        return self.default_msec_format % (self._second[1], record.msecs)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = getattr(record, "fields", None)
        if not fields:
            return text
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return f"{text} {pairs}"


class JSONFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``process``, ``message``, the record's fields, and ``exception`` if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        for key, value in (getattr(record, "fields", None) or {}).items():
            entry.setdefault(key, value)  # never in place of the record's own
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)
