"""DeepSpeed end to end: the deepspeed launcher on 2 CPU ranks, EP=2, ZeRO-2
(and ZeRO-0), fp32, dropless, must give the losses and gradient norms of the
plain torch.distributed path (torchrun, same config) step by step, write the
same metrics.jsonl keys, and resume from its own checkpoint onto the same curve.
The DeepSpeed config is filled from and checked against train.* (fast tests,
no processes)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from .launch_common import config_dir, LOSS_RTOL, REPO, TRAIN, free_port, read_metrics, tiny_ep2_config

pytest.importorskip("deepspeed")

from moe_train.config import ConfigError, config_from_dict  # noqa: E402
from moe_train.train.deepspeed_config import resolve_deepspeed_config  # noqa: E402

ZERO2 = os.path.join(REPO, "configs", "deepspeed", "zero2.json")
STEPS, SAVE_EVERY = 10, 5
CONFIG = tiny_ep2_config(STEPS, seed=11, eval_every=5, save_every=SAVE_EVERY)
NORM_RTOL = 1e-4


# ----------------------------------------------------------------------------
# The DeepSpeed JSON against train.*


def _cfg(tmp_path, ds: dict, **train):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    data = json.loads(json.dumps(CONFIG))
    data["train"].update(train, deepspeed_config=str(path))
    return config_from_dict(data)


def test_auto_fields_come_from_train(tmp_path):
    with open(ZERO2) as fh:
        cfg = _cfg(tmp_path, json.load(fh))
    ds = resolve_deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2      # 8 / (2 x dp 2)
    assert ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.05
    assert ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2
    ds = resolve_deepspeed_config(_cfg(tmp_path, {}, precision="bf16"), world_size=4)
    assert ds["gradient_accumulation_steps"] == 1 and ds["bf16"]["enabled"] is True


@pytest.mark.parametrize("ds, words", [
    ({"train_micro_batch_size_per_gpu": 4}, ["train_micro_batch_size_per_gpu (4)",
                                             "train.micro_batch_size (2)"]),
    ({"train_batch_size": 16}, ["train_batch_size (16)", "train.global_batch_size (8)"]),
    ({"gradient_accumulation_steps": 1}, ["gradient_accumulation_steps (1)"]),
    ({"gradient_clipping": 1.0}, ["gradient_clipping (1.0)", "train.grad_clip (0.05)"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled (true)", "train.precision (fp32)"]),
    ({"optimizer": {"type": "Adam"}}, ["\"optimizer\" section"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["\"scheduler\" section"]),
    ({"fp16": {"enabled": True}}, ["fp16.enabled"]),
    ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage (3)"]),
])
def test_conflicts_and_unsupported_sections_are_one_line_errors(tmp_path, ds, words):
    with pytest.raises(ConfigError) as info:
        resolve_deepspeed_config(_cfg(tmp_path, ds), world_size=2)
    message = str(info.value)
    assert "\n" not in message and message.startswith("train.deepspeed_config (")
    for word in words:
        assert word in message, message


def test_missing_or_broken_json_and_tensor_parallel(tmp_path):
    cfg = _cfg(tmp_path, {})
    cfg.train.deepspeed_config = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="file not found"):
        resolve_deepspeed_config(cfg, 2)
    (tmp_path / "broken.json").write_text("{")
    cfg.train.deepspeed_config = str(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_deepspeed_config(cfg, 2)
    cfg = _cfg(tmp_path, {})
    cfg.parallel.tensor_parallel_size = 2
    with pytest.raises(ConfigError, match="parallel.tensor_parallel_size"):
        resolve_deepspeed_config(cfg, 2)


def test_launch_train_refuses_bad_deepspeed_config_with_exit_2(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 3}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    result = subprocess.run(
        [sys.executable, TRAIN, "--config", str(tmp_path / "config.yaml"),
         "--set", "parallel.expert_parallel_size=1", "--run-dir", str(tmp_path / "run"),
         "--deepspeed_config", str(tmp_path / "ds.json")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train_batch_size (3)" in errors[0], result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


# ----------------------------------------------------------------------------
# End to end


def run(cmd, log_path, timeout: float = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started
            proc.wait()
            rc = "timeout"
    with open(log_path) as fh:
        output = fh.read()
    assert rc == 0, f"{' '.join(cmd)} exited {rc}:\n{output[-4000:]}"
    return output


def deepspeed_cmd():
    script = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def column(records, key):
    return [r[key] for r in records]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return config_dir(tmp_path_factory, "deepspeed", CONFIG)


@pytest.fixture(scope="module")
def plain(workdir):
    """The plain torch.distributed path: torchrun, same config, 2 ranks."""
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         TRAIN, "--config", str(workdir / "config.yaml"), "--run-dir", str(workdir / "torchrun")],
        str(workdir / "torchrun.log"))
    return read_metrics(workdir / "torchrun")


def deepspeed_run(workdir, ds_json, run_dir, *extra):
    run(deepspeed_cmd() + ["--num_gpus", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()),
                           TRAIN, "--config", str(workdir / "config.yaml"),
                           "--deepspeed_config", ds_json, "--run-dir", str(run_dir), *extra],
        f"{run_dir}.log")
    return read_metrics(run_dir)


# ZeRO-2 (optimizer state and gradients partitioned) and no ZeRO, where
# moe_train clips with its own global norm and rank 1's experts come back
# from model/ on resume.
@pytest.fixture(scope="module", params=["zero2", "zero0"])
def ds(request, workdir):
    """(name, run directory) of a 2-rank deepspeed launcher run."""
    name = request.param
    deepspeed_run(workdir, os.path.join(REPO, "configs", "deepspeed", f"{name}.json"),
                  workdir / name)
    return name, workdir / name


def test_deepspeed_ep2_matches_torchrun(ds, plain):
    _, run_dir = ds
    records = read_metrics(run_dir)
    assert column(records, "step") == list(range(1, STEPS + 1))
    # Monitoring does not depend on the launcher.
    assert [sorted(r) for r in records] == [sorted(r) for r in plain]
    assert column(records, "loss/train") == \
        pytest.approx(column(plain, "loss/train"), rel=LOSS_RTOL)
    assert column(records, "train/grad_norm") == \
        pytest.approx(column(plain, "train/grad_norm"), rel=NORM_RTOL)
    assert column(records, "train/lr") == pytest.approx(column(plain, "train/lr"), rel=1e-6)
    val = [r["loss/val"] for r in records if "loss/val" in r]
    assert val == \
        pytest.approx([r["loss/val"] for r in plain if "loss/val" in r], rel=LOSS_RTOL)


def test_deepspeed_checkpoint_layout_and_consolidated_model(ds):
    import torch

    from moe_train.train.checkpoint import find_checkpoint, load_model

    _, run_dir = ds
    ckpt = find_checkpoint(str(run_dir))
    assert os.path.basename(ckpt) == f"step_{STEPS}"
    names = set(os.listdir(ckpt))
    assert {"model", "rng", "trainer.pt", "config.yaml", "mp_rank_00_model_states.pt"} <= names
    # Optimizer state: one file per rank (ZeRO partition, or EP rank's experts).
    assert sum(n.endswith("optim_states.pt") for n in names) == 2
    # model/ holds every expert (both EP ranks') under EP=1 names: the
    # single-process model loads it strictly and evaluates.
    model, cfg = load_model(str(run_dir))
    assert cfg.moe.num_experts == 4
    # vocab_size is inferred from the byte dataset (257 ids rounded up to 384).
    vocab = cfg.model.vocab_size
    assert vocab == 384
    assert model(torch.randint(0, 257, (1, 8))).logits.shape == (1, 8, vocab)


def test_deepspeed_resume_continues_the_same_curve(ds, workdir):
    """Resume step 5 of the run into a new run directory: steps 6..10 must
    repeat the uninterrupted run (optimizer state, both ranks' experts,
    scheduler and RNG restored)."""
    name, run_dir = ds
    ckpt = run_dir / "checkpoints" / f"step_{SAVE_EVERY}"
    assert ckpt.is_dir()
    resumed = deepspeed_run(workdir, os.path.join(REPO, "configs", "deepspeed", f"{name}.json"),
                            workdir / f"{name}_resumed", "--resume", str(ckpt))
    full = read_metrics(run_dir)
    assert column(resumed, "step") == list(range(SAVE_EVERY + 1, STEPS + 1))
    assert column(resumed, "loss/train") == \
        pytest.approx(column(full, "loss/train")[SAVE_EVERY:], rel=LOSS_RTOL)
