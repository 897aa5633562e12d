"""MLP against transformers / the formula; the stacked experts' fast
implementations (loop, grouped_mm) against the slow masked reference loop
(outputs and every gradient, fp32 rtol 1e-5), both through LocalDispatcher's
per-expert blocks and through the packed [N,D] layout; bad expert_impl values."""
import math
import re

import pytest
import torch

from moe_train.config import ConfigError, MoEConfig, config_from_dict
from moe_train.model.mlp import MLP
from moe_train.moe.dispatcher import LocalDispatcher
from moe_train.moe.experts import Experts
from moe_train.moe.router import build_router
from moe_train.moe.routing import RoutingDecision


# ---------------------------------------------------------------------------- MLP

def test_swiglu_mlp_matches_transformers_llama_mlp():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    torch.manual_seed(0)
    D, Fh = 12, 20
    mlp = MLP(D, Fh, "swiglu")
    hf = llama.LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=Fh, hidden_act="silu",
                                              num_attention_heads=2, num_key_value_heads=2))
    with torch.no_grad():
        hf.gate_proj.weight.copy_(mlp.w1.weight)
        hf.up_proj.weight.copy_(mlp.w3.weight)
        hf.down_proj.weight.copy_(mlp.w2.weight)
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(mlp(x), hf(x))


def test_gelu_mlp_matches_erf_formula():
    torch.manual_seed(0)
    D, Fh = 6, 10
    mlp = MLP(D, Fh, "gelu")
    assert mlp.w3 is None
    x = torch.randn(4, D)
    h = x @ mlp.w1.weight.t()
    expected = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ mlp.w2.weight.t()
    torch.testing.assert_close(mlp(x), expected)


def test_mlp_init_and_no_bias():
    torch.manual_seed(0)
    mlp = MLP(256, 512, "swiglu", init_std=0.05, output_std=0.01)
    assert all(m.bias is None for m in (mlp.w1, mlp.w2, mlp.w3))
    assert abs(mlp.w1.weight.std().item() - 0.05) < 0.002
    assert abs(mlp.w3.weight.std().item() - 0.05) < 0.002
    assert abs(mlp.w2.weight.std().item() - 0.01) < 0.0005
    assert abs(MLP(256, 512, "gelu", init_std=0.05).w2.weight.std().item() - 0.05) < 0.002
    with pytest.raises(ValueError, match="activation"):
        MLP(4, 8, "relu")


# ---------------------------------------------------------------------------- helpers

FAST = ("loop", "grouped_mm")


def run_impl(experts, impl, x_TD, decision, blocks=None):
    """Dispatch, run ``experts`` with ``impl``, combine (EP=1)."""
    experts.impl = impl
    d = LocalDispatcher()
    blocks = experts.wants_blocks(x_TD) if blocks is None else blocks
    x_routed, counts, meta = d.dispatch(x_TD, decision, blocks=blocks)
    y_routed = experts(x_routed, counts)
    assert isinstance(y_routed, list) == blocks
    return d.combine(y_routed, meta)


def assert_same_outputs_and_grads(f_fast, f_ref, tensors, module, atol=1e-6):
    """Outputs and gradients wrt ``tensors`` and every parameter of ``module``."""
    torch.manual_seed(123)
    y_fast, y_ref = f_fast(), f_ref()
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=atol)
    probe = torch.randn_like(y_ref)
    params = [p for p in module.parameters()]
    wrt = list(tensors) + params
    g_fast = torch.autograd.grad((y_fast * probe).sum(), wrt, allow_unused=True)
    g_ref = torch.autograd.grad((y_ref * probe).sum(), wrt, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_fast, g_ref)):
        # Every expert gets a gradient (zeros when it got no tokens), so
        # optimizer state never depends on routing.
        assert a is not None and b is not None, f"gradient {i} is None"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)
    return y_fast


def hand_decision(token_index, expert_index, T, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(len(token_index), generator=g) + 0.1).requires_grad_(True)
    logits = torch.randn(T, E, generator=g)
    return RoutingDecision(token_index=torch.tensor(token_index, dtype=torch.long),
                           expert_index=torch.tensor(expert_index, dtype=torch.long),
                           weight=weight, logits=logits, probs=logits.softmax(-1),
                           num_experts=E, dropped_fraction=torch.tensor(0.0))


def mlp_of(experts, e):
    """Expert e of the stacked weights as an independent MLP module."""
    mlp = MLP(experts.hidden_size, experts.ffn_hidden_size, experts.activation)
    with torch.no_grad():
        mlp.w1.weight.copy_(experts.w1[e].t())
        mlp.w2.weight.copy_(experts.w2[e].t())
        if mlp.w3 is not None:
            mlp.w3.weight.copy_(experts.w3[e].t())
    return mlp


# ---------------------------------------------------------------------------- hand-built decisions

def test_stacked_shapes():
    experts = Experts(5, 8, 16, "swiglu")
    assert experts.w1.shape == (5, 8, 16) and experts.w3.shape == (5, 8, 16)
    assert experts.w2.shape == (5, 16, 8)
    assert Experts(5, 8, 16, "gelu").w3 is None
    assert [n for n, _ in experts.named_parameters()] == ["w1", "w3", "w2"]


@pytest.mark.parametrize("blocks", [True, False])
@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fast_equals_reference_on_hand_built_decision(activation, impl, blocks):
    # Experts 1 and 4 get no tokens; token 0 goes to three experts, token 3 to
    # none, token 5 twice; assignments deliberately not in expert order.
    T, E, D, Fh = 6, 5, 8, 16
    tok = [0, 2, 0, 5, 1, 0, 5, 4]
    exp = [3, 0, 2, 2, 3, 0, 0, 2]
    torch.manual_seed(1)
    experts = Experts(E, D, Fh, activation, init_std=0.3)
    x = torch.randn(T, D, requires_grad=True)
    decision = hand_decision(tok, exp, T, E)
    y = assert_same_outputs_and_grads(lambda: run_impl(experts, impl, x, decision, blocks),
                                      lambda: experts.reference_forward(x, decision),
                                      [x, decision.weight], experts)
    assert y[3].abs().sum() == 0
    # The reference itself, written out with independent MLP modules.
    with torch.no_grad():
        w = decision.weight
        y0 = w[0] * mlp_of(experts, 3)(x[0]) + w[2] * mlp_of(experts, 2)(x[0]) \
            + w[5] * mlp_of(experts, 0)(x[0])
        torch.testing.assert_close(y[0], y0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocks", [True, False])
@pytest.mark.parametrize("impl", FAST)
def test_no_assignments_at_all(impl, blocks):
    T, E, D = 4, 3, 8
    experts = Experts(E, D, 8, "swiglu", init_std=0.3)
    x = torch.randn(T, D, requires_grad=True)
    decision = hand_decision([], [], T, E)
    y = assert_same_outputs_and_grads(lambda: run_impl(experts, impl, x, decision, blocks),
                                      lambda: experts.reference_forward(x, decision),
                                      [x], experts)
    assert y.shape == (T, D) and y.abs().sum() == 0


def test_loop_backward_fills_one_stacked_gradient_per_weight():
    # The loop's backward returns [E,D,F] gradients whose rows of experts
    # without tokens are exact zeros (no uninitialised memory leaks through).
    torch.manual_seed(3)
    experts = Experts(4, 8, 8, "swiglu", init_std=0.3, impl="loop")
    blocks = [torch.randn(2, 8), torch.randn(0, 8), torch.randn(3, 8), torch.randn(0, 8)]
    ys = experts(blocks, torch.tensor([2, 0, 3, 0]))
    sum(y.sum() for y in ys).backward()
    for p in experts.parameters():
        assert p.grad.shape == p.shape
        assert p.grad[1].abs().sum() == 0 and p.grad[3].abs().sum() == 0
        assert p.grad[0].abs().sum() > 0


@pytest.mark.parametrize("impl", FAST)
def test_stride_zero_incoming_gradient(impl):
    # y.sum() sends a stride-0 gradient, which _grouped_mm's CPU backward
    # rejects unless it is made contiguous first.
    torch.manual_seed(4)
    experts = Experts(3, 8, 8, "swiglu", init_std=0.3, impl=impl)
    x = torch.randn(5, 8, requires_grad=True)
    experts(x, torch.tensor([2, 0, 3])).sum().backward()
    ref = torch.cat([experts.expert_forward(0, x[:2]), experts.expert_forward(2, x[2:])])
    g = torch.autograd.grad(ref.sum(), x)[0]
    torch.testing.assert_close(x.grad, g, rtol=1e-5, atol=1e-6)


def test_wrong_count_length_is_an_error():
    experts = Experts(3, 8, 8, "swiglu")
    with pytest.raises(ValueError, match="local expert"):
        experts(torch.randn(2, 8), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="local expert"):
        experts([torch.randn(1, 8), torch.randn(1, 8)], torch.tensor([1, 1, 0]))


@pytest.mark.parametrize("impl", FAST)
def test_expert_offset_holds_a_block_of_global_experts(impl):
    # Rank 1 of EP=2 over E=4 holds global experts 2 and 3: keep_experts
    # slices the stacked weights; the reference loop ignores assignments to
    # experts 0 and 1 and uses local expert e-2.
    T, D = 5, 8
    torch.manual_seed(2)
    full = Experts(4, D, 8, "swiglu", init_std=0.3, impl=impl)
    local = Experts(4, D, 8, "swiglu", init_std=0.3, impl=impl)
    local.load_state_dict(full.state_dict())
    local.keep_experts(2, 2)
    assert local.expert_offset == 2 and local.w1.shape == (2, D, 8)
    torch.testing.assert_close(local.w2, full.w2[2:])
    x = torch.randn(T, D)
    decision = hand_decision([0, 1, 2, 3, 4, 0], [0, 3, 2, 1, 3, 2], T, 4)
    with torch.no_grad():
        y = local.reference_forward(x, decision)
        w = decision.weight
        expected = torch.zeros(T, D)
        expected[1] = w[1] * mlp_of(full, 3)(x[1])
        expected[2] = w[2] * mlp_of(full, 2)(x[2])
        expected[4] = w[4] * mlp_of(full, 3)(x[4])
        expected[0] = w[5] * mlp_of(full, 2)(x[0])
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        # The fast path on the rows of the local experts only.
        rows = torch.stack([x[2], x[0], x[1], x[4]])
        out = local(rows, torch.tensor([2, 2]))
        torch.testing.assert_close(out[0], mlp_of(full, 2)(x[2]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[3], mlp_of(full, 3)(x[4]), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- bad values

def test_unknown_impl_is_one_line_error():
    with pytest.raises(ConfigError, match=r"moe.expert_impl \('fast'\) must be one of: auto, "
                                          r"grouped_mm, loop, reference"):
        Experts(2, 8, 8, impl="fast")
    with pytest.raises(ConfigError, match="moe.expert_impl"):
        config_from_dict({"moe": {"num_experts": 4, "expert_impl": "grouped"}})


def test_grouped_mm_without_torch_support_names_the_version(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm")
    msg = re.escape(f"torch {torch.__version__} lacks")
    with pytest.raises(ValueError, match=msg):
        Experts(2, 8, 8, impl="grouped_mm")
    with pytest.raises(ConfigError, match=msg) as err:
        config_from_dict({"moe": {"num_experts": 4, "expert_impl": "grouped_mm"}})
    assert "\n" not in str(err.value)
    # auto falls back to the loop everywhere.
    assert Experts(2, 8, 8).resolved_impl(torch.device("cuda")) == "loop"


def test_grouped_mm_needs_aligned_sizes():
    with pytest.raises(ValueError, match="multiples of 8"):
        Experts(2, 8, 12, impl="grouped_mm")
    assert Experts(2, 8, 12).resolved_impl(torch.device("cuda")) == "loop"
    assert Experts(2, 8, 16).resolved_impl(torch.device("cuda")) == "grouped_mm"
    assert Experts(2, 8, 16).resolved_impl(torch.device("cpu")) == "loop"
    # auto keeps grouped_mm to the dtype its CUDA kernels are built for.
    assert Experts(2, 8, 16).resolved_impl(torch.device("cuda"), torch.float32) == "loop"
    assert Experts(2, 8, 16, impl="grouped_mm").resolved_impl(
        torch.device("cuda"), torch.float32) == "grouped_mm"


# ---------------------------------------------------------------------------- the real router

GRID = [(E, k, c) for E in (1, 4, 16) for k in (1, 2, 4) for c in (1.0, None) if k <= E]


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("E,k,capacity_factor", GRID)
def test_fast_equals_reference_with_real_router(E, k, capacity_factor, impl):
    B, S, D, Fh = 2, 8, 8, 16
    cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=capacity_factor,
                    hidden_size=D, ffn_hidden_size=Fh, activation="swiglu")
    torch.manual_seed(E * 10 + k)
    router = build_router(cfg)
    torch.nn.init.normal_(router.weight, std=1.0)  # decisive, uneven routing: capacity drops
    experts = Experts(E, D, Fh, "swiglu", init_std=0.3)
    module = torch.nn.ModuleList([router, experts])
    x = torch.randn(B * S, D, requires_grad=True)

    decisions = []

    def fast():
        decision = router(x, B, S)
        decisions.append(decision)
        return run_impl(experts, impl, x, decision)

    assert_same_outputs_and_grads(fast, lambda: experts.reference_forward(x, router(x, B, S)),
                                  [x], module)
    decision = decisions[0]
    if capacity_factor is None:
        assert decision.token_index.numel() == B * S * k
    # The router weight really receives gradient through the gates.
    g = torch.autograd.grad(fast().sum(), router.weight)[0]
    assert E == 1 or g.abs().sum() > 0


@pytest.mark.parametrize("impl", FAST)
def test_fast_equals_reference_with_expert_choice(impl):
    B, S, D, Fh, E = 4, 6, 8, 16, 4
    cfg = MoEConfig(num_experts=E, router="expert_choice", capacity_factor=1.0,
                    hidden_size=D, ffn_hidden_size=Fh, activation="gelu")
    torch.manual_seed(9)
    router = build_router(cfg)
    torch.nn.init.normal_(router.weight, std=1.0)
    experts = Experts(E, D, Fh, "gelu", init_std=0.3)
    x = torch.randn(B * S, D, requires_grad=True)
    assert_same_outputs_and_grads(lambda: run_impl(experts, impl, x, router(x, B, S)),
                                  lambda: experts.reference_forward(x, router(x, B, S)),
                                  [x], torch.nn.ModuleList([router, experts]))


@pytest.mark.parametrize("impl", FAST)
def test_bf16_autocast_close_to_fp32_reference(impl):
    # Under bf16 autocast each matmul rounds its inputs to bf16 (relative
    # error 2^-8 each) and accumulates in fp32; over the 3 chained matmuls of
    # a SwiGLU expert with D=F=16 and O(1) values the output error stays
    # within a few bf16 ulps of the output scale: rtol 4*2^-8 ~ 0.016, atol
    # 0.05 against outputs of magnitude ~1.
    torch.manual_seed(7)
    experts = Experts(4, 16, 16, "swiglu", init_std=0.3)
    x = torch.randn(12, 16)
    decision = hand_decision(list(range(12)) * 2, [0, 1, 2, 3] * 6, 12, 4)
    with torch.no_grad():
        ref = experts.reference_forward(x, decision)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run_impl(experts, impl, x, decision)
    assert y.dtype == torch.float32  # combine sums in the gates' fp32
    torch.testing.assert_close(y, ref, rtol=4 * 2 ** -8, atol=0.05)


def test_loop_takes_blocks_only_from_the_mmap_threshold_up():
    from moe_train.moe.experts import BLOCKS_MIN_BYTES
    experts = Experts(4, 8, 8, "swiglu", impl="loop")
    x = torch.zeros(3, 8)
    rows_at_threshold = BLOCKS_MIN_BYTES // (8 * 4)
    assert experts.wants_blocks(x, rows_at_threshold)
    assert not experts.wants_blocks(x, rows_at_threshold - 1)
    assert experts.wants_blocks(x)  # row count unknown: blocks, the safe side
    experts.impl = "grouped_mm"
    assert not experts.wants_blocks(x, rows_at_threshold)
