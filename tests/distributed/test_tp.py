"""TP=2 against TP=1 with the same weights, forward and backward.

Every rank builds the full module from one seed, runs it unsharded as the
reference, then builds it again, shards it with tensor_parallel.py and runs
the same input. Checked in fp32: outputs, input gradients, and every
parameter gradient against the matching shard of the reference gradient.
The parent also checks that replicated parameters (norms, embeddings,
router, routed experts) have bit-identical gradients on both TP ranks, which
is why gradient sync does not reduce them over TP, and that a TP model's
state dict has the same keys as the unsharded one. One spawn runs all cases.
"""
import pytest
import torch
from torch import nn

from moe_train.config import ModelConfig, MoEConfig, RopeConfig
from moe_train.model.attention import Attention
from moe_train.model.mlp import MLP
from moe_train.model.transformer import build_model

from .harness import assert_checks, init_topology_gloo, run_distributed

B, S = 2, 5
RTOL, ATOL = 1e-5, 1e-6


def _normal_init(module: nn.Module, std: float = 0.3) -> nn.Module:
    # Large enough that outputs are O(1) and the tolerances mean something.
    for p in module.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=std)
    return module


def attention_rope_gqa():
    cfg = ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=2, position_embedding="rope",
                      max_seq_len=16)
    return _normal_init(Attention(cfg)), 32


def attention_rope_interleaved_partial_mha():
    cfg = ModelConfig(hidden_size=32, num_heads=4, position_embedding="rope", max_seq_len=16,
                      rope=RopeConfig(layout="interleaved", rotary_fraction=0.5))
    return _normal_init(Attention(cfg)), 32


def attention_alibi_gqa():
    # 6 heads: not a power of two, so rank 1's heads 3..5 have slopes of
    # their own (2^-6, 2^-8, 2^-3.5...): a wrong head_offset shows up.
    cfg = ModelConfig(hidden_size=24, num_heads=6, num_kv_heads=2, position_embedding="alibi",
                      max_seq_len=16)
    return _normal_init(Attention(cfg)), 24


def mlp_swiglu():
    return _normal_init(MLP(16, 24, "swiglu")), 16


def mlp_gelu():
    return _normal_init(MLP(16, 24, "gelu")), 16


MODULE_CASES = {f.__name__: f for f in (attention_rope_gqa, attention_rope_interleaved_partial_mha,
                                        attention_alibi_gqa, mlp_swiglu, mlp_gelu)}

MODEL_CASES = {
    "dense_model": (dict(num_layers=2, num_heads=4, num_kv_heads=2, position_embedding="rope"),
                    dict(num_experts=0)),
    "dense_model_alibi_tied": (dict(num_layers=2, num_heads=6, num_kv_heads=6, hidden_size=24,
                                    position_embedding="alibi", activation="gelu",
                                    tie_embeddings=True), dict(num_experts=0)),
    "moe_model_shared_experts": (dict(num_layers=2, num_heads=4, num_kv_heads=2),
                                 dict(num_experts=4, top_k=2, num_shared_experts=1,
                                      layer_freq=2, z_loss_coef=1e-3)),
}


def build_full_model(model_kw, moe_kw):
    torch.manual_seed(0)
    kw = dict(vocab_size=32, hidden_size=32, ffn_hidden_size=48, max_seq_len=16, init_std=0.2)
    kw.update(model_kw)
    return build_model(ModelConfig(**kw), MoEConfig(**moe_kw))


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def run_module_case(name, topo):
    from moe_train.parallel.tensor_parallel import full_weight_shard, shard_attention, shard_mlp

    torch.manual_seed(0)
    ref, D = MODULE_CASES[name]()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, D, generator=g)
    proj = torch.randn(B, S, D, generator=g)

    x_ref = x.clone().requires_grad_(True)
    out_ref = ref(x_ref)
    (out_ref * proj).sum().backward()

    torch.manual_seed(0)
    tp, _ = MODULE_CASES[name]()
    if isinstance(tp, Attention):
        shard_attention(tp, topo)
        local_heads = (tp.num_heads, tp.num_kv_heads, tp.head_offset)
    else:
        shard_mlp(tp, topo)
        local_heads = None
    x_tp = x.clone().requires_grad_(True)
    out_tp = tp(x_tp)
    (out_tp * proj).sum().backward()

    ref_grads = _grads(ref)
    checks = [("output", out_tp.detach(), out_ref.detach()), ("x.grad", x_tp.grad, x_ref.grad)]
    for n, p in tp.named_parameters():
        full = dict(ref.named_parameters())[n].detach()
        checks.append((f"weight {n}", p.detach(), full_weight_shard(full, p, topo)))
        checks.append((f"grad {n}", p.grad, full_weight_shard(ref_grads[n], p, topo)))
    return {"checks": checks, "local_heads": local_heads,
            "names": sorted(n for n, _ in tp.named_parameters()), "ref_names": sorted(ref_grads)}


def run_model_case(name, topo):
    from moe_train.parallel import is_tensor_parallel_param, parallelize
    from moe_train.parallel.tensor_parallel import full_weight_shard

    model_kw, moe_kw = MODEL_CASES[name]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 32, (B, S), generator=g)
    targets = torch.randint(0, 32, (B, S), generator=g)

    def loss_fn(out):
        return nn.functional.cross_entropy(out.logits.reshape(-1, 32), targets.reshape(-1)) + out.aux_loss

    ref = build_full_model(model_kw, moe_kw)
    ref_out = ref(ids)
    loss_fn(ref_out).backward()
    ref_grads = _grads(ref)
    ref_params = dict(ref.named_parameters())

    model = parallelize(build_full_model(model_kw, moe_kw), topo)
    out = model(ids)
    loss_fn(out).backward()
    checks = [("logits", out.logits.detach(), ref_out.logits.detach()),
              ("aux_loss", out.aux_loss.detach(), ref_out.aux_loss.detach())]
    replicated = {}
    sharded = []
    for n, p in model.named_parameters():
        checks.append((f"grad {n}", p.grad, full_weight_shard(ref_grads[n], p, topo)))
        checks.append((f"weight {n}", p.detach(), full_weight_shard(ref_params[n].detach(), p, topo)))
        if is_tensor_parallel_param(p):
            sharded.append(n)
        else:
            replicated[n] = p.grad.clone()
    return {"checks": checks, "replicated_grads": replicated, "sharded": sorted(sharded),
            "state_keys": sorted(model.state_dict()), "ref_state_keys": sorted(ref.state_dict())}


def tp_worker(rank, world):
    topo = init_topology_gloo(tensor_parallel_size=2)
    assert topo.tp_size == 2 and topo.tp_rank == rank and topo.dp_size == 1
    report = {name: run_module_case(name, topo) for name in MODULE_CASES}
    report.update({name: run_model_case(name, topo) for name in MODEL_CASES})
    return report


@pytest.fixture(scope="module")
def tp_run():
    return run_distributed(tp_worker, 2, timeout=150)


@pytest.mark.parametrize("case", list(MODULE_CASES))
def test_tp_module_equals_tp1(tp_run, case):
    for rank, report in enumerate(tp_run):
        r = report[case]
        assert_checks(r["checks"], f"rank {rank}", RTOL, ATOL)
        assert r["names"] == r["ref_names"]   # same parameter names as nn.Linear


def test_tp_attention_holds_its_own_heads(tp_run):
    # alibi_gqa: 6 heads, 2 kv heads over 2 ranks.
    assert [r["attention_alibi_gqa"]["local_heads"] for r in tp_run] == [(3, 1, 0), (3, 1, 3)]
    assert [r["attention_rope_gqa"]["local_heads"] for r in tp_run] == [(2, 1, 0), (2, 1, 2)]


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_tp_model_equals_tp1(tp_run, case):
    for rank, report in enumerate(tp_run):
        r = report[case]
        assert_checks(r["checks"], f"rank {rank}", RTOL, ATOL)
        assert r["state_keys"] == r["ref_state_keys"]
    sharded = tp_run[0][case]["sharded"]
    assert any(".attn.wq." in n for n in sharded) and any(".attn.wo." in n for n in sharded)
    if case == "moe_model_shared_experts":
        # Dense MLP in block 0 and the shared expert are sharded; routed experts are not.
        assert "blocks.0.ffn.w2.weight" in sharded
        assert "blocks.1.ffn.shared_experts.w1.weight" in sharded
        assert not any(".ffn.experts.w" in n for n in sharded)
        assert "blocks.1.ffn.experts.w1" in tp_run[0][case]["replicated_grads"]


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_tp_replicated_grads_identical_across_tp_ranks(tp_run, case):
    a, b = (r[case]["replicated_grads"] for r in tp_run)
    assert a.keys() == b.keys() and any("norm" in n for n in a)
    for n in a:
        assert torch.equal(a[n], b[n]), f"{n}: replicated gradient differs across TP ranks"
