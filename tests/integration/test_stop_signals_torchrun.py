"""A stop signal under torchrun with 2 ranks (EP=2): SIGTERM sent to rank 1
alone stops both ranks at the same step boundary, after one checkpoint of that
step that both ranks wrote, and rank 0 prints the final line. Schedulers
signal whichever processes they like; the ranks must agree by themselves."""
import os
import signal
import subprocess
import sys
import time

import psutil
import yaml

from moe_train.train.checkpoint import find_checkpoint
from moe_train.train.stop_signals import STEP_PAUSE_ENV

from .launch_common import TRAIN, free_port, read_metrics, tiny_ep2_config

STEPS = 6


def _rank_process(launcher: psutil.Process, rank: int) -> psutil.Process:
    for child in launcher.children(recursive=True):
        try:
            if TRAIN in child.cmdline() and child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def test_sigterm_to_one_rank_stops_both_after_a_checkpoint(tmp_path):
    cfg = tiny_ep2_config(STEPS, seed=3, eval_every=0, save_every=0)
    with open(tmp_path / "config.yaml", "w") as fh:
        yaml.safe_dump(cfg, fh)
    run_dir = str(tmp_path / "run")
    # Every rank waits after step 2 until it is signalled or 10 s pass: rank 1
    # gets the signal there, rank 0 never does and goes on into step 3, where
    # the ranks' one all-reduce of their flags stops both.
    env = dict(os.environ, OMP_NUM_THREADS="1", **{STEP_PAUSE_ENV: "2:10"})
    log = open(tmp_path / "out.log", "w+")  # closed by pytest's tmp_path cleanup
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         TRAIN, "--config", str(tmp_path / "config.yaml"), "--run-dir", run_dir],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 300
        while not (os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
                   and any(r["step"] == 2 for r in read_metrics(run_dir))):
            assert proc.poll() is None, open(tmp_path / "out.log").read()[-3000:]
            assert time.time() < deadline, "the run never reached step 2"
            time.sleep(0.05)
        rank1 = _rank_process(psutil.Process(proc.pid), 1)
        assert rank1 is not None
        rank1.send_signal(signal.SIGTERM)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    output = log.read()
    ckpt = os.path.join(run_dir, "checkpoints", "step_3")
    assert find_checkpoint(run_dir) == ckpt, output[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert (f"stopped by SIGTERM at step 3; checkpoint saved ({ckpt}); continue with --resume"
            in output), output[-3000:]
    assert "Traceback (most recent call last)" not in output.split("stopped by SIGTERM")[0]
