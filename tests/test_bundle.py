"""Intervention bundles (nslens.bundle): what is written reads back to the same edit (fingerprint and predictions),
a bundle refuses another model in one line, and the lm-eval export gives stock lm-eval's ``steered`` model the
numbers nslens's own adapter computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

import nslens
from nslens.batching import tokenize
from nslens.bundle import check_bundle_dir, export_lm_eval_steering, load_bundle, save_bundle
from nslens.errors import NsLensError
from nslens.intervene import intervention_fingerprint
from nslens.steering import full_masks, steering_operators


@pytest.fixture(scope="module")
def mixed(embedded, site, synth, synth_recorded, synth_masks):
    """One intervention of every stored kind: gated zero, ungated dampen, last-position adaptive, steering and
    LEACE (a fitted eraser with tensors)."""
    from nslens.leace import leace_samples

    leace = leace_samples(synth_recorded.samples, synth_recorded.sample_labels, synth_masks)
    steer = steering_operators(synth_recorded.stats, "steer", alpha=-1.5)
    return [nslens.Intervention(synth_masks[0], nslens.zero(), gated=True),
            nslens.Intervention(synth_masks[1], nslens.dampen(0.25), gated=False),
            nslens.Intervention(synth_masks[2], nslens.adaptive_dampen(0.5), gated=True, positions="last"),
            nslens.Intervention(full_masks(synth_recorded.stats)[3], steer[3], gated=True),
            nslens.Intervention(synth_masks[1], leace[1], gated=True)]


def predictions(model, site, prompts, ivs):
    with torch.no_grad():
        with model.trace(tokenize(model, prompts)):
            nslens.apply_in_trace(model, site, ivs)
            logits = model.output.logits[:, -1].save()
    return logits


def test_a_bundle_reads_back_to_the_same_edit(embedded, site, synth, mixed, tmp_path):
    out = save_bundle(tmp_path / "b", embedded, site, mixed, concepts=synth["train"].label_names,
                      dataset="synthetic")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "nslens.bundle/1" and manifest["site"]["layer"] == site.layer
    assert [e["operator"]["name"] for e in manifest["interventions"]] == ["zero", "dampen", "adaptive", "steer",
                                                                          "leace"]
    b = load_bundle(out, embedded)
    assert intervention_fingerprint(b.interventions) == intervention_fingerprint(mixed)
    assert b.concepts == list(synth["train"].label_names) and b.site(embedded) == site
    for a, c in zip(b.interventions, mixed, strict=True):
        assert (a.gated, a.positions, a.operator.label, a.mask.concept) == (c.gated, c.positions, c.operator.label,
                                                                          c.mask.concept)
        assert torch.equal(a.mask.lo, c.mask.lo) and torch.equal(a.mask.neurons, c.mask.neurons)
    prompts = synth["test_prompts"][:6]
    clean = predictions(embedded, site, prompts, None)
    edited = predictions(embedded, site, prompts, mixed)
    assert not torch.equal(clean, edited)
    assert torch.equal(predictions(embedded, site, prompts, b.interventions), edited)


def test_another_model_is_refused_in_one_line(embedded, site, synth_masks, tmp_path):
    from transformers import LlamaForCausalLM

    out = save_bundle(tmp_path / "b", embedded, site, nslens.Intervention(synth_masks[0], nslens.zero()))
    torch.manual_seed(0)
    other_dir = tmp_path / "other"
    LlamaForCausalLM(embedded._module.config).save_pretrained(other_dir)  # same shape, other weights
    embedded.tokenizer.save_pretrained(other_dir)
    other = nslens.load_model(str(other_dir))
    with pytest.raises(NsLensError, match=r"was made for model .* differs in its weights") as e:
        load_bundle(out, other)
    assert "\n" not in str(e.value)
    assert len(load_bundle(out, other, allow_other_model=True).interventions) == 1
    read = load_bundle(out)  # the files alone (what a command reads before the model loads), the model later
    read.check_fits(embedded)
    with pytest.raises(NsLensError, match=rf"bundle {out} was made for model .* differs in its weights"):
        read.check_fits(other)


@pytest.mark.parametrize("damage, words", [
    ("no-manifest", "not an nslens bundle"), ("format", "bundle format 'nslens.bundle/9'"),
    ("tensors", "cannot read bundle tensors"), ("missing-tensor", "incomplete"), ("edited", "does not read back"),
    ("no-model", "manifest .* is incomplete: model missing or damaged"),
])
def test_damaged_bundles_are_one_line_errors(embedded, site, synth_masks, tmp_path, damage, words):
    from safetensors.torch import load_file, save_file

    out = save_bundle(tmp_path / "b", embedded, site, nslens.Intervention(synth_masks[0], nslens.dampen(0.5)))
    man = out / "manifest.json"
    data = json.loads(man.read_text())
    if damage == "no-manifest":
        man.unlink()
    elif damage == "format":
        man.write_text(json.dumps({**data, "format": "nslens.bundle/9"}))
    elif damage == "no-model":
        man.write_text(json.dumps({k: v for k, v in data.items() if k != "model"}))
    elif damage == "tensors":
        (out / "tensors.safetensors").write_bytes(b"not safetensors")
    else:
        t = load_file(out / "tensors.safetensors")
        if damage == "missing-tensor":
            del t["iv0.mask.lo"]
        else:
            t["iv0.mask.hi"] = t["iv0.mask.hi"] + 1.0
        save_file(t, out / "tensors.safetensors")
    with pytest.raises(NsLensError, match=words):
        load_bundle(out, embedded)
    with pytest.raises(NsLensError, match=words):  # without the model too: the files alone are damaged
        load_bundle(out)


def test_what_a_bundle_cannot_hold_is_refused(embedded, site, synth_masks, tmp_path):
    from dataclasses import dataclass
    from typing import ClassVar

    from nslens.ops import Operator

    @dataclass(frozen=True)
    class Unregistered(Operator):
        name: ClassVar[str] = "unregistered_for_bundle_test"

        def __call__(self, x, mu, sigma, tau, neurons=None):
            return x

    with pytest.raises(NsLensError, match="not registered"):
        save_bundle(tmp_path / "b", embedded, site, nslens.Intervention(synth_masks[0], Unregistered()))
    with pytest.raises(NsLensError, match="at least one"):
        save_bundle(tmp_path / "b", embedded, site, [])


def test_a_bundle_goes_to_a_new_directory_or_over_a_bundle(embedded, site, synth_masks, tmp_path):
    """`bundle --ranges r --out r` wrote the bundle among the masks, and `r` no longer read as masks; now the
    masks' directory is refused (and stays readable), an earlier bundle is replaced."""
    masks_dir = tmp_path / "ranges"
    nslens.save_masks(synth_masks, masks_dir)
    before = sorted(p.name for p in masks_dir.iterdir())
    iv = nslens.Intervention(synth_masks[0], nslens.zero())
    with pytest.raises(NsLensError, match=f"bundle directory {masks_dir} holds other files \\(00_"):
        save_bundle(masks_dir, embedded, site, iv)
    assert sorted(p.name for p in masks_dir.iterdir()) == before
    assert len(nslens.load_masks(masks_dir)) == len(synth_masks)
    b = tmp_path / "b"
    save_bundle(b, embedded, site, iv)
    check_bundle_dir(b)  # an earlier bundle may be replaced
    save_bundle(b, embedded, site, [iv, nslens.Intervention(synth_masks[1], nslens.zero())])
    assert len(load_bundle(b).interventions) == 2


def test_lm_eval_steered_model_on_the_export_gives_the_adapters_numbers(embedded, site, synth_recorded, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from nslens.harness import local_tasks_dir, side_effects, task_metrics

    tasks = ["nslens_synth_mc", "nslens_synth_cont"]
    inc = local_tasks_dir(tmp_path / "tasks", n_mc=16, n_ppl=4)
    ops = steering_operators(synth_recorded.stats, "steer", alpha=-2.0)
    fm = full_masks(synth_recorded.stats)
    ivs = [nslens.Intervention(fm[0], ops[0], gated=False), nslens.Intervention(fm[2], ops[2], gated=False)]
    ours = side_effects(embedded, site, {"steer": ivs}, tasks=tasks, include_path=inc)
    pt = export_lm_eval_steering(save_bundle(tmp_path / "b", embedded, site, ivs), tmp_path / "steer.pt")

    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="steered", model_args={"pretrained": embedded._module.config._name_or_path, "steer_path": str(pt),
                                     "device": "cpu", "batch_size": 8, "softmax_dtype": "float32"},
        tasks=tasks, task_manager=TaskManager(include_path=str(inc), include_defaults=False), log_samples=False,
        bootstrap_iters=0, verbosity="ERROR")
    theirs = task_metrics(res, tasks)
    mine = ours["steer"]
    assert mine != ours["clean"], "steering by -2 changed no metric"
    for task in tasks:
        for metric, value in theirs[task].items():
            assert np.isclose(mine[task][metric], value, rtol=1e-6, atol=1e-9), (task, metric)


def test_export_refuses_what_lm_eval_cannot_express(embedded, site, synth_masks, tmp_path):
    out = save_bundle(tmp_path / "b", embedded, site, nslens.Intervention(synth_masks[0], nslens.zero()))
    with pytest.raises(NsLensError, match="cannot be exported"):
        export_lm_eval_steering(out, tmp_path / "x.pt")


def cli(argv, capsys):
    """``nslens ARGV`` in this process (``conftest.run_cli``): (exit code, stdout, stderr)."""
    r = run_cli(*argv)
    return r.returncode, r.stdout, r.stderr


def test_bundle_commands(embedded, site, synth_masks, synth_recorded, tmp_path, capsys):
    """`nslens bundle` writes what `erase --bundle` and `side-effects --bundle` read: the bundle's effect on its
    own concept equals the erasure table's range-masking Acc for that mask, and its side effects equal the
    library's; `export-steering` refuses a masking bundle in one line."""
    ranges = tmp_path / "ranges"
    for i, m in enumerate(synth_masks):
        m.save(ranges / f"{i:02d}_{m.concept}.safetensors")
    common = ["--layer", site.layer, "--n-per-class", 40, "--batch-size", 32]
    concept = synth_masks[2].concept
    code, _, err = cli(["bundle", "--ranges", ranges, "--concepts", concept, "--out", tmp_path / "b", *common],
                       capsys)
    assert code == 0, err
    code, _, err = cli(["erase", "--bundle", tmp_path / "b", "--out", tmp_path / "eb", *common], capsys)
    assert code == 0, err
    effect = json.loads((tmp_path / "eb.json").read_text())
    code, _, err = cli(["erase", "--ranges", ranges, "--out", tmp_path / "er", *common], capsys)
    assert code == 0, err
    table = json.loads((tmp_path / "er.json").read_text())
    c = effect["concepts"].index(concept)
    assert effect["edited"] == [concept]
    assert effect["acc_clean"][c] == pytest.approx(table["base"][c]["acc"])
    assert effect["acc_edited"][c] - effect["acc_clean"][c] == pytest.approx(table["range"][c]["acc"])

    code, out, err = cli(["side-effects", "--bundle", tmp_path / "b", "--lm-eval-limit", 8, "--out",
                          tmp_path / "se", *common], capsys)
    assert code == 0, err
    se = json.loads((tmp_path / "se.json").read_text())
    from nslens.harness import side_effects
    from nslens.lmtasks import LOCAL_TASKS, local_tasks_dir

    ref = side_effects(embedded, site, {"bundle": load_bundle(tmp_path / "b", embedded).interventions},
                       tasks=LOCAL_TASKS, include_path=local_tasks_dir(), limit=8)
    assert se == json.loads(json.dumps(dict(ref)))

    code, _, err = cli(["export-steering", tmp_path / "b", "--out", tmp_path / "s.pt"], capsys)
    assert code == 1 and "cannot be exported" in err and len(err.strip().splitlines()) == 1
