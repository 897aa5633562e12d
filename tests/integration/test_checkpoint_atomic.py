"""Checkpoints are atomic: a process SIGKILLed in the middle of a save leaves
the previous checkpoint loadable and ``latest`` pointing at it; the next run
resumes from it and cleans up. Also keep_last and load_model."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from moe_train.config import load_config
from moe_train.parallel.dist_checkpoint import model_state, read_state
from moe_train.parallel.topology import Topology
from moe_train.train.checkpoint import SAVE_DELAY_ENV, find_checkpoint, load_model
from moe_train.train.trainer import train

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.ffn_hidden_size=64", "moe.num_experts=4", "moe.top_k=2",
        "train.seq_len=32", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.log_every=1", "train.eval_every=0", "train.heatmap_every=0",
        "train.max_steps=4", "train.save_every=2"]
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def latest(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest")) as fh:
        return fh.read().strip()


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    ckpts = os.path.join(run_dir, "checkpoints")
    env = dict(CHILD_ENV, **{SAVE_DELAY_ENV: "4:120"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_train.train", "--run-dir", run_dir]
        + [a for o in TINY for a in ("--set", o)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # The hook sleeps after model/ (a DCP checkpoint; .metadata comes last)
    # is in the temporary directory: the save of step 4 is half done when the
    # process dies.
    marker = os.path.join(ckpts, ".tmp-step_4", "model", ".metadata")
    deadline = time.time() + 240
    try:
        while not os.path.exists(marker):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the run never reached the save of step 4"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert latest(run_dir) == "step_2"
    assert not os.path.exists(os.path.join(ckpts, "step_4"))
    # The previous checkpoint still loads, with the weights it was saved with.
    model, cfg = load_model(run_dir)
    assert not model.training
    saved = read_state(os.path.join(ckpts, "step_2", "model"))
    # Keyed as checkpoints are: the stacked experts one entry per expert.
    assert all(torch.equal(v, saved[k]) for k, v in model_state(model, Topology()).items())
    ids = torch.randint(0, cfg.model.vocab_size, (2, 8))
    with torch.no_grad():
        assert model(ids).logits.shape == (2, 8, cfg.model.vocab_size)

    # Resuming continues from step 2, finishes, and removes the half save.
    cfg = load_config(None, TINY)
    cfg.train.run_dir = run_dir
    summary = train(cfg, resume=run_dir)
    assert summary["start_step"] == 2 and summary["steps"] == 4
    assert latest(run_dir) == "step_4"
    assert sorted(os.listdir(ckpts)) == ["latest", "step_2", "step_4"]
    # Steps 3 and 4, logged by the killed run, were logged again, not twice.
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        assert [json.loads(line)["step"] for line in fh] == [1, 2, 3, 4]


def test_keep_last_and_load_model_from_a_step_dir(tmp_path):
    cfg = load_config(None, TINY + ["train.save_every=1", "train.keep_last=2"])
    cfg.train.run_dir = str(tmp_path)
    train(cfg)
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", "step_3", "step_4"]
    assert latest(tmp_path) == "step_4"
    from_step, _ = load_model(str(ckpts / "step_3"))
    from_run, _ = load_model(str(tmp_path))
    saved3 = read_state(str(ckpts / "step_3" / "model"))
    saved4 = read_state(str(ckpts / "step_4" / "model"))
    assert all(torch.equal(v, saved3[k]) for k, v in model_state(from_step, Topology()).items())
    assert all(torch.equal(v, saved4[k]) for k, v in model_state(from_run, Topology()).items())


def test_pointer_fallback_and_fresh_start_over(tmp_path):
    cfg = load_config(None, TINY + ["train.save_every=1"])
    cfg.train.run_dir = str(tmp_path)
    train(cfg)
    # Killed between the rename of step_4 and the write of `latest`: the
    # newest complete step directory is the checkpoint.
    os.remove(tmp_path / "checkpoints" / "latest")
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoints" / "step_4")

    # A fresh run with overwrite in the same directory starts over: nothing
    # of the old run survives to mix with the new one.
    again = load_config(None, TINY + ["train.save_every=1", "train.max_steps=2"])
    again.train.run_dir = str(tmp_path)
    train(again, overwrite=True)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_1", "step_2"]
    with open(tmp_path / "metrics.jsonl") as fh:
        assert [json.loads(line)["step"] for line in fh] == [1, 2]
