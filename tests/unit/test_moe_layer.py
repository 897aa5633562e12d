"""MoELayer against a dense reference; dropless accounting; causal safety of
the routing groups; bf16 autocast."""
import dataclasses
import warnings

import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.model.mlp import MLP
from moe_train.moe import MoELayer, MoEOutput

D, FFN = 16, 24


def make_layer(seed=0, router_std=1.0, **overrides):
    fields = dict(num_experts=4, top_k=2, hidden_size=D, ffn_hidden_size=FFN, activation="swiglu")
    fields.update(overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # expert_choice_group=batch warns about the leak on purpose
        # init_std large enough that outputs are O(1) and tolerances mean something.
        layer = MoELayer(MoEConfig(**fields), init_std=0.3)
    # A decisive router (default init is near uniform) so that capacity
    # actually overflows and gates differ a lot between experts.
    torch.nn.init.normal_(layer.router.weight, std=router_std)
    return layer


def expert_apply(layer, e, x):
    """Expert e written out from the stacked weights (not through Experts)."""
    ex = layer.experts
    h = x @ ex.w1[e]
    if ex.w3 is None:
        return torch.nn.functional.gelu(h) @ ex.w2[e]
    return (torch.nn.functional.silu(h) * (x @ ex.w3[e])) @ ex.w2[e]


def dense_from_decision(layer, x, decision):
    """Run EVERY expert on EVERY token, then pick, per kept assignment, the
    output of its expert at its token, scaled by its gate."""
    B, S, _ = x.shape
    x_TD = x.reshape(B * S, D)
    all_ETD = torch.stack([expert_apply(layer, e, x_TD) for e in range(layer.experts.num_experts)])
    y = [torch.zeros(D) for _ in range(B * S)]
    for t, e, w in zip(decision.token_index.tolist(), decision.expert_index.tolist(),
                       decision.weight.tolist()):
        y[t] = y[t] + w * all_ETD[e, t]
    y_TD = torch.stack(y)
    if layer.shared_experts is not None:
        y_TD = y_TD + layer.shared_experts(x_TD)
    return y_TD.view(B, S, D)


CONFIGS = {
    "tc_top2": dict(),
    "tc_top1_mixtral_order": dict(top_k=1, score_order="topk_then_softmax"),
    "tc_top2_capacity": dict(capacity_factor=1.0),
    "tc_top2_capacity_gshard": dict(capacity_factor=1.0, capacity_priority="gshard"),
    "tc_top4_of_8_shared": dict(num_experts=8, top_k=4, num_shared_experts=2),
    "ec_position": dict(router="expert_choice"),
    "ec_batch_gelu": dict(router="expert_choice", expert_choice_group="batch", activation="gelu"),
}


@pytest.mark.parametrize("impl", ["auto", "loop", "grouped_mm", "reference"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_equals_dense_reference(name, impl):
    layer = make_layer(seed=3, expert_impl=impl, **CONFIGS[name])
    x = torch.randn(4, 6, D)
    out = layer(x)
    assert isinstance(out, MoEOutput) and out.output.shape == x.shape
    with torch.no_grad():
        decision = layer.router(x.reshape(-1, D), 4, 6)
        expected = dense_from_decision(layer, x, decision)
    torch.testing.assert_close(out.output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_shared", [0, 1])
def test_token_choice_layer_equals_topk_of_softmax_written_out(num_shared):
    # Independent of the router code: gates from softmax(x W^T), top-K,
    # renormalised (softmax_then_topk, normalize_topk), no capacity.
    layer = make_layer(seed=4, num_experts=6, top_k=2, num_shared_experts=num_shared)
    x = torch.randn(3, 5, D)
    out = layer(x).output
    with torch.no_grad():
        x_TD = x.reshape(-1, D)
        probs = (x_TD @ layer.router.weight.t()).softmax(-1)
        expected = torch.zeros_like(x_TD)
        for t in range(x_TD.shape[0]):
            top = probs[t].topk(2)
            gates = top.values / top.values.sum()
            for g, e in zip(gates, top.indices.tolist()):
                expected[t] += g * expert_apply(layer, e, x_TD[t])
            if num_shared:
                expected[t] += layer.shared_experts(x_TD[t])
    torch.testing.assert_close(out, expected.view_as(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_fast_and_reference_impls_agree_with_gradients(impl):
    grouped = make_layer(seed=5, capacity_factor=1.0, num_shared_experts=1, z_loss_coef=1e-3,
                         expert_impl=impl)
    reference = make_layer(seed=6, capacity_factor=1.0, num_shared_experts=1, z_loss_coef=1e-3,
                           expert_impl="reference")
    reference.load_state_dict(grouped.state_dict())
    x = torch.randn(4, 6, D)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [layer(xi) for layer, xi in zip((grouped, reference), xs)]
    probe = torch.randn_like(x)
    for o, xi in zip(outs, xs):
        ((o.output * probe).sum() + o.aux_loss).backward()
    torch.testing.assert_close(outs[0].output, outs[1].output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(grouped.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("K,E", [(1, 4), (2, 4), (4, 8)])
def test_dropless_every_token_gets_k_experts(K, E):
    B, S = 3, 7
    layer = make_layer(seed=7, num_experts=E, top_k=K, capacity_factor=None)
    x = torch.randn(B, S, D)
    out = layer(x)
    tpe = out.stats["tokens_per_expert"]
    assert tpe.shape == (E,) and tpe.dtype == torch.long and not tpe.requires_grad
    assert int(tpe.sum()) == B * S * K
    assert out.stats["dropped_fraction"].dim() == 0 and float(out.stats["dropped_fraction"]) == 0.0
    decision = layer.router(x.reshape(-1, D), B, S)
    for t in range(B * S):
        experts_of_t = decision.expert_index[decision.token_index == t].tolist()
        assert len(experts_of_t) == K and len(set(experts_of_t)) == K
    assert torch.equal(tpe, torch.bincount(decision.expert_index, minlength=E))


def test_capacity_drops_are_reported():
    layer = make_layer(seed=8, capacity_factor=1.0)
    out = layer(torch.randn(4, 8, D))
    dropped = float(out.stats["dropped_fraction"])
    assert 0.0 < dropped < 1.0
    assert int(out.stats["tokens_per_expert"].sum()) == round(4 * 8 * 2 * (1 - dropped))


def test_aux_loss_is_sum_of_losses():
    layer = make_layer(seed=9, z_loss_coef=1e-3, aux_loss="switch")
    out = layer(torch.randn(2, 4, D))
    assert set(out.losses) == {"load_balancing", "z_loss"}
    torch.testing.assert_close(out.aux_loss, out.losses["load_balancing"] + out.losses["z_loss"])
    assert out.aux_loss.requires_grad

    none = make_layer(seed=9, aux_loss="none", z_loss_coef=0.0)(torch.randn(2, 4, D))
    assert none.losses == {} and none.aux_loss.dim() == 0 and float(none.aux_loss) == 0.0


# ---------------------------------------------------------------------------- causal safety

def expert0_lovers(layer, n, scale=8.0):
    """n inputs the router sends to expert 0 first, with near-certainty."""
    w0 = layer.router.weight[0].detach()
    g = torch.Generator().manual_seed(11)
    return scale * w0 / w0.norm() + 0.1 * torch.randn(n, D, generator=g)


def past_and_future_change(layer, x, t):
    """Replace every sequence's tokens after position t with tokens that crowd
    expert 0; return the max output change at positions <= t and > t."""
    B, S, _ = x.shape
    x2 = x.clone()
    x2[:, t + 1:] = expert0_lovers(layer, B * (S - t - 1)).view(B, S - t - 1, D)
    with torch.no_grad():
        y1, y2 = layer(x).output, layer(x2).output
    return ((y1[:, :t + 1] - y2[:, :t + 1]).abs().max().item(),
            (y1[:, t + 1:] - y2[:, t + 1:]).abs().max().item())


CAUSAL = [
    ("ec_position", dict(router="expert_choice", expert_choice_group="position"), False),
    ("tc_capacity_position", dict(capacity_factor=1.0, capacity_priority="position"), False),
    ("ec_batch", dict(router="expert_choice", expert_choice_group="batch"), True),
    ("tc_capacity_gshard", dict(capacity_factor=1.0, capacity_priority="gshard"), True),
]


@pytest.mark.parametrize("name,overrides,leaks", CAUSAL, ids=[c[0] for c in CAUSAL])
def test_future_tokens_do_not_change_past_outputs(name, overrides, leaks):
    B, S = 4, 8
    layer = make_layer(seed=12, **overrides)
    torch.manual_seed(13)
    x = torch.randn(B, S, D)
    if overrides.get("router", "token_choice") == "token_choice":
        # Capacity must really overflow, or the test proves nothing.
        assert float(layer(x).stats["dropped_fraction"]) > 0
    past = []
    for t in (0, S // 2 - 1, S - 2):
        change_past, change_future = past_and_future_change(layer, x, t)
        assert change_future > 1e-2, "the perturbation must change the perturbed positions"
        past.append(change_past)
    if leaks:
        # The same check catches a routing group that sees the future.
        assert max(past) > 1e-3, f"{name} should leak the future but the test saw no change"
    else:
        assert max(past) <= 1e-5, f"{name}: outputs at positions <= t changed by {past}"


# ---------------------------------------------------------------------------- precision and API

@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_keeps_router_fp32(router, x_dtype):
    from bf16_tolerance import bf16_atol, rms

    layer = make_layer(seed=14, router=router, num_shared_experts=1, capacity_factor=1.0)
    seen = {}
    layer.router.register_forward_hook(lambda m, i, o: seen.update(decision=o))
    # The reference sees the same (rounded) input, so the fp32 router makes
    # the same choices in both runs and only the experts' bf16 math differs.
    x = torch.randn(2, 6, D).to(x_dtype).float()
    reference = layer(x).output.detach()
    xb = x.to(x_dtype).requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = layer(xb)
    decision = seen["decision"]
    assert decision.logits.dtype == torch.float32
    assert decision.probs.dtype == torch.float32 and decision.weight.dtype == torch.float32
    assert out.output.dtype == x_dtype
    assert out.aux_loss.dtype == torch.float32
    # Path through a routed or shared SwiGLU expert: w1 and w3 (D=16, both
    # feeding the output through silu(h1)*h3) then w2 (F=24): 3 matmuls;
    # bf16 roundings of x, h1, h3, silu(h1), the product and the output: 6.
    # Gates and the combine stay fp32 (bf16_tolerance.py has the derivation).
    tol = bf16_atol(reference, matmuls=3, roundings=6, reduction=FFN)
    assert rms(reference) > 0.3
    torch.testing.assert_close(out.output.float(), reference, rtol=0, atol=tol)
    (out.output.float().sum() + out.aux_loss).backward()
    assert torch.isfinite(xb.grad).all() and layer.router.weight.grad is not None


def test_missing_sizes_name_the_field_and_config_wins():
    with pytest.raises(ValueError, match="moe.hidden_size"):
        MoELayer(MoEConfig(num_experts=2, top_k=1), ffn_hidden_size=8, activation="swiglu")
    layer = MoELayer(MoEConfig(num_experts=2, top_k=1, ffn_hidden_size=12), hidden_size=8,
                     ffn_hidden_size=99, activation="gelu")
    assert layer.experts.w1.shape == (2, 8, 12)
    assert layer.experts.w3 is None
    assert layer.shared_experts is None
    assert not any(p is None for p in layer.parameters())
    assert "dispatcher" not in dict(layer.named_children())


def test_shared_experts_width_and_init():
    layer = MoELayer(MoEConfig(num_experts=2, top_k=1, num_shared_experts=3), hidden_size=8,
                     ffn_hidden_size=4, activation="swiglu", init_std=0.1, output_std=0.01)
    assert isinstance(layer.shared_experts, MLP)
    assert layer.shared_experts.w1.weight.shape == (12, 8)
    assert layer.shared_experts.output_std == 0.01 and layer.experts.output_std == 0.01
    assert layer.experts.init_std == 0.1
    assert dataclasses.is_dataclass(layer.cfg) and layer.cfg.hidden_size == 8
