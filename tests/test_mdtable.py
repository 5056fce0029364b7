"""Markdown cells for users' text: every table nslens writes with a concept name in it, parsed by markdown-it-py
(GitHub-flavoured tables), keeps its columns and shows the name as it was given."""

from markdown_it import MarkdownIt

from nslens.effects import SideEffects, SideEffectTable
from nslens.erasure import METRICS, ErasureTable
from nslens.mdtable import cell
from nslens.sae import table31_markdown
from nslens.workflows import BundleEffect

#: names a user's dataset may hold: pipes and a line break
NAMES = ["sci|tech", "world\nnews", "a | b | c"]
SHOWN = ["sci|tech", "world news", "a | b | c"]


def tables(markdown: str) -> list[list[list[str]]]:
    """Each table of ``markdown`` as rows of cell texts (the header row first), as a Markdown renderer reads it."""
    out, row = [], None
    for tok in MarkdownIt("commonmark").enable("table").parse(markdown):
        if tok.type == "table_open":
            out.append([])
        elif tok.type == "tr_open":
            row = []
            out[-1].append(row)
        elif tok.type == "inline" and row is not None:
            row.append(tok.content)
        elif tok.type == "tr_close":
            row = None
    return out


def first_column(markdown: str) -> list[str]:
    """The first cell of each body row of the one table in ``markdown``."""
    (table,) = tables(markdown)
    return [r[0] for r in table[1:]]


def test_cell_is_one_cell_that_reads_as_the_text():
    for name, shown in zip(NAMES, SHOWN):
        assert first_column(f"| concept | n |\n|---|---|\n| {cell(name)} | 1 |\n") == [shown]


def test_without_escaping_the_reference_parser_sees_the_damage():
    """The checks here can fail: a raw pipe ends the cell (the rest of the name goes to the next column, and the
    row's last cell is dropped), a raw line break splits the row in two."""
    (table,) = tables("| concept | n |\n|---|---|\n| sci|tech | 1 |\n")
    assert table[1] == ["sci", "tech"]
    assert first_column("| concept | n |\n|---|---|\n| world\nnews | 1 |\n") == ["world", "news"]


def test_erasure_table_markdown():
    row = {k: 0.5 for k in METRICS}
    t = ErasureTable(NAMES, [row] * 3, [row] * 3, [row] * 3)
    assert first_column(t.to_markdown()) == [*SHOWN, "trimmed mean (10%)"]


def test_side_effect_markdown():
    clean = {"mmlu": {"acc": 0.5}}
    t = SideEffectTable(NAMES, ["mmlu"], clean, [clean] * 3, [clean] * 3)
    assert first_column(t.to_markdown()) == [*SHOWN, "trimmed mean (10%)"]
    runs = SideEffects({"clean": clean, **{name: clean for name in NAMES}})
    assert first_column(runs.to_markdown()) == ["clean", *SHOWN]


def test_bundle_effect_and_sae_table31_markdown():
    e = BundleEffect(NAMES, [1, 2, 3], [0.5] * 3, [0.4] * 3, [0.6] * 3, [0.5] * 3, [NAMES[0]])
    assert first_column(e.to_markdown()) == SHOWN
    r = {"active_per_sample": 1.0, "per_concept": 2, "consistent": 1, "ablated": 1}
    assert first_column(table31_markdown({"per_concept": dict(zip(NAMES, [r] * 3)), "mean": r, "d_sae": 8})) == [
        *SHOWN, "mean"]
