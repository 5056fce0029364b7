"""bitsandbytes-quantized models (weights 4-/8-bit, residual stream not): site access and interventions work the
same. bitsandbytes >= 0.45 runs on CPU, so this is tested here; GPU checks need a GPU machine."""

import pytest
import torch
from conftest import encode, hook_reference

import nslens

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install 'nslens[quant]')")


@pytest.fixture(scope="module", params=["nf4", "int8"])
def quantized(request):
    return request.param, nslens.load_model("embedded", quantize=request.param, device_map="cpu")


def test_weights_are_quantized_and_site_readable(quantized, synth):
    mode, model = quantized
    cls = bnb.nn.Linear4bit if mode == "nf4" else bnb.nn.Linear8bitLt
    assert isinstance(model._module.model.layers[0].mlp.up_proj, cls)
    site = nslens.resolve_site(model, -2)
    enc = encode(model, synth["test_prompts"][:4])
    with torch.no_grad():
        with model.trace(enc):
            h = nslens.read_site(model, site).save()
    assert h.shape == (4, enc["input_ids"].shape[1], 64) and torch.isfinite(h).all()


def test_intervention_equals_plain_hook_and_model_stays_clean(quantized, synth):
    mode, model = quantized
    site = nslens.resolve_site(model, -2)
    prompts, tr = synth["train_prompts"], synth["train"]
    rec = nslens.record(model, site, prompts, tr.labels, tr.label_names, batch_size=32)
    mask = nslens.build_range_masks(rec.stats, fraction=0.5)[0]
    iv = nslens.Intervention(mask, nslens.zero(), gated=True)
    enc = encode(model, synth["test_prompts"][:4])
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    # the edit written out per neuron in a plain forward hook (no nslens code)
    ref = hook_reference(model, site, enc, mask, lambda x, mu, sigma: torch.zeros_like(x), gated=True)
    with torch.no_grad():
        with model.trace(enc):
            nslens.apply_in_trace(model, site, iv)
            got = model.output.logits.save()
        clean = model._module(**enc, position_ids=pos).logits
        with model.trace(enc):
            after = model.output.logits.save()
    torch.testing.assert_close(got, ref)
    assert not torch.equal(got, clean) and torch.equal(after, clean)
    ids = nslens.label_token_ids(model.tokenizer, tr.label_words)
    import numpy as np

    acc = nslens.predict(model, site, synth["test_prompts"], np.asarray(ids)[synth["test"].labels]).correct.mean()
    assert acc > 0.5, f"{mode}: accuracy {acc}"  # chance is 0.25


def test_quantize_errors():
    with pytest.raises(ValueError, match="quantize applies to local models"):
        nslens.load_model("meta-llama/Llama-3.1-8B", quantize="nf4", remote=True)


def test_nf4_width_bitsandbytes_cannot_pack_on_cpu_is_a_one_line_error(tmp_path):
    """bitsandbytes asserts at the first forward ("N must be divisible by block_n"); nslens says it at load time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nslens.synthetic import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=66, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"nf4 on the CPU needs .* model.layers.0.self_attn.q_proj is 66 -> 66"):
        nslens.load_model(str(tmp_path), quantize="nf4", tokenizer=tok, device_map="cpu")
    m = nslens.load_model(str(tmp_path), quantize="int8", tokenizer=tok, device_map="cpu")  # int8 packs any width
    with torch.no_grad(), m.trace(dict(tok(["the game"], return_tensors="pt"))):
        out = m.output.logits.save()
    assert out.shape[-1] == len(tok)
