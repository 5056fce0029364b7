"""``python -m ndif_stack.watchdog STATE_DIR PARENT_PID PARENT_START``: stop the stack in STATE_DIR as soon as
its parent process (the pytest process) is gone, however it went (SIGKILL included). Runs in its own session, so a
Ctrl-C in the terminal does not reach it; exits once the stack is recorded as stopped. Stdlib only."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from . import procs
from .stack import load


def main(argv: list[str]) -> int:
    state_dir, parent, parent_start = Path(argv[0]), int(argv[1]), int(argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        stack = load(state_dir)
        if stack is None or stack.state.get("stopped"):
            return 0
        if not procs.alive(parent, parent_start):
            print(f"{time.strftime('%H:%M:%S')} parent {parent} is gone: stopping the stack in {state_dir}",
                  flush=True)
            try:
                stack.stop()
            except Exception as error:  # noqa: BLE001 - report and exit
                print(f"stopping failed: {error}", flush=True)
                return 1
            print(f"{time.strftime('%H:%M:%S')} stopped", flush=True)
            return 0
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
