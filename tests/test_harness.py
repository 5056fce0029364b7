"""lm-eval side effects: the nnsight adapter and the one-sweep table against lm-eval's stock HFLM (clean and with a
plain torch hook), on a multiple-choice task, a multi-token loglikelihood task and a rolling token-perplexity
task whose documents are longer than the evaluation's context (so rolling windows are exercised)."""

import json
import shutil

import pytest
import torch

import nslens
from nslens.effects import task_metrics
from nslens.errors import NsLensError
from nslens.harness import side_effect_table, side_effects
from nslens.lmadapter import NsLensLM
from nslens.lmtasks import local_tasks_dir
from nslens.ranges import RangeMask

lm_eval = pytest.importorskip("lm_eval")
TASKS = ["nslens_synth_mc", "nslens_synth_cont", "nslens_synth_token_ppl"]
CONTEXT = 48  # max_length of both LMs: the token-perplexity documents (100-300 tokens) need several windows


@pytest.fixture(scope="module")
def inc(tmp_path_factory):
    return local_tasks_dir(tmp_path_factory.mktemp("tasks"), n_mc=24, n_ppl=8)


@pytest.fixture(scope="module")
def tm(inc):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(inc), include_defaults=False)


def evaluate(lm, tm, tasks=TASKS):
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=False, bootstrap_iters=0,
                                  verbosity="ERROR")
    return task_metrics(res, tasks)


def stock(model, **kw):
    from lm_eval.models.huggingface import HFLM

    kw.setdefault("batch_size", 8)
    return HFLM(pretrained=model._module, tokenizer=model.tokenizer, device="cpu", softmax_dtype="float32", **kw)


@pytest.fixture(scope="module")
def masks(embedded, site, synth):
    rec = nslens.record(embedded, site, synth["train_prompts"], synth["train"].labels,
                        synth["train"].label_names, batch_size=32)
    return nslens.build_range_masks(rec.stats, method="max", fraction=0.5)


def hooked(mask, gated=True):
    """A plain torch forward hook zeroing the mask's neurons (inside their ranges when gated)."""
    def hook(module, args, output):
        hs = output.clone()
        for k, j in enumerate(mask.neurons.tolist()):
            col = hs[..., j]
            inside = (col >= mask.lo[k]) & (col <= mask.hi[k]) if gated else torch.ones_like(col, dtype=torch.bool)
            hs[..., j] = torch.where(inside, torch.zeros_like(col), col)
        return hs
    return hook


def test_no_intervention_equals_stock_hflm_on_every_task_type(embedded, tm, inc):

    docs = [json.loads(line) for line in open(inc / "nslens_synth_token_ppl.jsonl")]
    assert min(d["n_tokens"] for d in docs) > 2 * CONTEXT  # every document spans several rolling windows
    ref = evaluate(stock(embedded, max_length=CONTEXT), tm)
    ours = evaluate(NsLensLM(embedded, batch_size=8, max_length=CONTEXT), tm)
    assert ours == ref  # exactly: same batches, same float32 log-softmax, same sums
    assert 0.5 < ours["nslens_synth_mc"]["acc"] <= 1.0
    assert set(ours["nslens_synth_cont"]) == {"perplexity", "acc"}
    assert ours["nslens_synth_token_ppl"]["token_perplexity"] > 1.0


def test_raw_answers_equal_stock_including_greedy_hits(embedded):
    """loglikelihood answers (log-prob sum, is-greedy) for continuations of 1-3 tokens, some of them the model's own
    greedy tokens (so the flag is True), and requests sharing a context (lm-eval's one-token grouping)."""
    from lm_eval.api.instance import Instance

    tok = embedded.tokenizer
    contexts = ["the team won the", "the lab measured a", "Text: the market rose", "the vote"]
    reqs = []
    for i, ctx in enumerate(contexts):
        ids = tok(ctx, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = embedded._module.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        greedy = tok.decode(out[0, ids.shape[1]:])
        for cont in (" " + greedy, " " + greedy.split()[0], " science", " sports"):
            reqs.append(Instance("loglikelihood", {}, (ctx, cont), i))
    ref = stock(embedded).loglikelihood(reqs)
    ours = NsLensLM(embedded, batch_size=8).loglikelihood(reqs)
    assert ours == ref
    assert any(g for _, g in ours) and not all(g for _, g in ours)


def test_rolling_windows_skip_their_greedy_flags_and_a_later_request_recomputes_them(embedded):
    """A perplexity request's windows are answered without is-greedy flags (lm-eval discards them; the argmax over
    the vocabulary is not computed) and equal stock HFLM's; the same tokens asked later as a log-likelihood request
    are computed again, flags included, and equal stock's answer; the rolling request then reads the same number."""
    from lm_eval.api.instance import Instance

    text = " ".join(["the team won the match and the lab measured a rise in the market"] * 8)  # about 120 tokens
    reqs = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    ref, lm = stock(embedded, max_length=CONTEXT), NsLensLM(embedded, batch_size=8, max_length=CONTEXT)
    want = ref.loglikelihood_rolling(reqs)
    assert lm.loglikelihood_rolling(reqs) == want
    windows = dict(lm.sweep.answers)
    assert len(windows) >= 2 and all(a[0][1] is None for a in windows.values())  # several windows, no flags
    asked = [(("", ""), list(ctx), list(cont)) for ctx, cont in windows]
    got = lm._loglikelihood_tokens(asked)
    assert got == ref._loglikelihood_tokens(asked) and all(isinstance(g, bool) for _, g in got)
    assert all(lm.sweep.answers[k][0][1] is not None for k in windows)
    assert lm.loglikelihood_rolling(reqs) == want  # read from the answers that now have their flags


def test_intervention_equals_plain_torch_hook(embedded, site, masks, tm):
    mask: RangeMask = masks[0]
    iv = nslens.Intervention(mask, nslens.zero(), gated=True)
    handle = embedded._module.model.layers[site.layer].register_forward_hook(hooked(mask))
    try:
        ref = evaluate(stock(embedded, max_length=CONTEXT), tm)
    finally:
        handle.remove()
    ours = evaluate(NsLensLM(embedded, site, iv, batch_size=8, max_length=CONTEXT), tm)
    clean = evaluate(NsLensLM(embedded, batch_size=8, max_length=CONTEXT), tm)
    assert ours["nslens_synth_mc"]["acc"] == ref["nslens_synth_mc"]["acc"]
    for t in ("nslens_synth_cont", "nslens_synth_token_ppl"):
        for k, v in ref[t].items():
            assert ours[t][k] == pytest.approx(v, rel=1e-5)
    assert ours["nslens_synth_token_ppl"]["token_perplexity"] != clean["nslens_synth_token_ppl"]["token_perplexity"]


def test_chunked_head_equals_stock_hflm_and_hooks_at_a_large_vocabulary(embedded, tm, inc, monkeypatch):
    """A model whose log-likelihoods go through the head computed inside the readout (``nslens.loglik.ChunkedHead``,
    5 positions a chunk): the clean evaluation, a range-masked one and the side-effect table equal stock HFLM (clean
    and with a plain hook) up to float rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nslens import loglik

    tok = embedded.tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    model = nslens.load_model(LlamaForCausalLM(cfg).eval(), tokenizer=tok)
    monkeypatch.setattr(loglik, "HEAD_CHUNK_BYTES", 5 * 4096 * 4)
    site = nslens.resolve_site(model, -2)
    cols = torch.arange(0, 32, 2)
    mask = RangeMask(cols, -torch.ones(16) * .5, torch.ones(16) * .5, torch.zeros(16), torch.ones(16) * .2,
                     {"tau": 2.5, "concept": "c0", **site.describe()})
    handle = model._module.model.layers[site.layer].register_forward_hook(hooked(mask))
    try:
        ref = evaluate(stock(model), tm)
    finally:
        handle.remove()
    ref_clean = evaluate(stock(model), tm)
    iv = nslens.Intervention(mask, nslens.zero(), gated=True)
    for ours, want in ((evaluate(NsLensLM(model, batch_size=8), tm), ref_clean),
                       (evaluate(NsLensLM(model, site, iv, batch_size=8), tm), ref)):
        assert ours["nslens_synth_mc"]["acc"] == want["nslens_synth_mc"]["acc"]
        for t in ("nslens_synth_cont", "nslens_synth_token_ppl"):
            assert ours[t] == pytest.approx(want[t], rel=1e-5)
    assert ref["nslens_synth_token_ppl"] != pytest.approx(ref_clean["nslens_synth_token_ppl"], rel=1e-4)
    tab = side_effect_table(model, site, [mask], nslens.zero(), tasks=TASKS, include_path=inc)
    for t in TASKS:
        assert tab.range[0][t] == pytest.approx({k: v - ref_clean[t][k] for k, v in ref[t].items()}, rel=1e-4,
                                                abs=1e-6)


@pytest.mark.parametrize("per_pass", [1, 3, 8])
def test_sweep_equals_one_evaluation_per_intervention_and_hooks(embedded, site, masks, inc, per_pass):
    """The whole table in one sweep equals one evaluation per intervention, and a plain hook per intervention."""
    tab = side_effect_table(embedded, site, masks[:2], nslens.zero(), tasks=TASKS, include_path=inc,
                            per_pass=per_pass)
    for i, mask in enumerate(masks[:2]):
        for gated, part in ((False, tab.neuron), (True, tab.range)):
            iv = nslens.Intervention(mask, nslens.zero(), gated=gated)
            one = side_effects(embedded, site, {"x": iv}, tasks=TASKS, include_path=inc)
            if per_pass == 3:  # the independent reference: stock HFLM with a plain torch hook
                handle = embedded._module.model.layers[site.layer].register_forward_hook(hooked(mask, gated))
                try:
                    from lm_eval.tasks import TaskManager

                    ref = evaluate(stock(embedded), TaskManager(include_path=str(inc), include_defaults=False))
                finally:
                    handle.remove()
                assert ref["nslens_synth_mc"] == one["x"]["nslens_synth_mc"]
                for t in ("nslens_synth_cont", "nslens_synth_token_ppl"):
                    assert one["x"][t] == pytest.approx(ref[t], rel=1e-5)
            assert one["clean"] == tab.clean
            for t in TASKS:
                assert part[i][t] == pytest.approx(one.deltas()["x"][t], rel=1e-5, abs=1e-6)


def test_an_edit_of_the_last_position_edits_each_requests_own_last_token(embedded, site, masks, inc):
    """``positions="last"`` in lm-eval's right-padded batches edits each request's last input token, not the
    batch's last column (padding in every shorter row, which no real token attends to). The sweep (batches of 8)
    equals stock HFLM run one request a batch, where nothing is padded, with a plain hook on the last column."""
    from lm_eval.tasks import TaskManager

    def last_column(hook):
        def edit(module, args, output):
            out = output.clone()
            out[:, -1] = hook(module, args, output)[:, -1]
            return out
        return edit

    tab = side_effect_table(embedded, site, masks[:1], nslens.zero(), tasks=TASKS, include_path=inc,
                            positions="last")
    tm = TaskManager(include_path=str(inc), include_defaults=False)
    for gated, part in ((False, tab.neuron), (True, tab.range)):
        handle = embedded._module.model.layers[site.layer].register_forward_hook(last_column(hooked(masks[0], gated)))
        try:
            ref = evaluate(stock(embedded, batch_size=1), tm)
        finally:
            handle.remove()
        for t in TASKS:
            for k, v in ref[t].items():
                assert tab.clean[t][k] + part[0][t][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (gated, t, k)
        assert part[0]["nslens_synth_token_ppl"]["token_perplexity"] != 0.0  # the edit does something
        if gated:  # one evaluation alone (no replay): the same numbers
            iv = nslens.Intervention(masks[0], nslens.zero(), gated=True, positions="last")
            one = evaluate(NsLensLM(embedded, site, iv, batch_size=8), tm)
            for t in TASKS:
                assert one[t] == pytest.approx(ref[t], rel=1e-5, abs=1e-6), t


def test_side_effects_deltas_and_clean_cache(embedded, site, synth, inc, tmp_path, monkeypatch):
    rec = nslens.record(embedded, site, synth["train_prompts"], synth["train"].labels,
                        synth["train"].label_names, batch_size=32)
    full = nslens.build_range_masks(rec.stats, fraction=1.0)[0]  # every neuron of the site
    ivs = {"neuron": nslens.Intervention(full, nslens.zero(), gated=False),
           "range": nslens.Intervention(full, nslens.zero(), gated=True)}
    res = side_effects(embedded, site, ivs, tasks=TASKS, include_path=inc, cache_dir=tmp_path / "cache")
    d = res.deltas()
    ppl = "nslens_synth_token_ppl"
    for name in ivs:
        for k, v in res[name][ppl].items():
            assert d[name][ppl][k] == v - res["clean"][ppl][k]
    # heavy ungated zeroing (every neuron of the site) raises perplexity more than range masking the same neurons
    assert d["neuron"][ppl]["token_perplexity"] > d["range"][ppl]["token_perplexity"]
    assert d["neuron"][ppl]["token_perplexity"] > 0
    assert len(list((tmp_path / "cache").glob("clean_*.json"))) == 1
    assert len(list((tmp_path / "cache").glob("run_*.json"))) == 2
    # a second call reads everything from the cache: no sweep at all
    import nslens.harness as h

    sweeps = []
    orig = h.LoglikSweep
    monkeypatch.setattr(h, "LoglikSweep", lambda *a, **k: sweeps.append(orig(*a, **k)) or sweeps[-1])
    again = side_effects(embedded, site, {"range": ivs["range"]}, tasks=TASKS, include_path=inc,
                         cache_dir=tmp_path / "cache")
    assert sweeps == [] and again["clean"] == res["clean"] and again["range"] == res["range"]
    # new interventions with the clean results cached: the sweep holds only them (the clean pass stops at the site)
    new = {"dampen": nslens.Intervention(full, nslens.dampen(0.5), gated=False),
           "range": nslens.Intervention(full, nslens.dampen(0.5), gated=True)}
    both = side_effects(embedded, site, {**ivs, "dampen": new["dampen"]}, tasks=TASKS, include_path=inc,
                        cache_dir=tmp_path / "cache")
    assert [s.interventions for s in sweeps] == [[new["dampen"]]] and both["clean"] == res["clean"]
    for name in ivs:
        assert both[name] == res[name]
    assert f"| range | {ppl} | token_perplexity |" in again.to_markdown()


def test_intervention_results_are_cached_by_fingerprint_never_by_name(embedded, site, masks, inc, tmp_path):
    """Two interventions under the same name, one after the other, with one cache: each gets its own scores (equal
    to an uncached evaluation), and the same intervention rebuilt from equal tensors under another name is read
    from the cache."""
    from nslens.harness import run_cache_key
    from nslens.intervene import intervention_fingerprint

    a = nslens.Intervention(masks[0], nslens.zero(), gated=False)
    b = nslens.Intervention(masks[1], nslens.zero(), gated=False)
    cache = tmp_path / "cache"
    first = side_effects(embedded, site, {"x": a}, tasks=TASKS, include_path=inc, limit=8, cache_dir=cache)
    second = side_effects(embedded, site, {"x": b}, tasks=TASKS, include_path=inc, limit=8, cache_dir=cache)
    fresh = side_effects(embedded, site, {"x": b}, tasks=TASKS, include_path=inc, limit=8)
    assert second["x"] == fresh["x"] and second["x"] != first["x"]
    assert len(list(cache.glob("run_*.json"))) == 2
    twin = nslens.Intervention(RangeMask(masks[0].neurons.clone(), masks[0].lo.clone(), masks[0].hi.clone(),
                                         masks[0].mu.clone(), masks[0].sigma.clone(), dict(masks[0].meta)),
                               nslens.zero(), gated=False)
    assert intervention_fingerprint(twin) == intervention_fingerprint(a)
    again = side_effects(embedded, site, {"y": twin}, tasks=TASKS, include_path=inc, limit=8, cache_dir=cache)
    assert again["y"] == first["x"] and len(list(cache.glob("run_*.json"))) == 2
    # anything that changes the edit changes the key: gating, the operator's parameters, one bound, the limit
    lo = masks[0].lo.clone()
    lo[0] += 1e-3
    nudged = RangeMask(masks[0].neurons, lo, masks[0].hi, masks[0].mu, masks[0].sigma, masks[0].meta)
    variants = [a, b, nslens.Intervention(masks[0], nslens.zero(), gated=True),
                nslens.Intervention(masks[0], nslens.dampen(0.5), gated=False),
                nslens.Intervention(masks[0], nslens.dampen(0.25), gated=False),
                nslens.Intervention(nudged, nslens.zero(), gated=True),
                nslens.Intervention(masks[0], nslens.zero(), gated=False, positions="last"),
                [a, b]]
    assert len({intervention_fingerprint(v) for v in variants}) == len(variants)
    assert run_cache_key("k", site, a) != run_cache_key("k2", site, a)


def test_progress_is_one_bar_and_lm_eval_is_quiet(embedded, site, masks, inc, capfd, tmp_path, monkeypatch):
    import logging

    monkeypatch.chdir(tmp_path)  # outside a git checkout: lm-eval's git call printed "fatal: not a git repository"
    calls = []
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    side_effect_table(embedded, site, masks[:2], nslens.zero(), tasks=TASKS, include_path=inc, limit=6,
                      progress=lambda *a: calls.append(a))
    assert {c[0] for c in calls} == {"side effects (zero)"}
    done, total = calls[-1][1:]
    assert done == total > 0 and all(c[1] <= c[2] for c in calls)
    err = capfd.readouterr().err
    assert "WARNING" not in err and "it/s" not in err and "%|" not in err and "fatal" not in err, err[-500:]
    assert lm_logger.level == level  # restored


def test_bad_input(embedded, site, masks, inc):
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


def test_the_adapter_is_one_class_registered_with_lm_eval_once(embedded):
    """Every NsLensLM is an instance of one class, the one lm-eval's registry holds as 'nslens' (a class per call
    registered a new target under the name each time, and lm-eval's refusal of that was silenced)."""
    from lm_eval.api.registry import get_model

    a, b = NsLensLM(embedded, batch_size=8), NsLensLM(embedded, batch_size=8)
    assert type(a) is type(b) is get_model("nslens")


def test_missing_lm_eval_names_the_extra(embedded, site, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ValueError, match=r"side effects need lm-eval: pip install 'nslens\[eval\]'"):
        side_effects(embedded, site, {}, tasks=TASKS)


def test_results_and_tables_load_without_lm_eval():
    """``nslens.effects`` (what a report reads) imports neither lm-eval nor the adapter."""
    import subprocess
    import sys

    code = ("import sys; import nslens.effects; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'lm_eval' or m == 'nslens.lmadapter']; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]


def test_the_old_home_still_names_everything_it_did():
    """``nslens.harness`` re-exports the adapter, the tasks and the result types while importers move."""
    import nslens.effects as effects
    import nslens.harness as harness
    import nslens.lmadapter as lmadapter
    import nslens.lmtasks as lmtasks

    moved = {effects: ["METRIC_KEYS", "SideEffectTable", "SideEffects", "main_metric", "task_metrics"],
             lmadapter: ["NsLensLM", "quiet_lm_eval", "traced_logits"],
             lmtasks: ["DEFAULT_TASKS", "LOCAL_TASKS", "TASKS_DIR", "WIKIPEDIA_PPL_TASK", "local_tasks_dir",
                       "token_ppl_task", "wikipedia_ppl_task_dir"]}
    for home, names in moved.items():
        for name in names:
            assert getattr(harness, name) is getattr(home, name), name
            assert name in harness.__all__


def test_a_moved_task_folder_is_written_again_for_its_new_place(tmp_path):
    """The offline tasks' YAML files name their data by absolute path: a folder copied elsewhere (a copied
    $NSLENS_HOME) whose original is gone gets files that name the new place, with the same data, and loads."""
    from lm_eval.tasks import TaskManager

    first = local_tasks_dir(tmp_path / "a", n_mc=8, n_ppl=4)
    data = {f.name: f.read_text() for f in first.glob("*.jsonl")}
    shutil.copytree(first, tmp_path / "b")
    shutil.rmtree(first)
    moved = local_tasks_dir(tmp_path / "b", n_mc=8, n_ppl=4)
    assert {f.name: f.read_text() for f in moved.glob("*.jsonl")} == data
    for yaml in moved.glob("*.yaml"):
        assert str(tmp_path / "a") not in yaml.read_text() and str(moved) in yaml.read_text(), yaml.name
    task = TaskManager(include_path=str(moved), include_defaults=False).load_task_or_group(["nslens_synth_mc"])
    docs = list(task["nslens_synth_mc"].test_docs())
    assert [d["answer"] for d in docs] == [json.loads(line)["answer"] for line in data["mc.jsonl"].splitlines()]
    assert not list(moved.glob(".*.tmp"))


def test_group_metrics_are_read(embedded):
    res = {"results": {"mmlu_x": {"acc,none": 0.5}}, "groups": {"mmlu": {"acc,none": 0.25, "acc_stderr,none": 0.1}}}
    assert task_metrics(res, ["mmlu", "mmlu_x"]) == {"mmlu": {"acc": 0.25}, "mmlu_x": {"acc": 0.5}}


def test_wikipedia_token_ppl_task_from_a_local_parquet(embedded, tmp_path):
    """The paper's PPL task built from the first N articles (dataset order), each cut to max_tokens tokens of the
    model's tokenizer; its token perplexity equals exp(-sum ll / sum tokens) from stock HFLM's rolling
    log-likelihoods."""
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from nslens.data import wikipedia_articles
    from nslens.lmtasks import WIKIPEDIA_PPL_TASK, wikipedia_ppl_task_dir
    from nslens.synthetic import synthetic_corpus

    articles = [" ".join(synthetic_corpus(6, seed=s)) for s in range(5)]
    pq.write_table(pa.table({"title": [f"a{i}" for i in range(5)], "text": articles}), tmp_path / "wiki.parquet")
    assert wikipedia_articles(3, data_files=str(tmp_path / "wiki.parquet")) == articles[:3]
    d = wikipedia_ppl_task_dir(embedded.tokenizer, n_docs=4, max_tokens=30, data_files=str(tmp_path / "wiki.parquet"),
                               root=tmp_path / "task")
    docs = [json.loads(line) for line in open(d / f"{WIKIPEDIA_PPL_TASK}.jsonl")]
    tok = embedded.tokenizer
    assert [x["text"] for x in docs] == [tok.decode(tok(a, add_special_tokens=False)["input_ids"][:30])
                                         for a in articles[:4]]
    assert [x["n_tokens"] for x in docs] == [30] * 4
    res = side_effects(embedded, None, {}, tasks=[WIKIPEDIA_PPL_TASK], include_path=d)
    lls = stock(embedded).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (x["text"],), i)
                                                 for i, x in enumerate(docs)])
    expect = math.exp(-sum(lls) / sum(x["n_tokens"] for x in docs))
    assert res["clean"][WIKIPEDIA_PPL_TASK]["token_perplexity"] == pytest.approx(expect, rel=1e-12)
    assert WIKIPEDIA_PPL_TASK in TaskManager(include_path=str(d), include_defaults=False).all_tasks
    # a moved folder (a copied $NSLENS_HOME) is reused, its YAML pointed at its own data: the source is gone, so
    # writing it again would fail
    moved = tmp_path / "copied" / "task"
    shutil.copytree(d, moved)
    shutil.rmtree(d)
    (tmp_path / "wiki.parquet").unlink()
    again = wikipedia_ppl_task_dir(embedded.tokenizer, n_docs=4, max_tokens=30,
                                   data_files=str(tmp_path / "wiki.parquet"), root=moved)
    assert str(moved / f"{WIKIPEDIA_PPL_TASK}.jsonl") in (again / f"{WIKIPEDIA_PPL_TASK}.yaml").read_text()
    res2 = side_effects(embedded, None, {}, tasks=[WIKIPEDIA_PPL_TASK], include_path=again)
    assert res2["clean"][WIKIPEDIA_PPL_TASK]["token_perplexity"] == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match=r"could not load Wikipedia articles from /nowhere/w.parquet .*data_files="):
        wikipedia_articles(2, data_files="/nowhere/w.parquet")


def test_generative_task_under_an_intervention_equals_stock_hflm_with_a_plain_hook(embedded, site, masks, tm,
                                                                                    inc):
    """generate_until through the adapter: the intervention at every generated token (neuron masking, so it acts
    on every forward) gives stock HFLM-with-a-hook's generations, response for response; the clean adapter gives
    stock HFLM's; the edit changes some answers. side_effects reports the task's exact match."""
    task = ["nslens_synth_gen"]
    mask = masks[0]

    def responses(lm):
        res = lm_eval.simple_evaluate(model=lm, tasks=task, task_manager=tm, log_samples=True, bootstrap_iters=0,
                                      verbosity="ERROR")
        return [s["resps"] for s in res["samples"][task[0]]], task_metrics(res, task)[task[0]]

    handle = embedded._module.model.layers[site.layer].register_forward_hook(hooked(mask, gated=False))
    try:
        ref, ref_m = responses(stock(embedded))
    finally:
        handle.remove()
    iv = nslens.Intervention(mask, nslens.zero(), gated=False)
    ours, ours_m = responses(NsLensLM(embedded, site, iv, batch_size=8))
    assert ours == ref and ours_m == ref_m
    clean, clean_m = responses(NsLensLM(embedded, batch_size=8))
    assert clean == responses(stock(embedded))[0]
    assert clean != ours
    res = side_effects(embedded, site, {"neuron": iv}, tasks=task, include_path=inc)
    assert res["clean"][task[0]]["exact_match"] == clean_m["exact_match"]
    assert res["neuron"][task[0]]["exact_match"] == ours_m["exact_match"]


def test_several_operators_share_one_sweep(embedded, site, masks, inc):
    from nslens.harness import side_effect_tables

    ops = [nslens.zero(), nslens.adaptive_dampen(0.5)]
    both = side_effect_tables(embedded, site, masks[:2], ops, tasks=TASKS, include_path=inc, limit=8)
    assert list(both) == [op.label for op in ops]
    for op in ops:
        alone = side_effect_table(embedded, site, masks[:2], op, tasks=TASKS, include_path=inc, limit=8)
        assert both[op.label].clean == alone.clean
        for part in ("neuron", "range"):
            for a, b in zip(getattr(both[op.label], part), getattr(alone, part)):
                for t in TASKS:
                    assert a[t] == pytest.approx(b[t], rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="operators must differ"):
        side_effect_tables(embedded, site, masks[:1], [nslens.zero(), nslens.zero()], tasks=TASKS, include_path=inc)


def test_results_are_never_filed_under_another_name(embedded, site, masks, inc):
    """Two masks of one concept showed the second's result in both rows; an intervention named "clean" returned
    the edited model's metrics as the clean ones; a task name given as a string was run letter by letter."""
    twin = RangeMask(masks[1].neurons, masks[1].lo, masks[1].hi, masks[1].mu, masks[1].sigma,
                     {**masks[1].meta, "concept": masks[0].concept})
    with pytest.raises(NsLensError, match=f"one mask per concept, got {masks[0].concept}, {masks[0].concept}"):
        side_effect_table(embedded, site, [masks[0], twin], nslens.zero(), tasks=TASKS, include_path=inc, limit=2)
    with pytest.raises(NsLensError, match="no masks given"):
        side_effect_table(embedded, site, [], nslens.zero(), tasks=TASKS, include_path=inc, limit=2)
    with pytest.raises(NsLensError, match="operators are nslens operators .*got str"):
        side_effect_table(embedded, site, masks[:1], "zero", tasks=TASKS, include_path=inc, limit=2)
    iv = nslens.Intervention(masks[0], nslens.zero())
    with pytest.raises(NsLensError, match="any but 'clean'"):
        side_effects(embedded, site, {"clean": iv}, tasks=TASKS, include_path=inc, limit=2)
    with pytest.raises(NsLensError, match="any but 'clean'"):
        side_effects(embedded, site, [iv], tasks=TASKS, include_path=inc, limit=2)
    with pytest.raises(NsLensError, match=r"interventions\['a'\] must be an Intervention or a list of them, got"):
        side_effects(embedded, site, {"a": masks[0]}, tasks=TASKS, include_path=inc, limit=2)
    with pytest.raises(NsLensError, match="tasks is a list of lm-eval task names, got 'nslens_synth_mc'"):
        side_effects(embedded, site, {"a": iv}, tasks="nslens_synth_mc", include_path=inc, limit=2)
    with pytest.raises(NsLensError, match="NsLensLM takes a model loaded with nslens.load_model, got str"):
        NsLensLM("embedded")
    with pytest.raises(NsLensError, match="batch_size must be >= 1, got 0"):
        side_effects(embedded, site, {"a": iv}, tasks=TASKS, include_path=inc, limit=2, batch_size=0)
    with pytest.raises(NsLensError, match="num_fewshot must be >= 0, got -1"):
        side_effects(embedded, site, {"a": iv}, tasks=TASKS, include_path=inc, limit=2, num_fewshot=-1)
    with pytest.raises(NsLensError, match="lm-eval limit must be a finite number, got '4'"):
        side_effects(embedded, site, {"a": iv}, tasks=TASKS, include_path=inc, limit="4")
