"""Structured logs (``msc3870.logs``): one line per request and per background step
(screening, fetch, sweep) with the media id, user, state change and duration, as text
or JSON, credentials redacted in both. As the deployed server writes them:
``test_operating_server.py``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from mediarepo.redaction import REDACTED, RedactSecrets
from msc3870 import logs
from msc3870.asgi import MediaASGIHandler
from msc3870.models import MediaState

from .asgi_driver import call, created_path, run
from .helpers import MatrixClient, bearer, msc3870_settings, mxc_path, png_bytes

S = MediaState


class Lines(logging.Handler):
    """The records of the app's two loggers, and how each formatter writes them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.addFilter(RedactSecrets())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, logger: str, message: str = "") -> list[logging.LogRecord]:
        return [r for r in self.records if r.name == logger and message in r.getMessage()]

    def text(self, record: logging.LogRecord) -> str:
        return logs.TextFormatter().format(record)

    def json(self, record: logging.LogRecord) -> dict[str, Any]:
        return json.loads(logs.JSONFormatter().format(record))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    loggers = [logging.getLogger(name) for name in ("msc3870.requests", "msc3870.steps")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def test_a_request_line_says_who_did_what_to_which_media(
    app: MediaASGIHandler, token: str, lines: Lines
) -> None:
    async def scenario() -> str:
        path = await created_path(app, token)
        put = await call(
            app, "PUT", f"/_matrix/media/v3/upload/{path}", body=png_bytes(), headers=bearer(token)
        )
        assert put.status == 200
        return path

    path = run(scenario)
    media_id = path.split("/")[1]
    create, put = lines.of("msc3870.requests", "/create"), lines.of("msc3870.requests", "/upload/")
    assert create[0].fields == {
        "route": "create",
        "user": "@alice:localhost",
        "media_id": media_id,
        "state": S.PENDING,
        "duration_ms": create[0].fields["duration_ms"],
    }
    fields = put[0].fields
    assert fields["route"] == "upload-to-media"
    assert fields["media_id"] == media_id
    assert fields["user"] == "@alice:localhost"
    assert fields["state"] == S.COMPLETE  # what the request moved it to
    assert fields["duration_ms"] >= 0
    text = lines.text(put[0])
    assert f'"PUT /_matrix/media/v3/upload/{path} HTTP/1.1" 200' in text
    assert (
        f'HTTP/1.1" 200 route=upload-to-media user=@alice:localhost media_id={media_id} '
        f"state=complete screening_ms={fields['screening_ms']} screening_outcome=complete "
        f"duration_ms={fields['duration_ms']}"
    ) in text
    entry = lines.json(put[0])
    assert entry["level"] == "INFO" and entry["logger"] == "msc3870.requests"
    assert entry["media_id"] == media_id and entry["state"] == "complete"
    assert entry["message"].endswith(f'"PUT /_matrix/media/v3/upload/{path} HTTP/1.1" 200')
    # The screening of that PUT, in its own request: on the request's line, not a line of
    # its own (one line per request).
    assert fields["screening_outcome"] == "complete" and fields["screening_ms"] >= 0
    assert not [
        line
        for line in lines.of("msc3870.steps", "screening")
        if line.fields.get("media_id") == media_id
    ]


def test_tokens_and_upload_urls_are_redacted_in_both_formats(
    app: MediaASGIHandler, token: str, lines: Lines
) -> None:
    secret = "SECRETtoken0123456789"

    async def scenario() -> str:
        await call(app, "GET", f"/_matrix/client/v1/media/config?access_token={secret}")
        created = await call(app, "POST", "/_matrix/media/v1/create", headers=bearer(token))
        upload_url = created.json()["upload_url"]
        put = await call(app, "PUT", upload_url.split("8008", 1)[1], body=b"bytes")
        assert put.status == 200
        return upload_url.rsplit("/", 1)[1]

    upload_token = run(scenario)
    written = [lines.text(r) for r in lines.records] + [
        json.dumps(lines.json(r)) for r in lines.records
    ]
    for line in written:
        assert secret not in line and upload_token not in line, line
    assert any(f"access_token={REDACTED}" in line for line in written)
    assert any(f"/upload_url/{REDACTED}" in line for line in written)


def test_the_filter_redacts_structured_fields() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.fields = {"path": "/a/upload_url/s3cr3t?access_token=t0k", "status": 200}
    assert RedactSecrets().filter(record)
    assert record.fields == {
        "path": f"/a/upload_url/{REDACTED}?access_token={REDACTED}",
        "status": 200,
    }


def test_a_rejected_upload_and_a_sweep_are_steps(alice: MatrixClient, lines: Lines) -> None:
    from msc3870.tasks import expire_pending_task

    with msc3870_settings(DENIED_CONTENT_TYPES=["image/*"]):
        path = mxc_path(alice.create()["content_uri"])
        assert (
            alice.put(f"/_matrix/media/v3/upload/{path}", png_bytes(), "image/png").status_code
            == 403
        )
    screening = lines.of("msc3870.steps", "screening")[-1].fields
    assert screening["outcome"] == "rejected" and screening["state"] == S.REJECTED
    expire_pending_task.apply()
    sweep = lines.of("msc3870.steps", "sweep")[-1].fields
    assert sweep["sweep"] == "expire_pending"
    assert sweep["outcome"] == "done"
    assert {"moved", "objects_deleted", "duration_ms"} <= set(sweep)


def test_a_failing_step_is_written_with_outcome_error(lines: Lines) -> None:
    with pytest.raises(RuntimeError), logs.step("sweep", sweep="broken"):
        raise RuntimeError("storage down")
    fields = lines.of("msc3870.steps", "sweep")[-1].fields
    assert fields["outcome"] == "error" and fields["sweep"] == "broken"


def test_text_quotes_values_with_spaces_and_json_keeps_tracebacks() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "msc3870.steps", logging.ERROR, __file__, 1, "fetch", None, sys.exc_info()
        )
    record.fields = {"reason": 'two words "quoted"', "n": 3}
    text = logs.TextFormatter().format(record)
    first = text.splitlines()[0]
    assert first.endswith('fetch reason="two words \\"quoted\\"" n=3'), first
    assert "ValueError: boom" in text
    entry = json.loads(logs.JSONFormatter().format(record))
    assert entry["reason"] == 'two words "quoted"' and entry["n"] == 3
    assert "ValueError: boom" in entry["exception"]
    assert entry["time"].endswith("+00:00")


def test_log_format_selects_the_formatter() -> None:
    assert logs.formatter_name(None) == "text"
    assert logs.formatter_name("JSON") == "json"
    assert logs.formatter_name("logfmt") == "text"


def test_a_url_uploads_screening_line_times_the_move(alice: MatrixClient, lines: Lines) -> None:
    """The move out of the upload URL's reach is timed on the screening's line
    (``move_ms``), apart from the rest of it: most of what a URL upload's downloads wait
    for. A PUT's screening moves nothing and has none."""
    created = alice.create()
    assert alice.put_to_url(created["upload_url"], b"some bytes", "text/plain").status_code == 200
    assert alice.complete(created["content_uri"]).status_code == 200
    media_id = created["content_uri"].rsplit("/", 1)[1]
    (screening,) = [
        line.fields
        for line in lines.of("msc3870.steps", "screening")
        if line.fields.get("media_id") == media_id
    ]
    assert screening["outcome"] == "complete"
    assert 0 <= screening["move_ms"] <= screening["duration_ms"]
    assert "move_outcome" not in screening


def test_the_text_formatter_writes_the_time_as_logging_does() -> None:
    """The text of a second is kept for the next record of that second, never beyond."""
    plain = logging.Formatter("%(asctime)s")
    text = logs.TextFormatter("%(asctime)s")
    for created in (1_700_000_000.123, 1_700_000_000.987, 1_700_000_001.5, 1_699_999_999.0):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created % 1) * 1000
        assert text.format(record) == plain.format(record)
