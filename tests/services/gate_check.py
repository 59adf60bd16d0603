"""A check that holds screening until the test opens the gate.

Active only when GATE_DIR is set (in the worker's environment). It leaves
``<media_id>.started`` there, then waits for ``<media_id>.release`` (pass) or
``<media_id>.reject`` (a Rejection), so a test decides when and how screening ends
without sleeping for a guessed time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from msc3870.screening import Rejection, ScreeningContext


def gate(ctx: ScreeningContext) -> None:
    directory = os.environ.get("GATE_DIR")
    if not directory:
        return
    base = Path(directory, ctx.media.media_id)
    base.with_suffix(".started").touch()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if base.with_suffix(".reject").exists():
            raise Rejection("Refused at the gate", errcode="M_FORBIDDEN")
        if base.with_suffix(".release").exists():
            return
        time.sleep(0.02)
    raise RuntimeError("the gate was never opened")
