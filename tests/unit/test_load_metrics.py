"""Load percentiles and starved experts on hand-made counts."""
import pytest
import torch

from moe_train.train.metrics import moe_layer_metrics


def test_starved_experts_and_percentiles_by_hand():
    # Mean 10: loads 0, 0.05, 0.1, 0.85, 4.0 (x mean); below 0.1 are the first two.
    counts = [torch.tensor([0, 0.5, 1, 8.5, 40.0]), torch.tensor([10, 10, 10, 10, 10])]
    m = moe_layer_metrics(counts, [0.25, 0.0], drops=True)
    assert m["moe/layer_0/starved_experts"] == 2
    assert m["moe/layer_1/starved_experts"] == 0
    assert m["moe/all_layers/starved_experts"] == 2
    assert m["moe/layer_0/load_p50"] == pytest.approx(0.1)
    # p95 of [0, .05, .1, .85, 4]: position 0.95*4 = 3.8 -> .85 + .8*(4 - .85)
    assert m["moe/layer_0/load_p95"] == pytest.approx(0.85 + 0.8 * 3.15)
    assert m["moe/layer_0/load_max_over_mean"] == pytest.approx(4.0)
    assert m["moe/layer_1/load_p95"] == pytest.approx(1.0)
    assert m["moe/all_layers/load_max_over_mean"] == pytest.approx(4.0)
    # Pooled [0, .05, .1, .85, 4, 1, 1, 1, 1, 1]: the median sits between two 1.0s.
    assert m["moe/all_layers/load_p50"] == pytest.approx(1.0)
    assert m["moe/all_layers/dropped_fraction"] == pytest.approx(0.125)


def test_dropless_writes_no_dropped_fraction():
    m = moe_layer_metrics([torch.tensor([1.0, 3.0])], [0.0], drops=False)
    assert not [k for k in m if "dropped" in k]
    # A layer that routed nothing: every expert starved.
    assert moe_layer_metrics([torch.zeros(4)], [0.0])["moe/layer_0/starved_experts"] == 4
