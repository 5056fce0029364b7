import numpy as np
import torch

from nslens.figures import plot_activation_patterns, plot_common_neurons, plot_overlap_heatmap, plot_sweep
from nslens.ranges import RangeMask
from nslens.sweeps import Sweep

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 2000


def pixels(path):
    """The image's RGB pixels, ``[n, 3]`` floats in [0, 1]."""
    import matplotlib.image

    return matplotlib.image.imread(path)[..., :3].reshape(-1, 3)


def has_colour(px, rgb, tol=0.02):
    return bool((np.abs(px - np.asarray(rgb)).max(1) < tol).any())


def test_figures_render_headless(tmp_path, rng):
    x = rng.normal(size=(90, 6)) + np.repeat(np.arange(3), 30)[:, None]
    labels = np.repeat(np.arange(3), 30)
    names = ["a", "b", "c"]
    scores = np.abs(rng.normal(size=(3, 6)))
    masks = [RangeMask(torch.tensor([0, 1]), [-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [0.4, 0.4], {}) for _ in names]
    paths = [
        plot_overlap_heatmap(np.eye(3), names, tmp_path / "h.png"),
        plot_activation_patterns(x, labels, names, scores, masks, 0, tmp_path / "p.png"),
        plot_common_neurons(x, labels, names, [1, 2], tmp_path / "c.png"),
        plot_sweep(Sweep("tau", [1.0, 2.0], [{p: {"acc": 0.9, "cacc": 0.9} for p in ("base", "neuron", "range")}] * 2),
                   tmp_path / "s.png"),
    ]
    assert all(is_png(p) for p in paths)
    # the heatmap draws the identity's 1s and 0s in the colour map's two ends
    import matplotlib

    viridis = matplotlib.colormaps["viridis"]
    heat = pixels(paths[0])
    assert has_colour(heat, viridis(1.0)[:3]) and has_colour(heat, viridis(0.0)[:3])
    # every figure draws something beyond its background and black text (not a blank canvas)
    for p in paths:
        px = np.round(pixels(p), 2)
        drawn = {tuple(c) for c in px if not (c.min() > 0.95 or c.max() < 0.05)}
        assert len(drawn) > 20, p.name


def test_a_figure_is_written_in_the_format_its_name_says(tmp_path):
    """h.pdf held PNG data; an unknown suffix is named."""
    import pytest

    from nslens.errors import NsLensError

    assert plot_overlap_heatmap(np.eye(3), ["a", "b", "c"], tmp_path / "h.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in plot_overlap_heatmap(np.eye(3), ["a", "b", "c"], tmp_path / "h.svg").read_bytes()[:500]
    with pytest.raises(NsLensError, match=r"unknown format 'jpgx'; name it .png, .pdf, .svg"):
        plot_overlap_heatmap(np.eye(3), ["a", "b", "c"], tmp_path / "h.jpgx")
    assert not (tmp_path / "h.jpgx").exists()


def test_a_matrix_or_concept_that_does_not_fit_the_names_is_refused(tmp_path, rng):
    """Both were an IndexError while drawing."""
    import pytest

    from nslens.errors import NsLensError

    with pytest.raises(NsLensError, match=r"needs a 3 x 3 matrix for 3 names, got \(2, 2\)"):
        plot_overlap_heatmap(np.eye(2), ["a", "b", "c"], tmp_path / "h.png")
    x, labels = rng.normal(size=(30, 4)), np.repeat(np.arange(3), 10)
    masks = [RangeMask(torch.tensor([0]), [-1.0], [1.0], [0.0], [0.4], {}) for _ in range(3)]
    with pytest.raises(NsLensError, match=r"concept must be an index in \[0, 2\]"):
        plot_activation_patterns(x, labels, ["a", "b", "c"], np.ones((3, 4)), masks, 9, tmp_path / "p.png")
    assert plot_activation_patterns(x, labels, ["a", "b", "c"], np.ones((3, 4)), masks, np.int64(1),
                                    tmp_path / "p.png").exists()
    assert not (tmp_path / "h.png").exists()
