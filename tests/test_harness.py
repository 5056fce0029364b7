"""lm-eval side effects: the nnsight adapter against lm-eval's stock HFLM (clean and with a plain torch hook)."""

import pytest
import torch

import nslens
from nslens.harness import NsLensLM, local_tasks_dir, side_effects, task_metrics
from nslens.ranges import RangeMask

lm_eval = pytest.importorskip("lm_eval")
TASKS = ["nslens_synth_mc", "nslens_synth_ppl"]


@pytest.fixture(scope="module")
def tm(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(local_tasks_dir(tmp_path_factory.mktemp("tasks"), n_mc=40, n_ppl=20)))


def evaluate(lm, tm):
    res = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=tm, log_samples=False, bootstrap_iters=0,
                                  verbosity="ERROR")
    return task_metrics(res, TASKS)


@pytest.fixture(scope="module")
def masks(embedded, site, synth):
    rec = nslens.record(embedded, site, synth["train_prompts"], synth["train"].labels,
                        synth["train"].label_names, batch_size=32)
    return nslens.build_range_masks(rec.stats, method="max", fraction=0.5)


def test_no_intervention_equals_stock_hflm(embedded, tm):
    from lm_eval.models.huggingface import HFLM

    stock = evaluate(HFLM(pretrained=embedded._module, tokenizer=embedded.tokenizer, batch_size=8, device="cpu"), tm)
    ours = evaluate(NsLensLM(embedded, batch_size=8), tm)
    assert ours == stock
    assert 0.5 < ours["nslens_synth_mc"]["acc"] <= 1.0
    assert ours["nslens_synth_ppl"]["word_perplexity"] > 1.0


def test_intervention_equals_plain_torch_hook(embedded, site, masks, tm):
    from lm_eval.models.huggingface import HFLM

    mask: RangeMask = masks[0]
    iv = nslens.Intervention(mask, nslens.zero(), gated=True)

    def hook(module, args, output):
        hs = output.clone()
        for k, j in enumerate(mask.neurons.tolist()):
            col = hs[..., j]
            hs[..., j] = torch.where((col >= mask.lo[k]) & (col <= mask.hi[k]), torch.zeros_like(col), col)
        return hs

    handle = embedded._module.model.layers[site.layer].register_forward_hook(hook)
    try:
        ref = evaluate(HFLM(pretrained=embedded._module, tokenizer=embedded.tokenizer, batch_size=8, device="cpu"), tm)
    finally:
        handle.remove()
    ours = evaluate(NsLensLM(embedded, site, iv, batch_size=8), tm)
    clean = evaluate(NsLensLM(embedded, batch_size=8), tm)
    assert ours["nslens_synth_mc"]["acc"] == ref["nslens_synth_mc"]["acc"]
    for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours["nslens_synth_ppl"][k] == pytest.approx(ref["nslens_synth_ppl"][k], rel=1e-5)
    assert ours["nslens_synth_ppl"]["word_perplexity"] != clean["nslens_synth_ppl"]["word_perplexity"]


def test_side_effects_deltas_and_clean_cache(embedded, site, synth, tmp_path):
    rec = nslens.record(embedded, site, synth["train_prompts"], synth["train"].labels,
                        synth["train"].label_names, batch_size=32)
    full = nslens.build_range_masks(rec.stats, fraction=1.0)[0]  # every neuron of the site
    ivs = {"neuron": nslens.Intervention(full, nslens.zero(), gated=False),
           "range": nslens.Intervention(full, nslens.zero(), gated=True)}
    inc = local_tasks_dir(tmp_path / "t", n_mc=40, n_ppl=20)
    res = side_effects(embedded, site, ivs, tasks=TASKS, include_path=inc, cache_dir=tmp_path / "cache")
    d = res.deltas()
    for name in ivs:
        for k, v in res[name]["nslens_synth_ppl"].items():
            assert d[name]["nslens_synth_ppl"][k] == v - res["clean"]["nslens_synth_ppl"][k]
    # heavy ungated zeroing (every neuron of the site) raises perplexity more than range masking the same neurons
    assert d["neuron"]["nslens_synth_ppl"]["word_perplexity"] > d["range"]["nslens_synth_ppl"]["word_perplexity"]
    assert d["neuron"]["nslens_synth_ppl"]["word_perplexity"] > 0
    assert len(list((tmp_path / "cache").glob("clean_*.json"))) == 1
    # a second call reads the clean results from the cache: no lm-eval run without an intervention
    import nslens.harness as h

    built = []
    orig = h.NsLensLM
    h.NsLensLM = lambda model, site_, ivs_, **k: built.append(ivs_) or orig(model, site_, ivs_, **k)
    try:
        again = side_effects(embedded, site, {"range": ivs["range"]}, tasks=TASKS, include_path=inc,
                             cache_dir=tmp_path / "cache")
    finally:
        h.NsLensLM = orig
    assert built == [ivs["range"]] and again["clean"] == res["clean"]
    assert "| range | nslens_synth_ppl | word_perplexity |" in again.to_markdown()


def test_bad_input(embedded, site, masks, tm, tmp_path):
    inc = local_tasks_dir(tmp_path / "t", n_mc=8, n_ppl=4)
    with pytest.raises(ValueError, match="unknown lm-eval task 'nslens_synth_m'; close matches: nslens_synth_mc"):
        side_effects(embedded, site, {}, tasks=["nslens_synth_m"], include_path=inc)
    with pytest.raises(ValueError, match="limit must be > 0"):
        side_effects(embedded, site, {}, tasks=TASKS, include_path=inc, limit=0)
    other = RangeMask(masks[0].neurons, masks[0].lo, masks[0].hi, masks[0].mu, masks[0].sigma,
                      {**masks[0].meta, "layer": 1})
    with pytest.raises(ValueError, match="made for another model/site: layer: mask has 1, model has 2"):
        side_effects(embedded, site, {"x": nslens.Intervention(other, nslens.zero())}, tasks=TASKS,
                     include_path=inc)


def test_clean_cache_key_tracks_weights_and_tasks(embedded, tmp_path):
    from transformers import LlamaForCausalLM

    from nslens.harness import clean_cache_key

    inc = local_tasks_dir(tmp_path / "t", n_mc=8, n_ppl=4)
    key = clean_cache_key(embedded, TASKS, 5, 0, inc)
    assert key == clean_cache_key(embedded, TASKS, 5, 0, inc)
    assert key != clean_cache_key(embedded, TASKS, 6, 0, inc)
    other = LlamaForCausalLM(embedded._module.config)
    other.load_state_dict(embedded._module.state_dict())
    with torch.no_grad():
        other.model.embed_tokens.weight[0, 0] += 1.0  # retrained weights, same id and config
    assert clean_cache_key(nslens.load_model(other, tokenizer=embedded.tokenizer), TASKS, 5, 0, inc) != key
    (inc / "ppl.jsonl").write_text('{"text": "the game"}\n')  # changed task data
    assert clean_cache_key(embedded, TASKS, 5, 0, inc) != key


def test_missing_lm_eval_names_the_extra(embedded, site, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ValueError, match=r"side effects need lm-eval: pip install 'nslens\[eval\]'"):
        side_effects(embedded, site, {}, tasks=TASKS)


def test_group_metrics_are_read(embedded):
    res = {"results": {"mmlu_x": {"acc,none": 0.5}}, "groups": {"mmlu": {"acc,none": 0.25, "acc_stderr,none": 0.1}}}
    assert task_metrics(res, ["mmlu", "mmlu_x"]) == {"mmlu": {"acc": 0.25}, "mmlu_x": {"acc": 0.5}}
