"""Leaky buckets (Synapse's rate limiter): bursts of up to ``capacity`` units, drained at
``per_second``. A unit is whatever the caller counts: a request (``/create``, federation
media requests) or a byte (remote media fetched for a user). One small cache entry per
key, whatever the rate, in the shared cache, so all web processes and workers count
together when ``REDIS_URL`` is set.

The read and the write of a bucket are not one atomic step: racing requests of one key
may each see the level before the other's, so a burst can pass its capacity by the few
requests in flight at that instant (as DRF's throttles can).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured


@dataclass(frozen=True)
class LeakyBucket:
    capacity: float
    per_second: float

    @classmethod
    def from_rate(cls, rate: str, setting: str) -> LeakyBucket:
        """``rate`` in DRF's syntax, "N/period": bursts of N, refilled at N per period."""
        from rest_framework.throttling import SimpleRateThrottle

        try:
            capacity, period = SimpleRateThrottle.parse_rate(None, rate)  # type: ignore[arg-type]
        except (KeyError, ValueError, IndexError) as exc:
            raise ImproperlyConfigured(
                f"MSC3870[{setting!r}] must look like '600/min' (N per s, min, hour or day)"
            ) from exc
        if not capacity or not period:
            raise ImproperlyConfigured(f"MSC3870[{setting!r}] must allow at least one request")
        return cls(capacity=float(capacity), per_second=capacity / period)

    def level(self, key: str, now: float | None = None) -> float:
        """The units in the bucket at ``key`` now (what has not drained yet)."""
        now = time.time() if now is None else now
        level, at = cache.get(key) or (0.0, now)
        return max(0.0, level - (now - at) * self.per_second)

    def wait(self, key: str, cost: float = 1.0) -> float | None:
        """None if ``cost`` units would fit now, else the seconds until they would. Counts
        nothing."""
        level = self.level(key)
        if level + cost > self.capacity:
            return (level + cost - self.capacity) / self.per_second
        return None

    def take(self, key: str, cost: float = 1.0) -> float | None:
        """Count ``cost`` units if they fit (None), else the seconds until they would
        (nothing counted)."""
        now = time.time()
        level = self.level(key, now)
        if level + cost > self.capacity:
            return (level + cost - self.capacity) / self.per_second
        self._store(key, level + cost, now)
        return None

    def charge(self, key: str, cost: float) -> None:
        """Count ``cost`` units whether they fit or not: for work measured once done (the
        bytes of a fetch), which the next ``wait`` then makes its caller pay for."""
        if cost <= 0:
            return
        now = time.time()
        self._store(key, self.level(key, now) + cost, now)

    def _store(self, key: str, level: float, now: float) -> None:
        # Kept until it has drained to empty: an entry that expired is an empty bucket.
        cache.set(key, (level, now), max(1, math.ceil(level / self.per_second)))
