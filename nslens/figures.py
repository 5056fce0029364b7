"""Figures as PNG files (matplotlib, headless Agg backend): what researchers look at instead of tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import NsLensError
from .files import atomic_path
from .ranges import RangeMask
from .sweeps import Sweep

__all__ = ["plot_activation_patterns", "plot_common_neurons", "plot_overlap_heatmap", "plot_sweep"]


def _plt():
    """pyplot on the headless Agg backend (imported here: matplotlib is heavy, and the backend must be chosen
    before pyplot loads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


#: the figure formats a path may name by its suffix (none: PNG)
FIGURE_FORMATS = ("png", "pdf", "svg")


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` in the format its name says: ``h.pdf`` held PNG data."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        if fmt not in FIGURE_FORMATS:
            raise NsLensError(f"figure {path}: unknown format {fmt!r}; name it .{', .'.join(FIGURE_FORMATS)}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=fmt)
    finally:
        _plt().close(fig)
    return path


def plot_overlap_heatmap(matrix: np.ndarray, names: Sequence[str], path: str | Path,
                         title: str = "Overlap of top salient neurons") -> Path:
    """A concept x concept heatmap of ``matrix`` (the overlap of their top salient neurons), written to ``path``."""
    matrix = np.asarray(matrix)
    if matrix.shape != (len(names), len(names)):  # an IndexError while labelling the cells
        raise NsLensError(f"the heatmap needs a {len(names)} x {len(names)} matrix for {len(names)} names, got "
                          f"{matrix.shape}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(names), 1.0 + 0.6 * len(names)))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w" if matrix[i, j] < 0.6 else "k",
                    fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def _kde(ax, x: np.ndarray, label: str) -> None:
    from scipy.stats import gaussian_kde  # heavy: loaded by the one figure that needs it

    if len(x) < 2 or np.std(x) == 0:
        ax.axvline(float(np.mean(x)), label=label)
        return
    grid = np.linspace(x.min() - x.std(), x.max() + x.std(), 200)
    ax.plot(grid, gaussian_kde(x)(grid), label=label)


def plot_activation_patterns(samples: np.ndarray, labels: np.ndarray, names: Sequence[str], scores: np.ndarray,
                             masks: Sequence[RangeMask], concept: int, path: str | Path) -> Path:
    """Per-concept KDEs of the top, middle and bottom ranked neuron for ``concept``; its range is shaded."""
    if not (isinstance(concept, (int, np.integer)) and 0 <= concept < min(len(names), len(masks), len(scores))):
        raise NsLensError(f"concept must be an index in [0, {len(names) - 1}] (one per name, mask and score row), "
                          f"got {concept!r}")
    plt = _plt()
    order = np.argsort(-scores[concept], kind="stable")
    picks = {"top": int(order[0]), "middle": int(order[len(order) // 2]), "bottom": int(order[-1])}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    mask = masks[concept]
    for ax, (rank_name, j) in zip(axes, picks.items()):
        for c, name in enumerate(names):
            _kde(ax, samples[labels == c, j], name)
        hit = (mask.neurons == j).nonzero()
        if len(hit):
            i = int(hit[0, 0])
            ax.axvspan(float(mask.lo[i]), float(mask.hi[i]), color="grey", alpha=0.2, label=f"{names[concept]} range")
        ax.set_title(f"{rank_name}-ranked neuron {j} for {names[concept]}")
        ax.set_xlabel("activation")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_common_neurons(samples: np.ndarray, labels: np.ndarray, names: Sequence[str], common: Sequence[int],
                        path: str | Path, limit: int = 4) -> Path:
    """Box plots per concept for neurons salient for every concept."""
    plt = _plt()
    picks = list(common)[:limit] or [0]
    fig, axes = plt.subplots(1, len(picks), figsize=(3.5 * len(picks), 3.2), squeeze=False)
    for ax, j in zip(axes[0], picks):
        ax.boxplot([samples[labels == c, j] for c in range(len(names))], showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right")
        ax.set_title(f"neuron {j}")
    return _save(fig, path)


def plot_sweep(sweep: Sweep, path: str | Path) -> Path:
    """Target (Acc) and auxiliary (CAcc) accuracy after neuron and range masking along the swept parameter."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.asarray(sweep.values)
    for part, style in (("neuron", "--"), ("range", "-")):
        ax.plot(x, sweep.curve(part, "acc"), style, marker="o", label=f"{part} masking: target Acc")
        ax.plot(x, sweep.curve(part, "cacc"), style, marker="s", label=f"{part} masking: other CAcc")
    ax.set_xlabel(sweep.param)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"{sweep.param} sweep")
    return _save(fig, path)
