"""Routers: token choice (top-k, noisy gating, jitter, capacity) and expert
choice (Zhou et al. 2022). Both return a RoutingDecision.

Legend: T tokens (t = b*S + s), B batch rows, S positions, D hidden,
E experts, K top-k, k_ec tokens each expert picks per group, G routing groups.

All router math runs in fp32 with autocast disabled (Switch "selective
precision": bf16 routers diverged, Switch Table 2).
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_train.config import MoEConfig, check_choice
from moe_train.moe import losses as L
from moe_train.moe.capacity import capacity_keep_mask, expert_choice_k, token_capacity
from moe_train.moe.expert_choice_schedule import max_slots, slots_per_expert
from moe_train.moe.fused_routing import softmax_topk_routing
from moe_train.moe.routing import RoutingDecision, count_per_expert
from moe_train.moe.routing_noise import noise_generator

ROUTER_INIT_STD = 0.02


def _fp32_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    # Autocast would run this matmul in bf16; routing decisions must not.
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return x_TD.float() @ weight_ED.float().t()


def _jitter(x_TD: torch.Tensor, eps: float, gen: Optional[torch.Generator]) -> torch.Tensor:
    """Switch input jitter: x * U(1-eps, 1+eps), elementwise."""
    noise = torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps, generator=gen)
    return x_TD * noise


def _router_input(x_TD: torch.Tensor, batch: int, seq: int, training: bool,
                  jitter_eps: float, gen: Optional[torch.Generator]) -> torch.Tensor:
    """The fp32 router input, jittered in training (call with autocast off)."""
    if x_TD.shape[0] != batch * seq:
        raise ValueError(f"router got {x_TD.shape[0]} tokens, expected batch*seq = {batch}*{seq}")
    x_TD = x_TD.float()
    if training and jitter_eps > 0:
        x_TD = _jitter(x_TD, jitter_eps, gen)
    return x_TD


def _group_positions(positions: Optional[torch.Tensor], seq: int,
                     device: torch.device) -> torch.Tensor:
    """[S] long absolute position of each position group. With [B,S]
    positions the group of column s takes row 0's (a group is one column)."""
    if positions is None:
        return torch.arange(seq, device=device)
    if positions.dim() == 2:
        positions = positions[0]
    if positions.shape != (seq,):
        raise ValueError(f"router got positions of shape {tuple(positions.shape)}, "
                         f"expected [{seq}] or [batch, {seq}]")
    return positions.to(device=device, dtype=torch.long)


class TokenChoiceRouter(nn.Module):
    """Each token picks its top-K experts (Switch K=1, GShard/Mixtral K=2).

    ``score_order``: softmax_then_topk (gates = the K largest softmax probs,
    renormalised to sum 1 if ``normalize_topk``) or topk_then_softmax
    (Mixtral: softmax over the K chosen logits). ``noisy_gating`` adds
    Shazeer's learned Gaussian noise to the logits in training;
    ``jitter_eps`` multiplies the router input by U(1-eps, 1+eps) in training.
    With ``capacity_factor`` set, assignments beyond an expert's capacity are
    dropped in ``capacity_priority`` order.

    With ``expert_bias_update_rate`` > 0 the router holds ``expert_bias`` [E],
    an fp32 buffer (in the state dict, no gradient) for DeepSeek-V3's
    auxiliary-loss-free balancing: it is added to the softmax probabilities
    to choose the top K, while the gates use the unbiased scores (V3 Eq 16).
    :func:`moe_train.moe.balancing.update_expert_bias` moves it between steps.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.hidden_size is None:
            raise ValueError("moe.hidden_size must be filled before building the router")
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.score_order = cfg.score_order
        self.normalize_topk = cfg.normalize_topk
        self.capacity_factor = cfg.capacity_factor
        self.min_capacity = cfg.min_capacity
        self.capacity_priority = cfg.capacity_priority
        self.noisy_gating = cfg.noisy_gating
        self.jitter_eps = cfg.jitter_eps
        self.aux_loss = cfg.aux_loss
        self.aux_loss_coef = cfg.aux_loss_weight  # the paper's weight when null
        self.z_loss_coef = cfg.z_loss_coef
        self.expert_bias_update_rate = cfg.expert_bias_update_rate
        # Which layer this router is: part of its routing-noise seed
        # (moe/routing_noise.py). The model sets it; alone it is layer 0.
        self.layer_index = 0
        # False routes with plain autograd ops: the reference the fused
        # Function (moe/fused_routing.py) is tested against.
        self.fused = True
        check_choice("moe.score_order", self.score_order)
        check_choice("moe.aux_loss", self.aux_loss)
        if self.expert_bias_update_rate < 0:
            raise ValueError(f"moe.expert_bias_update_rate ({self.expert_bias_update_rate}) "
                             "must be >= 0")
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k ({self.top_k}) must be <= moe.num_experts ({self.num_experts})")
        # [E, D], the layout of nn.Linear.weight (and Mixtral's router).
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        if self.noisy_gating:
            self.noise_weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        else:
            self.register_parameter("noise_weight", None)
        # A buffer, not a parameter: it is moved by the load rule between
        # steps, never by the optimizer, and checkpoints must keep it. Only
        # created when enabled, so state dicts without the feature are unchanged.
        if self.expert_bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.register_buffer("expert_bias", None)
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .bfloat16() cast floating buffers too. A bf16
        # bias would round the 1e-3 steps of the update rule away once
        # |b| > 0.25, so the bias keeps its fp32 values through any cast
        # (device moves still apply).
        bias = self.expert_bias
        module = super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(device=self.expert_bias.device, dtype=torch.float32)
        return module

    def reset_parameters(self) -> None:
        """Shazeer starts W_g and W_noise at zero (uniform routing with noise
        doing the exploring); otherwise normal(0, 0.02)."""
        if self.noisy_gating:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.noise_weight)
        else:
            nn.init.normal_(self.weight, mean=0.0, std=ROUTER_INIT_STD)

    def select(self, scores_TE: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-K experts and their gates from selection scores ``scores_TE``
        (logits, possibly noisy). Returns (expert_ids_TK long, gates_TK fp32).
        With ``expert_bias``, the choice is the top K of softmax + bias and
        the gates are the unbiased ones of the chosen experts."""
        if self.expert_bias is not None:
            return self._select_biased(scores_TE)
        return self._select_unbiased(scores_TE)

    def _select_unbiased(self, scores_TE: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.score_order == "softmax_then_topk":
            gates_TK, ids_TK = scores_TE.softmax(-1).topk(self.top_k, dim=-1)
            # With K=1 renormalising would make every gate 1 and cut the
            # router off from the LM gradient, so Switch keeps the raw prob.
            if self.normalize_topk and self.top_k > 1:
                gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
        else:
            top_logits_TK, ids_TK = scores_TE.topk(self.top_k, dim=-1)
            gates_TK = top_logits_TK.softmax(-1)
        return ids_TK, gates_TK

    def _select_biased(self, scores_TE: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # DeepSeek-V3 Eq 16: the bias decides which experts, never how much.
        # It is added to the normalised affinities (here softmax probs, V3's
        # are normalised sigmoids) so gamma has the same scale as in V3; fp32
        # whatever the module was cast to.
        probs_TE = scores_TE.float().softmax(-1)
        ids_TK = (probs_TE + self.expert_bias.float()).topk(self.top_k, dim=-1).indices
        if self.score_order == "softmax_then_topk":
            gates_TK = probs_TE.gather(-1, ids_TK)
            if self.normalize_topk and self.top_k > 1:
                gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
        else:
            gates_TK = scores_TE.float().gather(-1, ids_TK).softmax(-1)
        return ids_TK, gates_TK

    def forward(self, x_TD: torch.Tensor, batch: int, seq: int,
                positions: Optional[torch.Tensor] = None) -> RoutingDecision:
        """Route the T = batch*seq rows of ``x_TD`` (row t = b*seq + s).
        ``positions`` is accepted for the routers' common signature; token
        choice does not use it."""
        draws = self.training and (self.jitter_eps > 0 or self.noisy_gating)
        gen = noise_generator(self.layer_index, x_TD.device) if draws else None
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = _router_input(x_TD, batch, seq, self.training, self.jitter_eps, gen)
            if self._takes_fused_path():
                return self._route_fused(x_TD, batch, seq)
            logits_TE = _fp32_logits(x_TD, self.weight)
            scores_TE, noise_std_TE = logits_TE, None
            if self.noisy_gating:
                noise_std_TE = F.softplus(_fp32_logits(x_TD, self.noise_weight))
                if self.training:
                    normal_TE = torch.randn(logits_TE.shape, generator=gen,
                                            device=logits_TE.device, dtype=logits_TE.dtype)
                    scores_TE = logits_TE + normal_TE * noise_std_TE
            ids_TK, gates_TK = self.select(scores_TE)
            if self.expert_bias is None:
                loss_ids_TK, loss_gates_TK = ids_TK, gates_TK
            else:
                # V3 Eq 18 counts f_i on the top K of the unbiased scores (as
                # megatron-core does): the loss trains the router's own
                # preference, which the bias would otherwise hide.
                loss_ids_TK, loss_gates_TK = self._select_unbiased(scores_TE)
            losses = self._losses(logits_TE, scores_TE, noise_std_TE, loss_ids_TK, loss_gates_TK,
                                  batch, seq)

            return self._decision(ids_TK, gates_TK, logits_TE, logits_TE.detach().softmax(-1),
                                  count_per_expert(ids_TK, self.num_experts), losses, batch, seq)

    def _takes_fused_path(self) -> bool:
        # The fused Function covers the default router (softmax then top-K,
        # Switch or per-sequence loss, z-loss, capacity, jitter); noise,
        # the expert bias and the other order and loss take plain autograd.
        return (self.fused and self.score_order == "softmax_then_topk" and not self.noisy_gating
                and self.expert_bias is None and self.aux_loss in ("switch", "sequence", "none"))

    def _route_fused(self, x_TD: torch.Tensor, batch: int, seq: int) -> RoutingDecision:
        logits_TE = _fp32_logits(x_TD, self.weight)
        r = softmax_topk_routing(
            logits_TE, self.top_k, self.normalize_topk and self.top_k > 1,
            balance_groups=batch if self.aux_loss == "sequence" else 1,
            balance_coef=None if self.aux_loss == "none" else self.aux_loss_coef,
            z_coef=self.z_loss_coef if self.z_loss_coef > 0 else None)
        losses: Dict[str, torch.Tensor] = {}
        if r.balance_loss is not None:
            losses["load_balancing"] = r.balance_loss
        if r.z_loss is not None:
            losses["z_loss"] = r.z_loss
        return self._decision(r.expert_ids_TK, r.gates_TK, logits_TE, r.probs_TE,
                              r.selected_E, losses, batch, seq)

    def _decision(self, ids_TK, gates_TK, logits_TE, probs_TE, selected_E, losses,
                  batch: int, seq: int) -> RoutingDecision:
        # Every top-K assignment, or with a capacity those that fit.
        T = ids_TK.shape[0]
        capacity = token_capacity(T, self.top_k, self.num_experts,
                                  self.capacity_factor, self.min_capacity)
        token_N = torch.arange(T, device=ids_TK.device).repeat_interleave(
            self.top_k, output_size=T * self.top_k)
        expert_N, weight_N = ids_TK.reshape(-1), gates_TK.reshape(-1)
        if capacity is None:
            # Dropless keeps all T*K assignments: no mask, no host sync.
            dropped = torch.zeros((), dtype=torch.float32, device=ids_TK.device)
        else:
            keep_TK = capacity_keep_mask(ids_TK, self.num_experts, capacity, batch, seq,
                                         self.capacity_priority)
            dropped = 1.0 - keep_TK.sum().float() / keep_TK.numel()
            # The one host sync of a capacity layer: how many were kept.
            kept_N = keep_TK.reshape(-1).nonzero().squeeze(1)
            token_N, expert_N, weight_N = (t.index_select(0, kept_N)
                                           for t in (token_N, expert_N, weight_N))
        return RoutingDecision(
            token_index=token_N,
            expert_index=expert_N,
            weight=weight_N,
            logits=logits_TE,
            probs=probs_TE,
            num_experts=self.num_experts,
            dropped_fraction=dropped,
            losses=losses,
            selected_per_expert=selected_E.detach(),
        )

    def _losses(self, logits_TE, scores_TE, noise_std_TE, ids_TK, gates_TK,
                batch: int, seq: int) -> Dict[str, torch.Tensor]:
        # Balancing losses see the pre-capacity top-K choice of the unbiased
        # scores and those scores (noisy in training with noisy gating).
        out: Dict[str, torch.Tensor] = {}
        if self.aux_loss == "switch":
            out["load_balancing"] = L.switch_load_balancing_loss(
                scores_TE.softmax(-1), ids_TK, self.aux_loss_coef)
        elif self.aux_loss == "sequence":
            # Same key as Switch so dashboards keep one series per run.
            out["load_balancing"] = L.sequence_load_balancing_loss(
                scores_TE.softmax(-1), ids_TK, batch, seq, self.aux_loss_coef)
        elif self.aux_loss == "shazeer":
            gates_TE = torch.zeros_like(scores_TE).scatter(-1, ids_TK, gates_TK)
            out["importance"] = L.importance_loss(gates_TE, self.aux_loss_coef)
            if self.noisy_gating and self.training and self.top_k < self.num_experts:
                load_E = L.smooth_load(logits_TE, scores_TE, noise_std_TE, self.top_k)
            else:
                load_E = L.count_load(ids_TK, self.num_experts)
            out["load"] = L.load_loss(load_E, self.aux_loss_coef)
        if self.z_loss_coef > 0:
            out["z_loss"] = L.z_loss(logits_TE, self.z_loss_coef)
        return out


class ExpertChoiceRouter(nn.Module):
    """Each expert picks its top-k_ec tokens of a routing group (Zhou et al.
    2022, Eq 1-4): S = softmax(x W_g) over experts; gate G[e, t] = S[t, e];
    no renormalisation; a token gets 0..E experts; no balancing loss.

    ``expert_choice_group``: ``position`` (causal-safe: group s = the B tokens
    at position s; expert e picks the k[s, e] tokens of
    :mod:`moe_train.moe.expert_choice_schedule`, c per token on average at any
    B) or ``batch`` (the paper's: one group of all B*S tokens, k = ceil(T*c/E),
    which lets a sequence's later tokens evict its earlier ones).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.hidden_size is None:
            raise ValueError("moe.hidden_size must be filled before building the router")
        if cfg.noisy_gating:
            raise ValueError("moe.noisy_gating applies to moe.router = token_choice only")
        if cfg.expert_bias_update_rate > 0:
            raise ValueError(f"moe.expert_bias_update_rate ({cfg.expert_bias_update_rate}) "
                             "applies to moe.router = token_choice only")
        check_choice("moe.expert_choice_group", cfg.expert_choice_group)
        if cfg.expert_choice_group == "batch":
            warnings.warn("moe.expert_choice_group = batch routes over all tokens of the batch: "
                          "in a causal LM a sequence's later tokens change which earlier tokens "
                          "get experts (leaks the future). Use position for decoders.",
                          stacklevel=2)
        self.num_experts = cfg.num_experts
        self.capacity_factor = cfg.capacity_factor
        self.group = cfg.expert_choice_group
        self.jitter_eps = cfg.jitter_eps
        self.z_loss_coef = cfg.z_loss_coef
        self.layer_index = 0  # part of the routing-noise seed, as in TokenChoiceRouter
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, 0.02)."""
        nn.init.normal_(self.weight, mean=0.0, std=ROUTER_INIT_STD)

    def forward(self, x_TD: torch.Tensor, batch: int, seq: int,
                positions: Optional[torch.Tensor] = None) -> RoutingDecision:
        """Route the T = batch*seq rows of ``x_TD`` (row t = b*seq + s);
        ``positions`` ([S] or [B,S], default arange(S)) are the absolute
        positions that set the position group's schedule."""
        T, E = x_TD.shape[0], self.num_experts
        draws = self.training and self.jitter_eps > 0
        gen = noise_generator(self.layer_index, x_TD.device) if draws else None
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = _router_input(x_TD, batch, seq, self.training, self.jitter_eps, gen)
            logits_TE = _fp32_logits(x_TD, self.weight)
            probs_TE = logits_TE.softmax(-1)
            if self.group == "position":
                # Group s holds row b at member index b: t = b*seq + s. Each
                # expert takes the k[s, e] of the schedule (often 0), so a
                # token costs c experts on average at every batch size.
                scores_GET = probs_TE.view(batch, seq, E).permute(1, 2, 0)          # [S, E, B]
                k_GE = slots_per_expert(_group_positions(positions, seq, x_TD.device),
                                        batch, E, self.capacity_factor)
                k_max = max_slots(batch, E, self.capacity_factor)
                gates_GEk, member_GEk = scores_GET.topk(k_max, dim=-1)
                group_G = torch.arange(seq, device=x_TD.device)
                token_GEk = member_GEk * seq + group_G[:, None, None]
                rank_k = torch.arange(k_max, device=x_TD.device)
                keep_GEk = rank_k[None, None, :] < k_GE[:, :, None]
                # The layer's one host sync: how many slots the schedule
                # fills (one nonzero, then gathers; not three boolean masks).
                kept_N = keep_GEk.reshape(-1).nonzero().squeeze(1)
            else:
                scores_GET = probs_TE.t().unsqueeze(0)                                 # [1, E, T]
                k = expert_choice_k(T, E, self.capacity_factor)
                gates_GEk, token_GEk = scores_GET.topk(k, dim=-1)
                kept_N = None  # every expert keeps its k: no sync
            expert_GEk = torch.arange(E, device=x_TD.device)[None, :, None].expand_as(token_GEk)
            token_index, expert_index, weight = (
                t.reshape(-1) if kept_N is None else t.reshape(-1).index_select(0, kept_N)
                for t in (token_GEk, expert_GEk, gates_GEk))
            chosen_T = torch.zeros(T, dtype=torch.bool, device=x_TD.device)
            chosen_T[token_index] = True
            losses: Dict[str, torch.Tensor] = {}
            if self.z_loss_coef > 0:
                losses["z_loss"] = L.z_loss(logits_TE, self.z_loss_coef)
            return RoutingDecision(
                token_index=token_index,
                expert_index=expert_index,
                weight=weight,
                logits=logits_TE,
                probs=probs_TE,
                num_experts=E,
                dropped_fraction=1.0 - chosen_T.float().mean(),
                losses=losses,
            )


def build_router(cfg: MoEConfig) -> nn.Module:
    """The router ``cfg.router`` names (token_choice | expert_choice)."""
    if cfg.router == "token_choice":
        return TokenChoiceRouter(cfg)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(cfg)
    raise ValueError(f"moe.router ({cfg.router!r}) must be one of: token_choice, expert_choice")
