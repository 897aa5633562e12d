"""Resuming reproduces an uninterrupted run exactly (CPU, fp32): 6 steps
straight against a 6-step run killed after its step-3 checkpoint and resumed
with a bare --resume through the command line."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from moe_train.config import load_config
from moe_train.parallel.dist_checkpoint import read_state
from moe_train.train.trainer import train

# Input jitter makes every step draw from the torch RNG, so a resume that did
# not restore the RNG state would differ. eval_every=4 puts an evaluation
# between the checkpoint and the end, and one at the end.
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.ffn_hidden_size=64", "moe.num_experts=4", "moe.top_k=2",
        "moe.jitter_eps=0.1", "moe.z_loss_coef=0.001", "train.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1",
        "train.eval_every=4", "train.eval_iters=1", "train.save_every=3",
        "train.heatmap_every=0", "train.warmup_steps=2", "train.lr=0.01"]
KEYS = ("loss/train", "train/lm_loss", "train/aux_loss", "train/grad_norm", "train/lr", "loss/val")

# The same thread count in this process (conftest) and the child, so that
# float reductions split the same way.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def run_until_killed_in_save(run_dir, step, overrides):
    """Start a 6-step run in a child that sleeps inside the save of ``step``
    (the checkpoint test hook) and SIGKILL it there: an interruption at a
    moment the run did not choose, after it logged steps beyond its last
    complete checkpoint."""
    env = dict(CHILD_ENV, MOE_TRAIN_TEST_SAVE_DELAY=f"{step}:120")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_train.train", "--run-dir", run_dir] +
        [a for o in overrides for a in ("--set", o)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    # The model's DCP metadata is written last: the model part of the save is done.
    marker = os.path.join(run_dir, "checkpoints", f".tmp-step_{step}", "model", ".metadata")
    deadline = time.time() + 240
    try:
        while not os.path.exists(marker):
            assert proc.poll() is None, "the run ended before the save it should die in"
            assert time.time() < deadline, "the run never reached the save"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_resume_matches_uninterrupted_run(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    cfg = load_config(None, TINY + ["train.max_steps=6"])
    cfg.train.run_dir = straight
    train(cfg)

    run_until_killed_in_save(split, 6, TINY + ["train.max_steps=6"])
    with open(os.path.join(split, "checkpoints", "latest")) as fh:
        assert fh.read().strip() == "step_3"
    # Bare --resume: the latest checkpoint of the run dir, with the config
    # stored beside it.
    proc = subprocess.run(
        [sys.executable, "-m", "moe_train.train", "--run-dir", split, "--resume"],
        capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step_3" in proc.stdout

    want, got = records(straight), records(split)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(want, got):
        for key in KEYS:
            if key in a:
                assert torch.equal(torch.tensor(a[key], dtype=torch.float64),
                                   torch.tensor(b[key], dtype=torch.float64)), (a["step"], key)

    # The final weights are the same too.
    a = read_state(os.path.join(straight, "checkpoints", "step_6", "model"))
    b = read_state(os.path.join(split, "checkpoints", "step_6", "model"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
