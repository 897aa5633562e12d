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
   It works on the packed [N,D] layout, so ``proto_tc`` dispatches with
   ``permute`` (the layout the all-to-all dispatcher uses) rather than the
   per-expert blocks of LocalDispatcher.
2. ``unpermute`` with ``index_add_`` into the fresh zeros instead of the
   out-of-place ``index_add``: now moe_train's ``unpermute`` itself.
3. ``chunked``: the experts return their outputs as a list (no cat) and the
   combine weights and scatter-adds each expert's chunk in place.
4. ``gather_chunks`` (with 3): the dispatch gathers each expert's rows
   separately, through one autograd Function whose backward scatter-adds all
   chunks' gradients into a single [T,D] buffer.

1 is now ``moe.expert_impl = loop`` (moe/expert_impls.py: one autograd
Function over the stacked weights, one stacked gradient per weight), so its
code is gone here: ``apply_prototype()`` only installs the packed [N,D]
layout of 2, and the loop splits that tensor itself.
3 and 4 are now moe_train's EP=1 path (``permute_chunks`` /
``unpermute_chunks`` in moe/permute.py, LocalDispatcher, Experts.forward on a
list), so their prototype code is gone: ``apply_prototype(chunked=True)`` and
``apply_prototype(gather_chunks=True)`` leave the layer as it is, and the
``proto_chunk`` / ``proto_gather`` variants are ``ours_tc`` (prototype 3
without 4 was not kept). The benchmarks that still ask for them keep running.
"""
from __future__ import annotations

import torch

import common  # noqa: F401  (repo root on sys.path)
from moe_train.moe.permute import make_permutation, permute, unpermute


class _ProtoDispatcher:
    """LocalDispatcher with the packed [N,D] layout that prototype 1 needs
    (``permute`` / ``unpermute``, the all-to-all dispatcher's local steps);
    ``unpermute`` already adds in place (prototype 2)."""

    def dispatch(self, x_TD, decision, blocks=False):
        perm = make_permutation(decision, x_TD.shape[0])
        return permute(x_TD, perm), perm.tokens_per_expert_E, perm

    def combine(self, y_routed_ND, meta):
        return unpermute(y_routed_ND, meta)


def apply_prototype(ours_module, fused_experts: bool = True, inplace_combine: bool = True,
                    chunked: bool = False, gather_chunks: bool = False):
    """Patch a ``variants.Ours`` instance (or a MoELayer) with prototype 1+2.

    ``chunked`` (3) and ``gather_chunks`` (3+4) are moe_train's own path now:
    the layer is returned as it is. ``inplace_combine`` (2) is moe_train's
    ``unpermute`` now; it stays a parameter so that old calls keep working,
    and the packed dispatcher is installed whenever ``fused_experts`` is, since
    the fused Function takes one [N,D] tensor.
    """
    layer = getattr(ours_module, "layer", ours_module)   # an Ours wrapper or a MoELayer
    if chunked or gather_chunks:
        return ours_module
    if fused_experts or inplace_combine:
        layer.dispatcher = _ProtoDispatcher()
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
    print("prototypes 3 and 3+4 are moe_train's path now; tests/unit/test_permute.py and "
          "test_experts.py hold it equal to permute/unpermute and the reference loop")
