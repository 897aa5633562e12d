"""Prototypes of changes to moe_train's fast path, measured by moe_layer.py
(``--proto``) before they are proposed. Nothing here is imported by moe_train.

1. ``FusedExperts``: one autograd Function for all local experts instead of
   one autograd graph per expert plus ``torch.cat``. Each expert writes its
   rows straight into the output (``torch.mm(out=...)``), and the backward
   writes each expert's input gradient straight into one [N,D] buffer, so
   the forward ``cat`` and the backward of ``torch.split`` (another cat)
   disappear. It saves the pre-activations h1 = x W1^T and h3 = x W3^T
   ([n_e,F] per expert) and recomputes silu(h1) and silu(h1)*h3 in the backward,
   where autograd keeps four [N,F] tensors (h1, silu(h1), h3, their product).
2. ``combine_inplace``: ``unpermute`` with ``index_add_`` into the fresh
   zeros instead of the out-of-place ``index_add`` (which copies [T,D] once
   more).
3. ``chunked``: the experts return their outputs as a list (no cat) and the
   combine weights and scatter-adds each expert's chunk in place, so the
   [N,D] temporaries of the combine (forward and backward) become
   per-expert [n_e,D] ones.
4. ``gather_chunks`` (with 3): the dispatch gathers each expert's rows
   separately, through one autograd Function whose backward scatter-adds all
   chunks' gradients into a single [T,D] buffer: no [N,D] tensor is left,
   forward or backward.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

import common  # noqa: F401  (repo root on sys.path)
from moe_train.moe.permute import Permutation


def _silu_grad(h1: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    # d/dh silu(h) = s * (1 + h * (1 - s)), s = sigmoid(h)
    return sig * (1 + h1 * (1 - sig))


class _FusedExpertsFn(torch.autograd.Function):
    """y[rows of e] = MLP_e(x[rows of e]) for every local expert e, rows grouped
    by expert (``counts``). ``weights`` = (w1_0, w3_0, w2_0, w1_1, ...) for
    swiglu, (w1_0, w2_0, ...) for gelu, in nn.Linear's [out, in] layout."""

    @staticmethod
    def forward(ctx, x_ND, counts: List[int], swiglu: bool, *weights):
        per = 3 if swiglu else 2
        N, D = x_ND.shape
        out_ND = x_ND.new_empty(N, D)
        # Pre-activations are kept per expert: [n_e, F] blocks come and go
        # through the heap, where one [N,F] block would be a fresh mmap (page
        # faults on every step) with glibc's allocator.
        saved = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            w = weights[per * e: per * e + per]
            xs = x_ND[rows]
            h1 = torch.mm(xs, w[0].t())
            if swiglu:
                h3 = torch.mm(xs, w[1].t())
                h = F.silu(h1) * h3
                saved += [h1, h3]
            else:
                h = F.gelu(h1)
                saved.append(h1)
            torch.mm(h, w[-1].t(), out=out_ND[rows])
            start += n
        ctx.counts, ctx.swiglu, ctx.num_weights = counts, swiglu, len(weights)
        ctx.save_for_backward(x_ND, *weights, *saved)
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        swiglu, counts = ctx.swiglu, ctx.counts
        x_ND, *rest = ctx.saved_tensors
        weights, acts = rest[:ctx.num_weights], iter(rest[ctx.num_weights:])
        per = 3 if swiglu else 2
        grad_ND = grad_ND.contiguous()
        grad_x = torch.empty_like(x_ND)
        grads = []
        start = 0
        for e, n in enumerate(counts):
            w = weights[per * e: per * e + per]
            if n == 0:
                grads += [torch.zeros_like(t) for t in w]
                continue
            rows = slice(start, start + n)
            g, xs, h1 = grad_ND[rows], x_ND[rows], next(acts)
            if swiglu:
                h3 = next(acts)
                sig = torch.sigmoid(h1)
                a = h1 * sig
                h = a * h3
            else:
                h = F.gelu(h1)
            g_w2 = g.t().mm(h)                   # [D,F]
            dh = g.mm(w[-1])                     # [n,F]
            if swiglu:
                dh3 = dh * a
                dh1 = dh.mul_(h3).mul_(_silu_grad(h1, sig))
                g_w1 = dh1.t().mm(xs)
                g_w3 = dh3.t().mm(xs)
                gx = torch.mm(dh1, w[0], out=grad_x[rows])
                gx.addmm_(dh3, w[1])
                grads += [g_w1, g_w3, g_w2]
            else:
                dh1 = torch.ops.aten.gelu_backward(dh, h1)
                g_w1 = dh1.t().mm(xs)
                torch.mm(dh1, w[0], out=grad_x[rows])
                grads += [g_w1, g_w2]
            start += n
        return (grad_x, None, None, *grads)


def fused_experts_forward(experts, x_routed_ND: torch.Tensor,
                          tokens_per_local_expert: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``Experts.forward`` (fp32; under autocast the caller would
    cast x and the weights to the autocast dtype before apply)."""
    counts = tokens_per_local_expert.tolist()
    swiglu = experts.experts[0].w3 is not None
    weights = []
    for mlp in experts.experts:
        weights += [mlp.w1.weight] + ([mlp.w3.weight] if swiglu else []) + [mlp.w2.weight]
    return _FusedExpertsFn.apply(x_routed_ND, counts, swiglu, *weights)


def combine_inplace(y_routed_ND: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """``unpermute`` with an in-place index_add_ into the new zeros."""
    dtype = torch.promote_types(y_routed_ND.dtype, perm.weight_N.dtype)
    weighted_ND = y_routed_ND.to(dtype) * perm.weight_N.to(dtype).unsqueeze(-1)
    y_TD = weighted_ND.new_zeros(perm.num_tokens, y_routed_ND.shape[-1])
    return y_TD.index_add_(0, perm.token_index_N, weighted_ND)


def chunked_experts_forward(experts, x_routed_ND, tokens_per_local_expert):
    """Experts.forward without the final torch.cat: a list of per-expert outputs
    (``x_routed_ND`` may already be the list of per-expert inputs)."""
    if isinstance(x_routed_ND, (list, tuple)):
        chunks = x_routed_ND
    else:
        chunks = torch.split(x_routed_ND, tokens_per_local_expert.tolist())
    return [expert(chunk) for expert, chunk in zip(experts.experts, chunks)]


def chunked_combine(y_chunks, perm: Permutation) -> torch.Tensor:
    """unpermute over per-expert chunks: each chunk is gate-weighted and
    index_add_-ed into one [T,D] buffer in place, so no [N,D] temporary
    (the cat, the weighted rows, and in the backward the gathered gradient
    and both products) is ever allocated whole."""
    counts = [c.shape[0] for c in y_chunks]
    tok = torch.split(perm.token_index_N, counts)
    wts = torch.split(perm.weight_N, counts)
    dtype = torch.promote_types(y_chunks[0].dtype, perm.weight_N.dtype)
    y_TD = y_chunks[0].new_zeros(perm.num_tokens, y_chunks[0].shape[-1], dtype=dtype)
    for y_nD, t_n, w_n in zip(y_chunks, tok, wts):
        if y_nD.shape[0]:
            y_TD.index_add_(0, t_n, y_nD.to(dtype) * w_n.to(dtype).unsqueeze(-1))
    return y_TD


class _GatherChunks(torch.autograd.Function):
    """Per-expert row gathers of x_TD with one shared backward buffer: the
    backward of E separate index_selects would zero-fill E [T,D] tensors
    (what the naive Mixtral loop pays) and the backward of one big gather
    plus split would allocate the [N,D] gradient whole."""

    @staticmethod
    def forward(ctx, x_TD, *token_chunks):
        ctx.save_for_backward(*token_chunks)
        ctx.shape = x_TD.shape
        return tuple(x_TD.index_select(0, t) for t in token_chunks)

    @staticmethod
    def backward(ctx, *grads):
        grad_TD = grads[0].new_zeros(ctx.shape)
        for t, g in zip(ctx.saved_tensors, grads):
            if g is not None and t.numel():
                grad_TD.index_add_(0, t, g)
        return (grad_TD,) + (None,) * len(grads)


class _ChunkedDispatcher:
    def __init__(self, base, gather_chunks: bool = False):
        self.base = base
        self.gather_chunks = gather_chunks

    def dispatch(self, x_TD, decision):
        if not self.gather_chunks:
            return self.base.dispatch(x_TD, decision)
        from moe_train.moe.permute import make_permutation
        perm = make_permutation(decision, x_TD.shape[0])
        counts = perm.tokens_per_expert_E.tolist()
        chunks = _GatherChunks.apply(x_TD, *torch.split(perm.token_index_N, counts))
        return list(chunks), perm.tokens_per_expert_E, perm

    def combine(self, y_chunks, meta):
        return chunked_combine(y_chunks, meta)


class _ProtoDispatcher:
    def __init__(self, base):
        self.base = base

    def dispatch(self, x_TD, decision):
        return self.base.dispatch(x_TD, decision)

    def combine(self, y_routed_ND, meta):
        return combine_inplace(y_routed_ND, meta)


def apply_prototype(ours_module, fused_experts: bool = True, inplace_combine: bool = True,
                    chunked: bool = False, gather_chunks: bool = False):
    """Patch a ``variants.Ours`` instance with the prototype changes
    (``chunked``: prototype 3 instead of 1 and 2; ``gather_chunks``: 3 + 4)."""
    import types
    layer = getattr(ours_module, "layer", ours_module)   # an Ours wrapper or a MoELayer
    if chunked or gather_chunks:
        layer.experts.forward = types.MethodType(chunked_experts_forward, layer.experts)
        layer.dispatcher = _ChunkedDispatcher(layer.dispatcher, gather_chunks)
        return ours_module
    if fused_experts:
        layer.experts.forward = types.MethodType(fused_experts_forward, layer.experts)
    if inplace_combine:
        layer.dispatcher = _ProtoDispatcher(layer.dispatcher)
    return ours_module


def check_equal(seed: int = 0, **proto) -> float:
    """Max abs difference of outputs and grads, prototype vs current (tests
    the prototype before timing it)."""
    import variants
    torch.manual_seed(seed)
    a = variants.build("ours_tc", 64, 96, 8, 2)
    b = variants.build("ours_tc", 64, 96, 8, 2)
    b.load_state_dict(a.state_dict())
    apply_prototype(b, **proto)
    x = torch.randn(4, 16, 64, requires_grad=True)
    g = torch.randn(4, 16, 64)
    ya = variants.fwd_bwd(a, x, g)
    gxa = x.grad.clone()
    yb = variants.fwd_bwd(b, x, g)
    gxb = x.grad.clone()
    diff = [(ya - yb).abs().max().item(), (gxa - gxb).abs().max().item()]
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        diff.append((pa.grad - pb.grad).abs().max().item())
    return max(diff)


if __name__ == "__main__":
    print(f"prototypes 1+2 vs current, max abs difference of output and grads: {check_equal():.2e}")
    print(f"prototype 3 vs current, max abs difference of output and grads: "
          f"{check_equal(chunked=True):.2e}")
    print(f"prototypes 3+4 vs current, max abs difference of output and grads: "
          f"{check_equal(gather_chunks=True):.2e}")
