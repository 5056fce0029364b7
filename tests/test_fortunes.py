"""Debian's fortunes as concept data: item splitting against the strfile index, the cleaning rules, the
deduplication and hold-out guarantees, spec checks and one-line errors. Needs the Debian data (`.ci/run` installs
it); outside CI the tests that read it are skipped when it is missing."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from nslens import fortunes as nf
from nslens.data import check_dataset_spec, load_dataset

HAVE_DATA = nf.FORTUNES_DIR.is_dir()
needs_data = pytest.mark.skipif(not HAVE_DATA and not os.environ.get("CI"),
                                reason="Debian fortunes not installed (apt-get install fortunes)")


@needs_data
def test_items_split_like_the_strfile_index():
    """Every category's item count equals the count in its strfile index (``<name>.dat``: a big-endian header
    whose second word is the number of strings), an independent reading of the same file."""
    root = nf.fortunes_dir()
    cats = nf.fortune_categories()
    assert len(cats) >= 40 and {"computers", "politics", "science", "sports"} <= set(cats)
    for cat in cats:
        numstr = struct.unpack(">5I", (root / f"{cat}.dat").read_bytes()[:20])[1]
        assert len(nf._raw_items(root / cat)) == numstr, cat


def test_cleaning_rules():
    # overstrike: underline and bold as a terminal prints them
    assert nf.clean_fortune("An _\bi_\bn_\bt_\be_\br_\bp_\br_\be_\bt_\ba_\bt_\bi_\bo_\bn of the code here\n") == \
        "An interpretation of the code here"
    assert nf.clean_fortune("Calm down, it's *____\b\b\b\bonly* ones and zeroes.") == \
        "Calm down, it's *only* ones and zeroes."
    # a (multi-line) attribution goes; lines joined, tabs and runs of spaces made single spaces
    raw = "APL is a mistake, carried through\tto perfection.\n\t\t-- Edsger W. Dijkstra,\n\t\tSIGPLAN Notices\n"
    assert nf.clean_fortune(raw) == "APL is a mistake, carried through to perfection."
    # dialogue with -- followed by unindented text stays
    raw = "-- Is it done yet?\n-- Not quite, but the tests pass now.\nOf course.\n"
    assert nf.clean_fortune(raw) == "-- Is it done yet? -- Not quite, but the tests pass now. Of course."
    # ASCII art and code (few letters), too short, too long
    assert nf.clean_fortune("  /\\_/\\  \n ( o.o ) \n  > ^ <  ||| ### ***\n") is None
    assert nf.clean_fortune("n = ((n >> 1) & 0x55555555) | ((n << 1) & 0xaaaaaaaa);") is None
    assert nf.clean_fortune("COBOL is for morons.") is None
    assert nf.clean_fortune(" ".join(["word"] * 81)) is None
    assert nf.clean_fortune(" ".join(["word"] * 80)) is not None
    assert nf.clean_fortune("COBOL is for morons.", min_words=4) == "COBOL is for morons."


@needs_data
def test_dataset_is_deduplicated_and_disjoint_from_the_held_out_text():
    ds = load_dataset("fortunes:computers,politics,science,sports")
    assert ds.label_names == ["computers", "politics", "science", "sports"] and ds.n_concepts == 4
    assert ds.label_words == ["computers", "politics", "science", "sports"]
    keys = [nf._key(t) for t in ds.texts]
    assert len(set(keys)) == len(keys)  # no repeat, within or across categories
    held = nf.heldout_texts()
    assert not set(keys) & {nf._key(t) for t in held}
    # the hold-out is one in ten of each category's clean items (by hash, so the same for any category list)
    for c, cat in enumerate(ds.label_names):
        n_in, n_out = int((ds.labels == c).sum()), len(nf.read_items(cat, heldout=True))
        assert 0.04 < n_out / (n_in + n_out) < 0.16, cat
        assert set(nf.read_items(cat)) == {t for t, lab in zip(ds.texts, ds.labels) if lab == c}
    other = load_dataset("fortunes:sports,science")
    assert set(other.texts) <= set(ds.texts) and other.label_names == ["sports", "science"]
    # every text is one line of at least 5 and at most 80 words, without the file's separators
    assert all("\n" not in t and "\t" not in t and 5 <= len(t.split()) <= 80 for t in ds.texts)
    assert not any(t.strip() == "%" or t.lstrip().startswith("-- ") and len(t.split()) < 6 for t in ds.texts)
    counts = ds.class_counts()
    assert np.all(counts >= 90), counts  # sports, the smallest, has about a hundred


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "fortunes"
    (root / "off").mkdir(parents=True)
    for cat, items in {"alpha": ["one two three four five", "the same item again here", "shared text in both "
                                 "files"],
                       "beta": ["six seven eight nine ten", "Shared text in both files.", "the same item again "
                                "here", "the same item again here"]}.items():
        (root / cat).write_text("\n%\n".join(items) + "\n%\n")
        (root / f"{cat}.dat").write_bytes(b"\0" * 24)
    (root / "off" / "rude").write_text("a rude item that must never be read\n%\n")
    (root / "off" / "rude.dat").write_bytes(b"\0" * 24)
    (root / "alpha.u8").symlink_to(root / "alpha")
    return root


def test_categories_exclude_off_and_companions_and_duplicates_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setenv("NSLENS_FORTUNES_DIR", str(_fake_root(tmp_path)))
    nf._all_items.cache_clear()
    assert nf.fortune_categories() == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"unknown fortunes categories \['off'\]; choose from alpha, beta"):
        check_dataset_spec("fortunes:alpha,off")
    ds = nf.fortunes_dataset("fortunes:alpha,beta")
    texts = sorted(ds.texts + nf.heldout_texts())
    # "shared text in both files" is in both categories (case and punctuation aside): dropped from both;
    # "the same item again here" is in both too; beta's own repeat is folded first
    assert texts == ["one two three four five", "six seven eight nine ten"]


def test_spec_errors_are_one_line(tmp_path, monkeypatch):
    if HAVE_DATA:
        with pytest.raises(ValueError, match=r"^unknown fortunes categories \['sport'\]; choose from art, .*sports"):
            check_dataset_spec("fortunes:sport,politics")
        with pytest.raises(ValueError, match="need at least 2 categories"):
            check_dataset_spec("fortunes:sports")
        with pytest.raises(ValueError, match=r"listed twice: \['sports'\]"):
            check_dataset_spec("fortunes:sports,politics,sports")
        check_dataset_spec("fortunes")
        assert nf.parse_fortunes_spec("fortunes") == nf.DEFAULT_CATEGORIES
    monkeypatch.setenv("NSLENS_FORTUNES_DIR", str(tmp_path / "none"))
    with pytest.raises(ValueError, match=r"^the fortunes data is not installed \(no .*none\); install it with "
                                         r"`apt-get install fortunes`"):
        check_dataset_spec("fortunes:computers,politics")
    with pytest.raises(ValueError, match="apt-get install fortunes"):
        load_dataset("fortunes")


@needs_data
def test_pipeline_loads_fortunes_with_label_words():
    from nslens.pipeline import RunConfig, load_concepts

    cfg = RunConfig(dataset="fortunes:computers,sports", n_per_class=20, label_words=["tech", "games"])
    cfg.validate()
    ds = load_concepts(cfg)
    assert ds.class_counts().tolist() == [20, 20] and ds.label_words == ["tech", "games"]


@needs_data
def test_held_out_documents_for_perplexity():
    from nslens.realtext import fortunes_documents

    held = nf.heldout_texts()
    docs = fortunes_documents(12)
    assert len(held) > 1000 and len(docs) == -(-len(held) // 12)
    assert "\n\n".join(docs) == "\n\n".join(held)
