"""Wheels for running nslens and its benchmarks on a GPU machine that has no network (a cluster node, say) but has
a CUDA build of PyTorch: every distribution nslens needs at run time (nnsight, transformers, lm-eval for the side
effects, bitsandbytes for nf4 and int8), at the versions installed here, less the ones named in ``--skip``
(what the target already has: torch, numpy, ...), built for the target's Python and platform.

    python benchmarks/offline_wheels.py --dest .whl --python 3.12 --cuda 130 --skip @target-packages.txt

``--cuda 130`` keeps only the CUDA 13.0 library in the bitsandbytes wheel (it ships one per CUDA release and
ROCm: about 130 MB unpacked against 5 MB). On the target:

    python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/bench_gpu.py --out gpu.json

The installed versions here are the tested ones; ``--skip`` entries are used as the target has them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

ROOTS = ("nslens",)
EXTRAS = ("eval", "quant")  # nslens's extras the benchmarks use (lm-eval, bitsandbytes)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")


def closure(roots: tuple[str, ...], extras: tuple[str, ...]) -> dict[str, tuple[str, Any]]:
    """Installed distribution name -> (version, the specifiers every requirer puts on it) for ``roots`` and
    everything they require here (markers evaluated for this interpreter; ``extras`` of the roots included)."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    found: dict[str, str] = {}
    specs: dict[str, SpecifierSet] = {}
    stack = [(r, extras) for r in roots]
    while stack:
        name, want = stack.pop()
        key = canonicalize_name(name)
        if key in found:
            continue
        try:
            dist = metadata.distribution(key)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency not installed here is not needed here either
        found[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *want)):
                dep = canonicalize_name(req.name)
                specs[dep] = specs.get(dep, SpecifierSet()) & req.specifier
                stack.append((req.name, ()))
    return {k: (v, specs.get(k, SpecifierSet())) for k, v in found.items()}


def parse_have(text: str) -> dict[str, str | None]:
    """``name`` or ``name==version`` per line (or comma-separated) -> version or None (unknown)."""
    from packaging.utils import canonicalize_name

    out: dict[str, str | None] = {}
    for line in text.replace(",", "\n").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name.strip())] = version.strip() or None
    return out


def keep_cuda(wheel: Path, cuda: str) -> Path:
    """Rewrite a bitsandbytes wheel with one CUDA library (``libbitsandbytes_cuda<cuda>.so``) and no ROCm or XPU
    ones; its RECORD is rewritten to match. Returns the path (same name, so pip takes it as the same wheel)."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = src.namelist()
        gone = {n for n in names if "/libbitsandbytes_" in n and n.endswith(".so")
                and not n.endswith(f"libbitsandbytes_cuda{cuda}.so") and "_cpu" not in n}
        if not any(n.endswith(f"libbitsandbytes_cuda{cuda}.so") for n in names):
            raise SystemExit(f"offline_wheels: {wheel.name} has no CUDA {cuda} library; choose one of "
                             + ", ".join(sorted(n.rsplit("cuda", 1)[1][:-3] for n in names if "_cuda" in n)))
        for info in src.infolist():
            if info.filename in gone:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if line.split(b",", 1)[0].decode() not in gone)
            dst.writestr(info, data)
    tmp.replace(wheel)
    return wheel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path(".whl"))
    ap.add_argument("--python", default="3.12", help="the target's Python version")
    ap.add_argument("--cuda", default=None, help="keep only this CUDA library in bitsandbytes (e.g. 130, 128)")
    ap.add_argument("--skip", default="torch", help="the distributions the target has: comma-separated, or @file "
                    "with one per line; name==version (pip freeze output) is checked against what nslens's "
                    "requirements allow, a bare name is trusted")
    args = ap.parse_args(argv)
    have = parse_have(Path(args.skip[1:]).read_text() if args.skip.startswith("@") else args.skip)
    want, kept = {}, []
    for name, (version, spec) in sorted(closure(ROOTS, EXTRAS).items()):
        if name in ROOTS:
            continue  # nslens itself travels as source (PYTHONPATH)
        theirs = have.get(name, "absent")
        # a version the target has is used unless a requirer here excludes it (transformers 5.17 for nslens's
        # >=5.22, say); an entry without a version is trusted
        if theirs is None or (theirs != "absent" and spec.contains(theirs, prereleases=True)):
            kept.append(name if theirs is None else f"{name}=={theirs}")
        else:
            want[name] = version.split("+")[0]
    args.dest.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", args.python, "--implementation", "cp", "-d", str(args.dest)]
    for p in PLATFORMS:
        base += ["--platform", p]
    missing = []
    for name, version in sorted(want.items()):
        if subprocess.run([*base, f"{name}=={version}"], capture_output=True, text=True).returncode == 0:
            continue
        # a pure-Python project published as a source archive only (sqlitedict, word2number): build its wheel
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(args.dest),
                                f"{name}=={version}"], capture_output=True, text=True)
        if built.returncode or not list(args.dest.glob(f"{name.replace('-', '_')}-{version}-py3-none-any.whl")):
            missing.append(f"{name}=={version}")
    if args.cuda:
        for wheel in args.dest.glob("bitsandbytes-*.whl"):
            keep_cuda(wheel, args.cuda)
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    print(f"{len(want) - len(missing)} wheels in {args.dest} ({total / 2**20:.1f} MiB): {', '.join(want)}")
    print(f"left to the target ({len(kept)}): {', '.join(kept) or 'none'}")
    if missing:
        print(f"offline_wheels: no wheel for Python {args.python} on x86-64 Linux: {', '.join(missing)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
