"""Random routing (jitter, noisy gating) under parallelism, through train().

- TP=2 (world 2): both tensor-parallel ranks route every micro-batch of every
  layer identically (same experts, same tokens, bit-equal gates), for a
  fresh run and for a run resumed from a world-1 checkpoint. Before routing
  noise had its own keyed generator, the resume reseeded each global rank
  differently and the TP replicas drew different noise.
- DP=2 (world 2): the two data-parallel ranks draw different noise (their
  keys differ), and each routes its micro-batch exactly as the world-1 run
  routed the same rows (step 0, before any update) and trains to the same
  losses: the noise names the rows, not the layout.

A forward hook on every router records (key, layer, decision) per call.
"""
import json
import os

import pytest
import torch

from moe_train.config import load_config

from .harness import init_topology_gloo, run_distributed

BASE = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=32", "model.max_seq_len=16",
        "moe.num_experts=4", "moe.top_k=2", "moe.aux_loss=switch",
        "train.precision=fp32", "train.seq_len=8", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.lr=0.01", "train.warmup_steps=1",
        "train.log_every=1", "train.eval_every=0", "train.save_every=2",
        "train.heatmap_every=0", "train.seed=3"]
NOISE = {"jitter": ["moe.jitter_eps=0.3"], "noisy": ["moe.noisy_gating=true"]}


def config(run_dir, steps, extra=()):
    cfg = load_config(None, BASE + list(extra) + [f"train.max_steps={steps}"])
    cfg.train.run_dir = run_dir
    return cfg


def recorded_fit(cfg, resume=None):
    """Train with a hook on every router; returns [(key, layer, ids, tokens, gates)]."""
    from moe_train.moe import routing_noise
    from moe_train.moe.router import ExpertChoiceRouter, TokenChoiceRouter
    from moe_train.parallel.topology import env_world_size, init_topology
    from moe_train.train.trainer import Trainer

    cfg.validate(env_world_size())
    trainer = Trainer(cfg, init_topology(cfg.parallel), resume=resume)
    calls = []

    def hook(router, _inputs, decision):
        calls.append((routing_noise.current_key(), router.layer_index,
                      decision.expert_index.clone(), decision.token_index.clone(),
                      decision.weight.detach().clone()))

    for module in trainer.model.modules():
        if isinstance(module, (TokenChoiceRouter, ExpertChoiceRouter)):
            module.register_forward_hook(hook)
    trainer.fit()
    return calls


def tp_worker(rank, world, root):
    init_topology_gloo(tensor_parallel_size=2)
    out = {}
    for name, extra in NOISE.items():
        tp = extra + ["parallel.tensor_parallel_size=2"]
        out[f"{name}_fresh"] = recorded_fit(config(os.path.join(root, f"{name}_tp"), 2, tp))
        out[f"{name}_resumed"] = recorded_fit(
            config(os.path.join(root, f"{name}_tp_resumed"), 4, tp),
            resume=os.path.join(root, f"{name}_world1", "checkpoints", "step_2"))
    return out


def dp_worker(rank, world, root):
    init_topology_gloo()
    return recorded_fit(config(os.path.join(root, "jitter_dp"), 2, NOISE["jitter"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("noise"))
    world1 = {name: recorded_fit(config(os.path.join(root, f"{name}_world1"), 2, extra))
              for name, extra in NOISE.items()}
    tp = run_distributed(tp_worker, 2, root, timeout=240)
    dp = run_distributed(dp_worker, 2, root, timeout=180)
    return root, world1, tp, dp


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r for r in map(json.loads, fh)}


def _same_call(a, b):
    return (a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
            and torch.equal(a[4], b[4]))


@pytest.mark.parametrize("run", ["jitter_fresh", "jitter_resumed", "noisy_fresh", "noisy_resumed"])
def test_tp_ranks_route_identically(runs, run):
    _, _, tp, _ = runs
    a, b = tp[0][run], tp[1][run]
    # 2 steps x 2 micro-batches x 2 MoE layers, each on both ranks.
    assert len(a) == len(b) == 8
    steps = {call[0].step for call in a}
    assert steps == ({0, 1} if run.endswith("fresh") else {2, 3})
    for i, (x, y) in enumerate(zip(a, b)):
        assert _same_call(x, y), f"{run}: call {i} (key {x[0]}, layer {x[1]}) differs across TP"


def test_dp_ranks_draw_different_noise_and_route_like_world1(runs):
    root, world1, _, dp = runs
    ref = world1["jitter"]
    for rank in (0, 1):
        got = dp[rank]
        assert len(got) == 4  # 2 steps x 1 micro-batch x 2 layers
        assert {call[0].micro_batch for call in got} == {rank}
    keys = [(c[0], c[1]) for c in dp[0]]
    assert not set(keys) & {(c[0], c[1]) for c in dp[1]}
    # Step 0: same weights everywhere, so rank r's routing is exactly the
    # world-1 run's on micro-batch r (the same rows, the same key).
    for rank in (0, 1):
        want = [c for c in ref if c[0].step == 0 and c[0].micro_batch == rank]
        got = [c for c in dp[rank] if c[0].step == 0]
        assert len(want) == len(got) == 2
        assert all(_same_call(g, w) for g, w in zip(got, want))
    # And the whole run trains like world 1 (gradients averaged over ranks).
    want, got = records(os.path.join(root, "jitter_world1")), records(os.path.join(root, "jitter_dp"))
    for step in (1, 2):
        assert got[step]["loss/train"] == pytest.approx(want[step]["loss/train"], rel=1e-5)
