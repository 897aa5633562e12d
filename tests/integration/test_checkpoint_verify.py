"""Verified checkpoints (issue 12 part 5): a checksum manifest in every
checkpoint; --resume of a run falls back from a bad latest checkpoint to the
newest good one, in one line naming the bad file; an explicit bad
checkpoint, load_model and export stop with one line and exit 2; no
EOFError or UnpicklingError ever reaches the user."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from moe_train import cli
from moe_train.config import load_config
from moe_train.train import InputError
from moe_train.train import checkpoint as ckpt
from moe_train.train.checkpoint_manifest import MANIFEST_FILE, sha256_file, write_manifest
from moe_train.parallel.topology import Topology
from moe_train.train.trainer import train

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=4",
        "model.ffn_hidden_size=64", "moe.num_experts=4", "moe.top_k=2",
        "train.seq_len=16", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.log_every=1", "train.eval_every=0", "train.heatmap_every=0",
        "train.max_steps=3", "train.save_every=1", "train.keep_last=3", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("verify") / "run"
    cfg = load_config(None, TINY)
    cfg.train.run_dir = str(run)
    train(cfg)
    return run


@pytest.fixture
def run(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def shard(step_dir):
    model = os.path.join(step_dir, "model")
    return os.path.join(model, next(n for n in sorted(os.listdir(model)) if n.endswith(".distcp")))


def garble(path, offset=64, size=4096):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(os.urandom(size))


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err and "weights_only" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in needles), err


def test_manifest_lists_every_file(finished):
    step = finished / "checkpoints" / "step_3"
    with open(step / MANIFEST_FILE) as fh:
        files = json.load(fh)["files"]
    on_disk = {os.path.relpath(os.path.join(p, n), step) for p, _, ns in os.walk(step) for n in ns}
    assert set(files) == on_disk - {MANIFEST_FILE}
    assert all(files[r]["sha256"] == sha256_file(step / r) and
               files[r]["bytes"] == os.path.getsize(step / r) for r in files)


def test_resume_falls_back_to_the_newest_good_checkpoint(run):
    bad = shard(run / "checkpoints" / "step_3")
    garble(bad)  # 4 KiB of garbage inside a shard: loaded silently before
    proc = subprocess.run(
        [sys.executable, "-m", "moe_train.train", "--run-dir", str(run), "--resume",
         "--set", "train.max_steps=4"], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and bad in warnings[0] and "step_2" in warnings[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in proc.stdout


def test_bad_checkpoint_named_explicitly_load_model_and_export(run, capsys):
    step3 = run / "checkpoints" / "step_3"
    trainer_pt = str(step3 / "trainer.pt")
    with open(trainer_pt, "r+b") as fh:
        fh.truncate(100)
    rc = cli.main(["train", "--resume", str(step3)])
    one_line_error(rc, capsys.readouterr().err, trainer_pt, "bytes")
    rc = cli.main(["export", "--checkpoint", str(step3), "--output", str(run / "hf")])
    one_line_error(rc, capsys.readouterr().err, trainer_pt)
    with pytest.raises(InputError, match="trainer.pt"):
        ckpt.load_model(str(step3))
    # Every checkpoint bad: the run directory has none to resume.
    for step in ("step_1", "step_2"):
        garble(shard(run / "checkpoints" / step))
    rc = cli.main(["train", "--run-dir", str(run), "--resume"])
    one_line_error(rc, capsys.readouterr().err, "passes verification", trainer_pt)


def test_corrupt_files_past_the_manifest_are_one_line(run):
    # A manifest rewritten to match garbage: the readers still say "corrupt",
    # never EOFError or UnpicklingError.
    step3 = run / "checkpoints" / "step_3"
    with open(step3 / "trainer.pt", "r+b") as fh:
        fh.truncate(100)
    garble(shard(step3))
    write_manifest(str(step3), 3, Topology())
    with pytest.raises(InputError, match=r"corrupt|cannot be read") as exc:
        ckpt.checkpoint_step(str(step3 / ".."))  if False else ckpt.load_model(str(step3))
    assert "weights_only" not in str(exc.value)
    with pytest.raises(InputError, match=r"trainer.pt is corrupt \((UnpicklingError|EOFError|"
                                         r"RuntimeError)\)"):
        ckpt._load_file(str(step3 / "trainer.pt"))
