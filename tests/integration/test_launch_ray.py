"""Ray end to end: ``ray job submit ... -- python launch/ray_train.py`` against
a Ray head started on 127.0.0.1 for this module.

(a) a 2-worker job reproduces the losses of a single-process run with the
same global batch and writes the same metrics.jsonl keys;
(b) a worker killed partway (the FAULT_ENV hook of moe_train.launchers.ray)
makes Ray restart the worker group, which resumes from the latest checkpoint:
the job still finishes every step, the resume point is within one checkpoint
interval of the kill, and the whole loss curve is still the single-process one.
(c) a Ray instance started by launch/ray_train.py itself (no cluster) trains
and prints each rank-0 line once, without Ray's PlacementGroupCleaner retries.
Bad input, and a relative run directory inside a Ray job, are refused before
Ray starts.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from .launch_common import (config_dir, LOSS_RTOL, REPO, assert_clean_output, console_lines,
                            free_port, read_metrics, tiny_ep2_config)

pytest.importorskip("ray")

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
STEPS, SAVE_EVERY, FAULT_STEP = 8, 3, 4
CONFIG = tiny_ep2_config(STEPS, seed=7, eval_every=4, save_every=SAVE_EVERY)


# A Ray instance on loopback only (see docs/launching.md).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
PORT_OPTIONS = ("port", "dashboard-port", "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port", "ray-client-server-port", "runtime-env-agent-port",
                "metrics-export-port", "node-manager-port", "object-manager-port")


def env() -> dict:
    return dict(os.environ, **RAY_ENV)


def _session_pids(sid: int):
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    pids.append(int(name))
            except OSError:
                continue
    return pids


def _stop_session(proc) -> None:
    """Stop the Ray head this module started: SIGTERM to ``ray start --block``
    (it shuts its processes down), then SIGKILL whatever is left in the
    session it was started in. Never ``ray stop``, which would stop every Ray
    instance on the machine."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``ray start --head`` on 127.0.0.1 with ports of its own; yields the
    dashboard (job submission) address."""
    root = tmp_path_factory.mktemp("ray_head")
    # Ray puts unix sockets under its temp dir: keep the path short (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="moe-ray-", dir="/tmp")
    ports = {name: free_port() for name in PORT_OPTIONS}
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--num-cpus=4", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"] + [f"--{name}={port}" for name, port in ports.items()]
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(address + "/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"ray head did not start:\n{(root / 'head.log').read_text()}")
                time.sleep(0.5)
        yield address
    finally:
        _stop_session(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return config_dir(tmp_path_factory, "ray_runs", CONFIG)


@pytest.fixture(scope="module")
def reference(workdir):
    """A single-process run (plain launch/train.py) of the same config."""
    run_dir = str(workdir / "single")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config",
         str(workdir / "config.yaml"), "--run-dir", run_dir,
         "--set", "parallel.expert_parallel_size=1"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return read_metrics(run_dir)


def submit(address, workdir, run_dir, extra_env=None, max_failures=0):
    """``ray job submit`` of launch/ray_train.py with 2 workers; returns
    (exit code, the job's output: the client's and the job's stdout and stderr)."""
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", "."]
    if extra_env:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": extra_env})]
    cmd += ["--", sys.executable, "launch/ray_train.py", "--config", str(workdir / "config.yaml"),
            "--num-workers", "2", "--run-dir", run_dir, "--max-failures", str(max_failures)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the submit client this test started
        output, _ = proc.communicate()
        pytest.fail(f"ray job submit ran past 240s:\n{output[-4000:]}")
    return proc.returncode, output


def assert_matches(records, reference):
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [sorted(r) for r in records] == [sorted(r) for r in reference]
    assert [r["loss/train"] for r in records] == \
        pytest.approx([r["loss/train"] for r in reference], rel=LOSS_RTOL)


def test_ray_job_submit_matches_single_process(ray_head, workdir, reference):
    run_dir = str(workdir / "job")
    rc, output = submit(ray_head, workdir, run_dir)
    assert rc == 0, output[-4000:]
    assert_matches(read_metrics(run_dir), reference)
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{STEPS}"))
    assert os.path.isdir(os.path.join(run_dir, "tb"))
    # The final checkpoint was reported to Ray, which keeps a copy where
    # docs/launching.md says: RUN_DIR/ray/<basename of RUN_DIR>/checkpoint_<timestamp>.
    copies = os.listdir(os.path.join(run_dir, "ray", os.path.basename(run_dir)))
    assert [c for c in copies if c.startswith("checkpoint_")], (copies, output[-2000:])
    assert_clean_output(output, STEPS)
    done = [line for line in console_lines(output) if line.startswith("ray: done")]
    assert len(done) == 1 and re.search(r"train loss \d\.\d{3},", done[0]), done


def test_ray_worker_killed_resumes_from_checkpoint(ray_head, workdir, reference, tmp_path):
    run_dir = str(workdir / "fault")
    marker = str(tmp_path / "fault-fired")
    rc, output = submit(ray_head, workdir, run_dir, max_failures=1,
                        extra_env={"MOE_TRAIN_TEST_RAY_FAULT": f"1:{FAULT_STEP}:{marker}"})
    assert rc == 0, output[-4000:]
    assert os.path.exists(marker), "the fault hook never fired"
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", output)]
    assert resumed, f"no resume in the job output:\n{output[-4000:]}"
    # The restarted group went back at most one checkpoint interval, not to step 0.
    assert FAULT_STEP - SAVE_EVERY <= min(resumed) < STEPS, resumed
    # Every step logged once, and the curve is the uninterrupted one.
    assert_matches(read_metrics(run_dir), reference)


def test_ray_bad_config_refused_before_ray_starts(workdir):
    run_dir = workdir / "bad"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "ray_train.py"), "--config",
         str(workdir / "config.yaml"), "--num-workers", "3", "--run-dir", str(run_dir)],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "parallel.expert_parallel_size" in errors[0], result.stderr
    assert not os.path.exists(run_dir / "ray")


def test_ray_local_instance_prints_each_line_once(workdir, tmp_path):
    """launch/ray_train.py without a cluster starts (and stops) its own Ray
    instance on 127.0.0.1; its output is as clean as torchrun's."""
    steps = 2
    run_dir = str(tmp_path / "local")
    local_env = {k: v for k, v in env().items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, os.path.join(REPO, "launch", "ray_train.py"), "--config",
           str(workdir / "config.yaml"), "--num-workers", "2", "--run-dir", run_dir,
           "--max-failures", "0", "--set", f"train.max_steps={steps}",
           "--set", "train.eval_every=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=local_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        output, _ = proc.communicate()
        pytest.fail(f"launch/ray_train.py ran past 300s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, steps + 1))
    assert_clean_output(output, steps)


def test_ray_job_relative_run_dir_refused(ray_head, workdir):
    """Inside a job the entrypoint runs in Ray's cached copy of --working-dir:
    a relative run directory would be written there and deleted with it."""
    rc, output = submit(ray_head, workdir, "runs/relative-in-a-job")
    assert rc != 0
    # One line, exit status 2 (ray job submit repeats the job's last log lines
    # in its failure message, so the line shows up there once more).
    errors = {line for line in console_lines(output) if line.startswith("error: ")}
    assert len(errors) == 1 and "--run-dir (runs/relative-in-a-job)" in errors.pop(), output[-3000:]
    assert "exit code 2" in output
    assert not os.path.exists(os.path.join(REPO, "runs", "relative-in-a-job"))
