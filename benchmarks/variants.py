"""The MoE layer implementations the benchmarks compare, behind one interface.

Every variant is an ``nn.Module`` whose ``forward(x [B,S,D])`` returns
``(y [B,S,D], aux_loss 0-d)``:

- ``dense``: one SwiGLU MLP of width K*F: the same active FLOPs per token as
  a top-K MoE of experts of width F, with no routing at all: the limit.
- ``naive``: the masked loop over experts of transformers' pre-5.x
  ``MixtralSparseMoeBlock`` (one-hot mask, per-expert ``torch.where``,
  ``index_add_``), written out here.
- ``deepspeed``: ``deepspeed.moe.layer.MoE`` with the same SwiGLU experts,
  no capacity drop (``drop_tokens=False``), ep_size=1, no random token
  selection, no sampled second expert.
- ``megatron``: megatron-core's ``MoELayer`` (GPU only; see
  ``build_megatron``).
- ``ours_tc`` / ``ours_ec``: moe_train's ``MoELayer`` with token choice /
  expert choice (``moe.expert_impl = auto``: loop on CPU, grouped_mm on CUDA).
- ``ours_gmm`` / ``ours_loop``: ``ours_tc`` with ``expert_impl`` grouped_mm /
  loop forced.
- ``proto_tc``, ``proto_chunk``, ``proto_gather``: ``ours_tc`` with the
  changes prototyped in prototypes.py (1+2, 3, 3+4).

``share_router`` copies one router weight into every variant, so that all
token-choice variants route the same tokens to the same experts (same loads,
same padding for DeepSpeed).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import common  # noqa: F401  (puts the repo root on sys.path)
from moe_train.config import MoEConfig
from moe_train.model.mlp import MLP
from moe_train.moe.layer import MoELayer


class Dense(nn.Module):
    """A dense SwiGLU MLP of width ``top_k * ffn``."""

    def __init__(self, hidden: int, ffn: int, top_k: int):
        super().__init__()
        self.mlp = MLP(hidden, top_k * ffn, "swiglu")

    def forward(self, x):
        return self.mlp(x), None


class NaiveMixtralBlock(nn.Module):
    """transformers' MixtralSparseMoeBlock before 5.x (softmax, top-K,
    renormalise; a masked loop over experts), with our MLP as the expert."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(hidden, ffn, "swiglu") for _ in range(num_experts))

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype,
            device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, None


class Ours(nn.Module):
    """moe_train's MoELayer (default config apart from router, E, K, c)."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, router: str,
                 **cfg_overrides):
        super().__init__()
        if router == "expert_choice":
            # c = K gives each expert T*K/E tokens: the same number of
            # (token, expert) rows, hence the same FLOPs, as top-K token choice.
            cfg_overrides.setdefault("capacity_factor", float(top_k))
        cfg = MoEConfig(num_experts=num_experts, top_k=top_k, router=router, **cfg_overrides)
        self.layer = MoELayer(cfg, hidden_size=hidden, ffn_hidden_size=ffn, activation="swiglu")

    def forward(self, x):
        out = self.layer(x)
        return out.output, out.aux_loss


class DeepSpeedMoE(nn.Module):
    """``deepspeed.moe.layer.MoE`` with our SwiGLU MLP as the expert.

    drop_tokens=False: capacity becomes the largest expert load, so nothing
    is dropped (every expert is padded to that load). use_rts=False and
    top2_2nd_expert_sampling=False make the routing deterministic top-K.
    Needs torch.distributed initialised (common.init_single_process_dist).
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int):
        super().__init__()
        from deepspeed.moe.layer import MoE
        kwargs = dict(hidden_size=hidden, expert=MLP(hidden, ffn, "swiglu"),
                      num_experts=num_experts, ep_size=1, k=top_k, capacity_factor=1.0,
                      eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False,
                      use_rts=False)
        if top_k == 2:
            kwargs["top2_2nd_expert_sampling"] = False
        self.moe = MoE(**kwargs)
        self.moe.set_deepspeed_parallelism()

    def forward(self, x):
        y, l_aux, _ = self.moe(x)
        return y, l_aux


def router_weight(module: nn.Module) -> Optional[torch.Tensor]:
    """The [E, D] router weight of a variant (None for dense)."""
    if isinstance(module, Ours):
        return module.layer.router.weight
    if isinstance(module, NaiveMixtralBlock):
        return module.gate.weight
    if isinstance(module, DeepSpeedMoE):
        return module.moe.deepspeed_moe.gate.wg.weight
    if hasattr(module, "megatron_router_weight"):
        return module.megatron_router_weight()
    return None


def share_router(modules, weight_ED: torch.Tensor) -> None:
    with torch.no_grad():
        for m in modules:
            w = router_weight(m)
            if w is not None:
                w.copy_(weight_ED)


class MegatronMoE(nn.Module):
    """megatron-core's MoELayer (alltoall token dispatcher, SequentialMLP or
    grouped GEMM experts), dropless top-K, SwiGLU. GPU only: it needs
    megatron-core's model-parallel state, which ``build_megatron`` sets up
    for a world of one."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, grouped: bool):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.transformer.transformer_config import TransformerConfig
        from megatron.core.transformer.moe.moe_layer import MoELayer as MCoreMoELayer
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(1, 1)
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(1234)
        cfg = TransformerConfig(
            num_layers=1, hidden_size=hidden, num_attention_heads=8, ffn_hidden_size=ffn,
            moe_ffn_hidden_size=ffn, num_moe_experts=num_experts, moe_router_topk=top_k,
            moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=1e-2, moe_grouped_gemm=grouped, gated_linear_unit=True,
            activation_func=F.silu, add_bias_linear=False, bf16=False, params_dtype=torch.float32,
            use_cpu_initialization=False)
        spec = get_moe_module_spec(use_te=False, num_experts=num_experts,
                                   moe_grouped_gemm=grouped)
        self.layer = MCoreMoELayer(cfg, submodules=spec.submodules)

    def megatron_router_weight(self):
        return self.layer.router.weight

    def forward(self, x):
        # megatron-core is sequence-first ([S, B, D]); an MoE layer treats every
        # token alike, so [B, S, D] goes in as it is (no transpose copy).
        y, _bias = self.layer(x)
        return y, None


def build(name: str, hidden: int, ffn: int, num_experts: int, top_k: int) -> nn.Module:
    if name == "dense":
        return Dense(hidden, ffn, top_k)
    if name == "naive":
        return NaiveMixtralBlock(hidden, ffn, num_experts, top_k)
    if name == "deepspeed":
        return DeepSpeedMoE(hidden, ffn, num_experts, top_k)
    if name == "ours_tc":
        return Ours(hidden, ffn, num_experts, top_k, "token_choice")
    if name == "ours_gmm":
        return Ours(hidden, ffn, num_experts, top_k, "token_choice", expert_impl="grouped_mm")
    if name == "ours_loop":
        return Ours(hidden, ffn, num_experts, top_k, "token_choice", expert_impl="loop")
    if name == "ours_ec":
        return Ours(hidden, ffn, num_experts, top_k, "expert_choice")
    if name == "proto_tc":
        import prototypes
        return prototypes.apply_prototype(Ours(hidden, ffn, num_experts, top_k, "token_choice"))
    if name == "proto_chunk":
        import prototypes
        return prototypes.apply_prototype(Ours(hidden, ffn, num_experts, top_k, "token_choice"),
                                          chunked=True)
    if name == "proto_gather":
        import prototypes
        return prototypes.apply_prototype(Ours(hidden, ffn, num_experts, top_k, "token_choice"),
                                          gather_chunks=True)
    if name == "megatron":
        return MegatronMoE(hidden, ffn, num_experts, top_k, grouped=False)
    if name == "megatron_grouped":
        return MegatronMoE(hidden, ffn, num_experts, top_k, grouped=True)
    raise ValueError(name)


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """One forward and backward through ``module`` (grads set to None first,
    as optimizer.zero_grad() does), with the aux loss in the backward."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    y, aux = module(x)
    outs, grads = [y], [grad_y]
    if aux is not None and aux.requires_grad:
        outs.append(aux)
        grads.append(torch.ones_like(aux))
    torch.autograd.backward(outs, grads)
    return y.detach()
