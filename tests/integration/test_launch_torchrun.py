"""torchrun end to end: launch/train.py on 2 ranks of one node, and on two
single-rank "nodes" joined by c10d rendezvous on 127.0.0.1, must reproduce the
losses of a single-process run with the same global batch, and write the same
metrics.jsonl keys."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .launch_common import (config_dir, LOSS_RTOL, REPO, TRAIN, assert_clean_output, free_port,
                            read_metrics, tiny_ep2_config)

STEPS = 6
CONFIG = tiny_ep2_config(STEPS, seed=7, eval_every=3, save_every=3)
NORM_RTOL = 1e-4

# EP=2 over the 2 ranks: the all-to-all runs across "nodes" in the multi-node case.
SINGLE = ["--set", "parallel.expert_parallel_size=1"]  # one process holds every expert


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start(cmd, log_path):
    """Start ``cmd`` in a session of its own (so a timeout can stop all it spawned)."""
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True), log


def finish(proc, log, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started
        proc.wait()
        pytest.fail(f"{proc.args[:3]} ran past {timeout}s")
    finally:
        log.close()


def run(cmd, log_path, timeout: float = 180) -> str:
    """Run ``cmd`` to the end; returns its output (stdout and stderr)."""
    proc, log = start(cmd, log_path)
    rc = finish(proc, log, timeout)
    with open(log_path) as fh:
        output = fh.read()
    assert rc == 0, f"{' '.join(cmd)} exited {rc}:\n{output[-4000:]}"
    return output


def losses(records):
    return [r["loss/train"] for r in records]


def assert_same_run(records, reference):
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # Monitoring does not depend on the launcher: the same keys every step.
    assert [sorted(r) for r in records] == [sorted(r) for r in reference]
    assert losses(records) == pytest.approx(losses(reference), rel=LOSS_RTOL)
    assert [r["train/grad_norm"] for r in records] == \
        pytest.approx([r["train/grad_norm"] for r in reference], rel=NORM_RTOL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return config_dir(tmp_path_factory, "torchrun", CONFIG)


@pytest.fixture(scope="module")
def reference(workdir):
    """A single-process run of the same config and global batch."""
    run_dir = str(workdir / "single")
    run([sys.executable, TRAIN, "--config", str(workdir / "config.yaml"), "--run-dir", run_dir]
        + SINGLE, str(workdir / "single.log"))
    records = read_metrics(run_dir)
    for key in ("loss/train", "train/lm_loss", "train/aux_loss", "train/lr", "train/grad_norm",
                "perf/tokens_per_sec", "perf/tflops", "memory/rss",
                "moe/layer_0/load_max_over_mean", "moe/all_layers/load_p95",
                "moe/layer_0/tokens_per_expert"):
        assert key in records[0], key
    # Dropless: no dropped-fraction series.
    assert not [k for k in records[0] if "dropped" in k]
    assert "loss/val" in records[2]
    return records


def test_torchrun_single_node_matches_single_process(workdir, reference):
    run_dir = str(workdir / "one_node")
    output = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                  TRAIN, "--config", str(workdir / "config.yaml"), "--run-dir", run_dir],
                 str(workdir / "one_node.log"))
    assert_same_run(read_metrics(run_dir), reference)
    # stdout and stderr of both ranks: no megatron-core TE/Apex warnings, and
    # every line of rank 0 once.
    assert_clean_output(output, STEPS)
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{STEPS}"))


def test_torchrun_two_nodes_c10d_matches_single_process(workdir, reference):
    """Two torchrun agents, one rank each, as two nodes would run them
    (--nnodes 2, c10d rendezvous); here both on 127.0.0.1."""
    run_dir = str(workdir / "two_nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--node_rank", str(node_rank), "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "test",
               "--local_addr", "127.0.0.1",
               TRAIN, "--config", str(workdir / "config.yaml"), "--run-dir", run_dir]
        procs.append(start(cmd, str(workdir / f"node{node_rank}.log")))
        time.sleep(0.5)  # node 0 first: it hosts the rendezvous store
    codes = [finish(proc, log, 180) for proc, log in procs]
    for node_rank, rc in enumerate(codes):
        with open(workdir / f"node{node_rank}.log") as fh:
            assert rc == 0, f"node {node_rank} exited {rc}:\n{fh.read()[-4000:]}"
    assert_same_run(read_metrics(run_dir), reference)


def test_help_lists_training_and_launcher_options():
    result = subprocess.run([sys.executable, TRAIN, "--help"], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--config", "--set", "--run-dir", "--resume", "launcher options",
                   "--deepspeed_config", "--deepspeed ", "--local_rank"):
        assert option in result.stdout, option
