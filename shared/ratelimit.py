"""Token buckets per key, in process: each key holds up to ``burst`` tokens, refilled at
``rate`` per second. A caller spends a token for what is limited and is refused while its
bucket is empty. Buckets full again are forgotten, so memory stays bounded by active keys."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class TokenBuckets:
    MAX_KEYS = 100_000

    def __init__(
        self, burst: int, rate: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if burst < 1 or rate <= 0:
            raise ValueError("burst must be >= 1 and rate > 0")
        self._burst = float(burst)
        self._rate = rate
        self._clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def _tokens(self, key: Hashable, now: float) -> float:
        tokens, at = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - at) * self._rate)

    def allows(self, key: Hashable) -> bool:
        """Whether ``key`` has a token left (spends nothing)."""
        return self._tokens(key, self._clock()) >= 1.0

    def spend(self, key: Hashable) -> None:
        """Takes one token from ``key``'s bucket (not below zero)."""
        now = self._clock()
        if len(self._buckets) >= self.MAX_KEYS:
            self._forget_full(now)
        self._buckets[key] = (max(0.0, self._tokens(key, now) - 1.0), now)

    def _forget_full(self, now: float) -> None:
        full = [k for k in self._buckets if self._tokens(k, now) >= self._burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.MAX_KEYS:
            self._buckets.clear()
