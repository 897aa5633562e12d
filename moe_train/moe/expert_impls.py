"""The two fast implementations of the stacked experts' math.

Legend: N routed rows grouped by local expert, n_e the rows of local expert
e, D hidden, F expert ffn, E local experts. Weights are stacked:
w1, w3 ``[E, D, F]`` and w2 ``[E, F, D]``, so expert e computes
``(act(x @ w1[e]) * (x @ w3[e])) @ w2[e]`` (SwiGLU; GELU has no w3).

- :func:`grouped_mm_experts`: three ``torch._grouped_mm`` calls over the
  whole ``[N, D]`` block, with the group ends (a cumsum of the counts) kept on
  the device: no host sync, one kernel per projection.
- :func:`loop_experts`: a Python loop of plain matmuls inside one autograd
  Function (:class:`_ExpertLoop`). Its backward writes every expert's weight
  gradient into one preallocated stacked gradient. Indexing ``w1[e]`` under
  autograd instead makes each expert's backward materialise a full ``[E,D,F]``
  gradient (E of them per step: 0.09x of dense at E=64 when measured).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from moe_train.moe.grad_buffers import stacked_grad_buffer

IMPLS = ("auto", "grouped_mm", "loop", "reference")
# torch._grouped_mm reads rows whose strides must be multiples of 16 bytes
# ("strides should be multiple of 16 bytes", CPU and CUDA): 8 bf16 values.
GROUPED_MM_ALIGN = 8


def has_grouped_mm() -> bool:
    """True when this torch has ``torch._grouped_mm`` (2.8 and later)."""
    return hasattr(torch, "_grouped_mm")


def grouped_mm_unavailable_reason(hidden_size: int, ffn_hidden_size: int) -> Optional[str]:
    """Why ``grouped_mm`` cannot run these experts here, or None."""
    if not has_grouped_mm():
        return (f"moe.expert_impl = grouped_mm needs torch._grouped_mm, which torch "
                f"{torch.__version__} lacks; use loop or auto")
    if hidden_size % GROUPED_MM_ALIGN or ffn_hidden_size % GROUPED_MM_ALIGN:
        return (f"moe.expert_impl = grouped_mm needs the hidden size ({hidden_size}) and the "
                f"expert ffn size ({ffn_hidden_size}) to be multiples of {GROUPED_MM_ALIGN} "
                "(torch._grouped_mm aligns rows to 16 bytes); use loop or auto")
    return None


# The dtypes torch._grouped_mm's CUDA kernels are built for; other dtypes
# take the loop under ``auto`` (an explicit grouped_mm is left to torch).
GROUPED_MM_CUDA_DTYPES = (torch.bfloat16,)


def resolve_impl(impl: str, device: torch.device, hidden_size: int, ffn_hidden_size: int,
                 dtype: torch.dtype = torch.bfloat16) -> str:
    """The implementation ``impl`` means on ``device`` for matmuls in
    ``dtype``: ``auto`` is grouped_mm on CUDA in bf16 (where torch has it and
    the sizes are aligned), loop elsewhere."""
    if impl != "auto":
        return impl
    if device.type == "cuda" and dtype in GROUPED_MM_CUDA_DTYPES \
            and grouped_mm_unavailable_reason(hidden_size, ffn_hidden_size) is None:
        return "grouped_mm"
    return "loop"


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of ``x`` and ``weight`` in."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)


def _activation_backward(activation: str, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if activation == "swiglu":
        return torch.ops.aten.silu_backward(grad, h)
    return torch.ops.aten.gelu_backward(grad, h)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous:
    ``_grouped_mm``'s CPU backward rejects stride-0 gradients such as the one
    ``y.sum()`` sends ("Invalid strides/sizes")."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_experts(x_ND: torch.Tensor, counts_E: torch.Tensor, w1: torch.Tensor,
                       w3: Optional[torch.Tensor], w2: torch.Tensor, activation: str
                       ) -> torch.Tensor:
    """All local experts on the rows ``x_ND`` grouped by expert
    (``counts_E [E]`` rows each, on the device), as grouped GEMMs.

    Under autocast the weights and rows are cast once to the autocast dtype
    and the GEMMs run with autocast off (the dtype is then explicit, whatever
    autocast's op lists say about ``_grouped_mm``)."""
    dtype = compute_dtype(x_ND, w1)
    # Group ends, cumulative, int32 as _grouped_mm wants; stays on the device.
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    with torch.autocast(device_type=x_ND.device.type, enabled=False):
        x_ND = x_ND.to(dtype)
        h1_NF = torch._grouped_mm(x_ND, w1.to(dtype), offs=offs_E)
        if w3 is not None:
            a_NF = F.silu(h1_NF) * torch._grouped_mm(x_ND, w3.to(dtype), offs=offs_E)
        else:
            a_NF = F.gelu(h1_NF)
        y_ND = torch._grouped_mm(a_NF, w2.to(dtype), offs=offs_E)
    return _ContiguousGrad.apply(y_ND)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a @ b`` written straight into ``out`` (a slice of a stacked
    gradient) when the dtypes match, else computed and cast in."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _blocks(tensors: Sequence[torch.Tensor], counts, dtype: torch.dtype) -> Sequence[torch.Tensor]:
    # The per-expert blocks in ``dtype``: views of the one packed tensor
    # (``counts`` host ints), or the E blocks themselves.
    if counts is not None:
        return tensors[0].to(dtype).split(counts)
    return [t.to(dtype) for t in tensors]


def _experts_of(weight: Optional[torch.Tensor], dtype: torch.dtype):
    # Each expert's slice of a stacked weight, in ``dtype`` (None stays None).
    return None if weight is None else weight.to(dtype).unbind(0)


class _ExpertLoop(torch.autograd.Function):
    """Expert e on block e for every local expert, with hand-written backward.

    The rows come either as E blocks (``counts`` None: E outputs, E input
    gradients) or packed, as one ``[N, D]`` tensor split by the host
    ``counts`` (one output and one input gradient, written slice by slice:
    no cat in either direction).

    Forward saves per expert what autograd would: the input block, the
    pre-activations ``h1 = x w1[e]``, ``h3 = x w3[e]``, ``act(h1)`` and the
    product. Gradients of w1/w3/w2 are written slice by slice
    into one ``[E, ...]`` tensor each; an expert with no rows gets zeros.
    """

    @staticmethod
    def forward(ctx, activation: str, dtype: torch.dtype, counts, w1, w3, w2, *xs):
        packed = counts is not None
        x_blocks = _blocks(xs, counts, dtype)
        w1s, w3s, w2s = (_experts_of(w, dtype) for w in (w1, w3, w2))
        y_blocks = None
        if packed:
            y_ND = xs[0].new_empty(xs[0].shape[0], w2.shape[-1], dtype=dtype)
            y_blocks = y_ND.split(counts)
        hs1, hs3, acts, As, ys = [], [], [], [], []
        for e, x_nD in enumerate(x_blocks):
            h1 = x_nD @ w1s[e]
            if w3s is not None:
                h3 = x_nD @ w3s[e]
                act1 = F.silu(h1)
                a = act1 * h3
                hs3.append(h3)
                acts.append(act1)
            else:
                a = F.gelu(h1)
            hs1.append(h1)
            As.append(a)
            if packed:
                torch.mm(a, w2s[e], out=y_blocks[e])
            else:
                ys.append(a @ w2s[e])
        ctx.activation, ctx.dtype, ctx.counts = activation, dtype, counts
        ctx.num_blocks = len(x_blocks)
        ctx.x_dtypes = [x.dtype for x in xs]
        ctx.has_w3 = w3 is not None
        # What autograd would keep for these ops (x, h1, act(h1), h3, the
        # product): recomputing the last two in the backward measured ~15%
        # slower at small widths.
        ctx.save_for_backward(w1, w3, w2, *xs, *hs1, *As, *hs3, *acts)
        return y_ND if packed else tuple(ys)

    @staticmethod
    def backward(ctx, *grad_ys):
        # The dtypes are explicit here: autocast (if backward runs inside it)
        # must not recast anything.
        with torch.autocast(device_type=grad_ys[0].device.type, enabled=False):
            return _ExpertLoop._backward(ctx, grad_ys)

    @staticmethod
    def _backward(ctx, grad_ys):
        E, counts, dtype = ctx.num_blocks, ctx.counts, ctx.dtype
        packed = counts is not None
        n_x = 1 if packed else E
        saved = ctx.saved_tensors
        w1, w3, w2 = saved[:3]
        xs = saved[3:3 + n_x]
        rest = saved[3 + n_x:]
        hs1, As = rest[:E], rest[E:2 * E]
        hs3 = rest[2 * E:3 * E] if ctx.has_w3 else [None] * E
        acts = rest[3 * E:4 * E] if ctx.has_w3 else [None] * E
        x_blocks, g_y_blocks = _blocks(xs, counts, dtype), _blocks(grad_ys, counts, dtype)
        w1s, w3s, w2s = (_experts_of(w, dtype) for w in (w1, w3, w2))
        need_w1, need_w3, need_w2 = ctx.needs_input_grad[3:6]
        need_x = ctx.needs_input_grad[6:]
        # One stacked gradient per weight, filled slice by slice.
        g_w1 = stacked_grad_buffer(w1) if need_w1 else None
        g_w3 = stacked_grad_buffer(w3) if need_w3 else None
        g_w2 = stacked_grad_buffer(w2) if need_w2 else None
        g_x_ND = g_x_blocks = None
        if packed and need_x[0]:
            g_x_ND = xs[0].new_empty(xs[0].shape, dtype=dtype)
            g_x_blocks = g_x_ND.split(counts)
        g_xs: List[Optional[torch.Tensor]] = []
        for e in range(E):
            x_nD, g_y = x_blocks[e], g_y_blocks[e]
            h1, h3, a, act1 = hs1[e], hs3[e], As[e], acts[e]
            if need_w2:
                _mm_into(g_w2[e], a.t(), g_y)
            g_a = g_y @ w2s[e].t()
            if h3 is not None:
                g_h3 = g_a * act1
                g_h1 = _activation_backward(ctx.activation, g_a * h3, h1)
            else:
                g_h3 = None
                g_h1 = _activation_backward(ctx.activation, g_a, h1)
            if need_w1:
                _mm_into(g_w1[e], x_nD.t(), g_h1)
            if need_w3:
                _mm_into(g_w3[e], x_nD.t(), g_h3)
            want_x = g_x_blocks is not None if packed else need_x[e]
            if want_x:
                g_x = g_x_blocks[e] if packed else x_nD.new_empty(x_nD.shape)
                torch.mm(g_h1, w1s[e].t(), out=g_x)
                if g_h3 is not None:
                    g_x.addmm_(g_h3, w3s[e].t())
            if not packed:
                g_xs.append(g_x.to(ctx.x_dtypes[e]) if want_x else None)
        if packed:
            g_xs = [None if g_x_ND is None else g_x_ND.to(ctx.x_dtypes[0])]
        return (None, None, None, g_w1, g_w3, g_w2, *g_xs)


def loop_experts(x_blocks: Sequence[torch.Tensor], w1: torch.Tensor, w3: Optional[torch.Tensor],
                 w2: torch.Tensor, activation: str) -> Tuple[torch.Tensor, ...]:
    """Expert e on ``x_blocks[e] [n_e, D]`` for every local expert; returns
    the E output blocks ``[n_e, D]`` (in the autocast dtype under autocast)."""
    if len(x_blocks) == 0:
        return ()
    dtype = compute_dtype(x_blocks[0], w1)
    with torch.autocast(device_type=x_blocks[0].device.type, enabled=False):
        return _ExpertLoop.apply(activation, dtype, None, w1, w3, w2, *x_blocks)


def loop_experts_packed(x_ND: torch.Tensor, counts: Sequence[int], w1: torch.Tensor,
                        w3: Optional[torch.Tensor], w2: torch.Tensor, activation: str
                        ) -> torch.Tensor:
    """The loop on rows ``x_ND`` grouped by expert (``counts[e]`` rows each,
    host ints); returns ``[N, D]`` outputs in the same order (in the autocast
    dtype under autocast)."""
    dtype = compute_dtype(x_ND, w1)
    with torch.autocast(device_type=x_ND.device.type, enabled=False):
        return _ExpertLoop.apply(activation, dtype, tuple(counts), w1, w3, w2, x_ND)
