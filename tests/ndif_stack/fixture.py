"""The ``ndif_stack`` pytest fixture (session scope), imported by ``tests/conftest.py``.

It starts a stack of its own (``.cache/ndif/pytest-<pid>/``, tied to the pytest process: see ``stack.start``'s
``tie_to_parent``) and stops it when the session ends, also when a test fails or the run is interrupted; if pytest
itself is killed, a watchdog process stops it. It never skips: a stack that cannot start is a test error naming
the step and its log. ``NSLENS_NDIF_REUSE=1`` uses the stack ``make ndif-up`` started instead (and leaves it
running), for quick iteration.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest


def _printer(config):
    """Progress lines on the terminal even while pytest captures output (the start takes a minute or two)."""
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")

    def say(message: str) -> None:
        if reporter is None:
            return
        ctx = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
        with ctx:
            reporter.write_line(f"[ndif_stack] {message}")

    return say


def _prune_dead_stacks(cache) -> None:
    """Remove the state directories (and Ray's log directories in /tmp) of earlier pytest runs whose process is
    gone, stopping anything left."""
    from . import procs, stack

    for path in cache.glob("pytest-*"):
        old = stack.load(path)
        owner = old.state.get("owner_pid") if old else None
        if old is not None and owner is not None and procs.alive(owner) and owner != os.getpid():
            continue
        with contextlib.suppress(Exception):
            if old is not None:
                old.stop()
                shutil.rmtree(old.state.get("ray_temp_dir") or path / "none", ignore_errors=True)  # Ray's logs
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ndif_stack(request):
    """A running NDIF stack: ``.host``, ``.api_key``, ``.models`` (embedded model first), ``.model_keys``, plus the
    client helpers (``.configured()``, ``.remote_model(id)``, ``.backend(model)``, ``.client_env()``) and the
    fault helpers (``.kill_api()``, ``.start_api()``, ``.restart_api()``, ``.pause_api()``/``.resume_api()``,
    ``.kill_model_actor(id)``/``.wait_model_actor(id, old_pid)``, ``.stop()``); see ``stack.Stack``."""
    from . import stack

    say = _printer(request.config)
    if os.environ.get("NSLENS_NDIF_REUSE", "") == "1":
        running = stack.load(stack.CLI_STATE_DIR)
        if running is None or not running.is_running():
            pytest.fail("NSLENS_NDIF_REUSE=1 but no stack from `make ndif-up` is running", pytrace=False)
        say(f"reusing the stack from `make ndif-up` at {running.host}")
        yield running
        return
    _prune_dead_stacks(stack.CACHE)
    try:
        live = stack.start(stack.CACHE / f"pytest-{os.getpid()}", tie_to_parent=True, progress=say)
    except stack.StackError as error:
        pytest.fail(f"the NDIF stack could not start: {error}", pytrace=False)
    try:
        yield live
    finally:
        live.stop()
        say("stopped the NDIF stack")
