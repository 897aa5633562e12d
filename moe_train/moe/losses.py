"""Auxiliary router losses: pure functions of router outputs.

Legend: T tokens, E experts, K top-k. Every function returns the weighted
loss (coefficient already applied) as a 0-d fp32 tensor. Formulas and
sources are in docs/moe.md.
"""
from __future__ import annotations

import torch

from moe_train.moe.routing import count_per_expert

CV_EPS = 1e-10
"""tensor2tensor's epsilon in cv_squared (keeps an all-zero vector at 0)."""


def switch_load_balancing_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor,
                               coef: float) -> torch.Tensor:
    """Switch Transformer Eq 4-6 with K choices: ``coef * E * sum_i f_i * P_i``.

    f_i = share of the T*K top-K assignments that chose expert i (counted
    before capacity drops; not differentiable), P_i = mean over tokens of the
    router probability of i (carries the gradient). Equals ``coef`` when the
    routing is uniform.
    """
    T, E = probs_TE.shape
    counts_E = count_per_expert(expert_ids_TK, E).to(torch.float32)
    f_E = counts_E / expert_ids_TK.numel()
    P_E = probs_TE.float().mean(0)
    return coef * E * torch.sum(f_E * P_E)


def sequence_load_balancing_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor,
                                 batch: int, seq: int, coef: float) -> torch.Tensor:
    """DeepSeek-V3 Eq 17-20 (DeepSeek-V2 Eq 23-25 per sequence), averaged
    over the ``batch`` sequences of ``seq`` tokens (row t = b*seq + s):

    ``coef * mean_b sum_i f_bi * P_bi`` with f_bi = E/(K*seq) * (top-K
    selections of expert i in sequence b) (no gradient) and P_bi = mean over
    the sequence of the normalised affinity of i (``probs_TE``: the softmax
    probabilities, which already sum to 1 over experts). Equals ``coef`` when
    every sequence is balanced; with batch 1 it equals the Switch loss.
    """
    T, E = probs_TE.shape
    K = expert_ids_TK.shape[-1]
    if T != batch * seq:
        raise ValueError(f"sequence loss got {T} tokens, expected batch*seq = {batch}*{seq}")
    ids_BN = expert_ids_TK.reshape(batch, seq * K)
    counts_BE = torch.zeros(batch, E, dtype=torch.float32, device=probs_TE.device)
    counts_BE.scatter_add_(1, ids_BN, torch.ones_like(ids_BN, dtype=torch.float32))
    f_BE = counts_BE * (E / (K * seq))
    P_BE = probs_TE.float().view(batch, seq, E).mean(1)
    return coef * (f_BE * P_BE).sum(-1).mean()


def cv_squared(x: torch.Tensor, eps: float = CV_EPS) -> torch.Tensor:
    """Squared coefficient of variation as tensor2tensor's cv_squared:
    population variance / (mean^2 + eps), with n + eps as the divisor."""
    x = x.float()
    n = x.numel() + eps
    mean = x.sum() / n
    variance = ((x - mean) ** 2).sum() / n
    return variance / (mean ** 2 + eps)


def importance_loss(gates_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """Shazeer et al. 2017 Eq 6-7: ``coef * CV(sum_x G(x))^2`` where G is the
    dense [T, E] gate matrix (zero outside each token's top-K)."""
    return coef * cv_squared(gates_TE.float().sum(0))


def load_loss(load_E: torch.Tensor, coef: float) -> torch.Tensor:
    """Shazeer et al. 2017 Eq 11: ``coef * CV(Load)^2``."""
    return coef * cv_squared(load_E)


def smooth_load(clean_logits_TE: torch.Tensor, noisy_logits_TE: torch.Tensor,
                noise_std_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Shazeer et al. 2017 Eq 8-10: differentiable expected load per expert.

    Load_i = sum_x Phi(((x W_g)_i - kth_excluding(H(x), K, i)) / softplus((x W_noise)_i)):
    the probability, under fresh noise on component i only, that i is in the
    top K. Excluding i, the K-th largest of H is the (K+1)-th largest overall
    when i is itself in the top K, and the K-th largest otherwise. Needs K < E.
    """
    T, E = noisy_logits_TE.shape
    if top_k >= E:
        raise ValueError(f"smooth load needs top_k ({top_k}) < num_experts ({E})")
    top_TK1 = noisy_logits_TE.topk(top_k + 1, dim=-1).values       # [T, K+1]
    threshold_if_in = top_TK1[:, top_k:top_k + 1]                   # (K+1)-th largest
    threshold_if_out = top_TK1[:, top_k - 1:top_k]                  # K-th largest
    is_in = noisy_logits_TE > threshold_if_in
    threshold_TE = torch.where(is_in, threshold_if_in, threshold_if_out)
    prob_TE = torch.special.ndtr((clean_logits_TE - threshold_TE) / noise_std_TE)
    return prob_TE.sum(0)


def count_load(expert_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] fp32: assignments per expert (Shazeer's load without noise; no gradient)."""
    return count_per_expert(expert_ids_TK, num_experts).to(torch.float32)


def z_loss(logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """ST-MoE router z-loss: ``coef * mean_t(logsumexp_j logits_tj)^2``."""
    return coef * torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
