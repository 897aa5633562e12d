"""CUDA-only checks (marker ``gpu``; skipped without CUDA, run by
``make gpu-check``): the grouped_mm experts in bf16 against the fp32
reference, and a dropless grouped_mm MoE layer whose forward and backward
make no host sync (``torch.cuda.set_sync_debug_mode("error")`` turns any
synchronising call into an error)."""
import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.moe import MoELayer

pytestmark = pytest.mark.gpu

D, FFN, E = 64, 128, 8


def make_layer(impl, **overrides):
    torch.manual_seed(0)
    fields = dict(num_experts=E, top_k=2, hidden_size=D, ffn_hidden_size=FFN,
                  activation="swiglu", expert_impl=impl)
    fields.update(overrides)
    layer = MoELayer(MoEConfig(**fields), init_std=0.1).cuda()
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    return layer


def run(layer, x, probe):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    ((out.output.float() * probe).sum() + out.aux_loss).backward()
    return out.output.float()


@pytest.mark.parametrize("overrides", [{}, {"capacity_factor": 1.0}, {"top_k": 8}],
                         ids=["top2", "capacity", "top8"])
def test_grouped_mm_bf16_matches_reference(overrides):
    # Reference: the masked loop in fp32. bf16 autocast rounds each matmul's
    # inputs to bf16 (relative 2^-8) and accumulates in fp32; over the three
    # chained matmuls of an expert (reductions of D=64 and F=128 terms of
    # O(0.1) values) the error of an O(0.3) output stays within a few bf16
    # ulps: rtol 4*2^-8 ~ 0.016 with atol 0.01; gradients likewise, relative
    # to their own scale (atol 0.02 of max |grad|).
    fast = make_layer("grouped_mm", **overrides)
    ref = make_layer("reference", **overrides)
    ref.load_state_dict(fast.state_dict())
    assert fast.experts.resolved_impl(torch.device("cuda")) == "grouped_mm"
    x = torch.randn(4, 32, D, device="cuda")
    probe = torch.randn(4, 32, D, device="cuda")
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y_fast = run(fast, xs[0], probe)
    ref_out = ref(xs[1])
    ((ref_out.output * probe).sum() + ref_out.aux_loss).backward()
    torch.testing.assert_close(y_fast, ref_out.output, rtol=4 * 2 ** -8, atol=0.01)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=4 * 2 ** -8, atol=0.02 * scale,
                                   msg=name)


def test_dropless_grouped_mm_layer_makes_no_host_sync():
    layer = make_layer("grouped_mm")
    x = torch.randn(4, 32, D, device="cuda", requires_grad=True)
    probe = torch.randn(4, 32, D, device="cuda")
    run(layer, x, probe)              # warm-up: cuBLAS handles, allocator pools
    torch.cuda.synchronize()
    layer.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(layer, x, probe)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert layer.experts.w1.grad is not None
