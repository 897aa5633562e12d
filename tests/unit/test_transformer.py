"""The whole model: causality, init, tying, GQA, MoE placement and outputs,
and the overfitting check of issue 2 section 6."""
import math

import pytest
import torch

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.mlp import MLP
from moe_train.model.norm import RMSNorm, build_norm
from moe_train.model.transformer import ModelOutput, Transformer, build_model
from moe_train.moe.layer import MoELayer

DENSE = MoEConfig(num_experts=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices: intra-op threads only add contention (30x slower on a
    # shared 2-core machine), so run this file single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw):
    base = dict(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=64, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("pe", ["rope", "alibi"])
@pytest.mark.parametrize("moe", [DENSE, MoEConfig(num_experts=4, top_k=2, capacity_factor=None)],
                         ids=["dense", "moe-dropless"])
def test_changing_future_tokens_leaves_earlier_logits_unchanged(pe, moe):
    torch.manual_seed(0)
    model = build_model(tiny(position_embedding=pe), moe).eval()
    ids = torch.randint(0, 32, (2, 12))
    t = 6
    other = ids.clone()
    other[:, t + 1:] = (ids[:, t + 1:] + 1 + torch.randint(0, 30, (2, 5))) % 32
    a, b = model(ids).logits, model(other).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_megatron_init_stds():
    torch.manual_seed(0)
    L, std = 4, 0.05
    mcfg = ModelConfig(vocab_size=512, hidden_size=128, num_layers=L, num_heads=4,
                       ffn_hidden_size=256, init_std=std, norm="rmsnorm")
    model = Transformer(mcfg, MoEConfig(num_experts=4, top_k=1, layer_freq=2))
    out_std = std / math.sqrt(2 * L)

    def check(w, want):
        assert abs(w.float().mean().item()) < want * 0.05
        assert w.float().std().item() == pytest.approx(want, rel=0.05)

    check(model.embed.weight, std)
    check(model.lm_head.weight, std)
    for block in model.blocks:
        for name in ("wq", "wk", "wv"):
            check(getattr(block.attn, name).weight, std)
        check(block.attn.wo.weight, out_std)
        # Stacked experts: w1/w3 [E,D,F], w2 [E,F,D]; a dense MLP: nn.Linear weights.
        mlp = block.ffn.experts if block.is_moe else block.ffn
        weight = (lambda m: m) if block.is_moe else (lambda m: m.weight)
        check(weight(mlp.w1), std)
        check(weight(mlp.w3), std)
        check(weight(mlp.w2), out_std)
        for norm in (block.attn_norm, block.ffn_norm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(model.final_norm.weight, torch.ones_like(model.final_norm.weight))


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = Transformer(tiny(tie_embeddings=True), DENSE)
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert sum(p.numel() for p in tied.parameters()) == \
        sum(p.numel() for p in Transformer(tiny(), DENSE).parameters()) - 32 * 32
    out = tied(torch.randint(0, 32, (1, 4))).logits.sum()
    out.backward()
    assert tied.embed.weight.grad is tied.lm_head.weight.grad
    untied = Transformer(tiny(), DENSE)
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_gqa_kv_heads_shapes():
    model = Transformer(tiny(num_heads=4, num_kv_heads=1), DENSE)
    attn = model.blocks[0].attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_offset) == (4, 1, 0)
    assert attn.wq.weight.shape == (32, 32) and attn.wk.weight.shape == (8, 32)
    assert attn.wv.weight.shape == (8, 32) and attn.wo.weight.shape == (32, 32)


@pytest.mark.parametrize("num_experts,layer_freq,pattern", [
    (0, 1, [False] * 4), (4, 1, [True] * 4), (4, 2, [False, True, False, True]),
    (4, 3, [False, False, True, False]),
])
def test_moe_layer_placement(num_experts, layer_freq, pattern):
    model = Transformer(tiny(num_layers=4), MoEConfig(num_experts=num_experts, top_k=1,
                                                      layer_freq=layer_freq))
    assert [b.is_moe for b in model.blocks] == pattern
    assert [isinstance(b.ffn, MoELayer) for b in model.blocks] == pattern
    assert all(isinstance(b.ffn, MLP) for b in model.blocks if not b.is_moe)
    assert len(model.moe_blocks) == sum(pattern)


def test_model_output_sums_the_moe_layers():
    torch.manual_seed(0)
    model = Transformer(tiny(num_layers=4), MoEConfig(num_experts=4, top_k=2, layer_freq=2,
                                                      aux_loss="switch", z_loss_coef=1e-3))
    seen = []
    for block in model.moe_blocks:
        block.ffn.register_forward_hook(lambda mod, inp, out: seen.append(out))
    out = model(torch.randint(0, 32, (2, 8)))
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 8, 32)
    assert len(seen) == 2 and len(out.moe_stats) == 2
    torch.testing.assert_close(out.aux_loss, seen[0].aux_loss + seen[1].aux_loss)
    assert set(out.losses) == {"load_balancing", "z_loss"}
    for name in out.losses:
        torch.testing.assert_close(out.losses[name], seen[0].losses[name] + seen[1].losses[name])
    for stats, layer_out in zip(out.moe_stats, seen):
        assert torch.equal(stats["tokens_per_expert"], layer_out.stats["tokens_per_expert"])
        assert int(stats["tokens_per_expert"].sum()) == 2 * 8 * 2  # dropless top-2
    out.aux_loss.backward()
    assert model.moe_blocks[0].ffn.router.weight.grad.abs().sum() > 0

    dense = Transformer(tiny(), DENSE)(torch.randint(0, 32, (1, 4)))
    assert dense.aux_loss.shape == () and dense.aux_loss.item() == 0.0
    assert dense.losses == {} and dense.moe_stats == []


def test_rmsnorm_matches_formula_and_transformers_and_keeps_fp32_stats():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 4 + 1
    norm = build_norm("rmsnorm", 16, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    want = norm.weight * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), want)
    hf = LlamaRMSNorm(16, eps=1e-6)
    hf.weight.data.copy_(norm.weight.data)
    torch.testing.assert_close(norm(x), hf(x))
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(norm.to(torch.bfloat16)(xb), hf.to(torch.bfloat16)(xb), rtol=0, atol=0)
    assert isinstance(norm, RMSNorm)
    assert isinstance(build_norm("layernorm", 16, 1e-5), torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="model.norm"):
        build_norm("batchnorm", 16)


# A bf16-cast model against its fp32 twin, with the router and RoPE tables
# checked to stay fp32: tests/unit/test_bf16_precision.py.


# ----------------------------------------------------------------------------
# Overfitting one small batch (issue 2 section 6)

ROUTERS = {
    "top1": MoEConfig(num_experts=4, top_k=1, router="token_choice", capacity_factor=None),
    "top2": MoEConfig(num_experts=4, top_k=2, router="token_choice", capacity_factor=None),
    "expert_choice": MoEConfig(num_experts=4, router="expert_choice", capacity_factor=2.0),
}


@pytest.mark.parametrize("pe", ["rope", "alibi"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_two_layer_moe_overfits_one_batch(router, pe):
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=32, hidden_size=32, num_layers=2, num_heads=2,
                       ffn_hidden_size=32, max_seq_len=16, position_embedding=pe)
    model = build_model(mcfg, ROUTERS[router])
    assert all(b.is_moe for b in model.blocks)
    ids = torch.randint(0, 32, (4, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        out = model(inputs)
        lm_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 32), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (lm_loss + out.aux_loss).backward()
        opt.step()
        losses.append(lm_loss.item())
    assert losses[-1] < 0.1 * losses[0], f"{router}/{pe}: {losses[0]:.3f} -> {losses[-1]:.3f}"
