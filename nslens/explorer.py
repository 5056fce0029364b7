"""The run explorer: one self-contained HTML file (``explorer.html``) to browse a finished run directory.

Everything the page shows is read from the run's own files and embedded as JSON in the page, with the page's own
CSS and JavaScript (``nslens/explorer_assets``): nothing is fetched when it is viewed, so it opens from a file
system, an e-mail attachment or an archive exactly as it was written. Sections: the erasure and side-effect tables
(sortable), a per-concept neuron browser (activation densities per concept with the concept's range drawn as a
band), the overlap matrix and the training texts at the range's bounds.

The densities are computed here, not in the browser: Gaussian KDEs (Scott's bandwidth, equal to
``scipy.stats.gaussian_kde``) of the raw training activations when the run kept them (``samples.safetensors``), else Gaussians from the
recorded per-concept mean and standard deviation (``stats.safetensors``), else, for a run with neither (an SAE
basis), the mask's own mu and sigma for its concept only. The page says which.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from .effects import SideEffectTable, main_metric
from .erasure import METRICS, ErasureTable
from .errors import NsLensError
from .files import read_json, write_text
from .ranges import RangeMask, load_masks
from .stats import ConceptStats

__all__ = ["check_page_path", "explorer_data", "render", "write_explorer"]

#: column names of the erasure metrics, as the report writes them
LABELS = {"acc": "Acc", "conf": "Conf", "cacc": "CAcc", "cconf": "CConf"}
#: characters of a training text shown at the bounds (the rest is cut and marked)
TEXT_CHARS = 300
#: a JSON string literal (the structural ":" and "," of the JSON text lie outside every match)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
#: escapes inside a literal, each still JSON for the same character: "</script>" in a text cannot end the data's
#: tag, and "http://" in a text cannot read as a URL (the page refers to nothing outside itself)
_LITERAL_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "/": "\\/", ":": "\\u003a"})


def write_explorer(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's explorer page (default ``<run_dir>/explorer.html``, beside ``report.md``) atomically and
    return its path. Reads only the run's files, so it also works on a run copied from elsewhere."""
    run = Path(run_dir)
    path = Path(out) if out is not None else run / "explorer.html"
    check_page_path(path)
    return write_text(path, render(explorer_data(run)))


#: what every page carries (page.html, since the first one): an existing file without it is not ours to replace
PAGE_MARK = '<script type="application/json" id="nslens-data">'


def check_page_path(path: str | Path) -> None:
    """The page replaces only an earlier page: ``-o r1/summary.json`` or ``-o data.csv`` overwrote that file with
    HTML (a run's own files, a user's dataset)."""
    path = Path(path)
    if path.is_dir():
        raise NsLensError(f"cannot write {path}: it is a directory; give a file name")
    if path.exists():
        try:
            text = path.read_bytes()
        except OSError as e:
            raise NsLensError(f"cannot write {path}: {e.strerror or e}") from e
        if PAGE_MARK.encode() not in text:
            raise NsLensError(f"{path} exists and is not an nslens explorer page; give a new file name (the page "
                              "replaces only an earlier page)")


def explorer_data(run_dir: str | Path, *, grid: int = 64, k_bounds: int = 3) -> dict[str, Any]:
    """Everything the page embeds, as plain JSON-able data: the run's description, its erasure and side-effect
    tables, its masks, the densities of every masked neuron per concept on ``grid`` points, the overlap matrix and
    the ``k_bounds`` texts nearest each range's bounds. A section the run lacks is ``None``."""
    run = Path(run_dir)
    if not (run / "summary.json").exists():
        raise NsLensError(f"{run} is not an nslens run directory (no summary.json)")
    if grid < 8:
        raise NsLensError(f"grid must be >= 8 points, got {grid}")
    summary = read_json(run / "summary.json")
    cfg = read_json(run / "config.json") if (run / "config.json").exists() else {}
    masks = load_masks(run / "ranges") if (run / "ranges").is_dir() else []
    sae = summary.get("basis") == "sae"  # feature masks: the site's samples and statistics are not their basis
    samples = _samples(run) if not sae else None
    stats = ConceptStats.load(run / "stats.safetensors") if not sae and (run / "stats.safetensors").exists() \
        else None
    return {
        "run": _describe(run, summary, cfg),
        "erasure": _erasure_tables(run),
        "side_effects": _side_effect_tables(run),
        "masks": [_mask(m) for m in masks],
        "densities": _densities(masks, samples, stats, grid) if masks else None,
        "overlap": _overlap(run),
        "bounds": _bounds(run, masks, samples, k_bounds) if masks and samples is not None else None,
    }


def render(data: dict[str, Any]) -> str:
    """The page: the template with the assets and the data (escaped so that no text closes the script tag or
    reads as a URL) inlined."""
    assets = resources.files(__package__).joinpath("explorer_assets")
    blob = _STRING.sub(_escape_literal, json.dumps(data, allow_nan=False, separators=(",", ":")))
    page = assets.joinpath("page.html").read_text()
    return (page.replace("{{CSS}}", assets.joinpath("explorer.css").read_text())
            .replace("{{JS}}", assets.joinpath("explorer.js").read_text())
            .replace("{{TITLE}}", _escape_html(f"nslens run {data['run']['name']}"))
            .replace("{{DATA}}", blob))


def _escape_literal(m: re.Match[str]) -> str:
    return m[0].translate(_LITERAL_ESCAPES)


def _escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _describe(run: Path, summary: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    site = summary.get("site", {})
    return {"name": run.resolve().name, "status": summary.get("status", "?"),
            "model_id": summary.get("model_id"), "site": site, "dataset": summary.get("dataset"),
            "n_train": summary.get("n_train"), "n_test": summary.get("n_test"),
            "basis": summary.get("basis", "neurons"), "method": cfg.get("method"), "fraction": cfg.get("fraction"),
            "tau": cfg.get("tau"), "positions": cfg.get("positions"),
            "neurons_per_concept": summary.get("neurons_per_concept"),
            "failed_steps": summary.get("failed_steps") or {}}


def _erasure_tables(run: Path) -> list[dict[str, Any]] | None:
    """Every ``erasure_*.json``: per concept the base values then the neuron- and range-masking deltas."""
    tables = []
    for path in sorted(run.glob("erasure_*.json")):
        tab = read_json(path, ErasureTable.from_json)
        names = [LABELS.get(k, k) for k in METRICS]
        columns = [*names, *(f"neuron Δ{n}" for n in names), *(f"range Δ{n}" for n in names)]
        rows = tab.rows()
        tables.append({"name": path.stem.removeprefix("erasure_"), "operator": tab.operator,
                       "steering": tab.meta.get("steering"), "columns": columns, "signed_from": len(METRICS),
                       "rows": [[r[0], *map(float, r[1:])] for r in rows[:-1]],
                       "footer": [rows[-1][0], *map(float, rows[-1][1:])]})
    tables.sort(key=lambda t: t["steering"] is not None)  # the operators first, as in the report
    return tables or None


def _side_effect_tables(run: Path) -> list[dict[str, Any]] | None:
    """Every ``side_effects_*.json``: per concept each task's main metric, deltas vs the clean model."""
    tables = []
    for path in sorted(run.glob("side_effects_*.json")):
        tab = read_json(path, SideEffectTable.from_json)
        cols = [(t, main_metric(tab.clean[t])) for t in tab.tasks]
        s = tab.summary()
        tables.append({
            "name": path.stem.removeprefix("side_effects_"), "operator": tab.operator,
            "clean": [[t, k, tab.clean[t][k]] for t, k in cols],
            "columns": [f"{part} Δ{t} {'PPL' if k.endswith('perplexity') else k}" for part in ("neuron", "range") for t, k in cols], "signed_from": 0,
            "rows": [[c, *(tab.neuron[i][t][k] for t, k in cols), *(tab.range[i][t][k] for t, k in cols)]
                     for i, c in enumerate(tab.concepts)],
            "footer": ["trimmed mean (10%)", *(s[p][f"{t}/{k}"] for p in ("neuron", "range") for t, k in cols)]})
    return tables or None


def _mask(m: RangeMask) -> dict[str, Any]:
    return {"concept": m.concept, "neurons": m.neurons.tolist(), "lo": m.lo.tolist(), "hi": m.hi.tolist(),
            "mu": m.mu.tolist(), "sigma": m.sigma.tolist()}


def _samples(run: Path) -> dict[str, np.ndarray] | None:
    path = run / "samples.safetensors"
    if not path.exists():
        return None
    raw = load_file(str(path))
    labels = raw["labels"].astype(np.int64)
    index = raw["index"] if "index" in raw else np.arange(len(labels))  # older runs: the first samples
    return {"x": np.asarray(raw["samples"], dtype=np.float64), "labels": labels, "index": index}


def _round(values: np.ndarray) -> list[float]:
    """Four significant digits: a curve on a 640-pixel plot needs no more, and the page stays small."""
    return [float(f"{v:.4g}") for v in np.asarray(values, dtype=np.float64)]


def _densities(masks: list[RangeMask], samples: dict[str, np.ndarray] | None, stats: ConceptStats | None,
               grid: int) -> dict[str, Any]:
    """Per masked neuron (each once, however many masks hold it): a common x grid covering every concept's
    values and every mask's range of it, and one density curve per concept (``None`` where there is none)."""
    c = len(masks)
    bounds: dict[int, list[float]] = {}
    for m in masks:
        for j, lo, hi in zip(m.neurons.tolist(), m.lo.tolist(), m.hi.tolist()):
            bounds.setdefault(j, []).extend([lo, hi])
    if samples is not None:
        source = "kde"
        note = (f"Gaussian KDE (as scipy.stats.gaussian_kde: Scott's bandwidth) of the {len(samples['labels'])} "
                "training activations the run kept, per concept.")
    elif stats is not None:
        source = "gaussian"
        note = ("Gaussians N(mean, std) from the recorded per-concept statistics: the run kept no raw samples, so "
                "no KDE.")
    else:
        source = "mask"
        note = ("Gaussians N(mu, sigma) of the mask's own concept only: the run kept neither raw samples nor "
                "per-concept statistics of this basis.")
    out: dict[str, Any] = {}
    for j, edges in sorted(bounds.items()):
        if source == "kde":
            cols = [samples["x"][samples["labels"] == k, j] for k in range(c)]
            vals = np.concatenate([*cols, edges])
            lo, hi = float(vals.min()), float(vals.max())
        elif source == "gaussian":
            mu, sd = stats.mean[:c, j].astype(np.float64), stats.std()[:c, j].astype(np.float64)
            lo, hi = min(float((mu - 4 * sd).min()), *edges), max(float((mu + 4 * sd).max()), *edges)
        else:
            own = [(k, m.mu[i].item(), m.sigma[i].item()) for k, m in enumerate(masks)
                   for i in (m.neurons == j).nonzero().flatten().tolist()]
            lo = min(min(mu - 4 * sd for _, mu, sd in own), *edges)
            hi = max(max(mu + 4 * sd for _, mu, sd in own), *edges)
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        x = np.linspace(lo - pad, hi + pad, grid)
        if source == "kde":
            curves = [_kde(col, x) for col in cols]
        elif source == "gaussian":
            curves = [_gauss(x, mu[k], sd[k]) for k in range(c)]
        else:
            curves = [None] * c
            for k, mu_k, sd_k in own:
                curves[k] = _gauss(x, mu_k, sd_k)
        out[str(j)] = {"x0": float(x[0]), "x1": float(x[-1]), "y": curves}
    return {"source": source, "note": note, "grid": grid, "neurons": out}


def _kde(values: np.ndarray, x: np.ndarray) -> list[float] | None:
    """The Gaussian KDE of one concept's values on ``x`` with Scott's bandwidth: what
    ``scipy.stats.gaussian_kde(values).evaluate(x)`` returns (the tests check it), written out in numpy because
    scipy's 1x1 triangular solves cost milliseconds each under thread contention and a run has thousands.
    None for fewer than two distinct values (no bandwidth)."""
    if len(values) < 2 or float(np.ptp(values)) == 0.0:
        return None
    var = float(np.var(values, ddof=1)) * len(values) ** (-2 / 5)  # Scott's factor n^(-1/5), squared
    z = (x[:, None] - values[None, :]) ** 2 / var
    return _round(np.exp(-0.5 * z).mean(axis=1) / np.sqrt(2 * np.pi * var))


def _gauss(x: np.ndarray, mu: float, sd: float) -> list[float] | None:
    if not sd > 0:
        return None
    return _round(np.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi)))


def _overlap(run: Path) -> dict[str, Any] | None:
    """The analyses' concept x concept overlap of salient-neuron sets, and each concept's mean distribution
    overlap, from ``analysis.json``."""
    path = run / "analysis.json"
    if not path.exists():
        return None
    a = read_json(path)
    p = a["polysemanticity"]
    d = a.get("distribution_overlap", {})
    return {"names": p["names"], "matrix": p["overlap"], "fraction": p["fraction"],
            "common_neurons": p.get("common_neurons", []), "definition": d.get("definition"),
            "per_concept_mean": d.get("per_concept_mean")}


def _bounds(run: Path, masks: list[RangeMask], samples: dict[str, np.ndarray], k: int) -> dict[str, Any] | None:
    """For every concept and neuron of its mask, the ``k`` training texts of that concept whose activation is
    nearest the range's lower and upper bound, as [text number, activation] (the same choice as
    ``nslens.analysis.bound_samples``); the texts are listed once."""
    path = run / "train.jsonl"
    if not path.exists():
        return None
    with path.open() as f:
        train = [json.loads(line)["text"] for line in f]
    texts: dict[int, int] = {}  # training-text number -> position in the embedded list
    per_concept = []
    for c, m in enumerate(masks):
        rows = np.flatnonzero(samples["labels"] == int(m.meta.get("concept_index", c)))
        entry = {}
        for i, j in enumerate(m.neurons.tolist()):
            acts = samples["x"][rows, j]
            near = {}
            for name, target in (("lo", m.lo[i].item()), ("hi", m.hi[i].item())):
                order = np.argsort(np.abs(acts - target), kind="stable")[:k]
                near[name] = [[texts.setdefault(int(samples["index"][rows[o]]), len(texts)), float(acts[o])]
                              for o in order]
            entry[str(j)] = near
        per_concept.append(entry)
    listed = sorted(texts, key=texts.get)
    return {"texts": [_cut(train[t]) for t in listed], "per_concept": per_concept}


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + "…"
