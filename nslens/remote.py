"""Running on NDIF: nslens's code shipped with every request, the API key, a preflight check, a client-side
timeout, and bounded retries for transient failures.

Every trace nslens runs goes through ``trace_args(model, remote)``:
- nslens is registered with nnsight for pickling *by value* (``nnsight.register``), so the functions, classes and
  operators a trace uses travel with the request as source: an NDIF server has never heard of nslens, and a
  pip-installed package is otherwise pickled by reference (``ModuleNotFoundError: No module named 'nslens'`` on
  the server). ``remote="local"`` cannot catch a missing registration (nslens is importable in-process); the test
  suite runs every remote path against a real local NDIF server for that reason.
- a real remote run (``remote=True``) gets a ``TimedRemoteBackend``: nnsight's blocking backend waits on its
  websocket with no deadline, so a hung server would block the client forever. The deadline covers the whole
  request (serialise, connect, submit, wait, download) and defaults to ``DEFAULT_TIMEOUT`` (long enough for a
  queued job on a 405B model); ``NSLENS_REMOTE_TIMEOUT`` (seconds) changes it.

The key comes from ``NDIF_API_KEY`` or nnsight's own config (``nnsight.CONFIG.set_default_api_key``). It is never
printed, logged or written into run directories: errors say *that* it is missing, never what it is.

nnsight (seconds to import) and its remote stack (httpx, websocket) are imported inside the functions that use
them: every tracing module imports this one, and a local run never needs the remote stack.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import NsLensError

__all__ = ["DEFAULT_STALL", "DEFAULT_TIMEOUT", "TRANSIENT_ERRORS", "RemoteTimeout", "api_key", "check_remote",
           "is_public_host", "job_backend", "maybe_retry", "poll_job", "redact", "remote_timeout", "retry_settings",
           "served_models", "ship_code", "stall_seconds", "trace_args", "with_deadline", "with_retries"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: failures worth retrying: the connection, not the request (plus httpx's and websocket's transport errors)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
#: seconds a remote request may take in all before the client gives up (queue + run + download)
DEFAULT_TIMEOUT = 6 * 3600.0


class RemoteTimeout(NsLensError):
    """A remote request outlived the client-side deadline (not retried: the job may still be running)."""


def _transient_types() -> tuple[type[BaseException], ...]:
    import httpx  # heavy: see the module docstring
    import websocket  # heavy: see the module docstring

    return (*TRANSIENT_ERRORS, httpx.TransportError, websocket.WebSocketConnectionClosedException,
            websocket.WebSocketTimeoutException, websocket.WebSocketAddressException)


def _is_transient_remote_error(e: BaseException) -> bool:
    """A failure that a retry can fix although its type does not say so: nnsight wraps a dropped connection
    while submitting in its ``RemoteError`` (the cause is the transport error); a gateway answering 502-504
    while the API restarts; a model worker that died (Ray restarts it)."""
    import httpx  # heavy: see the module docstring
    from nnsight.intervention.backends.remote import RemoteError  # heavy: see the module docstring

    if isinstance(e, httpx.HTTPStatusError):
        return e.response.status_code in (502, 503, 504)
    if not isinstance(e, RemoteError):
        return False
    cause = e.__cause__
    if cause is not None and (isinstance(cause, _transient_types()) or _is_transient_remote_error(cause)):
        return True
    return any(k in str(e) for k in _TRANSIENT_SERVER_MARKERS)


#: words in a server's error description that mean "the worker went away", not "your code failed"
_TRANSIENT_SERVER_MARKERS = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "actor died",
                             "The actor is dead", "ActorUnschedulableError",
                             # ndif 0.1.2 when the model's worker is gone or restarting
                             "Error submitting request to model deployment. Please try again later")


def ship_code() -> None:
    """Register nslens with nnsight for pickling by value (idempotent; see the module docstring)."""
    import nnsight  # heavy: see the module docstring

    nnsight.register("nslens")


def remote_timeout() -> float:
    """The client-side deadline of one remote request: ``$NSLENS_REMOTE_TIMEOUT`` seconds or ``DEFAULT_TIMEOUT``."""
    return _seconds_from_env("NSLENS_REMOTE_TIMEOUT", DEFAULT_TIMEOUT)


def _seconds_from_env(var: str, default: float) -> float:
    """``$var`` as a positive number of seconds, ``default`` when unset; anything else is a one-line error."""
    raw = os.environ.get(var)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise NsLensError(f"{var} must be a positive number of seconds, got {raw!r}")
    return value


def trace_args(model: Any, remote: bool | str) -> dict[str, Any]:
    """The keyword arguments for ``model.trace`` / ``model.session``: nothing locally; nslens's code shipped by
    value for ``remote="local"`` and ``remote=True``; for ``remote=True`` a backend with a deadline."""
    if not remote:
        return {}
    ship_code()
    if remote == "local":
        return {"remote": "local"}
    return {"backend": _backend(model, remote_timeout())}


def with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """``fn()`` in a worker thread that the caller waits on for at most ``timeout`` seconds, then
    ``RemoteTimeout``. A hung server leaves the worker blocked on its socket (nnsight's own HTTP timeout is 600 s
    a read, its websocket wait has none); it is a daemon thread and ends with the process."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=work, name="nslens-ndif-request", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RemoteTimeout(f"{what} did not answer within {timeout:g} s (client-side timeout); if the job is just "
                            f"long, raise it with NSLENS_REMOTE_TIMEOUT=SECONDS")
    if "error" in box:
        raise box["error"]
    return box["result"]


def job_backend(model: Any, job_id: str | None = None) -> Any:
    """A non-blocking backend for ``model.trace(..., backend=...)``: the trace submits its job and returns at once
    (``backend.job_id`` is set); ``poll_job`` fetches the result later, also from another process. The server
    keeps the job's status and result in its object store, so a client that restarts loses nothing it
    submitted. With ``job_id``, a backend that only polls that job. Each call is bounded by ``remote_timeout()``."""
    ship_code()
    return _backend(model, remote_timeout(), blocking=False, job_id=job_id)


#: seconds a submitted job may sit in one state (or unknown to the server) before it is resubmitted
DEFAULT_STALL = 600.0


def stall_seconds() -> float:
    """``$NSLENS_REMOTE_STALL`` or ``DEFAULT_STALL``: an API that restarts loses the jobs still in its queue (ndif
    0.1.2 keeps them QUEUED forever), so a job whose status has not changed for this long is submitted again."""
    return _seconds_from_env("NSLENS_REMOTE_STALL", DEFAULT_STALL)


def poll_job(model: Any, job_id: str, *, what: str = "NDIF job", sleep: Callable[[float], Any] = time.sleep,
             resubmit: Callable[[], str] | None = None) -> dict[str, Any]:
    """Wait for a submitted job (``job_backend``) and return its saved values by name. Polling is idempotent, so
    a failed poll is retried (``with_retries``); the wait is bounded by ``remote_timeout()``. With ``resubmit``
    (submits the same work again and returns the new job id), a job stuck in one state for ``stall_seconds()``
    is replaced by a new one (logged); the caller's ``resubmit`` records the new id."""
    backend = job_backend(model, job_id)
    deadline = time.monotonic() + remote_timeout()
    stall = stall_seconds()
    interval, seen, since = 0.05, None, time.monotonic()
    while True:
        result = with_retries(lambda b=backend: b(None), what=what, sleep=sleep)
        if result is not None:
            return result
        now = time.monotonic()
        state = None if backend.status is None else str(backend.status)
        if state != seen:
            seen, since = state, now
        elif resubmit is not None and now - since >= stall:
            old, job_id = job_id, resubmit()
            logger.warning("%s: job %s stayed %s for %.0f s (lost by a restarted server?); submitted again as %s",
                           what, old, state or "unknown to the server", now - since, job_id)
            backend, seen, since = job_backend(model, job_id), None, now
        if now >= deadline:
            raise RemoteTimeout(f"{what}: job {job_id} did not finish within {remote_timeout():g} s "
                                f"(client-side timeout); raise it with NSLENS_REMOTE_TIMEOUT=SECONDS")
        sleep(interval)
        interval = min(1.0, interval * 2)


def _backend(model: Any, timeout: float, **kwargs: Any) -> Any:
    from nnsight.intervention.backends.display import StatusDisplay  # heavy: see the module docstring

    backend = _backend_class()(model.to_model_key(), api_key=api_key(), env=model._remoteable_get_env(),
                               timeout=timeout, **kwargs)
    backend.display = StatusDisplay(enabled=False, verbose=False)  # nslens reports progress itself
    return backend


@functools.cache
def _backend_class() -> type:
    """``TimedRemoteBackend``, defined on first use so that importing nslens does not import nnsight's remote
    stack (websocket, httpx)."""
    from nnsight.intervention.backends.remote import RemoteBackend  # heavy: see the module docstring
    from nnsight.schema.request import RequestModel  # heavy: see the module docstring

    class TimedRemoteBackend(RemoteBackend):
        """nnsight's blocking backend, its request (serialise, connect, submit, wait, download) bounded by
        ``timeout`` seconds (``with_deadline``). Saved values are pushed into the caller's frame here, in the
        caller's thread, as nnsight's own ``__call__`` does."""

        def __init__(self, *args: Any, timeout: float, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.timeout = timeout

        def __call__(self, tracer: Any = None) -> Any:
            if not self.blocking:  # submit, or poll a submitted job: nothing to push into a frame
                return with_deadline(lambda: super(TimedRemoteBackend, self).__call__(tracer), self.timeout,
                                     f"NDIF at {self.host}")
            request = RequestModel(model_key=self.model_key, compress=self.compress, env=self.env)
            result = with_deadline(lambda: self.request(request, tracer), self.timeout, f"NDIF at {self.host}")
            if isinstance(result, dict):
                self._push(result, tracer)
            return result

    return TimedRemoteBackend


def api_key() -> str | None:
    """The NDIF API key from ``NDIF_API_KEY`` or nnsight's config, or None."""
    key = os.environ.get("NDIF_API_KEY")
    if key:
        return key
    from nnsight import CONFIG  # heavy: see the module docstring

    return CONFIG.API.APIKEY or None


#: the public NDIF service (the only host whose requests are known to need a key)
PUBLIC_HOST = "https://api.ndif.us"


def served_models(status: dict[str, Any]) -> list[str]:
    """The repo ids RUNNING in an NDIF ``/status`` answer. The public service's entries carry ``repo_id``; a
    self-hosted ndif 0.1.2 server's carry only ``application_state``, under a name
    ``<replica>:ModelActor:<wrapper class>:<JSON with repo_id>``, so the id is read from whichever is there."""
    out = set()
    for name, d in status.get("deployments", {}).items():
        if d.get("application_state") != "RUNNING":
            continue
        repo = d.get("repo_id") or _repo_from_key(d.get("model_key") or name)
        out.add(repo or name)
    return sorted(out)


def _repo_from_key(key: str) -> str | None:
    """``repo_id`` from the JSON part of a model key (``...TransformersModel:{"repo_id": ...}``), or None."""
    start = key.find("{")
    if start < 0:
        return None
    try:
        repo = json.loads(key[start:]).get("repo_id")
    except (ValueError, AttributeError):
        return None
    return repo if isinstance(repo, str) else None


def is_public_host() -> bool:
    """Whether nnsight points at the public NDIF service (``NDIF_HOST`` unset or that URL)."""
    from nnsight import CONFIG  # heavy: see the module docstring

    return CONFIG.API.HOST.rstrip("/") == PUBLIC_HOST


def check_remote(repo_id: str, *, timeout: float = 5.0, read_timeout: float = 90.0) -> None:
    """Fail early, with a clear one-line reason, when a remote run cannot work: no key for the public NDIF,
    NDIF unreachable, or the model not running there (naming the models that are).

    ``timeout`` bounds the connection; ``read_timeout`` the answer, which an ndif server computes on a cache miss
    by asking its Ray controller (bounded there by ``NDIF_STATUS_TIMEOUT_S``, default 60 s): on a busy machine that
    takes well over 5 s, so a short read timeout called a healthy server unreachable."""
    from nnsight import CONFIG  # heavy: see the module docstring
    from nnsight.ndif import _get  # heavy: see the module docstring

    host = CONFIG.API.HOST.rstrip("/")
    if not api_key() and is_public_host():
        raise NsLensError("remote runs need an NDIF API key: set NDIF_API_KEY or call "
                         "nnsight.CONFIG.set_default_api_key(KEY) (keys: https://login.ndif.us)")
    try:
        status = _status(_get, timeout, read_timeout)
    except Exception as e:  # httpx raises its own hierarchy; any failure here means "cannot reach"
        if "ReadTimeout" in type(e).__name__:
            raise NsLensError(f"NDIF at {host} accepted the connection but sent no status within {read_timeout:g} s; "
                              "the server is overloaded or its controller is down") from e
        code = getattr(getattr(e, "response", None), "status_code", None)
        if code is not None:
            raise NsLensError(f"NDIF at {host} answered its status page with HTTP {code}; the server is up but "
                              "not serving (see its logs)") from e
        raise NsLensError(f"cannot reach NDIF at {host} ({type(e).__name__}); check the network or NDIF_HOST") from e
    running = served_models(status)
    if repo_id not in running:
        raise NsLensError(f"model {repo_id!r} is not running on NDIF at {host}; running now: "
                         + (", ".join(running) or "none"))


def _status(get: Callable[..., Any], timeout: float, read_timeout: float, attempts: int = 3) -> Any:
    """The server's ``/status``, asked again (after 2 s) when it answers 503/504: ndif sends those when its
    controller's refresh failed or was lost (a lock left by an API restarted mid-refresh expires after 60 s), and
    the next request triggers a fresh one."""
    for i in range(attempts):
        try:
            return get("/status", timeout=(timeout, read_timeout))
        except Exception as e:
            code = getattr(getattr(e, "response", None), "status_code", None)
            if code not in (503, 504) or i == attempts - 1:
                raise
            logger.warning("NDIF /status answered %s; asking again (%d/%d)", code, i + 1, attempts - 1)
            time.sleep(2.0)
    raise AssertionError("unreachable")  # pragma: no cover


def retry_settings() -> tuple[int, float]:
    """``(attempts, base_delay)`` for remote requests: ``$NSLENS_REMOTE_RETRIES`` attempts in all (default 5) and
    ``$NSLENS_REMOTE_BACKOFF`` seconds before the first retry, doubling each time (default 2: 2 + 4 + 8 + 16 s,
    enough for an NDIF API or model worker to restart)."""
    out = []
    for var, default, kind in (("NSLENS_REMOTE_RETRIES", "5", int), ("NSLENS_REMOTE_BACKOFF", "2", float)):
        raw = os.environ.get(var, default)
        try:
            value = kind(raw)
        except ValueError:
            value = -1
        if value < (1 if kind is int else 0):
            raise NsLensError(f"{var} must be a {'positive integer' if kind is int else 'number >= 0'}, got {raw!r}")
        out.append(value)
    return int(out[0]), float(out[1])


def redact(text: str) -> str:
    """``text`` with the API key replaced by ``<api key>``: a server may echo a (malformed) key in its errors."""
    key = api_key()
    return text.replace(key, "<api key>") if key else text


def _one_line(e: BaseException) -> str:
    return " ".join(redact(f"{type(e).__name__}: {e}").split())[:500]


def with_retries(fn: Callable[[], T], *, attempts: int | None = None, base_delay: float | None = None,
                 sleep: Callable[[float], Any] = time.sleep, what: str = "NDIF request") -> T:
    """Call ``fn``; on a transient failure (the connection, or a model worker that died) wait
    ``base_delay * 2**i`` seconds and try again, at most ``attempts`` times in all (defaults:
    ``retry_settings()``), logging a progress line before each retry. A job that failed on the server for any
    other reason (nnsight's ``RemoteError``) is one ``NsLensError`` line at once, with the API key redacted;
    other errors propagate unchanged."""
    from nnsight.intervention.backends.remote import RemoteError  # heavy: see the module docstring

    default_attempts, default_delay = retry_settings()
    attempts = default_attempts if attempts is None else attempts
    base_delay = default_delay if base_delay is None else base_delay
    if attempts < 1:
        raise NsLensError(f"attempts must be >= 1, got {attempts}")
    transient = _transient_types()
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not (isinstance(e, transient) or _is_transient_remote_error(e)):
                if isinstance(e, RemoteError):
                    raise NsLensError(f"{what} failed on NDIF: {_one_line(e)}") from None
                raise
            if i == attempts - 1:
                raise NsLensError(f"{what} failed after {attempts} attempts ({_one_line(e)}); "
                                  f"more with NSLENS_REMOTE_RETRIES=N") from None
            delay = base_delay * 2**i
            logger.warning("%s failed (%s); retrying in %.0f s (%d/%d)", what, type(e).__name__, delay, i + 1,
                           attempts)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def maybe_retry(remote: bool | str, fn: Callable[[], T], what: str) -> T:
    """``with_retries`` for real remote runs (``remote=True``); a plain call locally and under ``remote="local"``."""
    return with_retries(fn, what=what) if remote is True else fn()
