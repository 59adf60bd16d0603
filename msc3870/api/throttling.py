"""Rate limits as leaky buckets (Synapse's rate limiter): bursts of up to N, refilled at N
per period. One small cache entry per key, whatever the rate (DRF's SimpleRateThrottle
keeps a timestamp per request), in the shared cache, so all web processes count together
when ``REDIS_URL`` is set."""

from __future__ import annotations

import time
from typing import Any

from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle, SimpleRateThrottle


def leaky_bucket(key: str, rate: str, setting: str, *, count: bool = True) -> float | None:
    """Count one request against the bucket at ``key`` (``rate`` is "N/period", DRF's
    syntax); None if it fits, else the seconds until it would. ``count=False`` only asks
    whether one more would fit."""
    try:
        capacity, period = SimpleRateThrottle.parse_rate(None, rate)  # type: ignore[arg-type]
    except (KeyError, ValueError, IndexError) as exc:
        raise ImproperlyConfigured(
            f"MSC3870[{setting!r}] must look like '600/min' (N per s, min, hour or day)"
        ) from exc
    if not capacity or not period:
        raise ImproperlyConfigured(f"MSC3870[{setting!r}] must allow at least one request")
    now = time.time()
    level, at = cache.get(key) or (0.0, now)
    level = max(0.0, level - (now - at) * capacity / period)
    if level + 1 > capacity:
        return (level + 1 - capacity) * period / capacity
    if count:
        cache.set(key, (level + 1, now), period)
    return None


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
