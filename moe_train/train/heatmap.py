"""The layers x experts load heatmap, drawn with matplotlib (Agg, no display).

Each row is one MoE layer (MoE layers counted from 0, top = first), each
column one expert. A cell's value is that expert's tokens over the layer's
mean tokens per expert, so 1.0 is perfect balance. The colour scale is
diverging and fixed, centred at 1 (white): blue below the mean (darkest at 0,
an expert that got nothing), red above it (darkest at 2 or more, an expert
with at least twice the mean). Fixed rather than per image, so images of
different steps compare by eye. With at most 16 experts each cell also
prints its value.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

# The diverging scale: value -> colour. 1.0 (balanced) is the white middle.
COLORMAP = "RdBu_r"
SCALE_MIN, SCALE_CENTRE, SCALE_MAX = 0.0, 1.0, 2.0
# Cells print their values up to this many experts; beyond it text would not fit.
ANNOTATE_MAX_EXPERTS = 16
DPI = 100


def normalised_load(tokens_per_expert: Sequence[np.ndarray]) -> np.ndarray:
    """[layers, experts] float array: each expert's load over the layer's mean
    load (1.0 = balanced; a layer that routed nothing is all zeros)."""
    rows = []
    for counts in tokens_per_expert:
        counts = np.asarray(counts, dtype=np.float64).reshape(-1)
        mean = counts.mean() if counts.size else 0.0
        rows.append(counts / mean if mean > 0 else np.zeros_like(counts))
    return np.stack(rows) if rows else np.zeros((0, 0))


def colour_norm():
    """The fixed diverging normalisation: 0 -> 0.0, 1 -> 0.5, 2 -> 1.0."""
    from matplotlib.colors import TwoSlopeNorm

    return TwoSlopeNorm(vmin=SCALE_MIN, vcenter=SCALE_CENTRE, vmax=SCALE_MAX)


def draw_load_heatmap(tokens_per_expert: Sequence[np.ndarray], step: Optional[int] = None):
    """A matplotlib ``Figure`` (Agg canvas, not registered with pyplot) of the
    normalised load; its one image axes is ``figure.axes[0]``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    load = normalised_load(tokens_per_expert)
    layers, experts = load.shape
    # 640 to 1600 px wide (TensorBoard shows images at their own size): cells
    # near square up to ~28 experts, narrower beyond so the image stays on screen.
    width = min(16.0, max(6.4, 0.5 * experts + 2.2))
    height = min(12.0, max(2.6, 0.45 * layers + 1.6))
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(load, cmap=COLORMAP, norm=colour_norm(), aspect="auto",
                   interpolation="nearest")
    # Fonts sized for TensorBoard, which shows the image at about half its
    # width unless "Show actual image size" is ticked.
    ax.set_xlabel("expert", fontsize=12)
    ax.set_ylabel("MoE layer", fontsize=12)
    ax.tick_params(labelsize=11)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(experts, 32), integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(layers, 24), integer=True))
    title = "expert load / layer mean (1 = balanced)"
    ax.set_title(title if step is None else f"{title}, step {step}", fontsize=13)
    bar = fig.colorbar(im, ax=ax, extend="max", fraction=0.05, pad=0.02)
    bar.set_label("load / mean", fontsize=12)
    bar.ax.tick_params(labelsize=11)
    if experts <= ANNOTATE_MAX_EXPERTS:
        for (row, col), value in np.ndenumerate(load):
            # Dark cells (far from 1) get white text.
            dark = abs(min(value, SCALE_MAX) - SCALE_CENTRE) > 0.6
            ax.text(col, row, f"{value:.2f}", ha="center", va="center",
                    fontsize=11 if experts <= 8 else 9,
                    color="white" if dark else "black")
    return fig


def figure_to_rgb(fig) -> np.ndarray:
    """Render a figure to a uint8 RGB array [H, W, 3]."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def load_heatmap(tokens_per_expert: Sequence[np.ndarray], step: Optional[int] = None) -> np.ndarray:
    """RGB image [H, W, 3] uint8 of :func:`draw_load_heatmap` (>= 640 px wide),
    for ``SummaryWriter.add_image(..., dataformats="HWC")``."""
    return figure_to_rgb(draw_load_heatmap(tokens_per_expert, step))
