"""MLP against transformers / the formula; fast grouped experts against the
slow masked reference loop (outputs and every gradient), both through
LocalDispatcher's per-expert blocks and through the packed [N,D] layout the
all-to-all dispatcher passes."""
import math

import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.model.mlp import MLP
from moe_train.moe.dispatcher import LocalDispatcher
from moe_train.moe.experts import Experts
from moe_train.moe.permute import make_permutation, permute, unpermute
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

def fast_path(experts, x_TD, decision):
    """LocalDispatcher: per-expert blocks in, blocks out, no [N,D] tensor."""
    d = LocalDispatcher()
    x_routed, counts, meta = d.dispatch(x_TD, decision)
    assert isinstance(x_routed, list)
    y_routed = experts(x_routed, counts)
    assert isinstance(y_routed, list) and len(y_routed) == len(x_routed)
    return d.combine(y_routed, meta)


def packed_path(experts, x_TD, decision):
    """The layout AllToAllDispatcher hands the experts: one [N,D] tensor
    grouped by expert, split by the counts inside Experts.forward."""
    perm = make_permutation(decision, x_TD.shape[0])
    y_routed = experts(permute(x_TD, perm), perm.tokens_per_expert_E)
    assert isinstance(y_routed, torch.Tensor)
    return unpermute(y_routed, perm)


PATHS = {"blocks": fast_path, "packed": packed_path}


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


# ---------------------------------------------------------------------------- hand-built decisions

@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fast_equals_reference_on_hand_built_decision(activation, path):
    # Experts 1 and 4 get no tokens; token 0 goes to three experts, token 3 to
    # none, token 5 twice; assignments deliberately not in expert order.
    T, E, D, Fh = 6, 5, 8, 12
    tok = [0, 2, 0, 5, 1, 0, 5, 4]
    exp = [3, 0, 2, 2, 3, 0, 0, 2]
    torch.manual_seed(1)
    experts = Experts(E, D, Fh, activation, init_std=0.3)
    x = torch.randn(T, D, requires_grad=True)
    decision = hand_decision(tok, exp, T, E)
    y = assert_same_outputs_and_grads(lambda: PATHS[path](experts, x, decision),
                                      lambda: experts.reference_forward(x, decision),
                                      [x, decision.weight], experts)
    assert y[3].abs().sum() == 0
    # The reference itself, written out for one token with three experts.
    with torch.no_grad():
        w = decision.weight
        y0 = w[0] * experts.experts[3](x[0]) + w[2] * experts.experts[2](x[0]) + w[5] * experts.experts[0](x[0])
        torch.testing.assert_close(y[0], y0)


@pytest.mark.parametrize("path", list(PATHS))
def test_no_assignments_at_all(path):
    T, E, D = 4, 3, 6
    experts = Experts(E, D, 8, "swiglu", init_std=0.3)
    x = torch.randn(T, D, requires_grad=True)
    decision = hand_decision([], [], T, E)
    y = assert_same_outputs_and_grads(lambda: PATHS[path](experts, x, decision),
                                      lambda: experts.reference_forward(x, decision),
                                      [x], experts)
    assert y.shape == (T, D) and y.abs().sum() == 0


def test_wrong_count_length_is_an_error():
    experts = Experts(3, 4, 8, "swiglu")
    with pytest.raises(ValueError, match="local expert"):
        experts(torch.randn(2, 4), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="local expert"):
        experts([torch.randn(1, 4), torch.randn(1, 4)], torch.tensor([1, 1]))


def test_blocks_in_blocks_out_equal_packed_rows():
    # Each output block is its expert applied to its input block, the same
    # rows the packed path produces (an empty block stays empty).
    torch.manual_seed(4)
    experts = Experts(3, 4, 8, "swiglu", init_std=0.3)
    counts = [2, 0, 3]
    x_ND = torch.randn(sum(counts), 4)
    blocks_out = experts(list(torch.split(x_ND, counts)), torch.tensor(counts))
    assert [b.shape for b in blocks_out] == [(n, 4) for n in counts]
    with torch.no_grad():
        for e, (block, rows) in enumerate(zip(blocks_out, torch.split(x_ND, counts))):
            torch.testing.assert_close(block, experts.experts[e](rows))
    torch.testing.assert_close(torch.cat(blocks_out), experts(x_ND, torch.tensor(counts)))


def test_expert_offset_holds_a_block_of_global_experts():
    # Rank 1 of EP=2 over E=4 holds global experts 2 and 3; its reference loop
    # must ignore assignments to experts 0 and 1 and use local module e-2.
    T, D = 5, 6
    torch.manual_seed(2)
    local = Experts(2, D, 8, "swiglu", init_std=0.3, expert_offset=2)
    x = torch.randn(T, D)
    decision = hand_decision([0, 1, 2, 3, 4, 0], [0, 3, 2, 1, 3, 2], T, 4)
    with torch.no_grad():
        y = local.reference_forward(x, decision)
        w = decision.weight
        expected = torch.zeros(T, D)
        expected[1] = w[1] * local.experts[1](x[1])
        expected[2] = w[2] * local.experts[0](x[2])
        expected[4] = w[4] * local.experts[1](x[4])
        expected[0] = w[5] * local.experts[0](x[0])
    torch.testing.assert_close(y, expected)


# ---------------------------------------------------------------------------- the real router

GRID = [(E, k, c) for E in (1, 4, 16) for k in (1, 2, 4) for c in (1.0, None) if k <= E]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("E,k,capacity_factor", GRID)
def test_fast_equals_reference_with_real_router(E, k, capacity_factor, path):
    B, S, D, Fh = 2, 8, 8, 12
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
        return PATHS[path](experts, x, decision)

    assert_same_outputs_and_grads(fast, lambda: experts.reference_forward(x, router(x, B, S)),
                                  [x], module)
    decision = decisions[0]
    if capacity_factor is None:
        assert decision.token_index.numel() == B * S * k
    # The router weight really receives gradient through the gates.
    g = torch.autograd.grad(fast().sum(), router.weight)[0]
    assert E == 1 or g.abs().sum() > 0
