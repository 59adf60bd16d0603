"""Request rates as DRF throttles over ``msc3870.ratelimit.LeakyBucket``: bursts of up to
N, refilled at N per period. One small cache entry per key, whatever the rate (DRF's
SimpleRateThrottle keeps a timestamp per request)."""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from ..ratelimit import LeakyBucket


def leaky_bucket(key: str, rate: str, setting: str) -> float | None:
    """Count one request against the bucket at ``key`` (``rate`` is "N/period", DRF's
    syntax); None if it fits, else the seconds until it would."""
    return LeakyBucket.from_rate(rate, setting).take(key)


class LeakyBucketThrottle(BaseThrottle):
    """A DRF throttle over ``leaky_bucket``: the rate is read on each request from the
    setting named ``setting`` (None or empty: no limit), one bucket per ``key``."""

    scope: str = ""
    setting: str = ""

    def __init__(self) -> None:
        self.retry_after: float | None = None

    def rate(self) -> str | None:
        raise NotImplementedError

    def key(self, request: Request) -> str:
        return f"msc3870:throttle:{self.scope}:{request.user}"

    def allow_request(self, request: Request, view: Any) -> bool:
        rate = self.rate()
        if not rate:
            return True
        self.retry_after = leaky_bucket(self.key(request), rate, self.setting)
        return self.retry_after is None

    def wait(self) -> float | None:
        return self.retry_after
