"""TensorBoard events and metrics.jsonl carry the documented tags and the
Custom Scalars layout, with values that agree with hand computations."""
import io
import json
import math
import os
import re
import sys

import numpy as np
import pytest

from moe_train.config import load_config
from moe_train.train.flops import model_flops_per_token
from moe_train.train.optim import lr_at
from moe_train.train.trainer import train

B, S, E, K, LAYERS = 4, 32, 4, 2, 2
PEAK = 0.5  # TFLOP/s: a made-up CPU peak, so that perf/mfu is logged
TINY = ["model.hidden_size=32", f"model.num_layers={LAYERS}", "model.num_heads=4",
        "model.ffn_hidden_size=64", f"moe.num_experts={E}", f"moe.top_k={K}",
        "moe.z_loss_coef=0.001", f"train.seq_len={S}",
        f"train.global_batch_size={B}", "train.micro_batch_size=2", "train.log_every=1",
        "train.eval_every=2", "train.eval_iters=1", "train.heatmap_every=2",
        "train.save_every=0", "train.warmup_steps=2"]
DROPS = TINY + ["moe.capacity_factor=1.0", "train.max_steps=4", f"train.peak_tflops={PEAK}"]
DROPLESS = TINY + ["moe.capacity_factor=null", "train.max_steps=2", "train.heatmap_every=0"]

LOAD = ("load_p50", "load_p95", "load_max_over_mean", "starved_experts")
SCALARS = ["loss/train", "train/lm_loss", "train/aux_loss", "train/load_balancing",
           "train/z_loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec", "perf/tflops",
           "perf/mfu", "memory/rss", "loss/val"] + [
    f"moe/{where}/{name}" for where in [f"layer_{i}" for i in range(LAYERS)] + ["all_layers"]
    for name in LOAD + ("dropped_fraction",)]


def _run(tmp_path_factory, name, overrides):
    run_dir = str(tmp_path_factory.mktemp(name))
    cfg = load_config(None, overrides)
    cfg.train.run_dir = run_dir
    train(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    return run_dir, cfg, records


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _run(tmp_path_factory, "metrics", DROPS)


@pytest.fixture(scope="module")
def dropless(tmp_path_factory):
    return _run(tmp_path_factory, "dropless", DROPLESS)


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _layout(acc):
    """{category: {chart title: [tag regexes]}} of the Custom Scalars layout."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = acc.Tensors("custom_scalars__config__")
    assert events, "no custom scalars layout in the event file"
    layout = layout_pb2.Layout.FromString(events[-1].tensor_proto.string_val[0])
    return {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}


def _percentile(values, q):
    """numpy's default ('linear') percentile, written out."""
    s = sorted(values)
    pos = q / 100 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def test_tensorboard_tags_and_layout(run):
    run_dir, _, records = run
    acc = _events(run_dir)
    tags = acc.Tags()
    for tag in SCALARS:
        assert tag in tags["scalars"], tag
    # The Time Series page sorts groups by name: the loss group comes first.
    assert sorted({t.split("/")[0] for t in tags["scalars"]})[0] == "loss"
    for i in range(LAYERS):
        assert f"moe/layer_{i}/tokens_per_expert" in tags["histograms"]
    assert "moe/load_heatmap" in tags["images"]
    images = acc.Images("moe/load_heatmap")
    assert [e.step for e in images] == [2, 4]
    assert images[0].width >= 600
    assert [e.step for e in acc.Scalars("loss/train")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("loss/val")] == [2, 4]
    # TensorBoard holds the same numbers as the jsonl (float32 in the events).
    for event, record in zip(acc.Scalars("loss/train"), records):
        assert event.value == pytest.approx(record["loss/train"], rel=1e-6)

    layout = _layout(acc)
    assert list(layout) == ["loss", "expert load", "optimizer and throughput"]
    charts = {title: regexes for cat in layout.values() for title, regexes in cat.items()}

    def drawn(title):
        return sorted(t for t in tags["scalars"] if any(re.search(r, t) for r in charts[title]))

    assert drawn("train and validation loss") == ["loss/train", "loss/val"]
    assert drawn("load max / mean, every layer") == [
        f"moe/layer_{i}/load_max_over_mean" for i in range(LAYERS)]
    assert drawn("dropped fraction, every layer") == [
        f"moe/layer_{i}/dropped_fraction" for i in range(LAYERS)]
    assert drawn("learning rate") == ["train/lr"]
    assert drawn("gradient norm (before clipping)") == ["train/grad_norm"]
    assert drawn("tokens/s (all ranks)") == ["perf/tokens_per_sec"]
    assert drawn("MFU and TFLOP/s per device") == ["perf/mfu", "perf/tflops"]


def test_dropless_run_has_no_dropped_fraction(dropless):
    run_dir, _, records = dropless
    acc = _events(run_dir)
    assert not [t for t in acc.Tags()["scalars"] if "dropped" in t]
    assert not [k for r in records for k in r if "dropped" in k]
    assert "dropped fraction, every layer" not in _layout(acc)["expert load"]
    # No peak is known for a CPU without train.peak_tflops: no MFU.
    assert "perf/mfu" not in records[0] and records[0]["perf/tflops"] > 0
    assert "moe/all_layers/load_p95" in records[0]


def test_jsonl_records_and_their_values(run):
    run_dir, cfg, records = run
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # The run's own config: model.vocab_size resolved from the data.
    flops_per_token = model_flops_per_token(load_config(os.path.join(run_dir, "config.yaml")))
    for r in records:
        for tag in SCALARS:
            if tag != "loss/val":
                assert tag in r, (r["step"], tag)
        assert ("loss/val" in r) is (r["step"] % 2 == 0)
        assert r["loss/train"] == pytest.approx(r["train/lm_loss"] + r["train/aux_loss"])
        assert r["train/aux_loss"] == pytest.approx(r["train/load_balancing"] + r["train/z_loss"])
        assert r["train/lr"] == pytest.approx(lr_at(r["step"] - 1, cfg.train))
        assert r["train/grad_norm"] > 0 and r["perf/tokens_per_sec"] > 0
        # One process: TFLOP/s = FLOPs per token * tokens/s; MFU = that / peak.
        tflops = flops_per_token * r["perf/tokens_per_sec"] / 1e12
        assert r["perf/tflops"] == pytest.approx(tflops, rel=1e-9)
        assert r["perf/mfu"] == pytest.approx(tflops / PEAK, rel=1e-9)
        assert 0.01 < r["memory/rss"] < 64  # GiB
        pooled = []
        for i in range(LAYERS):
            counts = np.array(r[f"moe/layer_{i}/tokens_per_expert"], dtype=float)
            # Capacity per expert and micro-batch: ceil(1.0 * 2*32*2 / 4) = 32 slots.
            slots = math.ceil(1.0 * 2 * S * K / E)
            kept = counts.sum()
            assert kept <= 2 * E * slots and np.all(counts <= 2 * slots)
            # Every (token, choice) is either kept or dropped.
            dropped = r[f"moe/layer_{i}/dropped_fraction"]
            assert kept == pytest.approx(B * S * K * (1 - dropped), abs=1e-6)
            load = list(counts / counts.mean())
            pooled += load
            layer = f"moe/layer_{i}/"
            assert r[layer + "load_max_over_mean"] == pytest.approx(counts.max() / counts.mean())
            assert r[layer + "load_p50"] == pytest.approx(_percentile(load, 50))
            assert r[layer + "load_p95"] == pytest.approx(_percentile(load, 95))
            assert r[layer + "starved_experts"] == sum(c < 0.1 * counts.mean() for c in counts)
        assert r["moe/all_layers/load_p95"] == pytest.approx(_percentile(pooled, 95))
        assert r["moe/all_layers/load_max_over_mean"] == pytest.approx(max(pooled))
        assert r["moe/all_layers/starved_experts"] == sum(
            r[f"moe/layer_{i}/starved_experts"] for i in range(LAYERS))
        assert r["moe/all_layers/dropped_fraction"] == pytest.approx(
            np.mean([r[f"moe/layer_{i}/dropped_fraction"] for i in range(LAYERS)]))
    # Near-uniform logits over the model's vocabulary: byte 257 ids rounded up to 384.
    assert records[0]["train/lm_loss"] == pytest.approx(math.log(384), abs=0.1)


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so the trainer draws its tqdm bar."""

    def isatty(self):
        return True


def test_progress_bar_shows_the_loss_from_step_1(tmp_path, monkeypatch):
    from moe_train.train.metrics import Progress

    shown = {}
    update = Progress.update

    def spy(self, step, loss, tokens_per_sec, logged):
        update(self, step, loss, tokens_per_sec, logged)
        shown[step] = self.bar.postfix  # what the bar prints after this step

    monkeypatch.setattr(sys, "stderr", _Terminal())
    monkeypatch.setattr(Progress, "update", spy)
    cfg = load_config(None, DROPLESS + ["train.log_every=10", "train.eval_every=0"])
    cfg.train.run_dir = str(tmp_path)
    train(cfg)
    # Step 1 is not a logged step, yet the bar carries its loss (4 significant digits).
    assert re.search(r"loss=\d\.\d{3}(,|$)", shown[1]), shown
