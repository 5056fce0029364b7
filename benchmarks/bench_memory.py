"""Recording memory: peak RSS of recording 20k samples divided by recording 1k samples, each in a fresh process,
on the embedded model. Goal: about 1.0 (statistics stream: O(concepts x d_model) whatever N).

    python benchmarks/bench_memory.py           # 20k vs 1k samples
    python benchmarks/bench_memory.py --quick   # 2k vs 200 (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, random, resource, sys
import numpy as np
import nslens
from nslens.synthetic import synthetic_text
n = int(sys.argv[1])
model = nslens.load_model("embedded")
site = nslens.resolve_site(model, -2)
rng = random.Random(0)
prompts = [f"Text: {synthetic_text(i % 4, rng)}\\nLabel:" for i in range(n)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
nslens.record(model, site, prompts, np.arange(n) % 4, ["a", "b", "c", "d"], batch_size=64)
print(json.dumps({"before_kb": before, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def peak(n: int) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    small, large = (200, 2000) if args.quick else (1000, 20000)
    a, b = peak(small), peak(large)
    ratio = b["peak_kb"] / a["peak_kb"]
    print(f"peak RSS recording {small} samples: {a['peak_kb'] / 1024:.0f} MiB; {large} samples: "
          f"{b['peak_kb'] / 1024:.0f} MiB (after loading: {a['before_kb'] / 1024:.0f} / {b['before_kb'] / 1024:.0f} MiB)")
    print(f"ratio {large}/{small} = {ratio:.3f} (goal about 1.0)")
    return ratio


if __name__ == "__main__":
    main()
