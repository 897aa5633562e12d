"""Training on real-data inputs: a dataset written by megatron-core's own
builder trains as it is; a blend (with data.document_mask) resumes exactly and logs loss/val/<name>
per part; model.vocab_size is inferred from the data and rounded; a too
small one is refused with one line."""
import json
import os

import numpy as np
import pytest

from moe_train.cli import main as cli_main
from moe_train.config import ConfigError, load_config
from moe_train.data import prepare
from moe_train.train.trainer import train

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.ffn_hidden_size=64", "moe.num_experts=4", "moe.top_k=2", "train.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1",
        "train.eval_iters=1", "train.heatmap_every=0", "train.warmup_steps=1",
        "model.max_seq_len=32"]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def text_corpus(path, seed, words, n_docs=40):
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for _ in range(n_docs):
            doc = " ".join(rng.choice(words, size=int(rng.integers(20, 60))))
            fh.write(json.dumps({"text": doc}) + "\n")
    return str(path)


def test_megatron_core_builder_dataset_trains(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "mg_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for n in rng.integers(30, 120, size=60):
        builder.add_item(torch.from_numpy(rng.integers(0, 500, size=int(n)).astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    cfg = load_config(None, TINY + [f"data.dataset={prefix}", "train.max_steps=2",
                                    "train.eval_every=2", "train.save_every=0"])
    cfg.train.run_dir = str(tmp_path / "run")
    summary = train(cfg)
    assert summary["steps"] == 2 and np.isfinite(summary["val_loss"])
    saved = load_config(os.path.join(cfg.train.run_dir, "config.yaml"))
    # Largest id 499 -> vocabulary 500 -> rounded up to 512.
    assert saved.model.vocab_size == 512
    # Megatron's files record no end-of-document id: the mask cannot be built.
    cfg.data.document_mask = True
    with pytest.raises(ConfigError, match=r"data\.document_mask needs end-of-document ids"):
        train(cfg)


def test_blend_resumes_exactly_and_logs_each_part(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    prepare([text_corpus(tmp_path / "a.jsonl", 0, ["alpha", "beta", "gamma", "delta"])],
            str(a), "byte", 0.2)
    prepare([text_corpus(tmp_path / "b.jsonl", 1, ["one", "two", "three", "four", "five"])],
            str(b), "byte", 0.2)
    blend = f"data.blend=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1, name: numbers}}]"
    # document_mask on: the window's documents attend apart (the per-document
    # reference is tests/unit/test_document_mask.py).
    overrides = TINY + [blend, "train.max_steps=4", "train.eval_every=2", "train.save_every=2",
                        "moe.jitter_eps=0.1", "data.document_mask=true"]
    straight = load_config(None, overrides)
    straight.train.run_dir = str(tmp_path / "straight")
    train(straight)
    resumed = load_config(None, overrides)
    resumed.train.run_dir = str(tmp_path / "resumed")
    train(resumed, resume=os.path.join(straight.train.run_dir, "checkpoints", "step_2"))

    want = {r["step"]: r for r in records(straight.train.run_dir)}
    got = {r["step"]: r for r in records(resumed.train.run_dir)}
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        for key in ("loss/train", "train/lm_loss", "train/grad_norm"):
            assert got[step][key] == want[step][key], (step, key)
    for r in (want[2], want[4], got[4]):
        assert {"loss/val", "loss/val/a", "loss/val/numbers"} <= set(r)
        # loss/val is the parts' losses mixed by weight.
        mix = 0.75 * r["loss/val/a"] + 0.25 * r["loss/val/numbers"]
        assert r["loss/val"] == pytest.approx(mix, rel=1e-6)
    assert got[4]["loss/val/numbers"] == want[4]["loss/val/numbers"]
    saved = load_config(os.path.join(straight.train.run_dir, "config.yaml"))
    assert saved.model.vocab_size == 384  # byte 256 + EOD = 257, rounded up to 128s


def test_too_small_vocab_is_one_line(tmp_path, capsys):
    code = cli_main(["train", "--run-dir", str(tmp_path / "r"), "--set", "model.vocab_size=256",
                     "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set",
                     "data.dataset=stdlib", *[x for o in TINY for x in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "model.vocab_size (256) must be >= the tokenizer's vocabulary (257)" in err


def test_bad_data_config_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "corpus.idx").write_bytes(b"MMIDIDX\x00\x00")
    cases = [
        ([f"data.dataset={tmp_path / 'corpus'}"], ["corpus.idx has no", "corpus.bin"]),
        (["data.blend=[{path: stdlib, weight: 1}, {path: shakespeare, weight: -0.5}]"],
         ["data.blend[1].weight (-0.5) must be > 0"]),
        (["data.blend=[{path: stdlib, weight: 0}]"], ["data.blend[0].weight (0.0) must be > 0"]),
        (["data.tokenizer=/no/such/tokenizer.json"], ["data.tokenizer", "not found"]),
    ]
    for sets, words in cases:
        code = cli_main(["train", "--run-dir", str(tmp_path / "r"),
                         *[x for o in TINY + sets for x in ("--set", o)]])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("error:"), (sets, err)
        for w in words:
            assert w in err, (w, err)
