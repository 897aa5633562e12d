"""Preemption-safe stops (issue 12 part 3), with real signals sent to a real
training process: SIGTERM or SIGINT mid-run saves the interrupted step,
prints one final line, exits 128 + signal number without a traceback, and
--resume then reproduces the losses of an uninterrupted run exactly; a second
signal during that save leaves the previous checkpoint the latest and intact."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from moe_train.config import load_config
from moe_train.parallel.dist_checkpoint import model_state, read_state
from moe_train.parallel.topology import Topology
from moe_train.train.checkpoint import SAVE_DELAY_ENV, find_checkpoint, load_model
from moe_train.train.stop_signals import STEP_PAUSE_ENV
from moe_train.train.trainer import train

# Jitter draws from the torch RNG every step: a resume that lost the RNG
# state would not reproduce the losses.
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=4",
        "model.ffn_hidden_size=64", "moe.num_experts=4", "moe.top_k=2", "moe.jitter_eps=0.1",
        "train.seq_len=16", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.log_every=1", "train.eval_every=0", "train.heatmap_every=0",
        "train.warmup_steps=2", "train.lr=0.01", "train.max_steps=5", "train.save_every=0"]
KEYS = ("loss/train", "train/lm_loss", "train/aux_loss", "train/grad_norm", "train/lr")
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the same float reductions as this process


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def logged(run_dir, step):
    try:
        return any(r["step"] == step for r in records(run_dir))
    except (OSError, ValueError):
        return False


def wait_for(proc, ready, what, timeout=240):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.time() < deadline, f"the run never reached {what}"
        time.sleep(0.05)


def start(run_dir, overrides, env):
    return subprocess.Popen(
        [sys.executable, "-m", "moe_train.train", "--run-dir", run_dir]
        + [a for o in overrides for a in ("--set", o)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(CHILD_ENV, **env))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("straight"))
    cfg = load_config(None, TINY)
    cfg.train.run_dir = run_dir
    train(cfg)
    return run_dir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_interrupted_step_and_resume_is_exact(sig, straight, tmp_path):
    run_dir = str(tmp_path / "run")
    # The hook holds the run after step 2 until the signal lands, so the
    # signal arrives mid-run at a known place; the run stops after step 3.
    proc = start(run_dir, TINY, {STEP_PAUSE_ENV: "2:120"})
    wait_for(proc, lambda: logged(run_dir, 2), "step 2")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    ckpt = os.path.join(run_dir, "checkpoints", "step_3")
    assert out.strip().splitlines()[-1] == (
        f"stopped by {sig.name} at step 3; checkpoint saved ({ckpt}); continue with --resume")
    assert find_checkpoint(run_dir) == ckpt
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]

    cfg = load_config(None, TINY)
    cfg.train.run_dir = run_dir
    summary = train(cfg, resume=run_dir)
    assert summary["start_step"] == 3 and summary["steps"] == 5 and not summary["stopped_by"]
    want, got = records(straight), records(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(want, got):
        for key in KEYS:
            assert a[key] == b[key], (a["step"], key)
    final = os.path.join("checkpoints", "step_5", "model")
    a, b = read_state(os.path.join(straight, final)), read_state(os.path.join(run_dir, final))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_signal_during_the_save_corrupts_nothing(tmp_path):
    run_dir = str(tmp_path / "run")
    ckpts = os.path.join(run_dir, "checkpoints")
    overrides = TINY + ["train.max_steps=6", "train.save_every=2"]
    # Signalled after step 3, the run stops after step 4, and its save of
    # step 4 sleeps (test hook) once model/ is written: signal it again there.
    proc = start(run_dir, overrides, {STEP_PAUSE_ENV: "3:120", SAVE_DELAY_ENV: "4:120"})
    wait_for(proc, lambda: logged(run_dir, 3), "step 3")
    proc.send_signal(signal.SIGTERM)
    marker = os.path.join(ckpts, ".tmp-step_4", "model", ".metadata")
    wait_for(proc, lambda: os.path.exists(marker), "the save of step 4")
    proc.send_signal(signal.SIGTERM)
    start_wait = time.time()
    out, err = proc.communicate(timeout=60)
    assert time.time() - start_wait < 30  # at once, not after the 120 s save delay
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "received again" in err, err

    assert find_checkpoint(run_dir) == os.path.join(ckpts, "step_2")
    assert not os.path.exists(os.path.join(ckpts, "step_4"))
    model, _ = load_model(run_dir)
    saved = read_state(os.path.join(ckpts, "step_2", "model"))
    assert all(torch.equal(v, saved[k]) for k, v in model_state(model, Topology()).items())
    # The run continues from step 2 and clears the half-written save.
    cfg = load_config(None, overrides)
    cfg.train.run_dir = run_dir
    assert train(cfg, resume=run_dir)["steps"] == 6
    assert sorted(os.listdir(ckpts)) == ["latest", "step_2", "step_4", "step_6"]
