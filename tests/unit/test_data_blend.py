"""Blends and vocabulary inference.

References: a plain-loop implementation of Megatron's blending rule (checked
against megatron-core's C++ helper), the weights themselves for the
proportions, and Megatron's divisible-by rounding done by hand.
"""
import numpy as np
import pytest
import torch

from moe_train.config import ConfigError, load_config
from moe_train.data.blend import Blend, blending_indices, blending_indices_reference
from moe_train.data.dataset import TokenDataset, sample_batch
from moe_train.data.vocab import VOCAB_MULTIPLE, padded_vocab_size, resolve_vocab_size


def ds_of(tmp_path, name, lo, n=4000):
    """A dataset whose ids all lie in [lo, lo + 50): a row tells its source."""
    rng = np.random.default_rng(lo)
    path = tmp_path / f"{name}.bin"
    rng.integers(lo, lo + 50, size=n).astype(np.uint16).tofile(path)
    return TokenDataset(str(path), np.uint16)


def test_blending_indices_match_the_reference_loop():
    for weights in ([0.5, 0.3, 0.2], [1, 1], [0.9, 0.05, 0.05], [3.0]):
        assert np.array_equal(blending_indices(weights, 3000),
                              blending_indices_reference(weights, 3000)), weights


def test_blend_proportions_within_2_percent_over_10k_samples(tmp_path):
    weights = [0.6, 0.3, 0.1]
    parts = [ds_of(tmp_path, n, lo) for n, lo in (("a", 0), ("b", 100), ("c", 200))]
    blend = Blend(["a", "b", "c"], [6, 3, 1], parts)  # unnormalized weights work too
    B, L = 50, 8
    counts = np.zeros(3)
    for step in range(200):  # 200 * 50 = 10k samples
        batch = sample_batch(blend, step, B, L, seed=7)
        counts += np.bincount(batch[:, 0].numpy() // 100, minlength=3)
        # Every row comes whole from one part.
        assert torch.equal(batch // 100, (batch[:, :1] // 100).expand_as(batch))
    share = counts / counts.sum()
    assert np.all(np.abs(share - weights) < 0.02), share
    assert counts.sum() == 10_000


def test_blend_batch_depends_on_seed_and_step_only(tmp_path):
    parts = [ds_of(tmp_path, "a", 0), ds_of(tmp_path, "b", 100)]
    walked = Blend(["a", "b"], [0.7, 0.3], parts)
    seen = [sample_batch(walked, s, 16, 8, seed=3) for s in range(12)]
    # A fresh blend asked for step 9 first (a resume) gives the same batch.
    fresh = Blend(["a", "b"], [0.7, 0.3], parts)
    assert torch.equal(sample_batch(fresh, 9, 16, 8, seed=3), seen[9])
    assert torch.equal(sample_batch(fresh, 2, 16, 8, seed=3), seen[2])
    assert not torch.equal(sample_batch(fresh, 9, 16, 8, seed=4), seen[9])
    assert not torch.equal(seen[0], seen[1])
    # Rows are contiguous windows of their part.
    for row in seen[5]:
        part = parts[int(row[0]) // 100].tokens
        starts = np.nonzero(part[:-8] == int(row[0]))[0]
        assert any(np.array_equal(part[s:s + 9], row.numpy()) for s in starts)


def test_blend_config_refusals():
    base = ["data.blend=[{path: a, weight: 1}, {path: b, weight: 2}]"]
    cfg = load_config(None, base)
    assert [(p.path, p.weight) for p in cfg.data.blend] == [("a", 1.0), ("b", 2.0)]
    with pytest.raises(ConfigError, match=r"data\.blend\[1\]\.weight \(-1\.0\) must be > 0"):
        load_config(None, ["data.blend=[{path: a, weight: 1}, {path: b, weight: -1}]"])
    with pytest.raises(ConfigError, match=r"data\.blend\[0\]\.weight \(0\.0\) must be > 0"):
        load_config(None, ["data.blend=[{path: a, weight: 0}]"])
    with pytest.raises(ConfigError, match=r"data\.blend\[1\]\.name \('a'\) is used twice"):
        load_config(None, ["data.blend=[{path: x/a, weight: 1}, {path: y/a, weight: 1}]"])
    with pytest.raises(ConfigError, match=r"unknown key data\.blend\[0\]\.wieght"):
        load_config(None, ["data.blend=[{path: a, wieght: 1}]"])


def test_vocab_rounded_up_to_a_multiple_of_128():
    assert VOCAB_MULTIPLE == 128
    # ceil(v / 128) * 128 by hand: byte + EOD, GPT-2, already a multiple, tiny.
    for vocab, want in ((257, 384), (50257, 50304), (256, 256), (32000, 32000), (5, 128)):
        assert padded_vocab_size(vocab) == want
    assert resolve_vocab_size(None, 257) == 384
    assert resolve_vocab_size(300, 257) == 300  # a set size is kept as it is
    with pytest.raises(ConfigError, match=r"model\.vocab_size \(256\) must be >= the "
                                          r"tokenizer's vocabulary \(257\)"):
        resolve_vocab_size(256, 257)
