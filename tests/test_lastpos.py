"""The last decoder layer at the last position only: equal to the full layer (plain forwards and plain hooks of
the Hugging Face model), for every family that names the shortcut, and refused where it would not be exact."""

import pytest
import torch

import nslens
from nslens import lastpos
from nslens.replay import chunked, replay_batch
from nslens.synthetic import build_tokenizer

PROMPTS = ["Text: apple pear plum fig\nLabel:", "Text: fig\nLabel:", "Text: red blue green red blue red\nLabel:"]


def last_logits(model, tiles=1, offset=0):
    return {"logits": model.output.logits[:, -1, :].cpu()}


def kept_logits(model, tiles=1, offset=0):
    return {"logits": model.output.logits.cpu()}


def random_model(model_type: str, attn: str = "sdpa", **extra):
    """A small random model of ``model_type`` (grouped-query attention, rotary) over the synthetic tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=128, pad_token_id=tok.pad_token_id, **extra)
    cfg._attn_implementation = attn
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    return nslens.load_model(hf, tokenizer=tok)


def hf_last_logits(model, enc, hook=None, layer=None):
    """The raw HF model's last-position logits (all layers in full), optionally with a plain forward hook."""
    handle = model._module.model.layers[layer].register_forward_hook(hook) if hook is not None else None
    try:
        with torch.no_grad():
            return model._module(**enc).logits[:, -1]
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("model_type,attn,extra", [
    ("llama", "sdpa", {}), ("llama", "eager", {}), ("qwen3", "sdpa", {}),  # Qwen3: RMSNorm on q and k per head
    ("qwen2", "sdpa", {}), ("mistral", "sdpa", {"sliding_window": None})])
def test_the_shortcut_equals_the_full_last_layer(model_type, attn, extra):
    model = random_model(model_type, attn, **extra)
    enc = dict(model.tokenizer(PROMPTS, return_tensors="pt", padding=True))  # left padding: rows of 3 lengths
    seq = enc["input_ids"].shape[1]
    site = nslens.resolve_site(model, 1)  # the penultimate block: the replay is the last layer alone
    plan = lastpos.last_positions(model, site, seq, 1)
    assert plan is not None and plan.kind == "rope-prenorm" and plan.path == "model.layers.2"
    d = site.d_model
    cols = torch.arange(0, d, 2)
    mask = nslens.RangeMask(cols, -torch.ones(len(cols)) * .05, torch.ones(len(cols)) * .05, torch.zeros(len(cols)),
                            torch.ones(len(cols)) * .02, {"tau": 2.5, **site.describe()})
    ivs = [None, nslens.Intervention(mask, nslens.zero(), gated=False), nslens.Intervention(mask, nslens.zero())]
    clean, outs = replay_batch(model, site, enc, chunked(ivs, 2), last_logits, logits_to_keep=1)
    torch.testing.assert_close(clean["logits"], hf_last_logits(model, enc), rtol=1e-5, atol=1e-5)

    def hook_for(gated):
        def hook(module, args, output):
            hs = output.clone()
            x = hs[..., cols]
            inside = (x >= mask.lo) & (x <= mask.hi) if gated else torch.ones_like(x, dtype=torch.bool)
            hs[..., cols] = torch.where(inside, torch.zeros_like(x), x)
            return hs
        return hook

    n = len(PROMPTS)
    got = outs[0]["logits"]
    for j, gated in enumerate((False, True)):
        ref = hf_last_logits(model, enc, hook_for(gated), site.layer)
        torch.testing.assert_close(got[j * n:(j + 1) * n], ref, rtol=1e-5, atol=1e-5)
    # the shortcut is what ran: a wrong last position shows in the logits
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lastpos.RopePreNormLayer, "last_output",
                   lambda self, layer, h, kw, s, keep: (torch.zeros_like(h[:, -keep:]), None))
        broken, _ = replay_batch(model, site, enc, [], last_logits, logits_to_keep=1)
    assert not torch.allclose(broken["logits"], clean["logits"], atol=1e-3)
    # and the model is clean afterwards
    torch.testing.assert_close(hf_last_logits(model, enc), clean["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [True, False])
def test_several_kept_positions_as_lm_eval_reads_them(padded):
    """lm-eval's log-likelihoods read the continuation's positions: there the queries of the kept positions are
    causal among themselves (the model's 4-d mask with padding; built here without one)."""
    model = random_model("llama")
    enc = dict(model.tokenizer(PROMPTS, return_tensors="pt", padding=True))
    if not padded:
        enc = {"input_ids": enc["input_ids"]}  # as the lm-eval adapter passes a batch: no attention mask
    site = nslens.resolve_site(model, 1)
    for keep in (1, 3):
        clean, _ = replay_batch(model, site, enc, [], kept_logits, logits_to_keep=keep)
        with torch.no_grad():
            ref = model._module(**enc).logits[:, -keep:]
        assert clean["logits"].shape == ref.shape
        torch.testing.assert_close(clean["logits"], ref, rtol=1e-5, atol=1e-5)


def test_a_middle_site_runs_the_layers_between_in_full():
    model = random_model("llama")
    enc = dict(model.tokenizer(PROMPTS, return_tensors="pt", padding=True))
    site = nslens.resolve_site(model, 0)
    clean, _ = replay_batch(model, site, enc, [], last_logits, logits_to_keep=1)
    torch.testing.assert_close(clean["logits"], hf_last_logits(model, enc), rtol=1e-5, atol=1e-5)


def test_where_the_shortcut_does_not_apply():
    model = random_model("llama")
    site = nslens.resolve_site(model, 1)
    assert lastpos.last_positions(model, site, 8, 1) is not None
    assert lastpos.last_positions(model, nslens.resolve_site(model, -1), 8, 1) is None  # nothing runs above the last layer
    assert lastpos.last_positions(model, site, 8, 4) is not None and lastpos.last_positions(model, site, 8, 5) is None
    assert lastpos.last_positions(model, site, 8, 0) is None  # 0 keeps all
    model._module.config._attn_implementation = "flash_attention_2"  # another mask format: the layer runs in full
    assert lastpos.last_positions(model, site, 8, 1) is None
    windowed = random_model("mistral", sliding_window=4)
    wsite = nslens.resolve_site(windowed, 1)
    assert lastpos.last_positions(windowed, wsite, 4, 1) is not None  # the window covers every position
    assert lastpos.last_positions(windowed, wsite, 5, 1) is None  # the last query would see only the window
    assert nslens.models.get_family("gpt2").layer_kind is None and nslens.models.get_family("gemma").layer_kind is None


@pytest.mark.parametrize("model_type,attn,prompts", [
    ("llama", "sdpa", PROMPTS), ("llama", "eager", PROMPTS), ("qwen3", "sdpa", PROMPTS),
    ("llama", "sdpa", PROMPTS[:1])])  # one prompt: no padding, so the model passes no mask
def test_an_edit_of_the_last_position_replays_one_position_per_layer(model_type, attn, prompts):
    """positions="last": the layers above the site run at the last position only, from the clean pass's keys and
    values; equal to the full forward with a plain hook that edits the last position."""
    model = random_model(model_type, attn)
    enc = dict(model.tokenizer(prompts, return_tensors="pt", padding=True))
    seq = enc["input_ids"].shape[1]
    site = nslens.resolve_site(model, 0)  # two layers above: the one between runs from cached keys too
    assert lastpos.upper_layers(model, site, seq).paths == ("model.layers.1", "model.layers.2")
    d = site.d_model
    cols = torch.arange(1, d, 3)
    mask = nslens.RangeMask(cols, -torch.ones(len(cols)) * .05, torch.ones(len(cols)) * .05, torch.zeros(len(cols)),
                            torch.ones(len(cols)) * .02, {"tau": 2.5, **site.describe()})
    last = [nslens.Intervention(mask, nslens.zero(), gated=g, positions="last") for g in (False, True)]
    every = nslens.Intervention(mask, nslens.zero(), gated=False)  # all positions: the chunk replays in full
    ivs = [None, *last, every, last[0]]
    clean, outs = replay_batch(model, site, enc, chunked(ivs, 2), last_logits, logits_to_keep=1)
    got = torch.cat([o["logits"] for o in outs])
    torch.testing.assert_close(clean["logits"], hf_last_logits(model, enc), rtol=1e-5, atol=1e-5)

    def hook_for(gated, only_last):
        def hook(module, args, output):
            hs = output.clone()
            x = hs[..., cols]
            inside = (x >= mask.lo) & (x <= mask.hi) if gated else torch.ones_like(x, dtype=torch.bool)
            if only_last:
                inside[:, :-1] = False
            hs[..., cols] = torch.where(inside, torch.zeros_like(x), x)
            return hs
        return hook

    n = len(prompts)
    for j, (gated, only_last) in enumerate([(False, True), (True, True), (False, False), (False, True)]):
        ref = hf_last_logits(model, enc, hook_for(gated, only_last), site.layer)
        torch.testing.assert_close(got[j * n:(j + 1) * n], ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[:n], got[2 * n:3 * n], atol=1e-3)  # editing one position is not editing all
    # the one-position replay is what ran: a wrong step shows in the logits
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lastpos.RopePreNormLayer, "step", lambda self, layer, x, past, kw, s, tiles: torch.zeros_like(x))
        _, broken = replay_batch(model, site, enc, chunked([last[0]], 1), last_logits, logits_to_keep=1)
    assert not torch.allclose(broken[0]["logits"], got[:n], atol=1e-3)
    # the clean pass runs the last layer at the kept position only, and the replays take its keys and values from
    # there: a wrong kept output shows in the clean logits alone, wrong keys in the replays' alone
    real = lastpos.RopePreNormLayer.last_output
    for part in (0, 1):
        def wrong(self, layer, h, kw, s, keep, part=part):
            out, (k, v) = real(self, layer, h, kw, s, keep)
            return (torch.zeros_like(out), (k, v)) if part == 0 else (out, (torch.zeros_like(k), v))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lastpos.RopePreNormLayer, "last_output", wrong)
            c, r = replay_batch(model, site, enc, chunked([last[0]], 1), last_logits, logits_to_keep=1)
        assert torch.allclose(c["logits"], clean["logits"], atol=1e-3) == (part == 1)
        assert torch.allclose(r[0]["logits"], got[:n], atol=1e-3) == (part == 0)
    torch.testing.assert_close(hf_last_logits(model, enc), clean["logits"], rtol=1e-5, atol=1e-5)  # clean after
