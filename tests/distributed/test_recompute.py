"""Activation recompute replays the forward exactly: with ``full`` and
``selective`` the gradients equal those of ``none`` bit for bit (fp32, CPU),
for token choice (Switch jitter and Shazeer noisy gating on) and expert
choice (jitter on), with expert parallelism 2. The backward runs under a
different routing-noise key than the forward, so a recompute that drew
fresh noise would route differently and fail."""
import torch
import torch.nn.functional as F

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.recompute import apply_recompute
from moe_train.moe.routing_noise import RoutingNoiseKey, use_key
from moe_train.parallel.build import build_parallel_model

from .harness import init_topology_gloo, run_distributed

SEED = 3
MODEL = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=48, max_seq_len=16)
CASES = {
    "token_choice": MoEConfig(num_experts=4, top_k=2, jitter_eps=0.1, noisy_gating=True,
                              aux_loss="shazeer", z_loss_coef=1e-3),
    "expert_choice": MoEConfig(num_experts=4, router="expert_choice", jitter_eps=0.1,
                               aux_loss="none"),
}
MODES = ("none", "full", "selective")


def _grads(topo, moe, mode, rank):
    model = build_parallel_model(MODEL, moe, topo, SEED, torch.device("cpu"))
    apply_recompute(model, mode).train()
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own rows
    ids = torch.randint(0, MODEL.vocab_size, (2, 12), generator=gen)
    with use_key(RoutingNoiseKey(SEED, 0, rank)):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
    with use_key(RoutingNoiseKey(SEED, 1, rank)):
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, world):
    topo = init_topology_gloo(expert_parallel_size=2)
    return {router: {mode: _grads(topo, moe, mode, rank) for mode in MODES}
            for router, moe in CASES.items()}


def test_recompute_gradients_equal_no_recompute_with_ep2():
    for rank, result in enumerate(run_distributed(_worker, 2, timeout=240)):
        for router, by_mode in result.items():
            loss, want = by_mode["none"]
            assert len(want) > 10 and all(g.abs().sum() > 0 for g in want.values())
            for mode in ("full", "selective"):
                got_loss, got = by_mode[mode]
                assert torch.equal(got_loss, loss), (rank, router, mode)
                assert got.keys() == want.keys()
                for name in want:
                    assert torch.equal(got[name], want[name]), (rank, router, mode, name)
