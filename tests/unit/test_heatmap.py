"""The load heatmap: size, scale, annotations, title, read back pixel by pixel."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib import colormaps  # noqa: E402

from moe_train.train.heatmap import (COLORMAP, draw_load_heatmap, figure_to_rgb,  # noqa: E402
                                     load_heatmap, normalised_load)


def _cell_rgb(fig, img, row, col):
    """The pixel colour near a cell's corner (away from its printed value)."""
    ax = fig.axes[0]
    x, y = ax.transData.transform((col - 0.4, row - 0.4))
    return img[int(round(img.shape[0] - y)), int(round(x))].astype(int)


def test_colours_follow_the_diverging_scale():
    counts = [np.array([10, 10, 10, 10]),  # balanced: every cell at 1.0
              np.array([0, 0, 0, 40])]     # one expert takes all: 0 and 4 (beyond 2)
    np.testing.assert_allclose(normalised_load(counts), [[1, 1, 1, 1], [0, 0, 0, 4]])
    fig = draw_load_heatmap(counts, step=7)
    img = figure_to_rgb(fig)
    assert img.dtype == np.uint8 and img.shape[2] == 3 and img.shape[1] >= 600
    cmap = colormaps[COLORMAP]

    def expected(position):  # position on the colour bar, 0..1
        return (np.array(cmap(position)[:3]) * 255).round().astype(int)

    # 1.0 sits at the middle of the bar, 0 at its bottom, >= 2 at its top.
    assert np.abs(_cell_rgb(fig, img, 0, 2) - expected(0.5)).max() <= 2
    assert np.abs(_cell_rgb(fig, img, 1, 0) - expected(0.0)).max() <= 2
    assert np.abs(_cell_rgb(fig, img, 1, 3) - expected(1.0)).max() <= 2
    ax = fig.axes[0]
    assert "step 7" in ax.get_title()
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "MoE layer"
    assert sorted(t.get_text() for t in ax.texts) == ["0.00"] * 3 + ["1.00"] * 4 + ["4.00"]
    assert fig.axes[1].get_ylabel() == "load / mean"  # the colour bar


def test_values_printed_only_up_to_16_experts():
    rng = np.random.default_rng(0)
    assert len(draw_load_heatmap([rng.integers(1, 9, 16)]).axes[0].texts) == 16
    assert len(draw_load_heatmap([rng.integers(1, 9, 17)]).axes[0].texts) == 0
    assert load_heatmap([rng.integers(1, 9, 64)] * 24).shape[1] <= 1600
