import pytest
import torch
from conftest import encode, plain_forward
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import nslens
from nslens.models import SUPPORTED_FAMILIES, model_family, read_site, resolve_site


def tiny(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=300, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=3, n_head=4, n_embd=32, n_positions=128))
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    return cls[1](cls[0](hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("layer", [0, -2])
def test_site_reading_equals_output_hidden_states(embedded, family, layer):
    hf = tiny(family).eval()
    model = nslens.load_model(hf, tokenizer=embedded.tokenizer)
    site = resolve_site(model, layer)
    assert site.family == family and site.layer == layer % 3
    enc = encode(model, ["the game and the team", "a bank"])
    with torch.no_grad():
        with model.trace(enc):
            h = read_site(model, site).save()
    ref = plain_forward(model, enc).hidden_states[site.layer + 1]  # hidden_states[0] is the embedding
    assert h.shape == ref.shape == (2, enc["input_ids"].shape[1], site.d_model)
    assert torch.equal(h, ref)


def test_embedded_site_and_padding(embedded, site):
    assert embedded.tokenizer.padding_side == "left" and embedded.tokenizer.pad_token is not None
    assert site.layer == site.n_layers - 2 and site.path == f"model.layers.{site.layer}"


def test_layer_out_of_range(embedded):
    with pytest.raises(ValueError, match=r"layer 4 out of range .*\(valid: -4\.\.3\)"):
        resolve_site(embedded, 4)
    with pytest.raises(ValueError, match="out of range"):
        resolve_site(embedded, -5)


def test_unknown_family_lists_supported(embedded):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="unknown model family 'gpt_neox'; supported: " +
                       ", ".join(sorted(SUPPORTED_FAMILIES))):
        nslens.load_model(hf, tokenizer=embedded.tokenizer)


def test_tuple_output_is_unwrapped_not_indexed(site):
    """transformers 4.x layers return tuples: read_site must take the hidden states, not batch row 0, and
    write_site must keep the tuple's other items."""
    from types import SimpleNamespace

    from nslens.models import write_site

    h = torch.randn(3, 5, site.d_model)
    layer = SimpleNamespace(output=(h, "cache"))
    fake = SimpleNamespace(model=SimpleNamespace(layers={site.layer: layer}))
    fake.model.layers = [layer if i == site.layer else None for i in range(site.n_layers)]
    assert read_site(fake, site) is h
    write_site(fake, site, h * 2)
    assert isinstance(layer.output, tuple) and layer.output[1] == "cache" and torch.equal(layer.output[0], h * 2)
    layer.output = h  # transformers 5: a plain tensor, returned whole
    assert read_site(fake, site) is h
    write_site(fake, site, h + 1)
    assert torch.equal(layer.output, h + 1)


def test_load_model_bad_inputs(embedded, tmp_path):
    with pytest.raises(ValueError, match="needs its tokenizer"):
        nslens.load_model(embedded._module)
    with pytest.raises(ValueError, match="remote=True needs a hub model id"):
        nslens.load_model(str(tmp_path), remote=True)
    with pytest.raises(ValueError, match="unknown quantize mode 'fp8'; choose one of nf4, int8"):
        nslens.load_model("embedded", quantize="fp8")
    with pytest.raises(ValueError, match="neither a local directory"):
        nslens.load_model("not-a-model")
    with pytest.raises(ValueError, match="unknown dtype"):
        nslens.load_model("embedded", dtype="float8")
    assert model_family(embedded) == "llama"


def test_default_site_is_the_last_decoder_block(embedded):
    """The paper's 'penultimate layer' is the layer before the output head: the last block's output."""
    import nslens

    site = nslens.resolve_site(embedded)
    assert site.layer == site.n_layers - 1 == 3
    from nslens.pipeline import RunConfig

    assert RunConfig().layer == -1 and RunConfig().only_correct is True and RunConfig().cacc_average == "class"


def test_a_registered_family_is_traced_like_the_built_ins(embedded):
    """Adding a family is one ModelFamily: GPT-NeoX (not built in) then loads, and its site reads the layer output."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from nslens.models import FAMILY_REGISTRY, ModelFamily, get_family, register_family

    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64)).eval()
    register_family(ModelFamily("gpt_neox", layers="gpt_neox.layers", embedding="gpt_neox.embed_in",
                                final_norm="gpt_neox.final_layer_norm", gated_mlp=False))
    try:
        assert "gpt_neox" in SUPPORTED_FAMILIES and SUPPORTED_FAMILIES["gpt_neox"] == "gpt_neox.layers"
        model = nslens.load_model(hf, tokenizer=embedded.tokenizer)
        site = resolve_site(model, 0)
        assert site.path == "gpt_neox.layers.0" and site.family == "gpt_neox"
        fam = get_family("gpt_neox")
        assert fam.part(hf, fam.embedding) is hf.get_input_embeddings()
        assert fam.part(hf, fam.head) is hf.get_output_embeddings()
        assert isinstance(fam.part(hf, fam.final_norm), torch.nn.LayerNorm)
        enc = encode(model, ["the game and the team"])
        with torch.no_grad():
            with model.trace(enc):
                h = read_site(model, site).save()
        assert torch.equal(h, plain_forward(model, enc).hidden_states[1])
    finally:
        FAMILY_REGISTRY.unregister("gpt_neox")
    assert "gpt_neox" not in SUPPORTED_FAMILIES


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_family_paths_name_the_models_modules(family):
    from nslens.models import get_family

    hf, fam = tiny(family), get_family(family)
    assert fam.part(hf, fam.embedding) is hf.get_input_embeddings()
    assert fam.part(hf, fam.head) is hf.get_output_embeddings()
    assert fam.part(hf, fam.layer_path(1)) is hf.get_submodule(fam.layer_path(1)) is fam.part(hf, fam.layers)[1]
    assert fam.part(hf, fam.mlp_path(1)) is hf.get_submodule(fam.layer_path(1)).mlp
    assert isinstance(fam.part(hf, fam.final_norm), torch.nn.Module)
    assert isinstance(fam.part(hf, f"{fam.layer_path(1)}.{fam.pre_mlp_norm}"), torch.nn.Module)
