"""Batching and tokenising shared by every module that runs prompts through the model in batches."""

import sys
from types import SimpleNamespace

import pytest

import nslens
from nslens.batching import batches, tokenize
from nslens.synthetic import build_tokenizer


def test_batches_cover_every_item_once_in_order():
    for n, size in ((0, 3), (1, 3), (7, 3), (9, 3), (5, 16)):
        parts = batches(n, size)
        assert [i for sl in parts for i in range(sl.start, sl.stop)] == list(range(n))
        assert all(0 < sl.stop - sl.start <= size for sl in parts)
        assert len(parts) == -(-n // size)


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(nslens.NsLensError, match="batch_size must be >= 1, got 0"):
        batches(4, 0)


def test_tokenize_pads_on_the_left_so_the_last_column_is_every_rows_last_token():
    tok = build_tokenizer()
    model = SimpleNamespace(tokenizer=tok)
    prompts = ["the game", "the long game was won", "a"]
    enc = tokenize(model, prompts)
    for row, p in enumerate(prompts):
        ids = tok(p)["input_ids"]
        assert enc["input_ids"][row, -len(ids):].tolist() == ids
        assert enc["attention_mask"][row].tolist() == [0] * (enc["input_ids"].shape[1] - len(ids)) + [1] * len(ids)
    tok.padding_side = "right"
    with pytest.raises(nslens.NsLensError, match="the tokenizer must pad on the left"):
        tokenize(model, prompts)


def test_the_old_home_still_names_them():
    """``nslens.record`` re-exports them while its importers move to ``nslens.batching``."""
    import nslens.batching as home

    record_module = sys.modules[nslens.record.__module__]
    assert (record_module.batches, record_module.tokenize, record_module.Progress) == \
        (home.batches, home.tokenize, home.Progress)


def test_a_prompt_of_no_tokens_and_no_prompts_are_refused():
    """An empty prompt failed deep in attention as a reshape error (``generate -p ""``, ``record``)."""
    model = SimpleNamespace(tokenizer=build_tokenizer())
    with pytest.raises(nslens.NsLensError, match="prompt '' has no tokens; every prompt needs at least one"):
        tokenize(model, ["the game", ""])
    with pytest.raises(nslens.NsLensError, match="no prompts given"):
        tokenize(model, [])
