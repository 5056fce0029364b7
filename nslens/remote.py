"""Running on NDIF: the API key, a preflight check, and bounded retries for transient failures.

The key comes from ``NDIF_API_KEY`` or nnsight's own config (``nnsight.CONFIG.set_default_api_key``). It is never
printed, logged or written into run directories: errors say *that* it is missing, never what it is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["TRANSIENT_ERRORS", "api_key", "check_remote", "maybe_retry", "with_retries"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: failures worth retrying: the connection, not the request
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


def _transient_types() -> tuple[type[BaseException], ...]:
    try:
        import httpx

        return (*TRANSIENT_ERRORS, httpx.TransportError)
    except ImportError:  # pragma: no cover - httpx comes with nnsight
        return TRANSIENT_ERRORS


def api_key() -> str | None:
    """The NDIF API key from ``NDIF_API_KEY`` or nnsight's config, or None."""
    key = os.environ.get("NDIF_API_KEY")
    if key:
        return key
    from nnsight import CONFIG

    return CONFIG.API.APIKEY or None


def check_remote(repo_id: str, *, timeout: float = 5.0) -> None:
    """Fail early, with a clear one-line reason, when a remote run cannot work: no key, NDIF unreachable, or the
    model not running there."""
    if not api_key():
        raise ValueError("remote runs need an NDIF API key: set NDIF_API_KEY or call "
                         "nnsight.CONFIG.set_default_api_key(KEY) (keys: https://login.ndif.us)")
    from nnsight import CONFIG
    from nnsight.ndif import _get

    host = CONFIG.API.HOST
    try:
        status = _get("/status", timeout=(timeout, timeout))
    except Exception as e:  # httpx raises its own hierarchy; any failure here means "cannot reach"
        raise ValueError(f"cannot reach NDIF at {host} ({type(e).__name__}); check the network or NDIF_HOST") from e
    running = sorted({d.get("repo_id") for d in status.get("deployments", {}).values()
                      if d.get("application_state") == "RUNNING" and d.get("repo_id")})
    if repo_id not in running:
        raise ValueError(f"model {repo_id!r} is not running on NDIF at {host}; running now: "
                         + (", ".join(running) or "none"))


def with_retries(fn: Callable[[], T], *, attempts: int = 3, base_delay: float = 2.0,
                 sleep: Callable[[float], Any] = time.sleep, what: str = "NDIF request") -> T:
    """Call ``fn``; on a transient (connection) failure wait ``base_delay * 2**i`` seconds and try again, at most
    ``attempts`` times in all. Other errors propagate at once."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    transient = _transient_types()
    for i in range(attempts):
        try:
            return fn()
        except transient as e:
            if i == attempts - 1:
                raise ValueError(f"{what} failed after {attempts} attempts ({type(e).__name__}: {e})") from e
            delay = base_delay * 2**i
            logger.warning("%s failed (%s); retrying in %.0f s (%d/%d)", what, type(e).__name__, delay, i + 1,
                           attempts)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def maybe_retry(remote: bool | str, fn: Callable[[], T], what: str) -> T:
    """``with_retries`` for real remote runs (``remote=True``); a plain call locally and under ``remote="local"``."""
    return with_retries(fn, what=what) if remote is True else fn()
