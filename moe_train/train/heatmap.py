"""The layers x experts load heatmap, as an RGB image built with numpy only.

Each row is one MoE layer, each column one expert. A cell's value is that
expert's share of the layer's routed tokens times the number of experts, so
1.0 means perfectly balanced. The colour scale is fixed (0 -> dark blue,
1 -> green, >= 2 -> yellow) rather than normalised per image, so images from
different steps can be compared by eye.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Viridis-like anchors: (value, RGB). Values between anchors are interpolated.
_ANCHORS = np.array([0.0, 0.5, 1.0, 1.5, 2.0])
_COLOURS = np.array([
    [68, 1, 84],      # 0: nothing routed here
    [59, 82, 139],
    [33, 145, 140],   # 1: exactly the mean load
    [94, 201, 98],
    [253, 231, 37],   # >= 2: twice the mean or more
], dtype=np.float64)

SCALE_MAX = float(_ANCHORS[-1])


def normalised_load(tokens_per_expert: Sequence[np.ndarray]) -> np.ndarray:
    """[layers, experts] float array: each expert's load over the layer's mean
    load (1.0 = balanced; a layer that routed nothing is all zeros)."""
    rows = []
    for counts in tokens_per_expert:
        counts = np.asarray(counts, dtype=np.float64).reshape(-1)
        mean = counts.mean() if counts.size else 0.0
        rows.append(counts / mean if mean > 0 else np.zeros_like(counts))
    return np.stack(rows) if rows else np.zeros((0, 0))


def colourise(values: np.ndarray) -> np.ndarray:
    """Map a 2-d float array to uint8 RGB [H, W, 3] on the fixed scale."""
    v = np.clip(values, 0.0, SCALE_MAX)
    channels = [np.interp(v, _ANCHORS, _COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def load_heatmap(tokens_per_expert: Sequence[np.ndarray], cell: int = 16) -> np.ndarray:
    """RGB image [layers*cell, experts*cell, 3] uint8 of the normalised load;
    each (layer, expert) cell is a ``cell`` x ``cell`` block of one colour."""
    rgb = colourise(normalised_load(tokens_per_expert))
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
