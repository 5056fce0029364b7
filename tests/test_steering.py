"""Steering baselines (paper App. M): vectors against numpy, steering / range-gated steering / directional ablation
against plain torch hooks, per-concept operators in the erasure and side-effect tables, remote="local"."""

import numpy as np
import pytest
import torch
from conftest import encode, plain_forward

import nslens
from nslens.erasure import erasure_table, predict
from nslens.ops import ablate_direction, steer
from nslens.steering import full_masks, steering_operators, steering_vectors


@pytest.fixture(scope="module")
def rec(embedded, synth):
    site = nslens.resolve_site(embedded, 2)  # the middle of the 4 blocks, as the paper steers at the middle layer
    r = nslens.record(embedded, site, synth["train_prompts"], synth["train"].labels, synth["train"].label_names,
                      batch_size=32, keep_samples=True)
    return site, r


def test_steering_vectors_are_target_minus_other_means(rec):
    _, r = rec
    v = steering_vectors(r.stats).numpy()
    x, y = r.samples.astype(np.float64), r.sample_labels
    for c in range(4):
        np.testing.assert_allclose(v[c], x[y == c].mean(0) - x[y != c].mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown steering kind 'push'"):
        steering_operators(r.stats, "push")


@pytest.mark.parametrize("kind,gated", [("steer", False), ("steer", True), ("ablate", False)])
def test_steering_equals_plain_hook_and_leaves_the_model_clean(embedded, synth, rec, kind, gated):
    site, r = rec
    mask = full_masks(r.stats, tau=1.0)[1]
    v = steering_vectors(r.stats)[1]
    op = steer(v, -2.0) if kind == "steer" else ablate_direction(v)
    enc = encode(embedded, synth["test_prompts"][:6])
    with torch.no_grad(), embedded.trace(enc):
        nslens.apply_in_trace(embedded, site, nslens.Intervention(mask, op, gated=gated))
        logits = embedded.output.logits.save()
    order = mask.neurons
    lo, hi = torch.empty(site.d_model), torch.empty(site.d_model)
    lo[order], hi[order] = mask.lo, mask.hi

    def hook(module, args, out):
        if kind == "ablate":
            u = v / v.norm()
            return out - (out @ u)[..., None] * u
        inside = (out >= lo) & (out <= hi) if gated else torch.ones_like(out, dtype=torch.bool)
        return torch.where(inside, out - 2.0 * v, out)

    ref = plain_forward(embedded, enc, hook, embedded._module.model.layers[site.layer]).logits
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    clean = plain_forward(embedded, enc).logits
    with torch.no_grad(), embedded.trace(enc):
        again = embedded.output.logits.save()
    torch.testing.assert_close(again, clean, rtol=0, atol=0)
    if kind == "ablate":
        with pytest.raises(ValueError, match="non-zero direction"):
            ablate_direction(torch.zeros(4))


def test_per_concept_operators_in_the_tables_and_remote_local(embedded, synth, rec, tmp_path):
    site, r = rec
    masks = full_masks(r.stats, tau=1.0)
    ops = steering_operators(r.stats, "steer", alpha=-2.0)
    ids = nslens.label_token_ids(embedded.tokenizer, synth["ds"].label_words)
    args = (embedded, site, synth["test_prompts"][:40], synth["test"].labels[:40], ids, masks, ops)
    fast = erasure_table(*args, batch_size=16)
    naive = erasure_table(*args, batch_size=16, fast=False)
    for part in ("neuron", "range"):
        for a, b in zip(getattr(fast, part), getattr(naive, part)):
            assert a == pytest.approx(b, abs=1e-6)
    assert fast.operator == "steer(a=-2)"
    # steering each concept away lowers its own accuracy more than the others'
    assert fast.summary()["neuron"]["acc"] < fast.summary()["neuron"]["cacc"]
    gold = np.asarray(ids)[synth["test"].labels[:12]]
    iv = nslens.Intervention(masks[0], ops[0], gated=True)
    a = predict(embedded, site, synth["test_prompts"][:12], gold, interventions=iv)
    b = predict(embedded, site, synth["test_prompts"][:12], gold, interventions=iv, remote="local")
    np.testing.assert_allclose(a.conf, b.conf, rtol=1e-5)
    with pytest.raises(ValueError, match="3 operators for 4 masks"):
        erasure_table(*args[:6], ops[:3])
    lm_eval = pytest.importorskip("lm_eval")  # noqa: F841
    from nslens.harness import local_tasks_dir, side_effect_table, side_effects

    inc = local_tasks_dir(tmp_path / "t", n_mc=16, n_ppl=4)
    tab = side_effect_table(embedded, site, masks[:2], ops[:2], tasks=["nslens_synth_mc", "nslens_synth_token_ppl"],
                            include_path=inc)
    one = side_effects(embedded, site, {"x": nslens.Intervention(masks[1], ops[1], gated=False)},
                       tasks=["nslens_synth_mc", "nslens_synth_token_ppl"], include_path=inc)
    for t in ("nslens_synth_mc", "nslens_synth_token_ppl"):
        assert tab.neuron[1][t] == pytest.approx(one.deltas()["x"][t], rel=1e-5, abs=1e-6)


def test_run_with_steering_writes_every_comparison(embedded, tmp_path, monkeypatch):
    import json

    from nslens.pipeline import RunConfig, run_pipeline

    monkeypatch.setenv("NSLENS_HOME", str(tmp_path / "home"))
    cfg = RunConfig(n_per_class=24, batch_size=32, fraction=0.5, layer=2, steering=["steer", "ablate", "arm"],
                    steer_source="mean", side_effects=True, side_effect_limit=6, analyses=False)
    run = run_pipeline(cfg, tmp_path / "run", model=embedded)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["erasure"]) == {"zero", "steer", "ablate", "arm"}
    assert set(summary["side_effects"]) == {"zero", "steer", "ablate", "arm"}
    steer_tab = json.loads((run / "erasure_steer.json").read_text())
    assert steer_tab["meta"]["steer_source"] == "mean" and steer_tab["operator"] == "steer(a=-2)"
    report = (run / "report.md").read_text()
    assert "## Steering baselines" in report and "### `arm` (zero)" in report and "### `steer` (steer(a=-2))" in report
    for bad, message in (({"steering": ["push"]}, "unknown steering ['push']"),
                         ({"steer_source": "first"}, "unknown steer_source 'first'"),
                         ({"steer_tau": 0}, "tau must be a positive number")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            RunConfig(**bad).validate()



def test_a_registered_vector_operator_is_a_steering_run(embedded, synth, rec):
    """A vector operator of one's own (``build = "vector"`` with ``from_vector``) is a steering kind and a valid
    steering run: steering by half the vector the wrong way round gives the erasure table of the built-in
    ``steer(r_c, +0.5)`` on the same full-vector masks."""
    from dataclasses import dataclass
    from typing import ClassVar

    from nslens.ops import OPERATOR_REGISTRY, Steer, register_operator
    from nslens.steering import STEERING_KINDS

    @dataclass(frozen=True)
    class HalfBack(Steer):
        name: ClassVar[str] = "half_back"

        @classmethod
        def from_vector(cls, vector, *, alpha=-2.0):
            return cls(vector, 0.5)

    site, r = rec
    te = synth["test"]
    ids = nslens.label_token_ids(embedded.tokenizer, te.label_words)
    args = (embedded, site, synth["test_prompts"][:24], te.labels[:24], ids, full_masks(r.stats))
    register_operator(HalfBack)
    try:
        assert "half_back" in STEERING_KINDS
        nslens.RunConfig(steering=["half_back"]).validate()
        ops = steering_operators(r.stats, "half_back")
        assert all(type(op) is HalfBack and op.alpha == 0.5 for op in ops)
        ours = erasure_table(*args, ops, batch_size=32)
    finally:
        OPERATOR_REGISTRY.unregister("half_back")
    builtin = erasure_table(*args, [steer(v, 0.5) for v in steering_vectors(r.stats)], batch_size=32)
    for part in ("base", "neuron", "range"):
        assert getattr(ours, part) == getattr(builtin, part)
    assert any(row["conf"] != 0 for row in ours.neuron)  # the steering moved something
    with pytest.raises(ValueError, match=r"unknown steering \['half_back'\]"):
        nslens.RunConfig(steering=["half_back"]).validate()
