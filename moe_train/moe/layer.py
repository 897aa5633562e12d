"""The MoE layer: route, dispatch, run the experts, combine, add shared experts.

Legend: B batch rows, S positions, T = B*S tokens (t = b*S + s), D hidden,
F expert ffn, E experts, N kept (token, expert) assignments.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from moe_train.config import ModelConfig, MoEConfig, check_choice
from moe_train.model.mlp import MLP
from moe_train.moe.dispatcher import LocalDispatcher
from moe_train.moe.experts import Experts
from moe_train.moe.router import build_router


DEFAULT_ACTIVATION = ModelConfig.activation


@dataclass
class MoEOutput:
    """What one MoE layer returns."""

    output: torch.Tensor
    """[B,S,D], same dtype as the input."""
    aux_loss: torch.Tensor
    """0-d fp32: sum of the weighted router losses (zero if none)."""
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Each weighted router loss by name (e.g. load_balancing, z_loss)."""
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached: tokens_per_expert [E] long (global experts), dropped_fraction 0-d."""


class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    ``hidden_size``, ``ffn_hidden_size`` and ``activation`` fill the fields of
    ``cfg`` that are None (the model passes its own); values set in ``cfg``
    win; with neither, the activation is swiglu, as in the model.
    ``layer_index`` (the block's) seeds this layer's routing noise
    (moe/routing_noise.py). Submodules: ``router``, ``experts`` and
    ``shared_experts`` (one MLP applied to every token, of width
    ``shared_expert_ffn_hidden_size`` or else num_shared_experts*F; or None)
    with, when ``shared_expert_gate``, ``shared_gate`` (Qwen2-MoE: the shared
    output times sigmoid(x . w), w [1,D]).
    ``dispatcher`` is a plain attribute holding no parameters; expert
    parallelism replaces it together with ``experts``.
    """

    def __init__(self, cfg: MoEConfig, hidden_size: Optional[int] = None,
                 ffn_hidden_size: Optional[int] = None, activation: Optional[str] = None,
                 init_std: float = 0.02, output_std: Optional[float] = None,
                 layer_index: int = 0):
        super().__init__()
        cfg = dataclasses.replace(
            cfg,
            hidden_size=cfg.hidden_size if cfg.hidden_size is not None else hidden_size,
            ffn_hidden_size=cfg.ffn_hidden_size if cfg.ffn_hidden_size is not None else ffn_hidden_size,
            # swiglu, the model's own default (ModelConfig.activation), so a
            # layer built alone matches one built by the model.
            activation=next(a for a in (cfg.activation, activation, DEFAULT_ACTIVATION)
                            if a is not None),
        )
        for name in ("hidden_size", "ffn_hidden_size"):
            if getattr(cfg, name) is None:
                raise ValueError(f"moe.{name} is not set: put it in the config or pass "
                                 f"{name}= to MoELayer (the model passes its own)")
        if cfg.num_experts < 1:
            raise ValueError(f"moe.num_experts ({cfg.num_experts}) must be >= 1 for an MoE layer")
        check_choice("moe.expert_impl", cfg.expert_impl)
        self.cfg = cfg
        self.router = build_router(cfg)
        self.router.layer_index = layer_index
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size,
                               cfg.activation, init_std, output_std, impl=cfg.expert_impl)
        shared_width = cfg.shared_expert_ffn_hidden_size or cfg.num_shared_experts * cfg.ffn_hidden_size
        self.shared_experts = (
            MLP(cfg.hidden_size, shared_width, cfg.activation, init_std, output_std)
            if cfg.num_shared_experts > 0 else None)
        self.shared_gate: Optional[nn.Linear] = None
        if self.shared_experts is not None and cfg.shared_expert_gate:
            self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
            nn.init.normal_(self.shared_gate.weight, std=init_std)
        self.dispatcher = LocalDispatcher()

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> MoEOutput:
        """Route every token of ``x [B,S,D]`` and return an :class:`MoEOutput`.
        ``positions`` ([S] or [B,S], default arange(S)): the tokens' absolute
        positions, which set expert choice's per-position schedule (a cached
        decode step at position s routes as position s of a full forward)."""
        B, S, D = x.shape
        x_TD = x.reshape(B * S, D)
        decision = self.router(x_TD, B, S, positions)
        if self.cfg.expert_impl == "reference":
            y_TD = self.experts.reference_forward(x_TD, decision)
        else:
            # The loop on CPU takes one block per expert once an [N,D]
            # tensor would be a fresh mmap each step; otherwise, and for
            # grouped_mm, one [N,D] tensor (counts stay on the device).
            x_routed_ND, tokens_per_local_expert, meta = self.dispatcher.dispatch(
                x_TD, decision,
                blocks=self.experts.wants_blocks(x_TD, decision.token_index.numel()))
            y_routed_ND = self.experts(x_routed_ND, tokens_per_local_expert)
            y_TD = self.dispatcher.combine(y_routed_ND, meta)
        if self.shared_experts is not None:
            # y_TD is in the gates' dtype (fp32 under autocast); add before the
            # single cast so the routed sum is not rounded twice.
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        output = y_TD.to(x.dtype).view(B, S, D)

        losses = dict(decision.losses)
        aux_loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for value in losses.values():
            aux_loss = aux_loss + value
        stats = {
            "tokens_per_expert": decision.tokens_per_expert().detach(),
            "dropped_fraction": torch.as_tensor(decision.dropped_fraction).detach().float(),
        }
        if decision.selected_per_expert is not None:
            # Aux-loss-free balancing steers by the choices before capacity
            # drops; the kept counts saturate at the capacity.
            stats["selected_per_expert"] = decision.selected_per_expert.detach()
        return MoEOutput(output=output, aux_loss=aux_loss, losses=losses, stats=stats)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"router={c.router}, num_experts={c.num_experts}, top_k={c.top_k}, "
                f"capacity_factor={c.capacity_factor}, expert_impl={c.expert_impl}")
