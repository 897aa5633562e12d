"""Every bad config input is one line naming what is wrong (issue 12 part 7),
and numbers mean what they look like (no YAML 1.1 octal or base 60)."""
import json
import os
import subprocess
import sys

import pytest

from moe_train import cli
from moe_train.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_line_error(rc, err, needle):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


@pytest.mark.parametrize("value, needle", [
    ("010", "ambiguous"),                 # YAML 1.1: octal 8
    ("1:30", "ambiguous"),                # YAML 1.1: base 60, 90
    ("9" * 5000, "5000 digits"),          # past Python's int-parsing limit
    ("[" * 5000, "nested too deeply"),    # RecursionError in the parser
    ("{a: [1", "train.max_steps"),        # malformed YAML
    ("[[[[[1]]]]]", "must be an integer"),
    ("1000000000000", "2**31"),
])
def test_bad_set_values(value, needle, capsys):
    rc = cli.main(["train", "--set", f"train.max_steps={value}"])
    one_line_error(rc, capsys.readouterr().err, needle)


@pytest.mark.parametrize("override, needle", [
    ("train.lr=.inf", "train.lr"), ("train.lr=.nan", "train.lr"),
    ("train.beta1=1.0", "train.beta1"), ("train.beta2=-0.1", "train.beta2"),
    ("train.seed=-1", "train.seed"), ("train.seed=4294967296", "train.seed"),
    ("model.norm_eps=0", "model.norm_eps"), ("train.max_skipped_steps=0", "max_skipped_steps"),
])
def test_values_torch_or_numpy_would_reject(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_numbers_that_look_like_numbers_still_work():
    cfg = load_config(None, ["train.max_steps=10", "train.lr=1e-3", "train.min_lr=0",
                             "train.seed=0", "data.tokenizer='010'", "train.run_dir='1:30'"])
    assert cfg.train.max_steps == 10 and cfg.train.lr == 1e-3
    assert cfg.data.tokenizer == "010" and cfg.train.run_dir == "1:30"


@pytest.mark.parametrize("content, needle", [
    (b"- a\n- b\n", "must be a mapping"),
    (b"42\n", "must be a mapping"),
    (b"train:\n  max_steps: 010\n", "line 2: 010 is ambiguous"),
    (b"\xff\xfe\x00binary\x00", "not UTF-8"),
    (b"train: [\n", "not valid YAML"),
])
def test_bad_config_files(content, needle, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    rc = cli.main(["train", "--config", str(path)])
    one_line_error(rc, capsys.readouterr().err, needle)


def test_meta_json_that_is_a_list(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps([1, 2]))
    rc = cli.main(["train", "--run-dir", str(tmp_path / "run"), "--set", f"data.dataset={data}"])
    one_line_error(rc, capsys.readouterr().err, "JSON object")
    assert not (tmp_path / "run").exists()


def test_packaged_config_by_name_from_any_directory(tmp_path):
    # The README's snippet, run outside the repository.
    code = ("from moe_train.config import load_config; "
            "a = load_config('tiny'); b = load_config('configs/tiny.yaml'); "
            "print(a == b, a.model.hidden_size)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "True"
    with pytest.raises(ConfigError, match="config file not found: nonesuch"):
        load_config("nonesuch")
