"""CLI start-up: wall time of `nslens --help` and of a usage error (`nslens record --bogus`), best of N fresh
processes. Goal: at most 1 s each (heavy imports only when a command needs them).

    python benchmarks/bench_startup.py           # best of 5
    python benchmarks/bench_startup.py --quick   # best of 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

GOAL = 1.0


def best(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True)
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    n = 2 if args.quick else 5
    base = [sys.executable, "-m", "nslens.cli"]
    out = {"nslens --help": best([*base, "--help"], n), "nslens record --bogus (usage error)":
           best([*base, "record", "--out", "x", "--bogus"], n),
           "python -c 'import nslens'": best([sys.executable, "-c", "import nslens"], n)}
    print(f"| command | best of {n} | goal |\n|---|---|---|")
    for k, v in out.items():
        print(f"| `{k}` | {v:.2f} s | <= {GOAL:.0f} s |")
    return out


if __name__ == "__main__":
    main()
