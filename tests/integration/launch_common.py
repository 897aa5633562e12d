"""What the launcher tests share: the repository paths, a free loopback port,
the metrics reader, and the tiny EP=2 config every launcher trains."""
import json
import os
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
