"""
When to renew a certificate and when to try again after a failure: pure
functions over numbers (seconds since the epoch), so the manager's timing is
tested without a CA or a clock.
"""

from __future__ import annotations

import email.utils
import random

__all__ = ["RENEW_AT", "JITTER", "MIN_BACKOFF", "MAX_BACKOFF", "renewal_time", "backoff", "retry_after_seconds"]

RENEW_AT = 2.0 / 3.0
"""Renew once this fraction of the certificate's lifetime has passed (Let's Encrypt's advice, certbot's and Caddy's)."""

JITTER = 0.05
"""Renewals move earlier by up to this fraction of the lifetime, so proxies started together do not renew together."""

MIN_BACKOFF = 60.0
"""Seconds before the first retry after a failure."""

MAX_BACKOFF = 6 * 3600.0
"""Seconds between retries at most: a failing CA is asked about four times a day, never less."""


def renewal_time(not_before: float, not_after: float, rng: random.Random, suggested: float | None = None) -> float:
    """
    The moment to renew a certificate valid from C{not_before} to C{not_after}.

    @param suggested: the CA's ACME Renewal Information window's chosen moment
        (RFC 9773), which wins when it comes before the certificate expires.
    """
    if suggested is not None and suggested < not_after:
        return suggested
    lifetime = max(0.0, not_after - not_before)
    return not_before + lifetime * RENEW_AT - rng.uniform(0.0, lifetime * JITTER)


def backoff(failures: int, rng: random.Random, minimum: float = MIN_BACKOFF, maximum: float = MAX_BACKOFF,
            retry_after: float | None = None) -> float:
    """
    Seconds to wait after the C{failures}-th failure in a row (1, 2, ...):
    doubling from C{minimum} up to C{maximum}, with up to a tenth added at
    random, and never sooner than the CA's C{Retry-After}.
    """
    base = min(maximum, minimum * (2.0 ** max(0, failures - 1)))
    delay = base + rng.uniform(0.0, base / 10.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """
    A C{Retry-After} header's wait in seconds: delta-seconds or an HTTP date.
    C{None} when absent or unreadable; never negative.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    return max(0.0, moment.timestamp() - now)
