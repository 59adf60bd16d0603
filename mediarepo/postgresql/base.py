"""PostgreSQL with a persistent connection's health checked at most once a second.

Django checks a persistent connection (``SELECT 1``) the first time each request uses
it: a round trip to the server per request, two of the thirteen of a create + PUT. Here
a connection made or checked less than ``HEALTH_CHECK_INTERVAL`` seconds ago is trusted
without one. If the server restarted inside that second, the request's first statement
fails (an error answer) and Django closes the connection at the end of that request, as
it does for any connection that failed; the next request connects afresh.
"""

from __future__ import annotations

import time

from django.db.backends.postgresql import base

HEALTH_CHECK_INTERVAL = 1.0


class DatabaseWrapper(base.DatabaseWrapper):
    _known_good_at = float("-inf")

    def connect(self) -> None:
        super().connect()
        self._known_good_at = time.monotonic()

    def close_if_health_check_failed(self) -> None:
        if (
            self.connection is not None
            and self.health_check_enabled
            and not self.health_check_done
            and time.monotonic() - self._known_good_at < HEALTH_CHECK_INTERVAL
        ):
            self.health_check_done = True
            return
        checking = not self.health_check_done
        super().close_if_health_check_failed()
        if checking and self.connection is not None:
            self._known_good_at = time.monotonic()
