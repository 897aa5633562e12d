"""Parallelism changes nothing, for the whole training loop.

The same 10 steps (same seed, same global batch of 8 in micro-batches of 4,
dropless top-2 token choice, fp32) trained

- in one process (2 micro-batches accumulated per step),
- on 2 data-parallel ranks (one micro-batch each),
- on 2 ranks with expert parallelism 2 (one micro-batch each, experts 0-1
  on rank 0 and 2-3 on rank 1, tokens exchanged by all-to-all),
- on 2 ranks with tensor parallelism 2 (dp 1: both ranks run both
  micro-batches, attention heads and dense MLP split),

logs the same loss, LM loss, auxiliary loss and gradient norm at every step
(rtol 1e-5), and ends with the same weights: the final checkpoint, read back
as one whole model, equals the single process's. Micro-batches of the same
size everywhere keep the Switch load-balancing loss (per micro-batch, not
linear in the batch) comparable. The reference is the world-1 run; the
parallel runs go through ``train(cfg)`` exactly as a launcher calls it.
"""
import json
import os

import pytest
import torch

from moe_train.config import load_config
from moe_train.train.checkpoint import load_model
from moe_train.train.trainer import train

from .harness import run_distributed

STEPS = 10
BASE = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.max_seq_len=32",
        "moe.num_experts=4", "moe.top_k=2", "moe.router=token_choice",
        "moe.capacity_factor=null", "moe.aux_loss=switch", "moe.z_loss_coef=0.001",
        "train.precision=fp32", "train.seq_len=16", "train.global_batch_size=8",
        "train.micro_batch_size=4", f"train.max_steps={STEPS}", "train.lr=0.01",
        "train.warmup_steps=2", "train.grad_clip=1.0", "train.log_every=1",
        "train.eval_every=5", "train.eval_iters=1", "train.save_every=0",
        "train.heatmap_every=0", "train.seed=11"]
KEYS = ("loss/train", "train/lm_loss", "train/aux_loss", "train/grad_norm", "loss/val")
RTOL = 1e-5

LAYOUTS = {
    "dp2": ["parallel.expert_parallel_size=1", "parallel.tensor_parallel_size=1"],
    "ep2": ["parallel.expert_parallel_size=2", "parallel.tensor_parallel_size=1"],
    "tp2": ["parallel.expert_parallel_size=1", "parallel.tensor_parallel_size=2"],
    # FSDP2 full sharding (ZeRO-3 class), alone and with experts sharded by EP.
    "fsdp2": ["parallel.dp_shard_size=2"],
    "fsdp2_ep2": ["parallel.dp_shard_size=2", "parallel.expert_parallel_size=2"],
}


def config(run_dir, extra=()):
    cfg = load_config(None, BASE + list(extra))
    cfg.train.run_dir = run_dir
    return cfg


def train_worker(rank, world, run_dir, extra):
    return train(config(run_dir, extra))


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r for r in map(json.loads, fh)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("world1"))
    train(config(run_dir))
    return run_dir


# Routing whose groups and slots are per micro-batch: expert choice with the
# per-position schedule (B*c/E = 1.5: experts take 1 or 2 tokens by turns)
# and top-2 with capacity 1.0 (drops). Under EP each rank routes its own
# micro-batch and the all-to-all must carry exactly those assignments.
ROUTINGS = {
    "expert_choice": ["moe.router=expert_choice", "moe.capacity_factor=1.5"],
    "capacity": ["moe.capacity_factor=1.0"],
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_ep2_trains_like_one_process_with_routing(routing, tmp_path):
    ref_dir = str(tmp_path / "world1")
    train(config(ref_dir, ROUTINGS[routing]))
    run_dir = str(tmp_path / "ep2")
    run_distributed(train_worker, 2, run_dir, ROUTINGS[routing] + LAYOUTS["ep2"], timeout=180)
    check_same_run(ref_dir, run_dir, f"ep2 {routing}")
    if routing == "capacity":
        # Capacity really dropped tokens, so the drops themselves matched.
        assert any(v > 0 for k, v in records(ref_dir)[1].items() if k.endswith("dropped_fraction"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_train_like_one_process(layout, reference, tmp_path):
    run_dir = str(tmp_path / layout)
    summaries = run_distributed(train_worker, 2, run_dir, LAYOUTS[layout], timeout=180)
    assert [s["steps"] for s in summaries] == [STEPS, STEPS]
    check_same_run(reference, run_dir, layout)


def check_same_run(reference, run_dir, layout):
    want, got = records(reference), records(run_dir)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        for key in KEYS:
            assert (key in got[step]) == (key in want[step]), (step, key)
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], rel=RTOL, abs=1e-7), \
                    (layout, step, key)
    # Steps after the first would agree only if the updates did: the losses
    # must move, so that matching them is not trivially matching constants.
    assert want[STEPS]["loss/train"] < want[1]["loss/train"] - 0.05

    # Every rank's shard made it into the checkpoint, under single-model names.
    # Adam divides by sqrt(v): where a gradient is ~0, rounding-level
    # differences move a weight by a fraction of lr, hence atol = lr / 100
    # (a swapped or stale expert would be off by the init scale, ~0.02).
    ref_model, _ = load_model(reference)
    model, _ = load_model(run_dir)
    ref_state = ref_model.state_dict()
    assert model.state_dict().keys() == ref_state.keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, ref_state[name], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{layout}: {name}: {m}")


@pytest.mark.parametrize("layout", ["ep2", "fsdp2_ep2"])
def test_aux_loss_free_balancing_trains_like_one_process(layout, tmp_path):
    # The expert bias is updated from the load of the whole global batch, so
    # expert-parallel ranks (each seeing half of it) must end with exactly the
    # single process's biases, and train the same losses; under FSDP too
    # (the bias is a buffer, never sharded).
    extra = ["moe.expert_bias_update_rate=0.01", "moe.aux_loss=sequence",
             "moe.aux_loss_coef=0.0001"]
    ref_dir, ep_dir = str(tmp_path / "world1"), str(tmp_path / "ep2")
    train(config(ref_dir, extra))
    run_distributed(train_worker, 2, ep_dir, extra + LAYOUTS[layout], timeout=180)
    want, got = records(ref_dir), records(ep_dir)
    for step in want:
        assert got[step]["loss/train"] == pytest.approx(want[step]["loss/train"], rel=RTOL)
    ref_state = load_model(ref_dir)[0].state_dict()
    ep_state = load_model(ep_dir)[0].state_dict()
    biases = [k for k in ref_state if k.endswith("router.expert_bias")]
    assert len(biases) == 2
    for key in biases:
        # Each update moves every entry by +-rate or 0: after 10 steps the
        # bias is a nonzero multiple of the rate, the same on both layouts.
        assert torch.equal(ep_state[key], ref_state[key]), key
        steps = ref_state[key] / 0.01
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() >= 1
