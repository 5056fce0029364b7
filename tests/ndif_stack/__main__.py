"""``python -m ndif_stack up|down|status|venv`` (run from the repository with ``PYTHONPATH=tests``; the Makefile's
``ndif-up``/``ndif-down`` targets). ``up`` prints, on its last lines, ``NDIF_HOST=<url>`` and
``NDIF_MODELS=<embedded id>,<random Llama id>`` (preceded by ``NDIF_API_KEY=<key>`` when the stack checks keys);
``.cache/ndif/up/env`` holds the same as ``export`` lines. Progress goes to stderr."""

from __future__ import annotations

import json
import sys
import time

from .stack import CLI_STATE_DIR, StackError, ensure_venv, load, start, stop


def _progress(message: str) -> None:
    print(f"[ndif-stack {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    try:
        if command == "venv":
            print(ensure_venv(_progress))
        elif command == "up":
            stack = start(CLI_STATE_DIR, progress=_progress)
            timings = stack.state.get("timings", {})
            if timings:
                _progress(f"timings: {json.dumps(timings)}; memory: {stack.memory()['rss_mib']:.0f} MiB RSS, "
                          f"{stack.memory()['pss_mib']:.0f} MiB PSS; stop it with `make ndif-down`")
            if stack.api_key:
                print(f"NDIF_API_KEY={stack.api_key}")
            print(f"NDIF_HOST={stack.host}")
            print(f"NDIF_MODELS={','.join(stack.models)}")
        elif command == "down":
            stop(CLI_STATE_DIR, progress=_progress)
        elif command == "status":
            stack = load(CLI_STATE_DIR)
            if stack is None or stack.state.get("stopped") or not stack.processes():
                print("no NDIF stack running")
                return 1
            memory = stack.memory()
            print(json.dumps({"host": stack.host, "models": stack.models, "api_key": stack.api_key,
                              "services": {k: v["pid"] for k, v in stack.state["services"].items()},
                              "running": stack.is_running(), "processes": len(memory["processes"]),
                              "rss_mib": memory["rss_mib"], "pss_mib": memory["pss_mib"],
                              "timings": stack.state.get("timings")}, indent=1))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except StackError as error:
        print(f"ndif-stack: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ndif-stack: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
