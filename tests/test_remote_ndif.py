"""Every nslens remote path over the real wire: a local NDIF server (ndif 0.1.2, tests/ndif_stack) that cannot
import nslens runs the traces, and each result equals the local run.

Tolerance: exact (``torch.equal`` / ``np.array_equal``) for values computed by one forward, because the server's
CPU actor runs torch with this process's thread count (``same_threads``); sums that nslens merges on the client
(Welford partials, lm-eval metrics) are exact too, since the partials themselves are. One exception: the fast
erasure path (clean pass + replays in one session, ``nslens.replay``) gives the same predictions, and
probabilities within 1e-6 of the local run (measured: 6e-7, float32 rounding; ``remote="local"`` is exact, so it
is something the server does differently in a session, not the shipped code). The remote model is
``nslens.load_model(<checkpoint path>, remote=True)`` with ``NDIF_HOST`` pointing at the stack: the id a
self-hosted server serves is the checkpoint's path, so the same string loads the local model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nslens
from nslens.synthetic import synthetic_concepts


@pytest.fixture(scope="module")
def wire(ndif_stack, embedded):
    """(local model, remote model, local site, remote site) for the embedded model, with nnsight pointed at the
    stack for the module's tests."""
    ndif_stack.wait_serving()  # whatever ran before (the fault tests kill parts of the stack), it serves again
    with ndif_stack.configured():
        remote = nslens.load_model(ndif_stack.models[0], remote=True)
        yield embedded, remote, nslens.resolve_site(embedded, -2), nslens.resolve_site(remote, -2)


@pytest.fixture(autouse=True)
def same_threads(ndif_stack):
    before = torch.get_num_threads()
    torch.set_num_threads(ndif_stack.state["torch_threads"])
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    ds = synthetic_concepts(10, seed=21)
    prompter = nslens.FewShotPrompter.from_dataset(ds, k=1, seed=0)
    return ds, prompter.prompts(ds.texts)


def assert_summaries_close(a, b):
    """Erasure summaries: accuracies exact, probabilities within 1e-6 (see the module docstring)."""
    assert a.keys() == b.keys()
    for key in a:
        for metric in a[key]:
            if metric in ("acc", "cacc"):
                assert a[key][metric] == b[key][metric], (key, metric)
            else:
                assert abs(a[key][metric] - b[key][metric]) <= 1e-6, (key, metric)


def both(wire, fn):
    """``fn(model, site, remote)`` run locally and on the server."""
    local, remote, site_l, site_r = wire
    return fn(local, site_l, False), fn(remote, site_r, True)


def assert_stats_equal(a, b):
    for name in ("count", "mean", "m2", "abs_sum"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("position", ["last", "all"])
def test_record(wire, data, position):
    ds, prompts = data
    keep = position == "last"
    a, b = both(wire, lambda m, s, r: nslens.record(m, s, prompts, ds.labels, ds.label_names, batch_size=8,
                                                    position=position, keep_samples=keep, remote=r))
    assert_stats_equal(a.stats, b.stats)
    if keep:
        assert np.array_equal(a.samples, b.samples)


def test_record_with_checkpoint_uses_jobs_and_leaves_no_checkpoint(wire, data, tmp_path):
    ds, prompts = data
    ck = tmp_path / "rec.ckpt"
    a, b = both(wire, lambda m, s, r: nslens.record(m, s, prompts, ds.labels, ds.label_names, batch_size=4,
                                                    remote=r, checkpoint=ck if r else None, checkpoint_every=1))
    assert_stats_equal(a.stats, b.stats)
    assert not ck.exists()


@pytest.fixture(scope="module")
def masks(wire, data):
    ds, prompts = data
    local, _, site, _ = wire
    rec = nslens.record(local, site, prompts, ds.labels, ds.label_names, batch_size=16)
    return rec, nslens.build_range_masks(rec.stats, fraction=0.5)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "naive"])
def test_erasure_table(wire, data, masks, fast):
    from nslens.lastpos import last_positions

    ds, prompts = data
    assert last_positions(wire[1], wire[3], 8, 1) is not None  # the fast path's last layer runs the shortcut there
    ids = nslens.label_token_ids(wire[0].tokenizer, ds.label_names)
    a, b = both(wire, lambda m, s, r: nslens.erasure_table(m, s, prompts, ds.labels, ids, masks[1],
                                                           nslens.adaptive_dampen(0.5), batch_size=8, remote=r,
                                                           fast=fast))
    if fast:
        assert_summaries_close(a.summary(), b.summary())
    else:
        assert a.to_markdown() == b.to_markdown() and a.summary() == b.summary()


def test_an_edit_of_the_last_position_replays_one_position_on_the_server(wire, data, masks):
    """positions="last" at a site below the penultimate block: the clean pass keeps the keys and values of the
    layers above on the server and each replay runs one position per layer there."""
    from nslens.erasure import predict_many
    from nslens.lastpos import upper_layers

    ds, prompts = data
    ids = np.asarray(nslens.label_token_ids(wire[0].tokenizer, ds.label_names))
    lower = (nslens.resolve_site(wire[0], 0), nslens.resolve_site(wire[1], 0))
    at_0 = [nslens.RangeMask(m.neurons, m.lo, m.hi, m.mu, m.sigma, {**m.meta, **lower[0].describe()})
            for m in masks[1][:2]]  # the layer-2 masks' ranges, applied at layer 0 under that layer's name
    ivs = [None] + [nslens.Intervention(m, nslens.zero(), gated=g, positions="last") for m in at_0
                    for g in (False, True)]
    assert upper_layers(wire[1], lower[1], 8) is not None
    a = predict_many(wire[0], lower[0], prompts, ids[ds.labels], ivs, batch_size=8, per_pass=4)
    b = predict_many(wire[1], lower[1], prompts, ids[ds.labels], ivs, batch_size=8, per_pass=4, remote=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.pred, y.pred)
        np.testing.assert_allclose(x.conf, y.conf, rtol=0, atol=1e-6)


def test_steering_and_directional_ablation(wire, data, masks):
    from nslens.erasure import erasure_table
    from nslens.steering import full_masks, steering_operators

    ds, prompts = data
    ids = nslens.label_token_ids(wire[0].tokenizer, ds.label_names)
    stats = masks[0].stats
    for kind in ("steer", "ablate"):
        ops = steering_operators(stats, kind)
        a, b = both(wire, lambda m, s, r, ops=ops: erasure_table(m, s, prompts, ds.labels, ids, full_masks(stats),
                                                                 ops, batch_size=8, remote=r))
        assert_summaries_close(a.summary(), b.summary())


def test_leace_fitted_and_applied_on_the_server(wire, data, masks):
    """LEACE: the erasers fitted from the server's site activations equal the local fit, and the erasure table
    with them (range-gated and not) equals the local one."""
    from nslens.leace import fit_leace

    ds, prompts = data
    ids = nslens.label_token_ids(wire[0].tokenizer, ds.label_names)
    ms = masks[1]
    ops_l, ops_r = both(wire, lambda m, s, r: fit_leace(m, s, prompts, ds.labels, ms, batch_size=8, remote=r))
    for a, b in zip(ops_l, ops_r, strict=True):
        assert torch.allclose(a.proj_left, b.proj_left, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)
    a, b = both(wire, lambda m, s, r: nslens.erasure_table(m, s, prompts, ds.labels, ids, ms, ops_l, batch_size=8,
                                                           remote=r))
    assert_summaries_close(a.summary(), b.summary())


USER_MODULE = """
from dataclasses import dataclass
from typing import ClassVar

from nslens.ops import Operator


@dataclass(frozen=True)
class Shrink(Operator):
    name: ClassVar[str] = "shrink_by_user"
    factor: float = 0.25

    def __call__(self, x, mu, sigma, tau, neurons=None):
        return x * self.factor
"""


def test_an_operator_from_the_users_own_module_runs_once_the_module_is_registered(wire, data, masks, tmp_path,
                                                                                   monkeypatch):
    """docs/extending.md, "Running your own class on NDIF": an operator class from a module of the user's own is
    pickled by reference, so the server (which cannot import it) refuses the request and says which module; after
    ``nnsight.register(module)`` it travels by value and the server's predictions equal the local ones."""
    import sys

    import cloudpickle
    import nnsight

    ds, prompts = data
    (tmp_path / "users_lens.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import users_lens

    ids = np.asarray(nslens.label_token_ids(wire[0].tokenizer, ds.label_names))[ds.labels]
    iv = nslens.Intervention(masks[1][0], users_lens.Shrink(), gated=True)
    try:
        with pytest.raises(Exception, match="users_lens"):
            nslens.predict(wire[1], wire[3], prompts[:8], ids[:8], interventions=iv, batch_size=8, remote=True)
        nnsight.register(users_lens)
        a, b = both(wire, lambda m, s, r: nslens.predict(m, s, prompts, ids, interventions=iv, batch_size=8,
                                                         remote=r))
    finally:
        if "users_lens" in cloudpickle.list_registry_pickle_by_value():
            cloudpickle.unregister_pickle_by_value(users_lens)
        sys.modules.pop("users_lens", None)
    assert np.array_equal(a.pred, b.pred) and np.array_equal(a.conf, b.conf)
    clean = nslens.predict(wire[0], wire[2], prompts, ids, batch_size=8)
    assert not np.array_equal(a.conf, clean.conf)  # the operator changed something


def test_generation_under_an_intervention(wire, data, masks):
    """Greedy continuations with a range mask applied at every generated token: the server's equal the local."""
    from nslens.generate import GenerationSettings, generate

    _, prompts = data
    iv = nslens.Intervention(masks[1][0], nslens.zero(), gated=False)
    settings = GenerationSettings(max_new_tokens=8)
    a, b = both(wire, lambda m, s, r: generate(m, s, prompts[:4], interventions=iv, settings=settings, batch_size=4,
                                               remote=r))
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert any(x.changed for x in a)


def test_a_bundle_made_locally_runs_on_the_server(wire, data, masks, tmp_path):
    """A bundle written from the local model loads onto the remote one (no local weights: checked by its config)
    and generates there what the local interventions generate here."""
    from nslens.bundle import load_bundle, save_bundle
    from nslens.generate import GenerationSettings, generate_ids

    local, remote, site_l, site_r = wire
    _, prompts = data
    ivs = [nslens.Intervention(masks[1][1], nslens.dampen(0.25), gated=False),
           nslens.Intervention(masks[1][2], nslens.zero(), gated=True)]
    b = load_bundle(save_bundle(tmp_path / "b", local, site_l, ivs), remote)
    settings = GenerationSettings(max_new_tokens=6)
    assert generate_ids(remote, b.site(remote), prompts[:3], interventions=b.interventions, settings=settings,
                        remote=True) == generate_ids(local, site_l, prompts[:3], interventions=ivs, settings=settings)


def test_next_token_erasure(wire, masks):
    from nslens.nexttoken import next_token_dataset, target_token_ids

    nt = next_token_dataset("next:punctuation:synthetic", n_per_concept=6, seed=3)
    gold, ok = target_token_ids(wire[0].tokenizer, nt.texts, nt.targets)
    local, _, site, _ = wire
    rec = nslens.record(local, site, nt.texts, nt.labels, nt.label_names, batch_size=8)
    m = nslens.build_range_masks(rec.stats, method="probeless", fraction=0.2)
    a, b = both(wire, lambda mod, s, r: nslens.erasure_table(mod, s, nt.texts, nt.labels, None, m, nslens.zero(),
                                                             gold_token_ids=gold, batch_size=8, remote=r))
    assert_summaries_close(a.summary(), b.summary())


def test_general_mean(wire, tmp_path):
    from nslens.general import general_mean
    from nslens.synthetic import synthetic_corpus

    texts = synthetic_corpus(6, seed=4)
    a, b = both(wire, lambda m, s, r: general_mean(m, s, texts, remote=r, cache_dir=tmp_path / str(r)))
    assert torch.equal(a, b)


@pytest.mark.parametrize("chunk", [None, 5], ids=["model-head", "chunked-head"])
def test_side_effects_with_server_side_loglikelihoods(wire, masks, tmp_path, monkeypatch, chunk):
    """lm-eval log-likelihoods reduced on the server; with ``chunk`` the head runs inside the readout, that many
    positions at a time (``nslens.loglik.ChunkedHead``: the module's input, skip and weight over the wire)."""
    pytest.importorskip("lm_eval")
    from nslens import loglik
    from nslens.harness import local_tasks_dir, side_effects

    if chunk:
        monkeypatch.setattr(loglik, "HEAD_CHUNK_BYTES", chunk * wire[0].config.vocab_size * 4)
        monkeypatch.setattr(loglik, "DEVICE_HEAD_CHUNK_BYTES", chunk * wire[0].config.vocab_size * 4)

    inc = local_tasks_dir(tmp_path / "t", n_mc=8, n_ppl=3)
    mask = masks[1][0]
    tasks = ["nslens_synth_mc", "nslens_synth_cont", "nslens_synth_token_ppl"]
    a, b = both(wire, lambda m, s, r: side_effects(
        m, s, {"neuron": nslens.Intervention(mask, nslens.zero(), gated=False),
               "range": nslens.Intervention(mask, nslens.zero())},
        tasks=tasks, include_path=inc, remote=r, cache_dir=tmp_path / f"c{r}"))
    assert dict(a) == dict(b) and b["neuron"] != b["clean"]


def test_generative_side_effects_on_the_server(wire, masks, tmp_path):
    """lm-eval's generate_until through the adapter on the server (no lm-eval stop criteria sent there):
    the same exact match as locally, clean and with the intervention at every generated token."""
    pytest.importorskip("lm_eval")
    from nslens.harness import side_effects
    from nslens.lmtasks import local_tasks_dir

    inc = local_tasks_dir(tmp_path / "t", n_mc=8, n_ppl=3)
    iv = nslens.Intervention(masks[1][0], nslens.zero(), gated=False)
    a, b = both(wire, lambda m, s, r: side_effects(m, s, {"neuron": iv}, tasks=["nslens_synth_gen"],
                                                   include_path=inc, remote=r, cache_dir=tmp_path / f"c{r}"))
    assert dict(a) == dict(b)


def test_sae_features(wire, data, masks):
    from nslens.sae import build_synthetic_sae, record_features

    ds, prompts = data
    rec = nslens.record(wire[0], wire[2], prompts, ds.labels, ds.label_names, batch_size=16, keep_samples=True)
    sae = build_synthetic_sae(rec.samples, d_sae=64, seed=0)
    a, b = both(wire, lambda m, s, r: record_features(m, s, sae, prompts, ds.labels, ds.label_names, batch_size=8,
                                                      remote=r))
    for name in ("n", "mean", "m2", "fire_n", "fire_mean", "fire_m2", "l0_sum"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_neurgrad_and_probe_features(wire, data):
    from nslens.neg import neurgrad, resolve_neuron_site
    from nslens.probes import probe_features

    _, prompts = data
    local, remote = wire[0], wire[1]
    options = nslens.label_token_ids(local.tokenizer, ["sports", "science", "business", "politics"])
    out = {}
    for name, m, r in (("local", local, False), ("remote", remote, True)):
        ns = resolve_neuron_site(m, 1)
        out[name] = (neurgrad(m, ns, prompts[:6], options=options, batch_size=3, remote=r),
                     probe_features(m, ns, prompts[:6], options, batch_size=3, remote=r))
    assert np.array_equal(out["local"][0], out["remote"][0])
    assert all(np.array_equal(x, y) for x, y in zip(out["local"][1], out["remote"][1]))


def test_preflight_accepts_the_real_status_and_names_what_is_served(ndif_stack):
    from nslens.remote import check_remote

    with ndif_stack.configured():
        for model_id in ndif_stack.models:
            check_remote(model_id)
        with pytest.raises(ValueError, match=r"'org/not-served' is not running on NDIF at http://127\.0\.0\.1:\d+; "
                                             r"running now: .*tiny-random-llama.*, .*embedded-v5") as e:
            nslens.load_model("org/not-served", remote=True)
        assert "\n" not in str(e.value)
