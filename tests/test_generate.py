"""Generation under an intervention (nslens.generate) against transformers' own ``generate`` with the same edit
as a plain torch forward hook on the raw module: token for token, greedy and sampled, and the model clean after."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import edit_by_hand, encode, plain_forward, run_cli

import nslens
from nslens.errors import NsLensError
from nslens.generate import GenerationSettings, generate, generate_ids
from nslens.intervene import edit_hidden
from nslens.steering import full_masks, steering_operators


@pytest.fixture(scope="module")
def prompts(synth):
    return synth["test_prompts"][:5]


def hooked_generate(model, site, prompts, interventions, settings):
    """The reference: the raw HF module's ``generate`` with the edit as a plain forward hook on the site's layer."""
    hf = model._module
    layer = hf.model.layers[site.layer]
    ivs = [] if interventions is None else list(interventions) if isinstance(interventions, list) \
        else [interventions]

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        for iv in ivs:
            h = plain_edit(h, iv)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    enc = dict(model.tokenizer(list(prompts), return_tensors="pt", padding=True))
    handle = layer.register_forward_hook(hook)
    try:
        if settings.do_sample:
            torch.manual_seed(settings.seed)
        with torch.no_grad():
            out = hf.generate(**enc, **settings.generate_kwargs(model.tokenizer))
    finally:
        handle.remove()
    eos = model.tokenizer.eos_token_id
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


def plain_edit(h, iv):
    """Zeroing, dampening and steering (x + alpha * r_j) written out neuron by neuron (where the value lies in the
    range when gated); LEACE's edit is checked against concept-erasure's own eraser in test_leace, so it goes
    through ``edit_hidden`` here."""
    op = iv.operator
    if op.name == "zero":
        return edit_by_hand(h, iv.mask, lambda x, mu, sigma: torch.zeros_like(x), iv.gated)
    if op.name == "dampen":
        return edit_by_hand(h, iv.mask, lambda x, mu, sigma: x * op.alpha, iv.gated)
    if op.name == "steer":  # edit_by_hand visits the mask's neurons in order: r_j is the next of their entries
        r = iter(op.vector[iv.mask.neurons])
        return edit_by_hand(h, iv.mask, lambda x, mu, sigma: x + op.alpha * next(r), iv.gated)
    assert op.name == "leace", op.name
    return edit_hidden(h, iv)


def interventions(name, synth_masks, synth_recorded):
    if name == "range":
        return nslens.Intervention(synth_masks[0], nslens.ops.zero(), gated=True)
    if name == "neuron":
        return nslens.Intervention(synth_masks[1], nslens.ops.zero(), gated=False)
    if name in ("steer", "range-steer"):  # difference-in-means steering (App. M), ungated and range-gated
        full = full_masks(synth_recorded.stats)
        ops = steering_operators(synth_recorded.stats, "steer", alpha=-4.0)
        return nslens.Intervention(full[0], ops[0], gated=name == "range-steer")
    if name in ("leace", "range-leace"):  # LEACE erasers fitted on the recording's vectors, ungated and gated
        from nslens.leace import leace_samples

        erasers = leace_samples(synth_recorded.samples, synth_recorded.sample_labels, synth_masks)
        return nslens.Intervention(synth_masks[3], erasers[3], gated=name == "range-leace")
    if name == "sequence":
        return [nslens.Intervention(synth_masks[0], nslens.ops.dampen(0.25), gated=True),
                nslens.Intervention(synth_masks[2], nslens.ops.zero(), gated=False)]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["range", "neuron", "steer", "range-steer", "leace", "range-leace", "sequence"])
def test_greedy_generation_equals_a_plain_hook_on_hf_generate(embedded, site, synth_recorded, synth_masks, prompts, name):
    iv = interventions(name, synth_masks, synth_recorded)
    settings = GenerationSettings(max_new_tokens=8)
    # batches of 2 once (several padded batches), else the whole set in one batch
    got = generate_ids(embedded, site, prompts, interventions=iv, settings=settings,
                       batch_size=2 if name == "range" else len(prompts))
    assert got == hooked_generate(embedded, site, prompts, iv, settings)


def test_clean_generation_equals_hf_generate_and_the_edit_changes_what_is_said(embedded, site, synth, synth_masks,
                                                                              prompts):
    enc = encode(embedded, prompts)
    before = plain_forward(embedded, enc).logits
    settings = GenerationSettings(max_new_tokens=10)
    iv = nslens.Intervention(synth_masks[0], nslens.ops.zero(), gated=False)
    res = generate(embedded, site, prompts, interventions=iv, settings=settings)
    assert [r.clean_ids for r in res] == hooked_generate(embedded, site, prompts, None, settings)
    assert any(r.changed for r in res), "zeroing half the site's neurons changed no continuation"
    for r in res:
        assert r.clean == embedded.tokenizer.decode(r.clean_ids, skip_special_tokens=True)
        assert r.to_dict()["changed"] == (r.clean_ids != r.intervened_ids)
    assert torch.equal(plain_forward(embedded, enc).logits, before), "the model is not clean after generation"


def test_sampling_is_seeded_and_equals_hf_sampling(embedded, site, synth_masks, prompts):
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.95, seed=7)
    iv = nslens.Intervention(synth_masks[0], nslens.ops.zero(), gated=True)
    a = generate_ids(embedded, site, prompts, interventions=iv, settings=settings, batch_size=len(prompts))
    b = generate_ids(embedded, site, prompts, interventions=iv, settings=settings, batch_size=len(prompts))
    assert a == b
    assert a == hooked_generate(embedded, site, prompts, iv, settings)
    other = generate_ids(embedded, site, prompts, interventions=iv, batch_size=len(prompts),
                         settings=GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.5, seed=8))
    assert other != a


def test_remote_local_equals_local(embedded, site, synth_masks, prompts):
    iv = nslens.Intervention(synth_masks[0], nslens.ops.zero(), gated=True)
    settings = GenerationSettings(max_new_tokens=6)
    assert generate_ids(embedded, site, prompts[:3], interventions=iv, settings=settings, remote="local") == \
        generate_ids(embedded, site, prompts[:3], interventions=iv, settings=settings)


@pytest.mark.parametrize("kwargs, words", [({"max_new_tokens": 0}, "max_new_tokens"),
                                           ({"temperature": 0.0}, "temperature"),
                                           ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                                           # each was accepted: "no" is truthy and sampled, inf sampled uniformly
                                           ({"do_sample": "no"}, "do_sample must be True or False, got 'no'"),
                                           ({"temperature": float("inf")}, "temperature must be a finite number"),
                                           ({"temperature": "x"}, "temperature must be a finite number, got 'x'"),
                                           ({"seed": -1}, "seed must be >= 0, got -1"),
                                           ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
                                           ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1")])
def test_bad_settings_are_user_errors(kwargs, words):
    with pytest.raises(NsLensError, match=words):
        GenerationSettings(**kwargs)
    with pytest.raises(NsLensError, match="settings must be a GenerationSettings, got dict"):
        generate_ids(None, None, ["a"], settings={"max_new_tokens": 2})


def test_no_prompts_is_a_user_error(embedded, site):
    with pytest.raises(NsLensError, match="no prompts"):
        generate_ids(embedded, site, [])


def cli(argv, capsys):
    """``nslens ARGV`` in this process (``conftest.run_cli``): (exit code, stdout, stderr)."""
    r = run_cli(*argv)
    return r.returncode, r.stdout, r.stderr


def test_generate_command_with_ranges_and_with_a_bundle(embedded, site, synth_masks, prompts, tmp_path, capsys):
    """`nslens generate` with saved masks writes the continuations the library computes for the same edit; a
    bundle of that edit (`nslens bundle`) generates the same; bad input is one line."""
    ranges = tmp_path / "ranges"
    for i, m in enumerate(synth_masks):
        m.save(ranges / f"{i:02d}_{m.concept}.safetensors")
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(p.replace("\n", "\\n") for p in prompts[:3]) + "\n")
    concept = synth_masks[1].concept
    code, out, err = cli(["generate", "--ranges", ranges, "--concepts", concept, "--ungated", "--prompts-file", pf,
                          "--max-new-tokens", 6, "--layer", site.layer, "--out", tmp_path / "gen.json"], capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "gen.json").read_text())
    want = generate_ids(embedded, site, prompts[:3], settings=GenerationSettings(max_new_tokens=6),
                        interventions=nslens.Intervention(synth_masks[1], nslens.zero(), gated=False))
    assert [c["intervened_ids"] for c in got["continuations"]] == want
    assert [c["prompt"] for c in got["continuations"]] == prompts[:3]
    assert got["interventions"][0]["concept"] == concept and got["interventions"][0]["kind"] == "neuron"
    assert "intervened" in out

    code, _, err = cli(["bundle", "--ranges", ranges, "--concepts", concept, "--ungated", "--layer", site.layer,
                        "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    code, _, err = cli(["generate", "--bundle", tmp_path / "b", "--prompts-file", pf, "--max-new-tokens", 6,
                        "--out", tmp_path / "gen_b.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "gen_b.json").read_text())["continuations"] == got["continuations"]

    for argv, words in [(["generate", "--prompt", "x"], "give the range masks (--ranges) or a bundle"),
                        (["generate", "--ranges", ranges, "--bundle", tmp_path / "b", "--prompt", "x"], "one of them"),
                        (["generate", "--ranges", ranges, "--layer", site.layer], "no prompts"),
                        (["generate", "--ranges", ranges, "--layer", site.layer, "--prompt", "x", "--concepts",
                          "nope"], "no mask for concept 'nope'"),
                        (["generate", "--bundle", tmp_path / "nowhere", "--prompt", "x"], "not an nslens bundle"),
                        (["generate", "--ranges", ranges, "--prompt", "x", "--max-new-tokens", 0], "max_new_tokens")]:
        code, _, err = cli(argv, capsys)
        assert code == 1 and words in err and len(err.strip().splitlines()) == 1, (argv, err)
