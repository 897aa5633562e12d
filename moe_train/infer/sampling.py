"""Choosing the next token from the logits: greedy, temperature, top-k and
top-p (nucleus, Holtzman et al. 2019), in the order transformers applies
them (temperature, then top-k, then top-p)."""
from __future__ import annotations

from typing import Optional

import torch


def filter_logits(logits_BV: torch.Tensor, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """fp32 logits with every token outside the top-k and outside the nucleus
    set to -inf. The nucleus is the smallest set of most likely tokens whose
    probability reaches ``top_p``; the most likely token always stays."""
    logits_BV = logits_BV.float()
    if top_k is not None and 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cumulative_BV = sorted_BV.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p.
        drop_BV = (cumulative_BV - sorted_BV.softmax(-1)) >= top_p
        drop_BV[..., 0] = False
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    return logits_BV


def next_token(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[B]`` long: the argmax at temperature 0 (deterministic), else a
    sample from softmax(filtered logits / temperature). ``generator`` is a
    CPU generator, so a seed gives the same tokens on any device."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs_BV = filter_logits(logits_BV.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs_BV.cpu(), 1, generator=generator).squeeze(-1).to(logits_BV.device)
