"""Non-finite guards (issue 12 part 4): a non-finite step is skipped, too
many in a row stop the run with exit 3 and one line, non-finite weights are
never checkpointed (so keep_last keeps a finite one), export refuses a
non-finite model, metrics.jsonl stays strict JSON."""
import json
import os
import subprocess
import sys

import pytest
import torch

from moe_train import cli
from moe_train.config import load_config
from moe_train.model.transformer import build_model
from moe_train.parallel.dist_checkpoint import read_state
from moe_train.train import checkpoint as ckpt
from moe_train.train import trainer as trainer_mod
from moe_train.train.nonfinite import DivergedError
from moe_train.train.optim import build_optimizer, build_scheduler

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=4",
        "model.ffn_hidden_size=64", "moe.num_experts=4", "moe.top_k=2",
        "train.seq_len=16", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.log_every=1", "train.eval_every=0", "train.heatmap_every=0",
        "train.save_every=1", "train.keep_last=1", "train.max_steps=20"]


def strict_records(path):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")

    with open(path) as fh:
        return [json.loads(line, parse_constant=refuse) for line in fh]


def all_finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v)
               and v.is_floating_point())


def test_huge_lr_stops_with_exit_3_and_keeps_finite_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "moe_train.train", "--run-dir", str(run_dir)]
        + [a for o in TINY + ["train.lr=1e6", "train.max_skipped_steps=3"] for a in ("--set", o)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: training diverged: step "), lines
    assert "loss" in lines[0] and "train.max_skipped_steps=3" in lines[0]

    records = strict_records(run_dir / "metrics.jsonl")
    skipped = [r["step"] for r in records if r["train/skipped_steps"] == 1]
    assert len(skipped) == 3 and skipped[-1] == records[-1]["step"] < 20
    assert any(None in (r["train/grad_norm"], r["loss/train"]) for r in records)
    # keep_last=1: the one checkpoint left is finite and loads.
    latest = ckpt.find_checkpoint(str(run_dir))
    assert all_finite(read_state(os.path.join(latest, "model")))
    ckpt.load_model(str(run_dir))


def test_nonfinite_weights_are_never_checkpointed(tmp_path, monkeypatch, capsys):
    original = trainer_mod.Trainer._train_step

    def poison_step_3(self, step):
        result = original(self, step)
        if step == 2:  # 0-based: the update of step 3 "produces" a NaN weight
            norm = next(p for n, p in self.model.named_parameters() if "norm" in n)
            with torch.no_grad():
                norm.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(trainer_mod.Trainer, "_train_step", poison_step_3)
    cfg = load_config(None, TINY)
    cfg.train.run_dir = str(tmp_path)
    with pytest.raises(DivergedError, match="step 8 had loss nan"):
        trainer_mod.train(cfg)
    out = capsys.readouterr().out
    assert all(f"step {s}: weights are not finite; no checkpoint written" in out
               for s in range(3, 8))
    # Steps 4..8 skipped, 3..7 never saved: keep_last=1 still holds step 2, finite.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_2"]
    assert all_finite(read_state(str(tmp_path / "checkpoints" / "step_2" / "model")))


def test_export_refuses_a_nonfinite_model(tmp_path, capsys):
    cfg = load_config(None, TINY + ["model.vocab_size=260"])  # no dataset to infer it from
    model = build_model(cfg.model, cfg.moe)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    opt = build_optimizer(model, cfg.train)
    # Written with the file-level protocol directly: training never would.
    path = ckpt.save_checkpoint(str(tmp_path / "run"), 1, model, opt,
                                build_scheduler(opt, cfg.train), cfg, keep_last=1)
    rc = cli.main(["export", "--checkpoint", path, "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "non-finite weights" in err and path in err, err
    assert not (tmp_path / "hf").exists()
