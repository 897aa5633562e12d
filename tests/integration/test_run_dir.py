"""A run directory belongs to one run (issue 12 parts 1 and 2): bad input
deletes nothing, a fresh run refuses a directory holding a run unless
--overwrite, --overwrite removes only what a run recorded, a live run's lock
refuses a second process, default names never collide."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from moe_train import cli
from moe_train.config import load_config
from moe_train.data.prepare import prepare
from moe_train.train import run_dir as run_dirs
from moe_train.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=4",
        "model.ffn_hidden_size=64", "moe.num_experts=4", "moe.top_k=2",
        "train.seq_len=16", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.log_every=1", "train.eval_every=0", "train.heatmap_every=0",
        "train.max_steps=1"]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def snapshot(root):
    """Every path under ``root`` with its size and mtime."""
    out = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def one_line_error(rc, err, needle):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-step run, copied by each test that changes it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    cfg = load_config(None, TINY)
    cfg.train.run_dir = str(run)
    train(cfg)
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_bad_input_changes_nothing(run, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("too short\n")
    prepare([str(text)], str(tmp_path / "short"))
    before = snapshot(run)
    for override, needle in [("train.beta1=1.0", "train.beta1"),
                             ("train.seed=-1", "train.seed"),
                             ("train.lr=.inf", "train.lr"),
                             ("model.hidden_size=100000000000000000000", "model.hidden_size"),
                             ("model.hidden_size=1000000000000", "model.hidden_size"),
                             (f"data.dataset={tmp_path / 'short'}", "train.seq_len")]:
        rc = cli.main(["train", "--run-dir", str(run), "--overwrite"] + sets(TINY + [override]))
        one_line_error(rc, capsys.readouterr().err, needle)
        assert snapshot(run) == before, override


def test_fresh_run_refuses_a_run_and_overwrite_removes_only_its_files(run, capsys):
    rc = cli.main(["train", "--run-dir", str(run)] + sets(TINY))
    one_line_error(rc, capsys.readouterr().err, "--overwrite")
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "my_other_model.bin").write_text("mine too")
    old_events = sorted(os.listdir(run / "tb"))
    rc = cli.main(["train", "--run-dir", str(run), "--overwrite"] + sets(TINY))
    assert rc == 0, capsys.readouterr().err
    assert "--overwrite removed" in capsys.readouterr().out
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "checkpoints" / "my_other_model.bin").read_text() == "mine too"
    assert not set(old_events) & set(os.listdir(run / "tb"))
    with open(run / "metrics.jsonl") as fh:
        assert [json.loads(line)["step"] for line in fh] == [1]


def test_directory_of_something_else_is_never_deleted(tmp_path, capsys):
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "my_other_model.bin").write_text("not moe_train's")
    before = snapshot(other)
    for extra in ([], ["--overwrite"]):
        rc = cli.main(["train", "--run-dir", str(other)] + extra + sets(TINY))
        one_line_error(rc, capsys.readouterr().err, "never deletes")
        assert snapshot(other) == before


def test_live_run_holds_the_directory(run, capsys):
    # This process holds the lock as a live run's rank 0 would.
    lock, _ = run_dirs.claim(str(run), fresh=False)
    try:
        # A second process under another launcher, fresh with --overwrite.
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--run-dir", str(run),
             "--overwrite"] + sets(TINY), capture_output=True, text=True, timeout=120,
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        one_line_error(proc.returncode, proc.stderr, f"pid {os.getpid()}")
        # And --resume (flock conflicts between two opens in one process too).
        rc = cli.main(["train", "--run-dir", str(run), "--resume"])
        one_line_error(rc, capsys.readouterr().err, f"in use by another run (pid {os.getpid()}")
    finally:
        lock.release()
    assert cli.main(["train", "--run-dir", str(run), "--resume",
                     "--set", "train.max_steps=2"]) == 0


def test_default_run_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = run_dirs.default_run_dir()
    assert first.endswith(f"-{os.getpid()}")
    os.makedirs(first)
    second = run_dirs.default_run_dir()
    assert second != first and second.startswith(first)
    # Another process in the same second gets another name.
    code = "from moe_train.train.run_dir import default_run_dir; print(default_run_dir())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT)).stdout.strip()
    assert other.rsplit("-", 1)[1] != str(os.getpid())
