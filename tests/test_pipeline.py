import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest

from nslens.pipeline import RunConfig, run_pipeline
from nslens.ranges import load_masks

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(**kw):
    base = dict(fraction=0.5, operators=["zero"], n_per_class=24, batch_size=32, method="max")
    base.update(kw)
    return RunConfig(**base)


def test_run_directory_contents(embedded, tmp_path):
    run = run_pipeline(small_cfg(operators=["zero", "dampen"], method="probe"), tmp_path / "run", model=embedded)
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "summary.json", "report.md", "stats.safetensors", "samples.safetensors", "ranges",
            "erasure_zero.md", "erasure_zero.csv", "erasure_zero.json", "erasure_dampen.json"} <= names
    masks = load_masks(run / "ranges", expect={"d_model": 64, "n_layers": 4, "layer": 3})  # the last block
    assert [m.concept for m in masks] == ["sports", "science", "business", "politics"]
    assert all(len(m) == 32 and m.meta["ranking"] == "probe" for m in masks)
    report = (run / "report.md").read_text()
    assert "Concept erasure" in report and "dampen(a=0.125)" in report
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_report_has_every_section(embedded, tmp_path):
    run = run_pipeline(small_cfg(sweeps=["fraction", "tau", "layer"], sweep_fractions=[0.2, 1.0],
                                 sweep_taus=[1.0, 2.5], sweep_layers=[1, 2]), tmp_path / "run", model=embedded)
    report = (run / "report.md").read_text()
    for section in ("## Concept erasure", "## Normality", "## Polysemanticity", "## Distribution overlap",
                    "## Activation patterns", "## Samples at the bounds", "## Sweeps", "### fraction", "### tau",
                    "### layer"):
        assert section in report, section
    for fig in ("polysemanticity", "patterns_00", "common_neurons", "sweep_fraction", "sweep_tau", "sweep_layer"):
        assert (run / "figures" / f"{fig}.png").stat().st_size > 2000
    import json

    a = json.loads((run / "analysis.json").read_text())
    assert set(a["normality"]["all_neurons"]) == {"sports", "science", "business", "politics", "dataset"}
    with pytest.raises(ValueError, match="unknown sweeps \\['depth'\\]"):
        small_cfg(sweeps=["depth"]).validate()


def test_only_correct_keeps_correct_samples(embedded, tmp_path):
    run = run_pipeline(small_cfg(only_correct=True), tmp_path / "r", model=embedded)
    tab = json.loads((run / "erasure_zero.json").read_text())
    assert all(row["acc"] == 1.0 for row in tab["base"])


def test_only_correct_leaving_a_concept_empty_is_one_line_with_the_counts(embedded, tmp_path, monkeypatch):
    """Planted: the embedded model never answers 'fossil' after 'Label:' (it was trained on the four topic
    labels), so politics keeps no correct sample. The error comes after the train split's filter (the test
    split's pass never runs) and names every concept's count before and after, its accuracy and what to try."""
    import nslens.prepare as prep

    calls = []
    real = prep.predict
    monkeypatch.setattr(prep, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = small_cfg(only_correct=True, label_words=["sports", "science", "business", "fossil"])
    with pytest.raises(ValueError) as e:
        run_pipeline(cfg, tmp_path / "r", model=embedded)
    msg = str(e.value)
    assert "\n" not in msg and len(calls) == 1
    assert "train split: the only-correct filter leaves fewer than 2 samples of a concept" in msg
    import re

    assert re.search(r"politics 1[67] -> 0 \(clean acc 0\.00\)", msg)  # 24 per class, 0.3 held out
    assert re.search(r"sports 1[67] -> \d+ \(clean acc [01]\.\d\d\)", msg)
    assert "--all-samples" in msg and "--label-words" in msg


def test_failed_run_keeps_finished_work_and_says_so(embedded, tmp_path, monkeypatch):
    """A core step failing (here erasure) keeps what was finished before it, marks the run failed, and leaves no
    hidden temporary directory or half-written file."""
    import nslens.pipeline as pl

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pl, "erasure_table", boom)
    with pytest.raises(RuntimeError):
        run_pipeline(small_cfg(), tmp_path / "run", model=embedded)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["status"] == "failed: RuntimeError: out of memory"
    assert {"config.json", "stats.safetensors", "ranges", "train.jsonl"} <= {p.name for p in run.iterdir()}
    assert not [p for p in run.rglob(".*")]


def test_config_files(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('fraction = 0.2\noperators = ["mean"]\n')
    cfg = RunConfig.from_file(p)
    assert cfg.fraction == 0.2 and cfg.operators == ["mean"] and cfg.tau == 2.5
    p.write_text("fractoin = 0.2\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['fractoin'\]; valid keys: model, dataset"):
        RunConfig.from_file(p)
    p.write_text("operators = ['clamp']\n")
    with pytest.raises(ValueError, match="unknown operator 'clamp'"):
        RunConfig.from_file(p)
    for f in (ROOT / "experiments" / "configs").glob("*.toml"):
        RunConfig.from_file(f)


def test_table3_experiment_smoke(embedded, tmp_path):
    mod = runpy.run_path(str(ROOT / "experiments" / "table3.py"))
    mod["main"](["--model", "embedded", "--datasets", "synthetic", "--limit", "24", "--out", str(tmp_path),
                 "--batch-size", "32"])
    text = (tmp_path / "table3.md").read_text()
    assert (tmp_path / "synthetic" / "report.md").exists()
    # the row is the run's own per-concept table, averaged over its 4 concepts (a 10 % trimmed mean of 4 cuts
    # none) and rounded as printed
    row = next(line for line in text.splitlines() if line.startswith("| synthetic |"))
    cells = [float(c) for c in row.strip("|").split("|")[1:]]
    tab = json.loads((tmp_path / "synthetic" / "erasure_zero.json").read_text())
    assert len(tab["concepts"]) == 4
    expect = [np.mean([r[k] for r in tab[part]]) for part in ("base", "neuron", "range")
              for k in ("acc", "conf", "cacc", "cconf")]
    np.testing.assert_allclose(cells, expect, atol=5e-4 + 1e-12)


def test_run_with_side_effects_table4(embedded, tmp_path, monkeypatch):
    """The run's Table-4 view: clean values equal lm-eval's stock HFLM on the same tasks and limit."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from nslens.harness import LOCAL_TASKS, SideEffectTable, local_tasks_dir, task_metrics

    monkeypatch.setenv("NSLENS_HOME", str(tmp_path / "home"))  # fresh clean-results cache
    cfg = small_cfg(side_effects=True, side_effect_limit=12)
    run = run_pipeline(cfg, tmp_path / "run", model=embedded)
    tab = SideEffectTable.from_json((run / "side_effects_zero.json").read_text())
    assert tab.concepts == ["sports", "science", "business", "politics"] and tab.tasks == list(LOCAL_TASKS)
    stock = lm_eval.simple_evaluate(
        model=HFLM(pretrained=embedded._module, tokenizer=embedded.tokenizer, batch_size=cfg.batch_size,
                   device="cpu"),  # the run's batches: padding, and so float rounding, depends on them
        tasks=list(LOCAL_TASKS), limit=12, num_fewshot=0, log_samples=False, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(local_tasks_dir()), include_defaults=False), verbosity="ERROR")
    assert tab.clean == task_metrics(stock, LOCAL_TASKS)
    assert all(row["nslens_synth_token_ppl"]["token_perplexity"] != 0 for row in tab.neuron + tab.range)
    report = (run / "report.md").read_text()
    assert "## Side effects (lm-eval)" in report and "nslens_synth_token_ppl PPL" in report
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["side_effects"]["zero"]) == {"clean", "neuron", "range"}


def test_table4_experiment_smoke(embedded, tmp_path):
    mod = runpy.run_path(str(ROOT / "experiments" / "table4.py"))
    mod["main"](["--model", "embedded", "--dataset", "synthetic", "--limit", "16", "--lm-eval-limit", "6",
                 "--operators", "zero", "--out", str(tmp_path / "t4"), "--batch-size", "32"])
    text = (tmp_path / "t4" / "table4.md").read_text()
    assert "| zero | nslens_synth_token_ppl token_perplexity |" in text and "| zero | nslens_synth_mc acc |" in text
    # each row: the clean value and the mean over the 4 concepts of the run's per-concept deltas, as printed
    tab = json.loads((tmp_path / "t4" / "side_effects_zero.json").read_text())
    assert len(tab["concepts"]) == 4
    for task, metric in (("nslens_synth_mc", "acc"), ("nslens_synth_token_ppl", "token_perplexity")):
        row = next(line for line in text.splitlines() if line.startswith(f"| zero | {task} {metric} |"))
        cells = [float(c) for c in row.strip("|").split("|")[2:]]
        expect = [tab["clean"][task][metric], *(np.mean([r[task][metric] for r in tab[part]])
                                                for part in ("neuron", "range"))]
        np.testing.assert_allclose(cells, expect, atol=5e-5 + 1e-12)


def test_sweeps_experiment_smoke(embedded, tmp_path):
    mod = runpy.run_path(str(ROOT / "experiments" / "sweeps.py"))
    mod["main"](["--model", "embedded", "--dataset", "synthetic", "--limit", "16", "--sweeps", "fraction", "tau",
                 "--out", str(tmp_path / "sw"), "--batch-size", "32"])
    assert (tmp_path / "sw" / "figures" / "sweep_tau.png").exists()
    assert "## Normality" in (tmp_path / "sw" / "report.md").read_text()


def test_a_failed_optional_step_keeps_the_run(embedded, tmp_path, monkeypatch):
    """An analysis that fails after erasure leaves the erasure tables, the masks and a report naming the failure."""
    import nslens.pipeline as pl

    def broken(*a, **k):
        raise RuntimeError("figure backend exploded")

    monkeypatch.setattr(pl, "write_analyses", broken)
    run = run_pipeline(small_cfg(), tmp_path / "run", model=embedded)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["failed_steps"] == {"analyses": "RuntimeError: figure backend exploded"}
    assert (run / "erasure_zero.json").exists() and len(list((run / "ranges").glob("*.safetensors"))) == 4
    assert "step `analyses` failed: RuntimeError: figure backend exploded" in (run / "report.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden temporary directory


def test_a_failed_core_step_keeps_finished_work(embedded, tmp_path, monkeypatch):
    import nslens.pipeline as pl

    def broken(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl, "erasure_table", broken)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(small_cfg(), tmp_path / "run", model=embedded)
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert (run / "stats.safetensors").exists() and len(list((run / "ranges").glob("*.safetensors"))) == 4
    assert not [p for p in run.rglob("*.tmp")]


@pytest.mark.parametrize("text,message", [
    ("tau = true\n", "config key 'tau' must be a number, got True"),
    ('operators = "zero"\n', "config key 'operators' must be a list of strings, got 'zero'"),
    ('n_per_class = "x"\n', "config key 'n_per_class' must be an integer, got 'x'"),
    ("sweep_layers = [1, 2.5]\n", "config key 'sweep_layers' must be a list of integers or none"),
    ("tau = \n", "c.toml: Invalid value (at line 1, column 7)"),
])
def test_config_values_are_type_checked(tmp_path, text, message):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        RunConfig.from_file(p)
    p.write_bytes(b"\xff\xfe tau")
    with pytest.raises(ValueError, match="c.toml is not UTF-8 text"):
        RunConfig.from_file(p)
    cfg = RunConfig.from_dict({"tau": 2, "fraction": 0.5, "sweep_layers": None, "label_words": ["a", "b"]})
    assert cfg.tau == 2 and cfg.sweeps.layers is None


def test_bad_inputs_are_reported_before_the_model_loads(tmp_path, monkeypatch):
    """A bad sweep layer, layer, dataset, batch size or operator option fails before any model is loaded and
    before the run directory is made (it used to take minutes; a bad alpha or beta failed only after the data
    were recorded, leaving a failed run behind)."""
    import nslens.pipeline as pl

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(pl, "load_model", no_loading)
    for kw, message in (({"sweeps": ["layer"], "sweep_layers": [1, 9]}, "layer 9 out of range for a model with 4"),
                        ({"layer": -5}, "layer -5 out of range"),
                        ({"dataset": "nope"}, "unknown dataset 'nope'"),
                        ({"dataset": "missing.csv"}, "dataset file not found: missing.csv"),
                        ({"batch_size": 0}, "batch_size must be >= 1"),
                        ({"operators": ["zero", "dampen"], "alpha": -5.0},
                         r"dampening factor alpha must be in \[0, 1\], got -5.0"),
                        ({"operators": ["adaptive"], "beta": 7.0},
                         r"adaptive dampening beta must be in \[0, 1\], got 7.0"),
                        ({"operators": ["dampen"], "alpha": float("nan")}, "alpha must be in .* got nan"),
                        ({"label_words": []}, "label_words lists no words"),
                        ({"seed": -1}, "seed must be >= 0, got -1"),
                        ({"n_per_class": "8"}, "n_per_class must be an integer >= 4, got '8'"),
                        ({"side_effects": {"enabled": True, "tasks": ["mmlux"]}},
                         "unknown lm-eval task 'mmlux'; close matches: mmlu"),
                        ({"side_effects": {"enabled": True, "tasks": ["nslens_synth_mc"], "include": "/nowhere"}},
                         "lm-eval task directory not found: /nowhere"),
                        ({"sae": {"path": "missing.npz"}}, "missing.npz"),
                        ({"sae": {"path": "a.npz"}, "operators": ["mean"]}, "the mean operator .* not SAE features")):
        with pytest.raises(ValueError, match=message):
            run_pipeline(RunConfig(**kw), tmp_path / "run")
        assert not (tmp_path / "run").exists()
    RunConfig(operators=["zero"], alpha=-5.0, beta=7.0).validate()  # options none of the run's operators reads


def test_experiment_scripts_behave_like_the_cli(embedded, tmp_path, monkeypatch, capsys):
    """One-line errors with exit codes, --limit 0 refused, an absolute dataset path never becomes the run
    directory, and the README's smoke command for the sweeps runs as written (embedded implies synthetic). The
    scripts run as ``__main__`` in this process, except one in a real process (progress without a terminal)."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # each script puts experiments/ on it

    def script(name, *args):
        """``python experiments/<name> args`` as __main__ here: (exit code, stderr)."""
        monkeypatch.setattr(sys, "argv", [str(ROOT / "experiments" / name), *args])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "experiments" / name), run_name="__main__")
            raise SystemExit(0)
        return e.value.code, capsys.readouterr().err

    code, err = script("table4.py", "--model", "embedded", "--limit", "0")
    assert code == 2 and "--limit: expected a positive integer, got 0" in err
    code, err = script("table3.py", "--model", "embedded", "--datasets", "nope")
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: unknown dataset 'nope'")
    assert "Traceback" not in err
    # the CLI's usage error (one usage line, one error line), every dataset and --out checked before any work
    code, err = script("fortunes_protocol.py", "--seeds", "a")
    assert code == 2 and err.strip().splitlines() == [
        "Usage: fortunes_protocol.py [OPTIONS] (--help lists them)",
        "error: argument --seeds: expected comma-separated integers, got 'a'"], err
    code, err = script("table3.py", "--model", "embedded", "--datasets", "synthetic", "nope")
    assert code == 1 and err.strip().splitlines() == [err.strip().splitlines()[0]] and "'nope'" in err, err
    assert not (tmp_path / "runs").exists()  # the first dataset did not run
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "data.csv").write_text("text,label\n")
    code, err = script("table3.py", "--model", "embedded", "--datasets", "a/data.csv", "b/data.csv")
    assert code == 1 and "datasets 'a/data.csv' and 'b/data.csv' would share the run directory" in err, err
    (tmp_path / "afile").write_text("x")
    code, err = script("neg_tables.py", "--model", "embedded", "--smoke", "--out", "afile")
    assert code == 1 and err.strip().splitlines() == ["error: --out afile is a file; give a directory for the "
                                                      "results"], err
    from nslens.synthetic import synthetic_concepts

    ds = synthetic_concepts(10, seed=5)
    data = tmp_path / "data" / "topics.csv"
    data.parent.mkdir()
    data.write_text("text,label\n" + "".join(f"{t},{ds.label_names[y]}\n" for t, y in zip(ds.texts, ds.labels)))
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "table3.py"), "--model", "embedded",
                        "--datasets", str(data), "--limit", "8", "--all-samples", "--out", str(tmp_path / "t3")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert data.read_text().startswith("text,label") and (tmp_path / "t3" / "topics" / "summary.json").exists()
    assert "record: " in r.stderr  # progress lines without a terminal
    code, err = script("sweeps.py", "--model", "embedded", "--limit", "24", "--sweeps", "tau", "--out",
                       str(tmp_path / "sw"))
    assert code == 0, err[-2000:]
    assert (tmp_path / "sw" / "figures" / "sweep_tau.png").exists()


def test_stale_temporary_files_of_a_killed_run_are_cleaned_up(embedded, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".summary.json.k2j3.tmp").write_text("{")  # what a SIGKILL mid-write leaves behind
    out = run_pipeline(small_cfg(analyses=False), run, model=embedded)
    assert not list(out.glob(".*.tmp")) and (out / "summary.json").exists()
    (run / "extra.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="exists and is not empty \\(pass --overwrite"):
        run_pipeline(small_cfg(analyses=False), run, model=embedded)


OLD_FLAT = """fraction = 0.5
steering = ["steer", "arm"]
steer_alpha = -1.0
steer_source = "mean"
steer_tau = 2.0
sweeps = ["tau"]
sweep_fractions = [0.5]
sweep_taus = [1.0, 2.5]
sweep_layers = [1]
side_effects = true
side_effect_tasks = ["nslens_wikipedia_ppl"]
side_effect_limit = 8
lm_eval_include = "tasks"
"""
NEW_SECTIONS = """fraction = 0.5
[steering]
runs = ["steer", "arm"]
alpha = -1.0
source = "mean"
tau = 2.0
[sweeps]
params = ["tau"]
fractions = [0.5]
taus = [1.0, 2.5]
layers = [1]
[side_effects]
enabled = true
tasks = ["nslens_wikipedia_ppl"]
limit = 8
include = "tasks"
"""


def test_flat_keys_of_earlier_configs_still_read_with_a_notice_naming_the_new_key(tmp_path, caplog):
    """An earlier flat config maps to the same config as its sectioned form (and to the sections built by hand),
    with one deprecation line per flat key; the sectioned form reads silently. Python keyword arguments map the
    same way, with a DeprecationWarning each."""
    import logging

    from nslens.config import SaeConfig, SideEffectsConfig, SteeringConfig, SweepConfig

    expect = RunConfig(fraction=0.5, steering=SteeringConfig(runs=["steer", "arm"], alpha=-1.0, source="mean", tau=2.0),
                       sweeps=SweepConfig(params=["tau"], fractions=[0.5], taus=[1.0, 2.5], layers=[1]),
                       side_effects=SideEffectsConfig(enabled=True, tasks=["nslens_wikipedia_ppl"], limit=8,
                                                      include="tasks"))
    (tmp_path / "old.toml").write_text(OLD_FLAT)
    (tmp_path / "new.toml").write_text(NEW_SECTIONS)
    with caplog.at_level(logging.WARNING, logger="nslens.config"):
        old = RunConfig.from_file(tmp_path / "old.toml")
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == OLD_FLAT.count("\n") - 1
    assert "config key 'steer_alpha' is deprecated: write it as alpha under [steering]" in notices
    assert "config key 'side_effects' is deprecated: write it as enabled under [side_effects]" in notices
    assert "config key 'lm_eval_include' is deprecated: write it as include under [side_effects]" in notices
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nslens.config"):
        new = RunConfig.from_file(tmp_path / "new.toml")
    assert not caplog.records
    assert old == new == expect
    with pytest.warns(DeprecationWarning, match=r"RunConfig\(steer_tau=\.\.\.\) is deprecated: pass "
                                                r"steering=SteeringConfig\(tau=\.\.\.\)"):
        kw = RunConfig(fraction=0.5, steering=["steer", "arm"], steer_alpha=-1.0, steer_source="mean", steer_tau=2.0,
                       sweeps=["tau"], sweep_fractions=[0.5], sweep_taus=[1.0, 2.5], sweep_layers=[1],
                       side_effects=True, side_effect_tasks=["nslens_wikipedia_ppl"], side_effect_limit=8,
                       lm_eval_include="tasks")
    assert kw == expect
    sae = RunConfig.from_dict({"sae_release": "r", "sae_id": "i", "sae_top": 0.3, "sae_ranges_over": "all"})
    assert sae.sae == SaeConfig(release="r", id="i", top=0.3, ranges_over="all") and sae.sae.enabled
    # a section's copy changes only what it is told, and never the original
    changed = expect.replace(side_effects={"limit": 4})
    assert changed.side_effects.limit == 4 and changed.side_effects.enabled and expect.side_effects.limit == 8
    # the configs the project ships use sections only
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nslens.config"):
        for f in (ROOT / "experiments" / "configs").glob("*.toml"):
            RunConfig.from_file(f)
    assert not caplog.records


@pytest.mark.parametrize("text,message", [
    ("[steering]\nstrength = 1\n", "unknown keys ['strength'] in [steering]; valid keys: runs, alpha, source, tau"),
    ("[sweeps]\ntaus = [1, true]\n", "config key 'sweeps.taus' must be a list of numbers, got [1, True]"),
    ("[steering]\nsource = \"first\"\n", "unknown steer_source 'first'; choose last or mean"),
    ("[steering]\nalpha = nan\n", "steering alpha must be a finite number, got nan"),
    ("[side_effects]\nlimit = 0\n", "lm-eval limit must be > 0, got 0"),
    ("sae = 3\n", "config key 'sae' must be a table ([sae]), got 3"),
    ("[sae]\npath = \"a.npz\"\nrelease = \"r\"\nid = \"i\"\n", "give either sae_path or sae_release + sae_id"),
    ("[sae]\npath = \"a.npz\"\ntop = 0\n", "min_fire and top must be in (0, 1], got 0.1 and 0"),
    ("[sae]\npath = \"\"\n", "an empty SAE setting names no SAE ([sae] path, release, id)"),
    ("[side_effects]\ntasks = [\"\"]\n", "side_effects.tasks must name lm-eval tasks, got ['']"),
    ("[sweeps]\nparams = [\"tau\", \"layer\"]\ntaus = []\n", "the tau sweep has no values (sweeps.taus"),
])
def test_config_sections_are_checked_by_their_own_validate(tmp_path, text, message):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig.from_file(p)


def test_run_result_says_what_ran(embedded, tmp_path):
    """The result of a run: its path (standing in for the directory's Path), status, steps with their times, and
    the tables, read back as objects equal to the files the run wrote."""
    res = run_pipeline(small_cfg(analyses=False), tmp_path / "run", model=embedded)
    assert res.path == tmp_path / "run" and (res / "report.md") == res.report and res.report.exists()
    assert res.status == "complete" and res.failed_steps == {} and res.tables == ["zero"]
    assert list(res.steps) == ["data", "masks", "erasure", "report", "explorer"]
    assert (res / "explorer.html").exists()
    assert all(s.status == "done" and s.seconds >= 0 for s in res.steps.values())
    summary = json.loads((res / "summary.json").read_text())
    assert summary["steps"]["erasure"]["status"] == "done" and summary["steps"]["report"]["required"] is False
    assert res.erasure("zero").to_json() == (res / "erasure_zero.json").read_text()
    assert res.side_effects("zero") is None and res.config["fraction"] == 0.5
    assert sorted(p.name for p in res.iterdir()) == sorted(p.name for p in (tmp_path / "run").iterdir())
