"""
The pool-wide retry budget: retries may add at most a share of a pool's
requests (plus a small floor per second), so that retrying cannot multiply
the load on a pool that is already failing.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

__all__ = ["RetryBudget"]


class RetryBudget:
    """A token bucket: each request deposits C{ratio}, each retry withdraws 1."""

    def __init__(self, clock: IReactorTime, ratio: float, floor_per_second: float = 3.0, cap: float = 100.0) -> None:
        self.clock = clock
        self.ratio = ratio
        self.floor = floor_per_second
        self.cap = cap
        self.tokens = min(cap, floor_per_second)
        self.last = clock.seconds()
        self.refused = 0

    def deposit(self) -> None:
        """A request was made."""
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.cap else self.cap

    def withdraw(self) -> bool:
        """May one more retry happen now?"""
        now = self.clock.seconds()
        self.tokens = min(self.cap, self.tokens + (now - self.last) * self.floor)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.refused += 1
        return False
