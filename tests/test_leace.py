"""LEACE baseline (nslens.leace): the fit equals concept-erasure's own LeaceFitter, the in-trace edit equals the
package's LeaceEraser in a plain torch forward hook (and leaves the model bit-for-bit clean), remote="local", the
erasure and side-effect tables against plain-hook references, the run config and the CLI."""

import json

import numpy as np
import pytest
import torch
from conftest import encode, plain_forward, run_cli

import nslens
from nslens.erasure import concept_metrics, erasure_table, predict
from nslens.errors import NsLensError
from nslens.leace import Leace, fit_leace, leace_samples
from nslens.steering import full_masks

concept_erasure = pytest.importorskip("concept_erasure")
LeaceEraser, LeaceFitter = concept_erasure.LeaceEraser, concept_erasure.LeaceFitter


@pytest.fixture(scope="module")
def rec(embedded, site, synth):
    return nslens.record(embedded, site, synth["train_prompts"], synth["train"].labels,
                         synth["train"].label_names, batch_size=32, keep_samples=True)


@pytest.fixture(scope="module")
def full(rec):
    """Full-width masks (textbook LEACE of the site) and their erasers, fitted from the recorded samples."""
    masks = full_masks(rec.stats, tau=1.0)
    return masks, leace_samples(rec.samples, rec.sample_labels, masks)


def _eraser(op: Leace) -> "LeaceEraser":
    return LeaceEraser(op.proj_left, op.proj_right, op.bias)


def test_fit_equals_the_package_fit_per_concept_on_the_masks_neurons(embedded, site, synth, rec):
    """Concept against the rest, over each mask's neurons: the shared streaming fit equals LeaceFitter.fit on
    x[:, neurons] with z = 1[label == c]; streaming from the model in batches equals fitting the samples."""
    partial = nslens.build_range_masks(rec.stats, method="max", fraction=0.3)
    ops = leace_samples(rec.samples, rec.sample_labels, partial)
    x = torch.as_tensor(rec.samples, dtype=torch.float64)
    for c, (mask, op) in enumerate(zip(partial, ops)):
        nz = torch.sort(mask.neurons).values
        z = torch.as_tensor(rec.sample_labels == c, dtype=torch.float64)[:, None]
        ref = LeaceFitter.fit(x[:, nz], z).eraser
        assert torch.equal(op.fitted_on, nz) and op.concept == mask.concept
        torch.testing.assert_close(op.proj_left @ op.proj_right, (ref.proj_left @ ref.proj_right).float(),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(op.bias, ref.bias.float(), rtol=0, atol=0)
        assert op.describe() == {"name": "leace", "fit": "concept vs rest", "concept": mask.concept,
                                 "neurons": len(mask), "rank": 1}
    streamed = fit_leace(embedded, site, synth["train_prompts"], synth["train"].labels, partial, batch_size=7)
    for a, b in zip(ops, streamed):
        torch.testing.assert_close(a.proj_left @ a.proj_right, b.proj_left @ b.proj_right, rtol=0, atol=1e-5)


@pytest.mark.parametrize("width,gated", [("full", False), ("full", True), ("partial", False)])
def test_in_trace_edit_equals_the_package_eraser_in_a_plain_hook(embedded, site, synth, rec, full, width, gated):
    if width == "full":
        masks, ops = full
    else:
        masks = nslens.build_range_masks(rec.stats, method="max", fraction=0.3)
        ops = leace_samples(rec.samples, rec.sample_labels, masks)
    mask, op = masks[1], ops[1]
    enc = encode(embedded, synth["test_prompts"][:6])
    with torch.no_grad(), embedded.trace(enc):
        nslens.apply_in_trace(embedded, site, nslens.Intervention(mask, op, gated=gated))
        logits = embedded.output.logits.save()
    eraser, nz = _eraser(op), op.fitted_on
    lo, hi = torch.empty(site.d_model), torch.empty(site.d_model)
    lo[mask.neurons], hi[mask.neurons] = mask.lo, mask.hi

    def hook(module, args, out):
        if width == "full":
            erased = eraser(out)
            return torch.where((out >= lo) & (out <= hi), erased, out) if gated else erased
        out = out.clone()
        out[..., nz] = eraser(out[..., nz])
        return out

    ref = plain_forward(embedded, enc, hook, embedded._module.model.layers[site.layer]).logits
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-6)
    assert (logits - plain_forward(embedded, enc).logits).abs().max() > 1e-3  # it did erase something
    clean = plain_forward(embedded, enc).logits
    with torch.no_grad(), embedded.trace(enc):
        again = embedded.output.logits.save()
    torch.testing.assert_close(again, clean, rtol=0, atol=0)
    with nslens.applied(embedded, site, nslens.Intervention(mask, op, gated=gated)):
        with torch.no_grad(), embedded.trace(enc):
            edited = embedded.output.logits.save()
    torch.testing.assert_close(edited, ref, rtol=0, atol=1e-6)
    with torch.no_grad(), embedded.trace(enc):
        after = embedded.output.logits.save()
    torch.testing.assert_close(after, clean, rtol=0, atol=0)


def test_remote_local_equals_local(embedded, site, synth, full):
    masks, ops = full
    gold = np.asarray(nslens.label_token_ids(embedded.tokenizer, synth["ds"].label_words))[synth["test"].labels[:12]]
    for gated in (False, True):
        iv = nslens.Intervention(masks[0], ops[0], gated=gated)
        a = predict(embedded, site, synth["test_prompts"][:12], gold, interventions=iv)
        b = predict(embedded, site, synth["test_prompts"][:12], gold, interventions=iv, remote="local")
        np.testing.assert_allclose(a.conf, b.conf, rtol=1e-5)
        assert (a.pred == b.pred).all()


def test_erasure_table_equals_a_plain_hook_reference(embedded, site, synth, full):
    masks, ops = full
    prompts, labels = synth["test_prompts"], synth["test"].labels
    ids = nslens.label_token_ids(embedded.tokenizer, synth["ds"].label_words)
    gold = torch.as_tensor(np.asarray(ids)[labels])
    tab = erasure_table(embedded, site, prompts, labels, ids, masks, ops, batch_size=len(prompts))
    assert tab.operator == "leace"
    enc = encode(embedded, prompts)

    def preds(hook=None):
        logits = plain_forward(embedded, enc, hook, embedded._module.model.layers[site.layer]).logits[:, -1]
        p = torch.softmax(logits.float(), -1)
        pred = logits.argmax(-1)
        return nslens.erasure.Predictions((pred == gold).numpy(), p.gather(-1, gold[:, None])[:, 0].double().numpy(),
                                          pred.numpy())

    clean = preds()
    for c, op in enumerate(ops):
        eraser = _eraser(op)
        ref = concept_metrics(preds(lambda m, a, out, e=eraser: e(out)), labels, c)
        base = concept_metrics(clean, labels, c)
        assert tab.base[c] == pytest.approx(base, abs=1e-6)
        assert tab.neuron[c] == pytest.approx({k: ref[k] - base[k] for k in ref}, abs=1e-5)
    # LEACE erases each concept's linear signal: its own accuracy drops more than the others'
    s = tab.summary()["neuron"]
    assert s["acc"] < s["cacc"]


def test_side_effect_table_equals_a_plain_hook_reference(embedded, site, full, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from nslens.harness import local_tasks_dir, side_effect_table, task_metrics

    masks, ops = full
    inc = local_tasks_dir(tmp_path / "t", n_mc=16, n_ppl=4)
    tasks = ["nslens_synth_mc", "nslens_synth_token_ppl"]
    tab = side_effect_table(embedded, site, masks[:2], ops[:2], tasks=tasks, include_path=inc)
    assert tab.operator == "leace"
    eraser = _eraser(ops[1])
    handle = embedded._module.model.layers[site.layer].register_forward_hook(lambda m, a, out: eraser(out))
    try:
        res = lm_eval.simple_evaluate(
            model=HFLM(pretrained=embedded._module, tokenizer=embedded.tokenizer, batch_size=8, device="cpu",
                       softmax_dtype="float32"),
            tasks=tasks, task_manager=TaskManager(include_path=str(inc), include_defaults=False), log_samples=False,
            bootstrap_iters=0, verbosity="ERROR")
    finally:
        handle.remove()
    ref = task_metrics(res, tasks)
    for t in tasks:
        for k, v in tab.neuron[1][t].items():
            assert tab.clean[t][k] + v == pytest.approx(ref[t][k], rel=1e-5)


def test_bad_input_is_refused(embedded, site, rec, full):
    masks, ops = full
    with pytest.raises(NsLensError, match="fitted on 64 other neurons than the mask"):
        nslens.Intervention(nslens.build_range_masks(rec.stats, fraction=0.3)[0], ops[0])
    with pytest.raises(NsLensError, match=r"the LEACE eraser of 'sports' is used with the mask of 'science'"):
        nslens.Intervention(masks[[m.concept for m in masks].index("science")], ops[0])
    with pytest.raises(NsLensError, match="fitted per concept on the training split"):
        nslens.make_operator("leace")
    with pytest.raises(NsLensError, match="needs training samples of the concept and of the others"):
        leace_samples(rec.samples[rec.sample_labels == 0], rec.sample_labels[rec.sample_labels == 0], masks)
    from nslens.pipeline import RunConfig

    with pytest.raises(NsLensError, match="LEACE is fitted on the site's neurons, not SAE features"):
        RunConfig(operators=["zero", "leace"], sae_path="params.npz").validate()


def test_run_with_leace_operator_and_steering(embedded, tmp_path, monkeypatch):
    from nslens.pipeline import RunConfig, run_pipeline

    monkeypatch.setenv("NSLENS_HOME", str(tmp_path / "home"))
    cfg = RunConfig(n_per_class=24, batch_size=32, fraction=0.5, layer=2, operators=["zero", "leace"],
                    steering=["leace"], analyses=False)
    run = run_pipeline(cfg, tmp_path / "run", model=embedded)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and set(summary["erasure"]) == {"zero", "leace", "leace_full"}
    tab = json.loads((run / "erasure_leace.json").read_text())
    assert tab["operator"] == "leace" and "steering" not in tab["meta"]
    full = json.loads((run / "erasure_leace_full.json").read_text())
    assert full["operator"] == "leace" and full["meta"]["steering"] == "leace"
    assert "### `leace` (leace)" in (run / "report.md").read_text()


def test_cli_erase_with_leace_and_a_one_line_error(embedded, tmp_path):
    r = run_cli("record", "--out", "s.safetensors", "--layer", "2", "--n-per-class", "24", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("ranges", "s.safetensors", "--out", "r", "--fraction", "1.0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("erase", "--ranges", "r", "--layer", "2", "--n-per-class", "24", "--operator", "leace", "--out",
                "t.md", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tab = json.loads((tmp_path / "t.json").read_text())
    assert tab["operator"] == "leace" and len(tab["concepts"]) == 4
    assert "Concept erasure (operator: leace)" in r.stdout
    (tmp_path / "bad.toml").write_text('operators = ["leace"]\nsae_path = "params.npz"\n')
    r = run_cli("run", "bad.toml", "--out", "run", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: LEACE is fitted on the site's neurons, not SAE features; run it without an SAE"]
    assert not (tmp_path / "run").exists()
