"""KV-cached decoding equals one full forward: a prompt prefilled, then
chunks and single tokens, give the logits the full causal forward gives at
the same positions (RoPE in both layouts, partial rotary, ALiBi with a head
count that is not a power of two, GQA, QK-norm, token- and expert-choice MoE)."""
import pytest
import torch

from moe_train.config import config_from_dict
from moe_train.model.kv_cache import KVCache
from moe_train.model.positional import alibi_bias
from moe_train.model.transformer import build_model

V, S = 64, 12
# fp32: the cached and full forwards sum the same products in different
# orders/blocks (SDPA over L keys vs a causal S x S block); with O(1)
# activations the difference is a few ulps of the logits (~1e-6).
TOL = 1e-5


def model_for(overrides):
    base = {"model": {"vocab_size": V, "hidden_size": 48, "num_layers": 2, "num_heads": 4,
                      "num_kv_heads": 2, "ffn_hidden_size": 32, "max_seq_len": 16},
            "moe": {"num_experts": 4, "top_k": 2},
            "train": {"seq_len": S, "global_batch_size": 2, "micro_batch_size": 2}}
    cfg = config_from_dict(base, list(overrides))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    with torch.no_grad():  # O(1) weights: the default 0.02 init would hide errors in tiny logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


VARIANTS = {
    "rope_half": [],
    "rope_interleaved_partial": ["model.rope.layout=interleaved", "model.rope.rotary_fraction=0.5"],
    "alibi_6_heads": ["model.position_embedding=alibi", "model.num_heads=6",
                      "model.num_kv_heads=3"],
    "mha_dense_every_other": ["model.num_kv_heads=4", "moe.layer_freq=2"],
    "expert_choice": ["moe.router=expert_choice"],
    "qk_norm_head_kv_channels_first_dense": ["model.qk_norm=head", "model.kv_channels=16",
                                             "moe.first_k_dense=1"],
    "qk_norm_projection_shared_expert": ["model.qk_norm=projection", "moe.num_shared_experts=1"],
}


def cached_logits(model, ids, chunks):
    cache = KVCache.for_model(model)
    out, start = [], 0
    for n in chunks:
        out.append(model(ids[:, start:start + n], cache=cache).logits)
        start += n
    assert start == ids.shape[1] and cache.length == start
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decode_equals_full_forward(name):
    model = model_for(VARIANTS[name])
    # Batch 1 as in generation (an expert-choice group is the batch at one position).
    ids = torch.randint(0, V, (1, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        assert full.abs().max() > 1.0  # not a comparison of near-zero numbers
        for chunks in ([5] + [1] * 7, [1] * S, [3, 4, 1, 4]):
            got = cached_logits(model, ids, chunks)
            diff = (got - full).abs().max().item()
            assert diff < TOL, f"{name} chunks {chunks}: max |cached - full| = {diff}"


def test_cached_decode_batch_of_two():
    model = model_for([])
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        got = cached_logits(model, ids, [4] + [1] * 8)
    assert (got - full).abs().max().item() < TOL


def test_cache_overflow_is_refused():
    model = model_for([])
    cache = KVCache.for_model(model)
    with torch.no_grad():
        model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def mask_reference(attn, q_len, kv_len):
    """The last ``q_len`` rows of the full forward's [H, L, L] ALiBi bias or
    [L, L] causal mask: what queries after ``kv_len - q_len`` cached keys see."""
    if attn.rotary is None:
        return alibi_bias(attn.alibi_slopes(torch.device("cpu")), kv_len)[:, kv_len - q_len:]
    future = torch.ones(kv_len, kv_len, dtype=torch.bool).triu(1)
    return torch.zeros(kv_len, kv_len).masked_fill(future, float("-inf"))[kv_len - q_len:]


@pytest.mark.parametrize("name", ["rope_half", "alibi_6_heads"])
def test_decode_mask_is_the_rows_of_the_full_mask(name):
    attn = model_for(VARIANTS[name]).blocks[0].attn
    for q_len, kv_len in [(1, 1), (1, 9), (4, 9), (9, 9)]:
        positions = torch.arange(kv_len - q_len, kv_len)
        shared = attn.shared_inputs(q_len, kv_len, positions, torch.float32)
        ref = mask_reference(attn, q_len, kv_len)
        if shared.mask is None:  # SDPA's is_causal (square) or one query seeing every key
            assert ((q_len == kv_len and shared.is_causal)
                    or (q_len == 1 and not shared.is_causal and torch.isfinite(ref).all()))
        else:
            assert torch.equal(shared.mask.expand_as(ref), ref), (q_len, kv_len)
