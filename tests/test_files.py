"""Atomic artifact writes: all or nothing, with the permissions an ordinary open() would give; the build lock."""

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nslens.errors import NsLensError
from nslens.files import atomic_path, file_lock, read_json, write_text


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        p = write_text(tmp_path / "sub" / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == mode and p.read_text() == "{}"


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_file_lock_makes_another_process_wait(tmp_path):
    """While this process holds the lock, another one blocks on it and gets it only after the release (the lock's
    folder is created on the way)."""
    lock = tmp_path / "sub" / ".build.lock"
    code = ("import time; from nslens.files import file_lock; print('waiting', flush=True)\n"
            f"with file_lock({str(lock)!r}):\n    print(time.monotonic(), flush=True)")
    with file_lock(lock):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "waiting"
        time.sleep(1.0)  # the child is at the lock by now, or soon after: either way it must wait for the release
        released = time.monotonic()
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and float(out) >= released


def test_output_stem_drops_only_an_output_extension():
    """``--out table.md`` names the stem ``table``; ``--out run.v1`` and ``--out run.v2`` stay apart (dropping the
    last dot-part wrote both to ``run.md``)."""
    from nslens.files import output_stem

    assert output_stem("er/table.md") == Path("er/table") and output_stem("x.JSONL") == Path("x")
    assert output_stem("run.v2") == Path("run.v2") and output_stem("a.b/c") == Path("a.b/c")
    assert output_stem("dir/table") == Path("dir/table")


@pytest.mark.parametrize("text, build, words", [
    ('{"status": "compl', None, r"summary.json is damaged or not what nslens wrote there \(JSONDecodeError"),
    ("[1, 2]", None, "summary.json holds a JSON list, not the object nslens writes there"),
    ('{"nope": 1}', lambda text: dict_only(**json.loads(text)), r"damaged or not what nslens wrote there \(TypeError"),
])
def test_read_json_names_a_damaged_or_foreign_file(tmp_path, text, build, words):
    """A truncated summary.json or table was an internal error (JSONDecodeError, a constructor's TypeError)."""
    p = tmp_path / "summary.json"
    p.write_text(json.dumps({"status": "complete", "steps": {}}))
    assert read_json(p) == {"status": "complete", "steps": {}}
    p.write_text(text)
    with pytest.raises(NsLensError, match=words):
        read_json(p, build)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def dict_only(*, status: str) -> dict:
    return {"status": status}
