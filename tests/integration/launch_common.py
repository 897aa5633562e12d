"""What the launcher tests share: the repository paths, a free loopback port,
the metrics reader, and the tiny EP=2 config every launcher trains."""
import json
import os
import re
import socket

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launch", "train.py")
# fp32 runs that differ only in how ranks split the work agree to ~1e-7 (the
# order of float sums); a wrong expert or optimizer state after a resume
# moves the loss by ~1e-4 within a step or two.
LOSS_RTOL = 1e-5


def tiny_ep2_config(steps: int, seed: int, eval_every: int, save_every: int) -> dict:
    """A 2-layer, 4-expert top-2 dropless model on EP=2, global batch 8 in
    micro-batches of 2, fp32. grad_clip sits far below the gradient norm, so
    every step clips and the global norm over both ranks' experts must be right
    for the losses of two launchers to agree."""
    return {
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "ffn_hidden_size": 32, "max_seq_len": 32},
        "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": None},
        "parallel": {"expert_parallel_size": 2},
        "data": {"dataset": "shakespeare"},
        "train": {"max_steps": steps, "seed": seed, "precision": "fp32", "global_batch_size": 8,
                  "micro_batch_size": 2, "seq_len": 32, "lr": 0.01, "warmup_steps": 2,
                  "grad_clip": 0.05, "log_every": 1, "eval_every": eval_every,
                  "eval_iters": 1, "save_every": save_every, "heatmap_every": 0},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def config_dir(tmp_path_factory, name: str, config: dict):
    """A fresh temporary directory holding ``config.yaml`` with ``config``."""
    root = tmp_path_factory.mktemp(name)
    with open(root / "config.yaml", "w") as fh:
        yaml.safe_dump(config, fh)
    return root


# Lines no launch may print (docs/monitoring.md, "Console output").
NOISE = ("Transformer Engine and Apex are not installed", "PlacementGroupCleaner",
         "State API may be temporarily unavailable")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\((?:RayTrainWorker|TrainController|\w+) pid=\d+(?:, ip=\S+)?\)\s?")


def console_lines(output: str):
    """The lines of a launch's output, without Ray's colour codes and
    ``(RayTrainWorker pid=N)`` prefixes."""
    return [_RAY_PREFIX.sub("", _ANSI.sub("", line)) for line in output.splitlines()]


def assert_clean_output(output: str, steps: int, log_every: int = 1) -> None:
    """None of the NOISE lines; rank 0's lines (run dir, tensorboard command,
    every logged step, done) each exactly once; printed floats at 4
    significant digits."""
    lines = console_lines(output)
    for noise in NOISE:
        assert not [line for line in lines if noise in line], f"{noise!r} in:\n{output[-4000:]}"
    expected = ["run dir: ", "tensorboard --logdir ", "done: step "] + [
        f"step {s}/{steps} " for s in range(log_every, steps + 1, log_every)]
    for prefix in expected:
        hits = [line for line in lines if line.startswith(prefix)]
        assert len(hits) == 1, f"{prefix!r} printed {len(hits)} times:\n{output[-4000:]}"
    done = next(line for line in lines if line.startswith("done: step "))
    loss = re.search(r"train loss (\S+?),", done).group(1)
    assert len(loss.replace(".", "").lstrip("0")) == 4, done
