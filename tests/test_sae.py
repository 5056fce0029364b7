"""Gemma Scope JumpReLU SAE features, tested offline with a synthetic SAE saved in Gemma Scope's npz layout."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import encode, plain_forward, run_cli

import nslens
from nslens.errors import NsLensError
from nslens.intervene import Intervention, apply_in_trace, edit_hidden
from nslens.ranges import RangeMask
from nslens.sae import (
    build_feature_masks,
    build_synthetic_sae,
    feature_table31,
    load_sae,
    load_sae_npz,
    record_features,
    select_features,
)


@pytest.fixture(scope="module")
def sae_file(embedded, site, synth, tmp_path_factory):
    rec = nslens.record(embedded, site, synth["train_prompts"], synth["train"].labels, synth["train"].label_names,
                        batch_size=32, keep_samples=True)
    path = tmp_path_factory.mktemp("sae") / "params.npz"
    build_synthetic_sae(rec.samples, d_sae=256, seed=0).save_npz(path)
    return path


@pytest.fixture(scope="module")
def sae(sae_file):
    return load_sae_npz(sae_file)


def test_npz_layout_and_gemma_scope_encode(sae, sae_file):
    with np.load(sae_file) as z:
        assert sorted(z.files) == sorted(["W_enc", "b_enc", "threshold", "W_dec", "b_dec"])
        x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
        pre = x @ z["W_enc"] + z["b_enc"]
        ref = (pre > z["threshold"]) * np.maximum(pre, 0)  # Gemma Scope's JumpReLU
    np.testing.assert_allclose(sae.encode(torch.tensor(x)).numpy(), ref, rtol=1e-5, atol=1e-6)
    assert sae.d_in == 64 and sae.d_sae == 256


def feature_mask(sae, idx, lo, hi, d_sae=256):
    idx = torch.tensor(idx)
    mu = (torch.tensor(lo) + torch.tensor(hi)) / 2
    return RangeMask(idx, lo, hi, mu, (torch.tensor(hi) - torch.tensor(lo)) / 5,
                     {"basis": "sae", "d_sae": d_sae, "tau": 2.5, "concept": "x"})


def test_identity_when_no_feature_changes(sae, embedded, site, synth):
    enc = encode(embedded, synth["test_prompts"][:4])
    h = plain_forward(embedded, enc).hidden_states[site.layer + 1]
    mask = feature_mask(sae, [0, 5, 9], [-1e9] * 3, [1e9] * 3)
    out = edit_hidden(h, Intervention(mask, nslens.dampen(1.0), gated=True, sae=sae))  # phi(x) = x
    torch.testing.assert_close(out, h, rtol=0, atol=1e-5)


def test_masking_changes_only_selected_features(sae, embedded, site, synth):
    enc = encode(embedded, synth["test_prompts"][:4])
    h = plain_forward(embedded, enc).hidden_states[site.layer + 1]
    f = sae.encode(h)
    sel = [int(i) for i in torch.argsort(-(f > 0).float().mean((0, 1)))[:6]]  # often-firing features
    vals = f[..., sel].reshape(-1, 6)
    lo, hi = vals.quantile(0.2, dim=0), vals.quantile(0.8, dim=0)
    mask = feature_mask(sae, sel, lo.tolist(), hi.tolist())
    out = edit_hidden(h, Intervention(mask, nslens.zero(), gated=True, sae=sae))
    x = f[..., sel]
    f_expected = f.clone()
    f_expected[..., sel] = torch.where((x >= lo) & (x <= hi), torch.zeros_like(x), x)
    assert (f_expected != f).any()
    # the residual moves exactly by the decoded change of the selected features
    torch.testing.assert_close(out - h, (f_expected - f) @ sae.W_dec, rtol=1e-4, atol=1e-4)


def test_trace_remote_local_equals_local(sae, embedded, site, synth):
    enc = encode(embedded, synth["test_prompts"][:3])
    mask = feature_mask(sae, [1, 2, 3], [0.0] * 3, [5.0] * 3)
    iv = Intervention(mask, nslens.zero(), gated=False, sae=sae)
    out = {}
    for remote in (False, "local"):
        with torch.no_grad():
            with embedded.trace(enc, remote=remote):
                apply_in_trace(embedded, site, iv)
                out[remote] = embedded.output.logits.save()
    assert torch.equal(out[False], out["local"])


def test_feature_statistics_and_selection_against_numpy(sae, embedded, site, synth):
    tr = synth["train"]
    st = record_features(embedded, site, sae, synth["train_prompts"], tr.labels, tr.label_names, batch_size=7)
    rec = nslens.record(embedded, site, synth["train_prompts"], tr.labels, tr.label_names, batch_size=32,
                        keep_samples=True)
    f = sae.encode(torch.tensor(rec.samples)).numpy().astype(np.float64)
    for c in range(4):
        fc = f[tr.labels == c]
        np.testing.assert_allclose(st.mean[c], fc.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(st.fire_rate()[c], (fc > 0).mean(0), atol=1e-12)
        j = int(np.argmax((fc > 0).sum(0)))
        firing = fc[fc[:, j] > 0, j]
        assert st.fire_mean[c, j] == pytest.approx(firing.mean(), rel=1e-4)
        assert st.std("firing")[c, j] == pytest.approx(firing.std(), rel=1e-3)
    sel = select_features(st, min_fire=0.1, top=0.2)
    for c in range(4):
        cand = np.flatnonzero((f[tr.labels == c] > 0).mean(0) >= 0.1)
        top = cand[np.argsort(-f[tr.labels == c][:, cand].mean(0), kind="stable")][: int(np.ceil(0.2 * len(cand)))]
        assert sorted(sel[c].tolist()) == sorted(top.tolist())
    masks = build_feature_masks(st, sel, tau=2.5, ranges_over="firing")
    assert masks[0].meta["basis"] == "sae" and masks[0].meta["d_sae"] == 256
    with pytest.raises(NsLensError, match="min_fire must be a finite number, got 'x'"):
        select_features(st, min_fire="x")
    with pytest.raises(NsLensError, match="3 feature selections for 4 concepts"):  # it gave three masks
        build_feature_masks(st, sel[:3])
    with pytest.raises(NsLensError, match=r"concept 'sports': feature indices must lie in \[0, 255\], got \[256\]"):
        build_feature_masks(st, [np.array([256])] + list(sel[1:]))
    t31 = feature_table31(st, sel)
    assert t31["per_concept"]["sports"]["ablated"] == len(sel[0]) and t31["d_sae"] == 256


def test_sae_run_end_to_end(embedded, sae_file, tmp_path, monkeypatch):
    from nslens.pipeline import RunConfig, run_pipeline

    monkeypatch.setenv("NSLENS_HOME", str(tmp_path / "home"))
    cfg = RunConfig(sae_path=str(sae_file), n_per_class=24, batch_size=32, side_effects=True, side_effect_limit=8,
                    operators=["zero"], layer=-2)  # the synthetic SAE was fitted at the site fixture's layer
    run = run_pipeline(cfg, tmp_path / "run", model=embedded)
    report = (run / "report.md").read_text()
    assert "## SAE features" in report and "| zero | feature |" in report and "| zero | range |" in report
    summary = json.loads((run / "summary.json").read_text())
    assert summary["basis"] == "sae" and "side_effects" in summary
    masks = nslens.load_masks(run / "ranges", expect={"d_model": 64, "n_layers": 4, "layer": 2})
    assert all(m.meta["basis"] == "sae" for m in masks)
    assert (run / "sae_params.npz").exists() and "table31" in json.loads((run / "sae.json").read_text())


def test_bad_input(sae, sae_file, tmp_path, monkeypatch, embedded):
    np.savez(tmp_path / "bad.npz", W_enc=np.zeros((64, 8)), b_enc=np.zeros(8))
    with pytest.raises(ValueError, match=r"lacks \['threshold', 'W_dec', 'b_dec'\]"):
        load_sae_npz(tmp_path / "bad.npz")
    small = nslens.sae.build_synthetic_sae(np.random.default_rng(0).normal(size=(50, 32)), d_sae=16)
    with pytest.raises(ValueError, match="SAE d_in 32 does not match the model's d_model 64"):
        small.check(nslens.resolve_site(embedded, -2))
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    with pytest.raises(ValueError, match=r"needs sae-lens: pip install 'nslens\[sae\]'"):
        load_sae("gemma-scope-2b-pt-res", "layer_25/width_16k/average_l0_285")
    mask = RangeMask(torch.tensor([1]), [0.0], [1.0], [0.5], [0.1], {"basis": "sae", "d_sae": 256})
    with pytest.raises(ValueError, match="pass the SAE"):
        Intervention(mask, nslens.zero())


def test_unknown_release_or_id_lists_valid_ones(monkeypatch):
    pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install 'nslens[sae]')")
    with pytest.raises(ValueError, match="unknown SAE release 'gemma-scope-nope'"):
        load_sae("gemma-scope-nope", "x")
    with pytest.raises(ValueError, match=r"ID 'layer_25/width_16k/average_l0_999' not found in release "
                                         r"'gemma-scope-2b-pt-res'. Valid IDs include: .*layer_25/width_16k/average_l0_285"):
        load_sae("gemma-scope-2b-pt-res", "layer_25/width_16k/average_l0_999")


def test_sae_cli_and_experiment_smoke(embedded, sae_file, tmp_path):
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = run_cli("sae", "--n-per-class", "16", "--batch-size", "32", cwd=tmp_path)
    assert r.returncode == 1 and "name the SAE" in r.stderr
    r = run_cli("sae", "--sae-path", str(sae_file), "--n-per-class", "16", "--batch-size", "32", "--no-side-effects",
                "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| zero | feature |" in r.stdout and "ablated" in r.stdout
    # the printed Table 31's "ablated" column is the size of each feature mask the run saved
    masks = nslens.load_masks(tmp_path / "run" / "ranges")
    assert masks and all(m.meta["basis"] == "sae" for m in masks)
    for m in masks:
        row = next(line for line in r.stdout.splitlines() if line.startswith(f"| {m.concept} |"))
        assert row.rstrip(" |").split("|")[-1].strip() == f"{len(m)} / {m.meta['d_sae']}", row
    mod = runpy.run_path(str(root / "experiments" / "sae_gemma.py"))
    mod["main"](["--smoke", "--limit", "16", "--lm-eval-limit", "4", "--out", str(tmp_path / "exp")])
    assert (tmp_path / "exp" / "synthetic" / "report.md").exists()


def test_record_features_remote_local_equals_local(sae, embedded, site, synth):
    tr = synth["train"]
    args = (embedded, site, sae, synth["train_prompts"][:10], tr.labels[:10], tr.label_names)
    a, b = record_features(*args, batch_size=4), record_features(*args, batch_size=4, remote="local")
    for k in ("n", "mean", "m2", "fire_n", "fire_mean", "fire_m2", "l0_sum"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def test_bad_sae_files_are_one_line_errors(tmp_path, sae_file):
    from nslens.sae import load_sae_npz

    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"one.npy is a single array \(.npy\), not an .npz archive"):
        load_sae_npz(tmp_path / "one.npy")
    data = sae_file.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(NsLensError, match="cut.npz"):
        load_sae_npz(tmp_path / "cut.npz")
    # every member present, one of them an array header cut short (numpy raises a plain ValueError reading it)
    import zipfile

    with zipfile.ZipFile(sae_file) as src, zipfile.ZipFile(tmp_path / "member.npz", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"\x93NUMPY\x01\x00cut" if name == "W_dec.npy" else src.read(name))
    with pytest.raises(NsLensError, match="SAE file .*member.npz could not be read"):
        load_sae_npz(tmp_path / "member.npz")
    with np.load(sae_file) as z:  # NaN weights: every feature then read as zero, without a word
        arrays = {k: z[k] for k in z.files}
    arrays["W_enc"] = np.full_like(arrays["W_enc"], np.nan)
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(NsLensError, match=r"SAE file nan.npz has NaN/inf values in \['W_enc'\]"):
        load_sae_npz(tmp_path / "nan.npz")


def test_save_npz_is_atomic(sae, tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous file as it was and no temporary behind."""
    path = tmp_path / "params.npz"
    sae.save_npz(path)
    before = path.read_bytes()

    def broken(f, **arrays):
        f.write(b"PK-half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        sae.save_npz(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["params.npz"]
