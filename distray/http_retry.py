"""When and how long to retry an HTTP request: shared by the openai teacher and evaluate's latency probe.

    from distray.http_retry import backoff_s, retry_after_s, retryable_status
    if retryable_status(resp.status_code):
        time.sleep(backoff_s(attempt, 0.5, 30.0, retry_after_s(resp.headers)))

429, 408, 409 and every 5xx are worth retrying; another 4xx will fail the same way again.
The wait is exponential backoff with full jitter, and a server's `Retry-After` (seconds or an
HTTP date) or `retry-after-ms` is a floor on it, up to `retry_after_cap_s` (a server asking for
an hour would otherwise stall a run for that hour; the request then fails sooner, and a rerun
sends it again).

401, 403 and 404 are neither retried nor a per-row failure: a revoked key or a wrong model fails
every later request the same way, so callers stop at once (`fatal_status`).
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from typing import Any

__all__ = [
    "DEFAULT_RETRY_AFTER_CAP_S", "backoff_s", "fatal_status", "retry_after_s", "retryable_status",
]

_RETRY_STATUS = frozenset({408, 409, 429})
_FATAL_STATUS = frozenset({401, 403, 404})

#: The longest a server's Retry-After is honoured, unless the caller says otherwise.
DEFAULT_RETRY_AFTER_CAP_S = 60.0


def retryable_status(code: int) -> bool:
    """An HTTP status worth retrying: 408, 409, 429 and every 5xx."""
    return code in _RETRY_STATUS or code >= 500


def fatal_status(code: int) -> bool:
    """An HTTP status that fails every later request too: 401, 403 (the key), 404 (the model
    or the URL). Retrying it, or rejecting rows one by one, only hides the cause."""
    return code in _FATAL_STATUS


def retry_after_s(headers: Any) -> float | None:
    """The wait a server asks for, in seconds: `retry-after-ms`, else `retry-after`.

    Args:
        headers: a mapping with `.get` (httpx headers are case-insensitive).

    Returns:
        The seconds to wait (0 for a date in the past), or None when the server asks nothing.
    """
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return _seconds(float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return _seconds(float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def _seconds(value: float) -> float | None:
    """A header's wait as a usable number: NaN says nothing, a negative wait is none."""
    if math.isnan(value):
        return None
    return max(0.0, value)


def backoff_s(
    attempt: int,
    base_s: float,
    max_s: float,
    retry_after_s: float | None,
    retry_after_cap_s: float = DEFAULT_RETRY_AFTER_CAP_S,
) -> float:
    """Full-jitter exponential backoff; a server's Retry-After is a floor, up to a cap.

    Args:
        attempt: the attempt that just failed, from 0.
        base_s: the first attempt's longest wait; it doubles with each attempt.
        max_s: the longest wait backoff picks (a Retry-After may ask for more).
        retry_after_s: the server's wait, from `retry_after_s(headers)`.
        retry_after_cap_s: the longest Retry-After honoured.
    """
    delay = random.uniform(0, min(max_s, base_s * min(2**attempt, 2**30)))
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, retry_after_cap_s))
    return delay
