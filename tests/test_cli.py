"""The CLI: a clear one-line error and exit code 1 on bad input (no traceback), real runs on the embedded model.

Most commands run in this process (``nslens(...)``: ``main`` with stdout and stderr captured, neither a terminal);
a few run as a real child process (``nslens_process(...)``) for what needs one: output without a terminal, a real
SIGINT, and the exit codes and one error line of a real process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_cases import CASES, FIXTURES, LATIN1, markdown
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def nslens_process(*args, cwd=None, env=None):
    """``python -m nslens.cli`` in a child process (stdout and stderr are pipes, not terminals)."""
    env = {**(os.environ if env is None else env), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "nslens.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


#: nslens in this process (conftest.run_cli)
nslens = run_cli


def write_case_files(folder):
    for name, text in FIXTURES.items():
        (folder / name).write_text(text)
    (folder / LATIN1[0]).write_bytes(LATIN1[1])


def assert_bad_input(r, code, message, folder):
    """Usage errors: the usage line and one error line, exit 2; other bad input: one error line, exit 1. The line
    is unwrapped (no terminal) and nothing is written."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    if code == 2:
        lines = r.stderr.strip().splitlines()
        assert lines[-2].startswith("Usage: nslens") and lines[-1] == errors[0]
    assert not (folder / "x.safetensors").exists()


@pytest.mark.parametrize("args,code,message", CASES, ids=[" ".join(c[0]) or "(none)" for c in CASES])
def test_bad_input_is_one_error_line_with_its_exit_code(embedded, tmp_path, args, code, message):
    """Every case of the table (in this process): nothing on stderr but the usage line (exit 2) and the error
    line."""
    write_case_files(tmp_path)
    r = nslens(*args, cwd=tmp_path)
    assert_bad_input(r, code, message, tmp_path)
    assert len(r.stderr.splitlines()) == (2 if code == 2 else 1), r.stderr


#: a usage error and a user error that gets as far as loading the model, each in a real process
IN_A_PROCESS = [c for c in CASES if c[0] in (["recrd"], ["record", "--out", "x.safetensors", "--layer", "9"])]


@pytest.mark.parametrize("args,code,message", IN_A_PROCESS, ids=[" ".join(c[0]) for c in IN_A_PROCESS])
def test_bad_input_in_a_real_process(embedded, tmp_path, args, code, message):
    assert len(IN_A_PROCESS) == 2
    write_case_files(tmp_path)
    assert_bad_input(nslens_process(*args, cwd=tmp_path), code, message, tmp_path)


def test_docs_bad_input_table_is_generated_from_the_cases():
    page = (ROOT / "docs" / "cli.md").read_text()
    assert markdown() in page, "regenerate the table in docs/cli.md: python tests/cli_cases.py"


def test_docs_option_table_names_the_commands_that_take_each_option():
    """Each row of docs/cli.md's option table: every option it names (second names and --no-/--all- forms too) is
    taken by exactly the commands its last column names ("every command that loads a model": those with
    --model)."""
    import re

    import typer

    from nslens.cli import app

    commands = typer.main.get_command(app).commands

    def takes(option):
        return {n for n, c in commands.items()
                if any(option in p.opts or option in getattr(p, "secondary_opts", ()) for p in c.params)}

    page = (ROOT / "docs" / "cli.md").read_text()
    table = page[page.index("| option | sets | on |"):]
    table = table[:table.index("\n\n")]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert len(rows) >= 15
    loads_model = takes("--model")
    for cells in rows:
        options = [o for chunk in re.findall(r"`(--[^`]+)`", cells[0]) for o in chunk.split("/")]
        on = cells[-1].strip(" |")
        want = loads_model if on == "every command that loads a model" else set(on.split(", "))
        assert want <= set(commands), on
        for option in options:
            assert takes(option) == want, (option, sorted(takes(option)), on)


@pytest.mark.parametrize("exc", ["keyboard", "typer-exit-130"])
def test_ctrl_c_exits_130_saying_what_and_how_to_resume(monkeypatch, capsys, tmp_path, exc):
    """Ctrl-C reaches main either as KeyboardInterrupt or, with typer >= 0.2x, as the exit code 130 that a
    non-standalone typer app returns (typer converts the KeyboardInterrupt into Exit(130))."""
    import nslens.cli as cli

    def interrupted(*a, **k):
        if exc == "keyboard":
            raise KeyboardInterrupt
        return 130

    monkeypatch.setattr(cli, "app", interrupted)
    monkeypatch.chdir(tmp_path)
    argv = ["record", "--out", "s.safetensors", "--checkpoint", "ck.safetensors"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: interrupted: nslens record; no batch was checkpointed yet"]
    (tmp_path / "ck.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit):
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: interrupted: nslens record")
    assert "run the same command again to resume (nslens record --out s.safetensors --checkpoint ck.safetensors)" \
        in err[0]
    with pytest.raises(SystemExit):
        cli.main(["run", "c.toml"])
    assert "finished artifacts stay in the run directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def recorded(embedded, tmp_path_factory):
    """One recording by a real process (its progress without a terminal is checked), shared by the commands that
    read statistics."""
    folder = tmp_path_factory.mktemp("recorded")
    r = nslens_process("record", "--out", "stats.safetensors", "--n-per-class", "24", "--batch-size", "32",
                       cwd=folder)
    assert r.returncode == 0, r.stderr
    return folder / "stats.safetensors", r


def test_record_ranges_erase_roundtrip(recorded, tmp_path):
    stats, r = recorded
    # no terminal: progress is a plain line per stage, not a bar frame
    assert any(line.startswith("record: ") and line.endswith(" s)") for line in r.stderr.splitlines()), r.stderr
    r = nslens("ranges", stats, "--out", "ranges", "--fraction", "0.5", "--tau", "0", cwd=tmp_path)
    assert r.returncode == 1 and "tau must be a positive number" in r.stderr
    r = nslens("ranges", stats, "--out", "ranges", "--fraction", "0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "ranges").glob("*.safetensors"))) == 4
    r = nslens("erase", "--ranges", "ranges", "--n-per-class", "24", "--batch-size", "32", "--out", "tab",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Concept erasure" in r.stdout and "trimmed mean" in r.stdout
    assert (tmp_path / "tab.md").exists() and (tmp_path / "tab.csv").exists()
    # masks made for layer 3 (the default: the last block) do not fit layer 1
    r = nslens("erase", "--ranges", "ranges", "--layer", "1", cwd=tmp_path)
    assert r.returncode == 1 and "made for another model/site: layer: mask has 3, model has 1" in r.stderr
    # a dataset whose concepts come in another order would print one concept's numbers under another's name
    from nslens.synthetic import synthetic_concepts

    ds = synthetic_concepts(12, seed=3)
    rows = sorted(zip(ds.texts, [ds.label_names[y] for y in ds.labels]), key=lambda r: r[1] != "politics")
    (tmp_path / "other.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    r = nslens("erase", "--ranges", "ranges", "--dataset", "other.csv", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "are for the concepts ['sports', 'science', 'business', 'politics'] but the dataset has" in r.stderr
    # masks recorded on another model (a copy of the embedded model under another id) are refused ...
    from nslens.embedded import embedded_model_dir

    r = nslens("erase", "--ranges", "ranges", "--model", str(embedded_model_dir()), "--n-per-class", "24",
               "--batch-size", "32", cwd=tmp_path)
    assert r.returncode == 1 and "were recorded on model 'embedded'" in r.stderr and "--allow-other-model" in r.stderr
    # ... unless the user says it is a copy of it
    r = nslens("erase", "--ranges", "ranges", "--model", str(embedded_model_dir()), "--n-per-class", "24",
               "--batch-size", "32", "--allow-other-model", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_run_from_config(embedded, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('fraction = 0.5\nn_per_class = 24\nbatch_size = 32\noperators = ["zero"]\n')
    r = nslens("run", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "report.md").exists() and "Concept erasure" in r.stdout


def test_side_effects_command(recorded, tmp_path):
    stats, _ = recorded
    assert nslens("ranges", stats, "--out", "ranges", "--fraction", "0.5", cwd=tmp_path).returncode == 0
    r = nslens("side-effects", "--ranges", "ranges", "--lm-eval-limit", "0", cwd=tmp_path)
    assert r.returncode == 1 and "limit must be > 0" in r.stderr and "Traceback" not in r.stderr
    r = nslens("side-effects", "--ranges", "ranges", "--tasks", "nslens_synth_m", cwd=tmp_path)
    assert r.returncode == 1 and "unknown lm-eval task 'nslens_synth_m'" in r.stderr
    r = nslens("side-effects", "--ranges", "ranges", "--lm-eval-limit", "4", "--out", "se", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "trimmed mean (10%)" in r.stdout and (tmp_path / "se.json").exists()


def test_remote_bad_input(tmp_path, monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    r = nslens("record", "--out", "x.safetensors", "--remote", "--model", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 1 and "remote=True needs a hub model id" in r.stderr and "Traceback" not in r.stderr
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)  # no key in nnsight's config either
    r = nslens("record", "--out", "x.safetensors", "--remote", "--model", "meta-llama/Llama-3.1-70B", cwd=tmp_path)
    assert r.returncode == 1 and "need an NDIF API key" in r.stderr and "Traceback" not in r.stderr


def test_analyze_sweep_report_commands(embedded, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('fraction = 0.5\nn_per_class = 16\nbatch_size = 32\nanalyses = false\n')
    r = nslens("run", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "run" / "analysis.json").exists()
    r = nslens("analyze", str(tmp_path / "run"))
    assert r.returncode == 1 and "no raw samples" in r.stderr
    cfg.write_text('fraction = 0.5\nn_per_class = 16\nbatch_size = 32\n')
    assert nslens("run", str(cfg), "--out", str(tmp_path / "run2")).returncode == 0
    (tmp_path / "run2" / "analysis.json").unlink()
    r = nslens("analyze", str(tmp_path / "run2"))
    assert r.returncode == 0, r.stderr
    assert "## Polysemanticity" in (tmp_path / "run2" / "report.md").read_text()
    r = nslens("sweep", str(cfg), "--param", "tau", "--values", "1,2.5", "--out", str(tmp_path / "sw"))
    assert r.returncode == 0, r.stderr
    assert "| 2.5 |" in r.stdout and (tmp_path / "sw" / "figures" / "sweep_tau.png").exists()
    r = nslens("sweep", str(cfg), "--param", "depth")
    assert r.returncode == 1 and "unknown sweep 'depth'" in r.stderr
    r = nslens("report", str(tmp_path))
    assert r.returncode == 1 and "not an nslens run directory" in r.stderr
    assert nslens("report", str(tmp_path / "sw")).returncode == 0
    # damaged files of a run: one line naming the file (each was an internal error)
    run2 = tmp_path / "run2"
    table = run2 / "erasure_zero.json"
    table.write_text(table.read_text()[:40])
    for command in ("report", "explore"):
        r = nslens(command, str(run2))
        assert r.returncode == 1 and r.stderr.startswith(f"error: {table} is damaged or not what nslens wrote"), \
            r.stderr
    (run2 / "samples.safetensors").write_bytes(b"truncated")
    r = nslens("analyze", str(run2))
    assert r.returncode == 1 and r.stderr.startswith(f"error: cannot read {run2 / 'samples.safetensors'}"), r.stderr
    next(iter((run2 / "ranges").glob("*.safetensors"))).replace(run2 / "samples.safetensors")  # a mask in its place
    r = nslens("analyze", str(run2))
    assert r.returncode == 1 and "is not a run's raw samples" in r.stderr, r.stderr
    (run2 / "summary.json").write_text("[1, 2]")
    r = nslens("report", str(run2))
    assert r.returncode == 1 and "summary.json holds a JSON list" in r.stderr, r.stderr


def test_real_sigint_during_record(embedded, tmp_path):
    """A real Ctrl-C (SIGINT) in the middle of a recording: exit 130, one line, no traceback."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "nslens.cli", "record", "--out", "s.safetensors", "--n-per-class",
                          "2000", "--batch-size", "4", "--checkpoint", "ck.safetensors"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-500:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: interrupted: nslens record") and "Traceback" not in err
    assert not (tmp_path / "s.safetensors").exists()


def test_unwritable_out_fails_before_any_work_and_a_failed_final_write_keeps_the_checkpoint(embedded, tmp_path,
                                                                                              monkeypatch):
    from nslens import workflows
    from nslens.stats import ConceptStats

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: a regular file as the folder then
            locked = tmp_path / "file"
            locked.write_text("x")
        with monkeypatch.context() as mp:
            mp.setattr(workflows, "load_model", no_loading)  # refused before the model loads
            r = nslens("record", "--out", str(locked / "s.safetensors"), cwd=tmp_path)
        assert r.returncode == 1 and f"cannot write {locked / 's.safetensors'}" in r.stderr, r.stderr
    finally:
        (tmp_path / "locked").chmod(0o700)
    # the final write fails after recording: the checkpoint (all the progress) must survive
    save = ConceptStats.save

    def disk_full(self, path):  # checkpoints still save; the final output does not
        if Path(path).name == "s.safetensors":
            raise OSError(28, "No space left on device")
        return save(self, path)

    monkeypatch.setattr(ConceptStats, "save", disk_full)
    r = nslens("record", "--out", "s.safetensors", "--n-per-class", "12", "--batch-size", "8", "--checkpoint",
               "ck.safetensors", "--all-samples", cwd=tmp_path)
    assert r.returncode == 1 and "No space left on device" in r.stderr
    assert (tmp_path / "ck.safetensors").exists() and not (tmp_path / "s.safetensors").exists()


def test_a_bug_is_an_internal_error_not_a_user_error(monkeypatch, tmp_path, capsys):
    """A plain ValueError from inside (numpy's, say) is not bad input: one line saying it is internal, where the
    traceback went, exit 1; --debug prints the traceback too. NsLensError stays a one-line user error."""
    import nslens.pipeline
    from nslens.cli import main
    from nslens.errors import NsLensError

    monkeypatch.setenv("NSLENS_HOME", str(tmp_path / "home"))

    def broken(run):
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

    monkeypatch.setattr(nslens.pipeline, "analyze_run", broken)
    with pytest.raises(SystemExit) as ex:
        main(["analyze", str(tmp_path)])
    err = capsys.readouterr().err
    assert ex.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert "internal error" in err and "broadcast" in err and "--debug" in err and "Traceback" not in err
    saved = list((tmp_path / "home" / "errors").glob("internal-error-*.txt"))
    assert len(saved) == 1 and "in broken" in saved[0].read_text()

    with pytest.raises(SystemExit) as ex:
        main(["analyze", str(tmp_path), "--debug"])
    err = capsys.readouterr().err
    assert ex.value.code == 1 and "Traceback (most recent call last)" in err and "in broken" in err

    def user(run):
        raise NsLensError("run directory has no samples.safetensors")

    monkeypatch.setattr(nslens.pipeline, "analyze_run", user)
    with pytest.raises(SystemExit) as ex:
        main(["analyze", str(tmp_path)])
    err = capsys.readouterr().err
    assert ex.value.code == 1 and err.strip() == "error: run directory has no samples.safetensors"


#: (command, flag) pairs whose default is the command's own, not the configuration's
OWN_DEFAULTS = {("steer", "--layer"), ("steer", "--steering"), ("sae", "--side-effects"), ("steer", "--side-effects"),
                ("demo", "--side-effects"), ("demo", "--fraction"), ("demo", "--operators"),
                ("nexttoken", "--n-per-class"), ("sweep", "--param")}


def test_every_flag_sets_one_config_field_and_means_it_on_every_command():
    """The vocabulary: every option of every command is a configuration flag (one field of RunConfig, of one of
    its sections or of NegConfig) or a command option (an input or output); a flag has the same names, Python
    name and default on every command (the defaults are the fields' own), and no two flags set one field."""
    import dataclasses
    import typing

    import typer.main

    from nslens.cli import app
    from nslens.cli.options import COMMAND_OPTIONS, FLAGS, to_field_type
    from nslens.config import SECTIONS, RunConfig
    from nslens.negstudy import NegConfig

    def owner_field(target):
        owner, _, name = target.rpartition(".")
        cls = NegConfig if owner == "neg" else SECTIONS[owner] if owner else RunConfig
        return cls, {f.name: f for f in dataclasses.fields(cls)}[name]

    targets = [f.target for f in FLAGS.values()]
    assert len(set(targets)) == len(targets), "two flags set one field"
    names = [n for f in FLAGS.values() for part in f.names for n in part.split("/")]
    assert len(set(names)) == len(names), "one name for two flags"
    for f in FLAGS.values():
        cls, fld = owner_field(f.target)
        default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
        assert to_field_type(f.default, typing.get_type_hints(cls)[fld.name]) == default, f.flag
    group = typer.main.get_command(app)
    python_names = {}
    for command, cmd in group.commands.items():
        for p in cmd.params:
            if p.param_type_name != "option":
                continue
            flag = next(o for o in p.opts if o.startswith("--"))
            assert (flag in FLAGS) != (flag in COMMAND_OPTIONS), f"nslens {command} {flag}: in neither table"
            if flag not in FLAGS:
                continue
            spec = FLAGS[flag]
            assert {o for o in [*p.opts, *p.secondary_opts] if o.startswith("--")} == \
                {n for part in spec.names for n in part.split("/") if n.startswith("--")}, (command, flag)
            assert python_names.setdefault(flag, p.name) == p.name, (command, flag)
            if (command, flag) not in OWN_DEFAULTS:
                assert p.default == spec.default, (command, flag, p.default)
    # every command that loads a model takes the model, remote, dtype and quantize options
    for command in ("record", "erase", "side-effects", "sae", "steer", "neg", "probe"):
        opts = {o for p in group.commands[command].params for o in p.opts}
        assert {"--model", "--remote", "--dtype", "--quantize", "--layer", "--seed"} <= opts, command


@pytest.mark.parametrize("argv,function,expect", [
    (["erase", "--ranges", "r", "--operators", "zero,dampen", "--alpha", "0.3", "--beta", "0.7", "--batch-size", "8",
      "--dtype", "float16", "--seed", "3", "--positions", "last"], "nslens.workflows.erase_with_masks",
     {"operators": ["zero", "dampen"], "alpha": 0.3, "beta": 0.7, "batch_size": 8, "dtype": "float16", "seed": 3,
      "positions": "last"}),
    (["side-effects", "--ranges", "r", "--operator", "adaptive", "--lm-eval-limit", "5", "--tasks", "a,b",
      "--include", "inc"], "nslens.workflows.side_effects_with_masks",
     {"operators": ["adaptive"], "side_effects.limit": 5.0, "side_effects.tasks": ["a", "b"],
      "side_effects.include": "inc", "batch_size": 16}),
    (["steer", "--steering", "steer", "--steer-alpha", "-1", "--steer-source", "mean", "--steer-tau", "2",
      "--limit", "4", "--no-side-effects", "--layer", "2"], "nslens.workflows.steering_run",
     {"steering.runs": ["steer"], "steering.alpha": -1.0, "steering.source": "mean", "steering.tau": 2.0,
      "side_effects.limit": 4.0, "side_effects.enabled": False, "layer": 2, "operators": ["zero"],
      "analyses": False}),
    (["sae", "--sae-release", "r", "--sae-id", "i", "--ranges-over", "all", "--n", "8", "--max-words", "12"],
     "nslens.pipeline.run_pipeline",
     {"sae.release": "r", "sae.id": "i", "sae.ranges_over": "all", "n_per_class": 8, "side_effects.enabled": True,
      "max_words": 12}),
    (["neg", "--kind", "up_proj", "--prompts", "3", "--one-layer", "--label-words", "a,b,c,d", "--layer", "1"],
     "nslens.negstudy.neg_linearity",
     {"neg.kind": "up_proj", "neg.prompts": 3, "neg.all_layers": False, "label_words": ["a", "b", "c", "d"],
      "layer": 1}),
    (["probe", "--mceval", "agnews", "--queries", "7", "--batch-size", "4", "--remote", "--model", "org/m"],
     "nslens.negstudy.skill_probes",
     {"neg.mceval": "agnews", "neg.queries": 7, "batch_size": 4, "remote": True, "model": "org/m"}),
])
def test_a_flag_reaches_its_field(monkeypatch, argv, function, expect):
    """What a command hands its library function: each flag's value in the field the table names."""
    import importlib

    from nslens.cli import main

    got = {}

    def capture(cfg, *args, **kwargs):
        got["cfg"], got["neg"] = cfg, next((a for a in args if type(a).__name__ == "NegConfig"), None)
        raise SystemExit(0)

    module, name = function.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, capture)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    for target, value in expect.items():
        owner, _, field = target.rpartition(".")
        obj = got["neg"] if owner == "neg" else getattr(got["cfg"], owner) if owner else got["cfg"]
        assert getattr(obj, field) == value, target


def test_help_lists_what_the_registries_hold():
    """The option help is written out (reading the registries would load torch on `nslens --help`), so a test
    keeps it honest: every registered operator is named in --operators' help, and every ranking `nslens ranges`
    can compute from a statistics file in --method's."""
    from nslens.cli.options import FLAGS
    from nslens.ops import OPERATORS
    from nslens.rank import RANKING_METHODS, get_ranking

    for name in OPERATORS:
        assert name in FLAGS["--operators"].help, name
    for name in RANKING_METHODS:
        r = get_ranking(name)
        if not (r.needs_model or r.needs_samples):
            assert name in FLAGS["--method"].help, name


def test_help_shows_every_word_it_was_given():
    """Typer renders help as rich markup, where a bracketed word reads as a style tag and vanishes ("tables
    ([sae], ...)" printed "tables (, , , )") and ":name:" can become an emoji ("next:FAMILY:SOURCE" printed a
    family emoji). Every word of each command's help and of its parameters' help must appear in its ``--help``
    (written with ``\\[`` where a bracket must survive)."""
    import typer
    from typer.testing import CliRunner

    from nslens.cli import COMMANDS, app

    group = typer.main.get_command(app)
    for name in COMMANDS:
        command = group.commands[name]
        shown = CliRunner().invoke(app, [name, "--help"], terminal_width=1000, env={"COLUMNS": "1000"})
        assert shown.exit_code == 0, (name, shown.output)
        words = set(shown.output.replace("│", " ").split())
        for text in [command.help or ""] + [p.help for p in command.params if getattr(p, "help", None)]:
            for word in text.replace("\\[", "[").split():
                assert word in words, (name, word, text)


def test_a_terminal_shows_messages_as_they_are(tmp_path, monkeypatch):
    """On a terminal nslens prints through rich, which reads "[word]" as a style tag and ":name:" as an emoji: an
    error naming a config table printed "unknown keys ['bogus'] in ; valid keys: ...". Through a real terminal
    (a pty), the error line keeps it; a "wrote" line keeps a path with brackets and colons, an erasure table a
    concept's name."""
    import importlib
    import io
    import pty
    import re

    cli_app = importlib.import_module("nslens.cli.app")  # the module (nslens.cli.app is also the typer app's name)

    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "embedded"\n[sae]\nbogus = 1\n')
    leader, follower = pty.openpty()
    p = subprocess.run([sys.executable, "-m", "nslens.cli", "run", str(cfg)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=follower, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    line = ansi.sub("", shown.decode()).strip()
    assert p.returncode == 1
    assert line.startswith("error: unknown keys ['bogus'] in [sae]; valid keys: "), line
    assert "\x1b[" in shown.decode()  # it was a terminal: the label is coloured

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err, out = Terminal(), Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    path = tmp_path / "[run]" / "a:smile:.md"
    cli_app.done("wrote", path)
    assert ansi.sub("", err.getvalue()).strip() == f"wrote {path}"

    class Table:
        operator, concepts, meta = "zero", ["[b]sports"], {}

        def rows(self):
            return [["[b]sports", *([0.5] * 12)]]

    monkeypatch.setattr(cli_app.out_console, "width", 300)
    cli_app.print_table(Table())
    assert "[b]sports" in ansi.sub("", out.getvalue())


def test_demo_and_run_never_replace_a_folder_that_is_not_a_run(tmp_path):
    """`demo` always replaces its --out and `run --overwrite` replaces one: both refuse a user's own folder (one
    line, exit 1) and leave it as it was."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "precious.txt").write_text("important")
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "embedded"\n')
    for args in (["demo", "--out", mine, "--no-side-effects"], ["run", cfg, "--out", mine, "--overwrite"]):
        r = nslens(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.strip().splitlines() == [
            f"error: {mine} exists, is not empty and is not an nslens run directory (no summary.json); choose a new "
            "or empty directory as --out"], r.stderr
        assert sorted(p.name for p in mine.iterdir()) == ["precious.txt"]


def test_outputs_are_checked_first_and_a_failed_command_leaves_no_folders(embedded, tmp_path):
    """A directory given where one file goes fails before any work, naming it (record's failed at the end,
    naming its temporary file); a command refused after the output check leaves none of the folders its output
    would have needed (the check used to make them)."""
    folder = tmp_path / "ranges"
    folder.mkdir()
    r = nslens("record", "--out", folder, "--n-per-class", "8")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: cannot write {folder}: it is a directory; give a file name"], r.stderr
    (tmp_path / "file.txt").write_text("")
    r = nslens("record", "--out", tmp_path / "file.txt" / "x.safetensors", "--n-per-class", "8")
    assert r.returncode == 1 and f"{tmp_path / 'file.txt'} is not a directory" in r.stderr, r.stderr
    r = nslens("nexttoken", "pronouns", "--source", "synthetic", "--min-words", "-3", "-o", tmp_path / "nt" / "a")
    assert r.returncode == 1, r.stderr
    r = nslens("record", "--out", tmp_path / "nd" / "deep" / "x.safetensors", "--n-per-class", "8",
               "--label-words", "sports,sports,business,politics")
    assert r.returncode == 1, r.stderr
    assert not (tmp_path / "nt").exists() and not (tmp_path / "nd").exists()


def test_a_task_directory_that_is_not_one_fails_first(embedded, tmp_path):
    """`side-effects --include nowhere` ran with the include silently ignored (lm-eval indexes only directories)."""
    r = nslens("side-effects", "--ranges", tmp_path / "r", "--include", tmp_path / "nowhere", "--lm-eval-limit", "2")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: lm-eval task directory not found: {tmp_path / 'nowhere'} (--include, side_effects.include)"], r.stderr


def test_analyze_names_a_missing_run_as_such(tmp_path):
    """`analyze nowhere` said the run had no raw samples and to re-run with analyses = true."""
    r = nslens("analyze", tmp_path / "nowhere")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'} is not an nslens run directory (no summary.json)"], r.stderr


@pytest.mark.parametrize("method,needs", [("probe", "raw samples"), ("neurgrad", "the model")])
def test_ranges_names_the_rankings_a_statistics_file_can_give(tmp_path, method, needs):
    """`ranges --method probe` answered with Python advice (record with keep_samples=True) instead of the
    command's choices."""
    r = nslens("ranges", tmp_path / "stats.safetensors", "--out", tmp_path / "r", "--method", method)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: the {method} ranking needs {needs}, which a statistics file does not hold; choose max, probeless "
        f"here, or run it with nslens run (method = \"{method}\")"], r.stderr


@pytest.mark.parametrize("args,message", [
    (["erase", "--ranges", "{t}/nowhere"], "no range masks (*.safetensors) in {t}/nowhere"),
    (["side-effects", "--ranges", "{t}/nowhere"], "no range masks (*.safetensors) in {t}/nowhere"),
    (["generate", "--ranges", "{t}/nowhere", "--prompt", "a"], "no range masks (*.safetensors) in {t}/nowhere"),
    (["bundle", "--ranges", "{t}/nowhere", "--out", "{t}/b"], "no range masks (*.safetensors) in {t}/nowhere"),
    (["erase", "--bundle", "{t}/nowhere"], "not an nslens bundle: {t}/nowhere/manifest.json not found"),
    (["side-effects", "--bundle", "{t}/nowhere"], "not an nslens bundle: {t}/nowhere/manifest.json not found"),
    (["generate", "--bundle", "{t}/nowhere", "--prompt", "a"],
     "not an nslens bundle: {t}/nowhere/manifest.json not found"),
    (["side-effects", "--bundle", "{t}/nowhere", "--include", "{t}/none"],
     "lm-eval task directory not found: {t}/none (--include, side_effects.include)"),
])
def test_a_bad_source_fails_before_the_model_loads(args, message, tmp_path, monkeypatch):
    """A typo in --ranges or --bundle, or a task directory that is not one, used to cost a whole model load
    (seconds for the real model, minutes for a hub one) before the one-line error."""
    from nslens import workflows

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the source was read")

    monkeypatch.setattr(workflows, "load_model", no_loading)
    r = nslens(*[a.format(t=tmp_path) for a in args], cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {message.format(t=tmp_path)}"], r.stderr


def test_a_bundle_for_other_concepts_fails_before_the_model_loads(embedded, site, synth_masks, tmp_path, monkeypatch):
    """erase --bundle reads the bundle's concepts before the model loads; the model checks follow it."""
    from nslens import workflows
    from nslens.bundle import save_bundle
    from nslens.intervene import Intervention
    from nslens.ops import Zero

    save_bundle(tmp_path / "b", embedded, site, [Intervention(synth_masks[0], Zero())], concepts=["nope"])
    monkeypatch.setattr(workflows, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    r = nslens("erase", "--bundle", tmp_path / "b", cwd=tmp_path)
    assert r.returncode == 1 and "edits concepts nope that dataset synthetic lacks" in r.stderr, r.stderr


def test_steer_with_no_baselines_is_refused(tmp_path):
    """`--steering ""` (an unset shell variable) ran a steering run without any baseline and exited 0."""
    from nslens.config import steering_runs

    r = nslens("steer", "--steering", "", "--out", tmp_path / "s")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: no steering baselines given; choose from {', '.join(steering_runs())}"], r.stderr
    assert not (tmp_path / "s").exists()


def test_an_unknown_sae_release_is_one_line_in_a_fresh_process(tmp_path):
    """bitsandbytes' import-time warning about an optional CPU kernel package came first, so two lines."""
    r = nslens_process("sae", "--sae-release", "nope", "--sae-id", "x", "--out", str(tmp_path / "r"), cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: unknown SAE release 'nope'"), r.stderr
