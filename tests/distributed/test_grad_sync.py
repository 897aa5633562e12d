"""Gradient sync and global-norm clipping on 4 ranks.

- The group layout megatron-core builds (tp-ep-dp) is the one
  docs/parallelism.md draws.
- Planted gradients (value = rank + 1): dense ones come out as the mean over
  the data-parallel group, expert ones as the sum over the expert-data-
  parallel group / dp, so a reduction over the wrong group shows.
- A whole small MoE transformer, EP=2 (world 4, tp 1) and TP=2 x EP=2 (world
  4), each data-parallel rank on its own micro-batch: after sync_gradients
  every gradient equals (its shard of) the single-process gradient of the mean
  loss, and clip_grad_norm returns the single-process norm and scales
  gradients like torch.nn.utils.clip_grad_norm_ would.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.transformer import build_model

from .harness import init_topology_gloo, run_distributed

B, S, V = 2, 6, 32
RTOL, ATOL = 1e-5, 1e-6


def build_full_model():
    torch.manual_seed(0)
    model_cfg = ModelConfig(vocab_size=V, hidden_size=16, ffn_hidden_size=24, num_layers=2,
                            num_heads=4, num_kv_heads=2, max_seq_len=16, init_std=0.2)
    # layer_freq=2: block 0 dense, block 1 MoE; capacity so that drops happen.
    moe_cfg = MoEConfig(num_experts=4, top_k=2, layer_freq=2, num_shared_experts=1,
                        capacity_factor=1.0, z_loss_coef=1e-3)
    model = build_model(model_cfg, moe_cfg)
    for block in model.moe_blocks:   # a decisive router: uneven loads between ranks
        nn.init.normal_(block.ffn.router.weight, std=1.0)
    return model


def batch(dp_rank):
    g = torch.Generator().manual_seed(10 + dp_rank)
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


def loss_of(model, dp_rank):
    ids, targets = batch(dp_rank)
    out = model(ids)
    return nn.functional.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1)) + out.aux_loss


def reference(dp_size):
    """Single process: gradient of the mean loss over the dp micro-batches, and its norm."""
    model = build_full_model()
    for d in range(dp_size):
        (loss_of(model, d) / dp_size).backward()
    from moe_train.parallel import logical_entries

    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    # Keyed by logical entry: one per expert for the stacked expert weights.
    grads = {k: g.clone() for n, p in model.named_parameters()
             for k, g in logical_entries(model, n, p.grad)}
    return grads, norm


def group_ranks(group):
    return dist.get_process_group_ranks(group)


def planted_sync(topo):
    """Every gradient set to rank+1, then synced."""
    from moe_train.parallel import apply_expert_parallel, is_expert_param, sync_gradients

    model = apply_expert_parallel(build_full_model(), topo)
    for p in model.parameters():
        p.grad = torch.full_like(p, float(topo.rank + 1))
    sync_gradients(model, topo)
    out = {"dense": None, "expert": None}
    for n, p in model.named_parameters():
        kind = "expert" if is_expert_param(n) else "dense"
        values = p.grad.unique()
        assert values.numel() == 1, n
        if out[kind] is None:
            out[kind] = float(values)
        assert out[kind] == float(values), n
    return out


def model_sync(topo):
    from moe_train.parallel import clip_grad_norm, logical_entries, parallelize, sync_gradients
    from moe_train.parallel.tensor_parallel import full_weight_shard

    ref_grads, ref_norm = reference(topo.dp_size)
    model = parallelize(build_full_model(), topo)
    loss_of(model, topo.dp_rank).backward()
    sync_gradients(model, topo)
    checks, names = [], set()
    for n, p in model.named_parameters():
        for gn, g in logical_entries(model, n, p.grad):
            names.add(gn)
            checks.append((f"synced {gn}", g.clone(), full_weight_shard(ref_grads[gn], p, topo)))
    max_norm = 0.5 * float(ref_norm)
    norm = clip_grad_norm(model, max_norm, topo)
    coef = max_norm / (float(ref_norm) + 1e-6)
    checks.append(("grad norm", norm, ref_norm))
    for n, p in model.named_parameters():
        for gn, g in logical_entries(model, n, p.grad):
            checks.append((f"clipped {gn}", g, coef * full_weight_shard(ref_grads[gn], p, topo)))
    return {"checks": checks, "names": names, "ref_names": set(ref_grads)}


def sync_worker(rank, world, tp, ep):
    topo = init_topology_gloo(tensor_parallel_size=tp, expert_parallel_size=ep)
    layout = {"tp": group_ranks(topo.tp_group), "dp": group_ranks(topo.dp_group),
              "ep": group_ranks(topo.ep_group), "expert_dp": group_ranks(topo.expert_dp_group),
              "sizes": (topo.tp_size, topo.dp_size, topo.ep_size, topo.expert_dp_size)}
    return {"layout": layout, "planted": planted_sync(topo), "model": model_sync(topo)}


LAYOUTS = {
    # world 4, tp 1, ep 2: dp over all 4; experts 0-1 on ranks 0 and 2, 2-3 on 1 and 3.
    "tp1_ep2": dict(tp=1, ep=2, sizes=(1, 4, 2, 2),
                    groups=[{"tp": [0], "dp": [0, 1, 2, 3], "ep": [0, 1], "expert_dp": [0, 2]},
                            {"tp": [1], "dp": [0, 1, 2, 3], "ep": [0, 1], "expert_dp": [1, 3]},
                            {"tp": [2], "dp": [0, 1, 2, 3], "ep": [2, 3], "expert_dp": [0, 2]},
                            {"tp": [3], "dp": [0, 1, 2, 3], "ep": [2, 3], "expert_dp": [1, 3]}]),
    # world 4, tp 2, ep 2: EP groups join ranks of the same TP rank; one copy of
    # each expert shard per TP rank.
    "tp2_ep2": dict(tp=2, ep=2, sizes=(2, 2, 2, 1),
                    groups=[{"tp": [0, 1], "dp": [0, 2], "ep": [0, 2], "expert_dp": [0]},
                            {"tp": [0, 1], "dp": [1, 3], "ep": [1, 3], "expert_dp": [1]},
                            {"tp": [2, 3], "dp": [0, 2], "ep": [0, 2], "expert_dp": [2]},
                            {"tp": [2, 3], "dp": [1, 3], "ep": [1, 3], "expert_dp": [3]}]),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def sync_run(request):
    spec = LAYOUTS[request.param]
    return spec, run_distributed(sync_worker, 4, spec["tp"], spec["ep"], timeout=150)


def test_group_layout(sync_run):
    spec, reports = sync_run
    for rank, report in enumerate(reports):
        layout = report["layout"]
        assert layout["sizes"] == spec["sizes"]
        assert {k: layout[k] for k in ("tp", "dp", "ep", "expert_dp")} == spec["groups"][rank], rank


def test_planted_grads_reduce_over_their_own_group(sync_run):
    spec, reports = sync_run
    for rank, report in enumerate(reports):
        groups = spec["groups"][rank]
        dp = len(groups["dp"])
        dense = sum(r + 1 for r in groups["dp"]) / dp
        expert = sum(r + 1 for r in groups["expert_dp"]) / dp
        assert report["planted"] == pytest.approx({"dense": dense, "expert": expert}), rank


def test_model_grads_and_norm_equal_single_process(sync_run):
    _, reports = sync_run
    covered = set()
    for rank, report in enumerate(reports):
        r = report["model"]
        for label, got, expected in r["checks"]:
            atol = max(ATOL, RTOL * float(expected.abs().max()))
            torch.testing.assert_close(got, expected, rtol=RTOL, atol=atol,
                                       msg=lambda m: f"rank {rank}: {label}: {m}")
        covered |= r["names"]
    assert covered == reports[0]["model"]["ref_names"]
