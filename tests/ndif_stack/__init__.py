"""A real NDIF server (ndif 0.1.2) started on this machine, for the remote tests and benchmarks.

    make ndif-up / make ndif-down            # python -m ndif_stack up|down|status (PYTHONPATH=tests)
    def test_x(ndif_stack): ...              # the session fixture (tests/ndif_stack/fixture.py)

Every ndif workaround lives in this package (``stack.py`` and ``server/ndif_stack_server.py``) and is listed in
``README.md`` next to it; the library has none. Importing this package is cheap (stdlib only).
"""

from .stack import (
    CLI_STATE_DIR,
    Stack,
    StackError,
    add_api_key,
    ensure_venv,
    load,
    start,
    stop,
    stop_all,
)

__all__ = ["CLI_STATE_DIR", "Stack", "StackError", "add_api_key", "ensure_venv", "load", "start", "stop",
           "stop_all"]
