"""Log-likelihoods computed inside the trace: the plan and readout against HFLM's own slicing on planted logits,
and what one remote batch returns (it must not grow with the vocabulary)."""

from types import SimpleNamespace

import pytest
import torch

import nslens
from nslens.loglik import LoglikPlan, LoglikSweep, loglik_readout


def hflm_reference(logits: torch.Tensor, rows) -> list[tuple[float, bool]]:
    """HFLM._loglikelihood_tokens' reduction, transcribed: log-softmax of the whole batch, the row's window
    [inplen - contlen, inplen), a member's greedy check on the window's last len(cont) positions and its log-probs
    gathered from the window's first len(cont) positions (torch.gather with a shorter index)."""
    multi = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    out = []
    for r, (inplen, contlen, members) in enumerate(rows):
        window = multi[r][inplen - contlen:inplen].unsqueeze(0)
        greedy_tokens = window.argmax(dim=-1)
        for cont in members:
            c = torch.tensor(cont).unsqueeze(0)
            max_equal = (greedy_tokens[:, -c.shape[1]:] == c).all()
            lp = torch.gather(window, 2, c.unsqueeze(-1)).squeeze(-1)
            out.append((float(lp.sum()), bool(max_equal)))
    return out


def test_readout_equals_hflm_reduction_on_planted_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g) * 3
    # row 2 plants greedy continuations: its window's argmax tokens are the continuation
    logits[2, 5:8] -= 100
    logits[2, 5, 7] = logits[2, 6, 8] = logits[2, 7, 9] = 50
    rows = [(9, 4, [[1, 2, 3, 4]]),  # a 4-token continuation at the end of a full row
            (6, 1, [[5], [6], [7]]),  # three one-token continuations sharing a context (lm-eval's grouping)
            (8, 3, [[7, 8, 9], [8, 9]])]  # right-padded row; a member shorter than the window
    model = SimpleNamespace(output=SimpleNamespace(logits=logits))
    plan = LoglikPlan.build(rows)
    out = loglik_readout(model, *plan.args(torch.float32))
    got = list(zip(out["ll"].tolist(), [bool(x) for x in out["greedy"].tolist()]))
    assert got == hflm_reference(logits, rows)
    assert [x[1] for x in got] == [False, False, False, False, True, True]
    assert plan.first_pos == 5 and plan.n_requests == 6
    # two tiles of the batch in one pass (the replays): each tile's answers in turn
    both = loglik_readout(SimpleNamespace(output=SimpleNamespace(logits=torch.cat([logits, logits * 0.5]))),
                          *plan.args(torch.float32), tiles=2)
    half = loglik_readout(SimpleNamespace(output=SimpleNamespace(logits=logits * 0.5)), *plan.args(torch.float32))
    assert torch.equal(both["ll"], torch.cat([out["ll"], half["ll"]]))
    # logits computed from position 5 on only (logits_to_keep): the offset maps positions back
    kept = loglik_readout(SimpleNamespace(output=SimpleNamespace(logits=logits[:, 5:])), *plan.args(torch.float32),
                          offset=5)
    assert torch.equal(kept["ll"], out["ll"])
    # a perplexity window's plan: the same log-likelihoods, no flags (no argmax)
    nog = loglik_readout(model, *LoglikPlan.build(rows, greedy=False).args(torch.float32))
    assert list(nog) == ["ll"] and torch.equal(nog["ll"], out["ll"])


def test_plan_refuses_a_continuation_longer_than_its_window():
    with pytest.raises(ValueError, match="continuation of 3 tokens in a window of 2"):
        LoglikPlan.build([(5, 2, [[1, 2, 3]])])


def test_sweep_needs_a_site_for_interventions(embedded, site):
    mask = nslens.RangeMask(torch.tensor([0]), torch.zeros(1), torch.ones(1), torch.zeros(1), torch.ones(1),
                            {"tau": 2.5, **site.describe()})
    with pytest.raises(ValueError, match="an intervention needs its site"):
        LoglikSweep(embedded, None, [None, nslens.Intervention(mask, nslens.zero())])
    with pytest.raises(ValueError, match="at least one intervention"):
        LoglikSweep(embedded, site, [])


def _random_llama(tok, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return nslens.load_model(LlamaForCausalLM(cfg).eval(), tokenizer=tok)


def test_remote_batch_bytes_do_not_grow_with_the_vocabulary(embedded):
    """One batch under remote='local' (nnsight's serialization path) for the clean model and two interventions:
    what comes back is the same for a 186- and an 8192-token vocabulary, and far below the full logits."""
    tok = embedded.tokenizer
    ids = torch.randint(4, len(tok), (4, 20), generator=torch.Generator().manual_seed(1))
    rows = [(20, 3, [[5, 6, 7]]), (18, 1, [[8], [9]]), (20, 5, [[1, 2, 3, 4, 5]]), (12, 2, [[4, 4]])]
    sent = {}
    for vocab in (len(tok), 8192):
        model = _random_llama(tok, vocab)
        site = nslens.resolve_site(model, -2)
        mask = nslens.RangeMask(torch.arange(8), -torch.ones(8), torch.ones(8), torch.zeros(8), torch.ones(8) * .4,
                                {"tau": 2.5, **site.describe()})
        ivs = [None, nslens.Intervention(mask, nslens.zero(), gated=False), nslens.Intervention(mask, nslens.zero())]
        local = LoglikSweep(model, site, ivs, per_pass=2)
        remote = LoglikSweep(model, site, ivs, per_pass=2, remote="local")
        a, b = local.answer(ids, rows, torch.float32), remote.answer(ids, rows, torch.float32)
        assert a == b and len(a) == 5 and all(len(x) == 3 for x in a)
        sent[vocab] = remote.batch_bytes[0]
        assert sent[vocab] < ids.numel() * vocab * 4 / 50  # vs the float32 logits of one pass
    assert sent[len(tok)] == sent[8192] == 3 * 5 * (4 + 1)  # 3 runs x 5 requests x (float32 + bool)


def test_logits_budget_limits_tiles_not_results(embedded, site, monkeypatch):
    """A tight logits budget puts fewer interventions in each replay pass; the answers stay the same."""
    tok = embedded.tokenizer
    ids = torch.randint(4, len(tok), (3, 16), generator=torch.Generator().manual_seed(2))
    rows = [(16, 4, [[5, 6, 7, 8]]), (16, 1, [[9], [10]]), (10, 2, [[4, 4]])]
    mask = nslens.RangeMask(torch.arange(6), -torch.ones(6), torch.ones(6), torch.zeros(6), torch.ones(6) * .4,
                            {"tau": 2.5, **site.describe()})
    ivs = [None, *(nslens.Intervention(mask, op, gated=g) for op in (nslens.zero(), nslens.dampen(0.3))
                   for g in (False, True))]
    wide = LoglikSweep(embedded, site, ivs, per_pass=8)
    one_tile = 3 * 16 * wide.vocab_size * 4
    tight = LoglikSweep(embedded, site, ivs, per_pass=8, max_logits_bytes=2 * one_tile)
    assert wide.tiles_per_pass(3, 16) == 8 and tight.tiles_per_pass(3, 16) == 2 and tight.tiles_per_pass(30, 16) == 1
    a, b = wide.answer(ids, rows, torch.float32), tight.answer(ids, rows, torch.float32)
    # and the CPU pass budget (nslens.replay.CPU_PASS_BYTES) at one tile per pass: the answers stay the same
    monkeypatch.setattr("nslens.replay.CPU_PASS_BYTES", 1)
    c = LoglikSweep(embedded, site, ivs, per_pass=8).answer(ids, rows, torch.float32)
    for x, y, z in zip(a, b, c):
        assert [v for v, _ in x] == pytest.approx([v for v, _ in y], rel=1e-6) and [g for _, g in x] == [g for _, g in y]
        assert [v for v, _ in x] == pytest.approx([v for v, _ in z], rel=1e-6) and [g for _, g in x] == [g for _, g in z]


def _random_model(model_type: str, tok, vocab: int, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=128, pad_token_id=tok.pad_token_id, **extra)
    return nslens.load_model(AutoModelForCausalLM.from_config(cfg).eval(), tokenizer=tok)


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("gemma2", {"final_logit_softcapping": 2.0})])
def test_chunked_head_equals_hflm_on_the_models_own_logits(embedded, monkeypatch, model_type, extra):
    """The head computed in the readout, 5 needed positions a chunk (ragged last chunk, requests spanning chunks),
    against HFLM's reduction of the plain HF forward's logits (Gemma 2's soft-capping included), with some
    continuations the model's own greedy tokens; the model's own head does not run; remotely the same."""
    from nslens import loglik

    tok = embedded.tokenizer
    model = _random_model(model_type, tok, 4096, **extra)
    head = loglik.ChunkedHead.of(model)
    assert head == loglik.ChunkedHead("lm_head", extra.get("final_logit_softcapping"))
    ids = torch.randint(4, len(tok), (4, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model._module(input_ids=ids).logits
    greedy = logits.argmax(-1)  # the token each position predicts: a continuation of them is greedy
    rows = [(20, 3, [greedy[0, 17:20].tolist()]), (18, 1, [[8], [greedy[1, 17].item()]]),
            (20, 7, [[1, 2, 3, 4, 5, 6, 7]]), (12, 2, [greedy[3, 10:12].tolist(), [4]])]
    ref = hflm_reference(logits, rows)
    assert [g for _, g in ref] == [True, False, True, False, True, False]
    monkeypatch.setattr(loglik, "HEAD_CHUNK_BYTES", 5 * 4096 * 4)
    calls = []
    hook = model._module.lm_head.register_forward_hook(lambda m, i, o: calls.append(o.shape[-1]))
    try:
        got = LoglikSweep(model, None, [None]).answer(ids, rows, torch.float32)
        assert calls == [1]  # skipped: the module hands out the placeholder, the readout computed the logits
        plain = LoglikSweep(model, None, [None], chunked_head=False).answer(ids, rows, torch.float32)
        assert calls == [1, 4096]
    finally:
        hook.remove()
    assert [a[0][1] for a in got] == [g for _, g in ref] == [a[0][1] for a in plain]
    assert [a[0][0] for a in got] == pytest.approx([v for v, _ in ref], rel=1e-6)
    assert [a[0][0] for a in plain] == pytest.approx([v for v, _ in ref], rel=1e-6)
    nog = LoglikSweep(model, None, [None]).answer(ids, rows, torch.float32, greedy=False)
    assert nog == [[(a[0][0], None)] for a in got]  # without flags: the same log-likelihoods
    # with interventions (the replays), locally and under remote="local"
    site = nslens.resolve_site(model, -2)
    mask = nslens.RangeMask(torch.arange(8), -torch.ones(8), torch.ones(8), torch.zeros(8), torch.ones(8) * .4,
                            {"tau": 2.5, **site.describe()})
    ivs = [None, nslens.Intervention(mask, nslens.zero(), gated=False), nslens.Intervention(mask, nslens.dampen(.5))]
    a = LoglikSweep(model, site, ivs, per_pass=2).answer(ids, rows, torch.float32)
    b = LoglikSweep(model, site, ivs, per_pass=2, chunked_head=False).answer(ids, rows, torch.float32)
    c = LoglikSweep(model, site, ivs, per_pass=2, remote="local").answer(ids, rows, torch.float32)
    assert a == c and [x[1] for r in a for x in r] == [x[1] for r in b for x in r]
    assert [x[0] for r in a for x in r] == pytest.approx([x[0] for r in b for x in r], rel=1e-6)
    assert len({x[0] for x in a[2]}) == 3  # the interventions change the answer


def test_chunked_head_only_where_the_logits_are_the_heads(embedded):
    from nslens import loglik

    model = _random_model("llama", embedded.tokenizer, 4096)
    model.config.logits_scaling = 0.5  # Granite-style: the model divides its logits; the readout would not
    assert loglik.ChunkedHead.of(model) is None and LoglikSweep(model, None, [None]).head is None
    # a small vocabulary's logits stay below the chunk: the model's own head runs (bit-for-bit HFLM)
    small = LoglikSweep(embedded, None, [None])
    assert small.head is not None and 8 * 512 * small.vocab_size * 4 <= loglik.HEAD_CHUNK_BYTES
