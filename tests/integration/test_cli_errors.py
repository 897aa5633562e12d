"""Bad input: one line ``error: ...`` naming the field or path on stderr, exit
status 2, no traceback, nothing trained. A few cases go through each real entry
point in a subprocess; the rest call the same ``main`` in-process."""
import os
import subprocess
import sys

import pytest

from moe_train import cli
from moe_train.config import load_config
from moe_train.data.prepare import prepare
from moe_train.train.trainer import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.ffn_hidden_size=64", "moe.num_experts=4", "moe.top_k=2",
        "train.seq_len=32", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.log_every=1", "train.eval_every=0", "train.heatmap_every=0",
        "train.max_steps=1"]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def assert_one_line_error(rc, stderr, needle):
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


def run_entry(argv, tmp_path):
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("entry, args, needle", [
    ("module", ["--config", "missing.yaml"], "missing.yaml"),
    ("module", ["--set", "moe.bogus=1"], "moe.bogus"),
    ("console", ["train", "--set", "moe.top_k=9"], "moe.top_k"),
    ("launch", ["--local_rank", "0", "--run-dir", "blocker/run"], "train.run_dir"),
    ("launch", ["--local-rank=0", "--run-dir", "empty", "--resume"], "no checkpoint"),
    ("launch", ["--deepspeed"], "--deepspeed_config"),
    ("launch", ["--run-dir", "empty", "--deepspeed_config"], "--deepspeed_config"),
])
def test_entry_points(entry, args, needle, tmp_path):
    (tmp_path / "blocker").write_text("a regular file where a directory should be")
    (tmp_path / "empty").mkdir()
    prefix = {"module": [sys.executable, "-m", "moe_train.train"],
              "console": [sys.executable, "-m", "moe_train.cli"],
              "launch": [sys.executable, os.path.join(ROOT, "launch", "train.py")]}[entry]
    rc, stderr = run_entry(prefix + args, tmp_path)
    assert_one_line_error(rc, stderr, needle)
    assert not (tmp_path / "runs").exists()  # failed before making a default run dir


def call_main(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("override, needle", [
    ("train.max_steps=ten", "train.max_steps"),
    ("moe.top_k=5", "moe.top_k"),
    ("model.num_heads=3", "model.num_heads"),
    ("model.num_kv_heads=3", "model.num_kv_heads"),
    ("train.seq_len=512", "train.seq_len"),
    ("train.lr=-0.1", "train.lr"),
    ("train.recompute=some", "train.recompute"),
    ("parallel.dp_shard_size=2", "parallel.dp_shard_size (2) must divide"),
    ("parallel.dp_shard_size=2 train.deepspeed_config=ds.json", "DeepSpeed shards"),
])
def test_impossible_values(override, needle, tmp_path, capsys):
    rc, err = call_main(["train", "--run-dir", str(tmp_path / "run")]
                        + sets(TINY + override.split()), capsys)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "run").exists()


def test_run_dir_that_cannot_be_written(capsys):
    rc, err = call_main(["train", "--run-dir", "/proc/moe_train_run"] + sets(TINY), capsys)
    assert_one_line_error(rc, err, "/proc/moe_train_run")


def test_dataset_too_small(tmp_path, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("far too short for one sequence\n")
    prepare([str(text)], str(tmp_path / "data"))
    rc, err = call_main(["train", "--run-dir", str(tmp_path / "run")]
                        + sets(TINY + [f"data.dataset={tmp_path / 'data'}"]), capsys)
    assert_one_line_error(rc, err, "train.seq_len")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_with_incompatible_config(tmp_path, capsys):
    cfg = load_config(None, TINY)
    cfg.train.run_dir = str(tmp_path)
    train(cfg)
    capsys.readouterr()
    rc, err = call_main(["train", "--run-dir", str(tmp_path), "--resume",
                         "--set", "model.hidden_size=64", "--set", "moe.num_experts=8"], capsys)
    assert_one_line_error(rc, err, "model.hidden_size")
    line = err.strip()
    assert "moe.num_experts" in line and "moe.hidden_size" in line
    assert "model.num_layers" not in line and "moe.top_k" not in line


def test_resume_path_without_checkpoint(tmp_path, capsys):
    rc, err = call_main(["train", "--resume", str(tmp_path / "nowhere")], capsys)
    assert_one_line_error(rc, err, "nowhere")


def test_unknown_command(capsys):
    rc, err = call_main(["fly"], capsys)
    assert_one_line_error(rc, err, "fly")
