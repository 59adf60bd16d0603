"""Screening checks the tests configure by import string (``MSC3870["CHECKS"]``), as a
host project would add its own: ``"tests.checks.reject_everything"``. (The checks that
processes of the services suite load are in ``tests/services/``.)"""

from __future__ import annotations

from msc3870.errors import Codes
from msc3870.screening import Rejection, ScreeningContext


def reject_everything(ctx: ScreeningContext) -> None:
    raise Rejection("Found something nasty", errcode=Codes.FORBIDDEN)


def refuse_evil_signature(ctx: ScreeningContext) -> None:
    """A scanner with one signature: bytes that start with ``EVIL``."""
    if ctx.prefix().startswith(b"EVIL"):
        raise Rejection("Matched signature Test.Evil")


def fail_to_run(ctx: ScreeningContext) -> None:
    """A check whose scanner is down: it fails, it neither passes nor refuses."""
    raise ConnectionError("clamd is down")


def reject_odd_sizes(ctx: ScreeningContext) -> None:
    """A host project's own check."""
    if ctx.info.size % 2:
        raise Rejection("Odd sizes are not welcome here", errcode=Codes.INVALID_PARAM, status=400)


def too_large(ctx: ScreeningContext) -> None:
    raise Rejection("Too large for this server", errcode=Codes.TOO_LARGE, status=413)


def slow_down(ctx: ScreeningContext) -> None:
    raise Rejection("Too many uploads today", errcode=Codes.LIMIT_EXCEEDED, status=429)


def pretend_success(ctx: ScreeningContext) -> None:
    """A refusal with a success status (never answered as one)."""
    raise Rejection("Not for you", errcode=Codes.FORBIDDEN, status=200)


def unavailable_for_legal_reasons(ctx: ScreeningContext) -> None:
    raise Rejection("Blocked here", errcode=Codes.FORBIDDEN, status=451)
