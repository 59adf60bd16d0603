"""A check that holds screening open so a test can kill the worker in the middle of it.

Active only when SLOW_CHECK_DIR is set (in the worker's environment): it leaves a marker
named after the media id there, then sleeps SLOW_CHECK_SECONDS.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from msc3870.screening import ScreeningContext


def pause(ctx: ScreeningContext) -> None:
    directory = os.environ.get("SLOW_CHECK_DIR")
    if not directory:
        return
    Path(directory, ctx.media.media_id).touch()
    time.sleep(float(os.environ.get("SLOW_CHECK_SECONDS", "30")))
