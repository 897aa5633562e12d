"""Position information for attention: rotary embeddings (RoPE) and ALiBi.

RoPE (RoFormer, arXiv 2104.09864) rotates pairs of query/key dims by an
angle ``position * theta_i`` with ``theta_i = base^(-2i/r)``, ``r`` the rotary
dims, so that ``q_m . k_n`` depends on ``m - n`` only. ALiBi (Press et al.,
arXiv 2108.12409) adds ``-m_h * (i - j)`` to the attention scores instead.

Legend: B batch, S sequence, H heads, d head dim, r rotary dims (<= d).

Precision: positions, inv_freq, the outer product and cos/sin are fp32 with
autocast disabled, and only cos/sin are cast to the input dtype. In bf16,
256 and 257 are the same number (8-bit mantissa), so a bf16 table makes
neighbouring positions identical (transformers #25681, Baichuan2 report).
``inv_freq`` is a plain attribute, not a buffer, so ``model.to(bfloat16)``
and DeepSpeed's casts leave it fp32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from moe_train.config import RopeScalingConfig

ScalingLike = Union[None, RopeScalingConfig, dict]


# ----------------------------------------------------------------------------
# ALiBi


def _power_of_two_slopes(n: int) -> List[float]:
    # m_h = 2^(-8h/n), h = 1..n, written as a geometric sequence like the reference.
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start ** h for h in range(n)]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes ``[num_heads]`` (fp32), the reference ``get_slopes`` rule.

    A power of two H gives ``m_h = 2^(-8h/H)``, h = 1..H. Otherwise, with
    ``p = 2^floor(log2 H)``: ``slopes(p)`` followed by
    ``slopes(2p)[0::2][:H - p]`` (the same as BLOOM's ``build_alibi_tensor``).
    """
    if num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads ({num_heads}) must be >= 1")
    if math.log2(num_heads).is_integer():
        slopes = _power_of_two_slopes(num_heads)
    else:
        p = 2 ** math.floor(math.log2(num_heads))
        slopes = _power_of_two_slopes(p) + _power_of_two_slopes(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes_H: torch.Tensor, seq_len: int,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """Additive causal ALiBi bias ``[H, S, S]`` in fp32 for
    ``scaled_dot_product_attention``'s ``attn_mask``.

    ``bias[h, i, j] = -slopes[h] * (i - j)`` for ``j <= i`` and ``-inf`` above
    the diagonal, so the causal mask and the linear bias travel as one tensor
    (SDPA refuses ``attn_mask`` together with ``is_causal``).
    """
    return alibi_bias_rows(slopes_H, seq_len, seq_len, device)


def alibi_bias_rows(slopes_H: torch.Tensor, q_len: int, kv_len: int,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """The last ``q_len`` query rows of :func:`alibi_bias` for ``kv_len``
    keys: fp32 ``[H, q_len, kv_len]``, queries at positions
    ``kv_len - q_len .. kv_len - 1``.

    fp32 with autocast off whatever the caller runs under: in bf16 a slope of
    2^-8 times a distance near 4000 has a granularity of 0.06, so neighbouring
    distances would merge (references.md, ALiBi precision trap).
    """
    device = slopes_H.device if device is None else device
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device, dtype=torch.float32)
        k_pos = torch.arange(kv_len, device=device, dtype=torch.float32)
        distance_SL = q_pos[:, None] - k_pos[None, :]                       # i - j
        bias_HSL = -slopes_H.to(device=device, dtype=torch.float32)[:, None, None] * distance_SL
        return bias_HSL.masked_fill(distance_SL < 0, float("-inf"))


# ----------------------------------------------------------------------------
# RoPE


def _as_scaling(scaling: ScalingLike) -> Optional[RopeScalingConfig]:
    if scaling is None or isinstance(scaling, RopeScalingConfig):
        return scaling
    if isinstance(scaling, dict):
        data = dict(scaling)
        if "rope_type" in data:  # transformers' spelling of the same key
            data["type"] = data.pop("rope_type")
        names = {f.name for f in dataclasses.fields(RopeScalingConfig)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"rope scaling: unknown keys {unknown}; allowed: {sorted(names)}")
        return RopeScalingConfig(**data)
    raise TypeError(f"rope scaling must be None, a RopeScalingConfig or a dict, got {scaling!r}")


def _default_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    # theta_i = base^(-2i/r), i = 0..r/2-1; arange in int64 then fp32, like transformers.
    # On the CPU even inside a meta-device build: a table, not a parameter
    # (moved to the input's device on first use).
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64,
                            device="cpu").to(torch.float32) / rotary_dim
    return 1.0 / (base ** exponent)


def _yarn_inv_freq(base: float, rotary_dim: int, factor: float, original_len: int,
                   beta_fast: float, beta_slow: float) -> torch.Tensor:
    """YaRN "NTK-by-parts" (arXiv 2309.00071 Sec 3.2), as transformers'
    ``_compute_yarn_parameters`` (truncate=True): dims that turn more than
    ``beta_fast`` times over the original context keep their frequency, dims
    that turn fewer than ``beta_slow`` times are interpolated by ``factor``,
    with a linear ramp in between."""
    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(original_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rotary_dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32, device="cpu") - low)
            / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp                          # 1: keep the frequency, 0: interpolate
    inv_freq = _default_inv_freq(base, rotary_dim)
    return (inv_freq / factor) * (1.0 - extrapolation) + inv_freq * extrapolation


class RotaryEmbedding(nn.Module):
    """Rotary position embedding applied to queries and keys.

    Args:
        dim: head dim d.
        base: theta base (10000 in RoFormer).
        layout: ``"half"`` rotates dims (i, i + r/2) (GPT-NeoX, LLaMA,
            transformers' ``rotate_half``); ``"interleaved"`` rotates pairs
            (2i, 2i+1) (RoFormer, GPT-J, ChatGLM). Checkpoints of one layout
            do not load into the other without permuting the q/k weights.
        rotary_fraction: the first ``r = int(dim * rotary_fraction)`` dims
            rotate, the rest pass through untouched (ChatGLM: 0.5).
        scaling: None, a :class:`~moe_train.config.RopeScalingConfig`, or a
            dict with its keys. ``linear``: positions / factor; ``ntk``:
            base * factor^(r/(r-2)); ``dynamic``: NTK with the factor grown
            from the current length once it exceeds the trained one;
            ``yarn``: NTK-by-parts plus cos/sin times ``attention_factor``.
        max_seq_len: trained length, the default of
            ``scaling.original_max_position_embeddings`` (dynamic, yarn).

    Call: ``rotary(q, k, positions) -> (q, k)`` with q, k ``[B, S, H, d]``
    (q and k may have different head counts) and positions ``[S]`` or
    ``[B, S]``.
    """

    def __init__(self, dim: int, base: float = 10000.0, layout: str = "half",
                 rotary_fraction: float = 1.0, scaling: ScalingLike = None,
                 max_seq_len: Optional[int] = None):
        super().__init__()
        if layout not in ("half", "interleaved"):
            raise ValueError(f"rope layout ({layout!r}) must be one of: half, interleaved")
        rotary_dim = int(dim * rotary_fraction)
        if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > dim:
            raise ValueError(f"rope rotary_fraction ({rotary_fraction}) times dim ({dim}) must give "
                             "an even number of rotary dims in [2, dim]")
        self.dim = dim
        self.rotary_dim = rotary_dim
        self.base = float(base)
        self.layout = layout
        self.scaling = _as_scaling(scaling)
        self.attention_factor = 1.0
        self.original_max_position_embeddings: Optional[int] = None

        s = self.scaling
        inv_freq = _default_inv_freq(self.base, rotary_dim)
        if s is not None:
            if s.type not in ("linear", "ntk", "dynamic", "yarn"):
                raise ValueError(f"rope scaling type ({s.type!r}) must be one of: linear, ntk, dynamic, yarn")
            if s.factor < 1.0:
                raise ValueError(f"rope scaling factor ({s.factor}) must be >= 1")
            if s.type in ("dynamic", "yarn"):
                original = s.original_max_position_embeddings or max_seq_len
                if not original:
                    raise ValueError(f"rope scaling {s.type} needs original_max_position_embeddings "
                                     "(or max_seq_len)")
                self.original_max_position_embeddings = int(original)
            if s.type == "linear":
                # Dividing inv_freq by s equals dividing positions by s (Chen et al. 2023,
                # arXiv 2306.15595); transformers folds it the same way.
                inv_freq = inv_freq / s.factor
            elif s.type == "ntk":
                inv_freq = _default_inv_freq(self.base * s.factor ** (rotary_dim / (rotary_dim - 2)),
                                             rotary_dim)
            elif s.type == "yarn":
                inv_freq = _yarn_inv_freq(self.base, rotary_dim, s.factor,
                                          self.original_max_position_embeddings,
                                          s.beta_fast, s.beta_slow)
                self.attention_factor = (s.attention_factor if s.attention_factor is not None
                                         else 0.1 * math.log(s.factor) + 1.0)
        # A plain attribute, not a buffer: model.to(bfloat16) must not cast it.
        self.inv_freq = inv_freq

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"layout={self.layout}, scaling={self.scaling}")

    def inv_freq_for(self, seq_len: Union[int, torch.Tensor, None] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
        """fp32 ``[r/2]`` inverse frequencies in use for sequences of
        ``seq_len`` tokens (the length matters only for dynamic NTK)."""
        device = self.inv_freq.device if device is None else device
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)  # stays fp32: .to(device) only
        s = self.scaling
        if s is None or s.type != "dynamic" or seq_len is None:
            return self.inv_freq
        # Dynamic NTK (transformers' _compute_dynamic_ntk_parameters):
        # base' = base * (s*L/L0 - (s-1))^(r/(r-2)) with L = max(len, L0), so
        # nothing changes up to the trained length. Tensor math: no host sync.
        r, L0 = self.rotary_dim, float(self.original_max_position_embeddings)
        length = torch.as_tensor(seq_len, dtype=torch.float32, device=device).clamp(min=L0)
        base = self.base * (s.factor * length / L0 - (s.factor - 1.0)) ** (r / (r - 2))
        exponent = torch.arange(0, r, 2, dtype=torch.int64, device=device).to(torch.float32) / r
        return 1.0 / (base ** exponent)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[..., r/2]`` for ``positions`` (``[S]`` or ``[B, S]``),
        computed in fp32 with autocast off, times ``attention_factor``, then
        cast to ``dtype``."""
        device = positions.device
        with torch.autocast(device_type=device.type, enabled=False):
            pos = positions.to(torch.float32)
            seq_len = None
            if self.scaling is not None and self.scaling.type == "dynamic":
                seq_len = positions.max() + 1
            inv_freq = self.inv_freq_for(seq_len, device)
            angles = pos[..., None] * inv_freq                  # [..., S, r/2]
            cos = angles.cos() * self.attention_factor
            sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def _rotate(self, x_BSHd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        x_rot, x_pass = x_BSHd[..., :r], x_BSHd[..., r:]
        if self.layout == "half":
            a, b = x_rot[..., : r // 2], x_rot[..., r // 2:]
            out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
        else:
            a, b = x_rot[..., 0::2], x_rot[..., 1::2]
            out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate q ``[B, S, Hq, d]`` and k ``[B, S, Hk, d]`` by ``positions``.

        ``cos_sin``: the tables of :meth:`cos_sin` for these positions,
        computed once per model forward and shared by every layer; computed
        here when not given. They are cast to q's dtype if they differ."""
        if q.shape[-1] != self.dim or k.shape[-1] != self.dim:
            raise ValueError(f"rope: head dim {q.shape[-1]}/{k.shape[-1]} != {self.dim}")
        if cos_sin is None:
            cos, sin = self.cos_sin(positions.to(q.device), q.dtype)
        else:
            cos, sin = (t.to(q.dtype) for t in cos_sin)
        # [S, r/2] or [B, S, r/2] -> broadcast over heads: [.., S, 1, r/2]
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *,
         dim: Optional[int] = None, base: float = 10000.0, layout: str = "half",
         rotary_fraction: float = 1.0, scaling: ScalingLike = None,
         max_seq_len: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Functional RoPE: ``RotaryEmbedding(dim or q.shape[-1], ...)(q, k, positions)``."""
    rotary = RotaryEmbedding(dim or q.shape[-1], base=base, layout=layout,
                             rotary_fraction=rotary_fraction, scaling=scaling,
                             max_seq_len=max_seq_len)
    return rotary(q, k, positions)
