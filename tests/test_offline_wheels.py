"""benchmarks/offline_wheels.py: the wheel set for an offline GPU machine (requirement closure, what the target
keeps, one CUDA library in bitsandbytes). The downloads themselves need a registry and are not run here."""

from __future__ import annotations

import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import offline_wheels  # noqa: E402


def _wheel(path: Path, names: list[str]) -> dict[str, bytes]:
    files = {n: f"payload of {n}".encode() for n in names}
    record = "".join(f"{n},sha256=x,{len(b)}\n" for n, b in files.items()) + "bnb-1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
        z.writestr("bnb-1.dist-info/RECORD", record)
    return files


def test_keep_cuda_keeps_one_cuda_library_and_the_cpu_one(tmp_path):
    libs = ["bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_cuda130.so",
            "bitsandbytes/libbitsandbytes_rocm64.so", "bitsandbytes/libbitsandbytes_xpu2025.so",
            "bitsandbytes/libbitsandbytes_cpu.so"]
    wheel = tmp_path / "bitsandbytes-1-py3-none-any.whl"
    files = _wheel(wheel, ["bitsandbytes/__init__.py", *libs])
    offline_wheels.keep_cuda(wheel, "130")
    kept = {"bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cuda130.so",
            "bitsandbytes/libbitsandbytes_cpu.so"}
    with zipfile.ZipFile(wheel) as z:
        assert set(z.namelist()) == kept | {"bnb-1.dist-info/RECORD"}
        assert all(z.read(n) == files[n] for n in kept)
        listed = {line.split(",")[0] for line in z.read("bnb-1.dist-info/RECORD").decode().splitlines()}
    assert listed == kept | {"bnb-1.dist-info/RECORD"}


def test_keep_cuda_names_the_versions_a_wheel_has(tmp_path):
    wheel = tmp_path / "bitsandbytes-1-py3-none-any.whl"
    _wheel(wheel, ["bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_cuda126.so"])
    with pytest.raises(SystemExit, match="no CUDA 130 library; choose one of 118, 126"):
        offline_wheels.keep_cuda(wheel, "130")
    with zipfile.ZipFile(wheel) as z:  # untouched
        assert len(z.namelist()) == 3


def test_parse_have_reads_names_and_pinned_versions():
    have = offline_wheels.parse_have("numpy==2.5.2\nTorch\n# a comment\n\nHuggingface_Hub==1.33.0, sacrebleu")
    assert have == {"numpy": "2.5.2", "torch": None, "huggingface-hub": "1.33.0", "sacrebleu": None}


def test_closure_holds_the_installed_requirements_and_their_specifiers():
    found = offline_wheels.closure(("nslens",), ("eval",))
    for name in ("nnsight", "transformers", "torch", "lm-eval", "datasets"):
        assert found[name][0] == metadata.version(name)
    # nslens's own pin on transformers (pyproject.toml) is part of the specifier the target's version must meet
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(Requirement(d).specifier for d in deps if Requirement(d).name == "transformers")
    spec = found["transformers"][1]
    excluded = [v for v in ("5.17.0", "5.21.9", "5.22.0", "5.23.0", "5.24.0") if not pin.contains(v)]
    assert excluded and not any(spec.contains(v) for v in excluded)
    assert spec.contains(metadata.version("transformers"))
    assert "bitsandbytes" not in offline_wheels.closure(("nslens",), ())  # only with the quant extra
