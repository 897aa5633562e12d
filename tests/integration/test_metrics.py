"""TensorBoard events and metrics.jsonl carry the documented tags, with values
that agree with hand computations; the load heatmap's colours follow its scale."""
import json
import math
import os

import numpy as np
import pytest

from moe_train.config import load_config
from moe_train.train.heatmap import load_heatmap, normalised_load
from moe_train.train.optim import lr_at
from moe_train.train.trainer import train

B, S, E, K, LAYERS = 4, 32, 4, 2, 2
TINY = ["model.hidden_size=32", f"model.num_layers={LAYERS}", "model.num_heads=4",
        "model.ffn_hidden_size=64", f"moe.num_experts={E}", f"moe.top_k={K}",
        "moe.z_loss_coef=0.001", "moe.capacity_factor=1.0", f"train.seq_len={S}",
        f"train.global_batch_size={B}", "train.micro_batch_size=2", "train.log_every=1",
        "train.eval_every=2", "train.eval_iters=1", "train.heatmap_every=2",
        "train.save_every=0", "train.max_steps=4", "train.warmup_steps=2"]

SCALARS = ["train/loss", "train/lm_loss", "train/aux_loss", "train/load_balancing",
           "train/z_loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "val/loss"] + [
    f"moe/layer_{i}/{name}" for i in range(LAYERS)
    for name in ("dropped_fraction", "load_max_over_mean")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("metrics"))
    cfg = load_config(None, TINY)
    cfg.train.run_dir = run_dir
    train(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    return run_dir, cfg, records


def test_tensorboard_tags(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, records = run
    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in SCALARS:
        assert tag in tags["scalars"], tag
    for i in range(LAYERS):
        assert f"moe/layer_{i}/tokens_per_expert" in tags["histograms"]
    assert "moe/load_heatmap" in tags["images"]
    assert [e.step for e in acc.Images("moe/load_heatmap")] == [2, 4]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]
    # TensorBoard holds the same numbers as the jsonl (float32 in the events).
    for event, record in zip(acc.Scalars("train/loss"), records):
        assert event.value == pytest.approx(record["train/loss"], rel=1e-6)


def test_jsonl_records_and_their_values(run):
    _, cfg, records = run
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for tag in SCALARS:
            if tag != "val/loss":
                assert tag in r, (r["step"], tag)
        assert ("val/loss" in r) is (r["step"] % 2 == 0)
        assert r["train/loss"] == pytest.approx(r["train/lm_loss"] + r["train/aux_loss"])
        assert r["train/aux_loss"] == pytest.approx(r["train/load_balancing"] + r["train/z_loss"])
        assert r["train/lr"] == pytest.approx(lr_at(r["step"] - 1, cfg.train))
        assert r["train/grad_norm"] > 0 and r["train/tokens_per_sec"] > 0
        for i in range(LAYERS):
            counts = np.array(r[f"moe/layer_{i}/tokens_per_expert"], dtype=float)
            # Capacity per expert and micro-batch: ceil(1.0 * 2*32*2 / 4) = 32 slots.
            slots = math.ceil(1.0 * 2 * S * K / E)
            kept = counts.sum()
            assert kept <= 2 * E * slots and np.all(counts <= 2 * slots)
            # Every (token, choice) is either kept or dropped.
            dropped = r[f"moe/layer_{i}/dropped_fraction"]
            assert kept == pytest.approx(B * S * K * (1 - dropped), abs=1e-6)
            assert r[f"moe/layer_{i}/load_max_over_mean"] == pytest.approx(
                counts.max() / counts.mean())
    # Near-uniform logits over the model's vocabulary: byte 257 ids rounded up to 384.
    assert records[0]["train/lm_loss"] == pytest.approx(math.log(384), abs=0.1)


def test_heatmap_colours_follow_the_fixed_scale():
    counts = [np.array([10, 10, 10, 10]),  # balanced: every cell at 1.0
              np.array([0, 0, 0, 40])]     # one expert takes all: 0 and 4 (clipped to 2)
    np.testing.assert_allclose(normalised_load(counts), [[1, 1, 1, 1], [0, 0, 0, 4]])
    img = load_heatmap(counts, cell=3)
    assert img.shape == (2 * 3, 4 * 3, 3) and img.dtype == np.uint8
    assert (img[:3, :, :] == [33, 145, 140]).all()   # the "balanced" colour
    assert (img[3:, :9, :] == [68, 1, 84]).all()     # the "empty" colour
    assert (img[3:, 9:, :] == [253, 231, 37]).all()  # the "2x mean or more" colour
