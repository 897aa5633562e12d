"""Attention limited to within a document (``data.document_mask``), what
Megatron-LM calls ``--reset-attention-mask``.

Training windows are cut from a stream of documents, each ended by the
end-of-document id. With the mask a token attends only to earlier tokens of
its own document, so a window holding the tail of one document and the head
of the next computes each part as if it were alone (RoPE and ALiBi depend
only on relative positions, so positions need no reset for that).
"""
from __future__ import annotations

import torch


def document_ids(input_ids_BS: torch.Tensor, eod_id: int) -> torch.Tensor:
    """``[B, S]`` index of the document each token belongs to, counted from
    the window's start: an end-of-document token belongs to the document it
    ends, and the token after it starts the next."""
    is_eod = (input_ids_BS == eod_id).to(torch.int32)
    return torch.cumsum(is_eod, dim=1) - is_eod


def document_bias(document_ids_BS: torch.Tensor) -> torch.Tensor:
    """fp32 additive mask ``[B, 1, S, S]``: 0 where key ``k <= q`` lies in
    the query's document, -inf elsewhere (causal included)."""
    S = document_ids_BS.shape[1]
    same_BSS = document_ids_BS[:, :, None] == document_ids_BS[:, None, :]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=document_ids_BS.device).tril()
    allowed = same_BSS & causal_SS
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=document_ids_BS.device)
    return bias.masked_fill(~allowed, float("-inf"))[:, None]
