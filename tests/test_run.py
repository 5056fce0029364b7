"""The run directory (nslens.run.Run): what it refuses before any work, so that no --out a user gives loses files."""

import json

import pytest

from nslens.errors import NsLensError
from nslens.run import Run


def test_overwrite_replaces_a_run_but_never_another_folder(tmp_path):
    mine = tmp_path / "project"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("a user's file")
    for overwrite in (False, True):
        with pytest.raises(NsLensError, match="is not an nslens run directory"):
            Run(mine, overwrite=overwrite)
    assert (mine / "notes.txt").read_text() == "a user's file" and (mine / "src").is_dir()

    run = tmp_path / "run"
    r = Run(run)
    r.start({"model": "embedded"})
    r.complete()
    assert json.loads((run / "summary.json").read_text())["status"] == "complete"
    with pytest.raises(NsLensError, match="pass --overwrite"):
        Run(run)
    r = Run(run, overwrite=True)
    r.start({"model": "other"})
    assert json.loads((run / "config.json").read_text()) == {"model": "other"}

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".summary.json.x1.tmp").write_text("{")  # what a killed writer leaves: not a user's file
    Run(empty).start({})
    assert (empty / "summary.json").is_file()
