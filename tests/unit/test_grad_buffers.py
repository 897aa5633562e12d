"""The loop's stacked weight gradients reuse CPU buffers, never while alive.

References: the masked-loop oracle (``reference_forward`` through plain
autograd) for values; data pointers for whether a block was reused.
"""
import torch

from moe_train.moe import grad_buffers
from moe_train.moe.experts import Experts


def _blocks(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 8, generator=g) for n in (3, 0, 2, 4)]


def _loop_grads(experts, blocks):
    ys = experts(blocks, torch.tensor([b.shape[0] for b in blocks]))
    sum((y * (i + 1)).sum() for i, y in enumerate(ys)).backward()


def _reference_grads(experts, blocks_list):
    # Independent: index the stacked weights under plain autograd, per expert.
    params = [p for p in experts.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for blocks in blocks_list:
        out = sum((experts.expert_forward(e, b) * (e + 1)).sum()
                  for e, b in enumerate(blocks) if b.shape[0])
        for t, g in zip(total, torch.autograd.grad(out, params, allow_unused=True)):
            if g is not None:
                t += g
    return total


def test_buffer_is_reused_after_set_to_none_and_values_stay_exact():
    torch.manual_seed(0)
    experts = Experts(4, 8, 8, "swiglu", init_std=0.3, impl="loop")
    _loop_grads(experts, _blocks(1))
    first = [p.grad.data_ptr() for p in experts.parameters()]
    experts.zero_grad(set_to_none=True)
    _loop_grads(experts, _blocks(2))
    assert [p.grad.data_ptr() for p in experts.parameters()] == first
    for p, ref in zip(experts.parameters(), _reference_grads(experts, [_blocks(2)])):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6)


def test_accumulation_never_writes_into_a_live_grad():
    # Three micro-batches without zeroing: each later backward must get a
    # block other than the one .grad holds, or the sum would be overwritten.
    torch.manual_seed(0)
    experts = Experts(4, 8, 8, "swiglu", init_std=0.3, impl="loop")
    for seed in (1, 2, 3):
        _loop_grads(experts, _blocks(seed))
    refs = _reference_grads(experts, [_blocks(s) for s in (1, 2, 3)])
    for p, ref in zip(experts.parameters(), refs):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6)


def test_a_kept_reference_blocks_reuse():
    torch.manual_seed(0)
    experts = Experts(4, 8, 8, "swiglu", init_std=0.3, impl="loop")
    _loop_grads(experts, _blocks(1))
    kept = experts.w1.grad
    before = kept.clone()
    experts.zero_grad(set_to_none=True)
    for _ in range(3):  # more hand-outs than the cache holds
        _loop_grads(experts, _blocks(2))
        experts.zero_grad(set_to_none=True)
    assert torch.equal(kept, before)


def test_cache_holds_at_most_two_blocks_per_weight_and_clears():
    torch.manual_seed(0)
    experts = Experts(4, 8, 8, "swiglu", init_std=0.3, impl="loop")
    held = []
    for seed in range(4):
        _loop_grads(experts, _blocks(seed))
        held.append(experts.w1.grad)
        experts.zero_grad(set_to_none=True)
    assert len(grad_buffers._cache[experts.w1]) == grad_buffers.MAX_PER_WEIGHT
    grad_buffers.clear()
    assert experts.w1 not in grad_buffers._cache
