"""The analytic model-FLOP count against torch's FlopCounterMode on a real
forward (and backward), with attention written as plain matmuls so that the
counter sees it (the CPU SDPA kernel is not counted)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from moe_train.config import load_config
from moe_train.model import attention
from moe_train.model.transformer import build_model
from moe_train.train.flops import PerfMeter, forward_flops_per_token, model_flops_per_token, \
    peak_tflops

B, S = 2, 16


def _matmul_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **_):
    if enable_gqa:  # G key/value heads serve H query heads (repeats are no matmul)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask
    return F.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("overrides", [
    # GQA, SwiGLU, top-2 dropless, untied head
    [],
    # shared expert, GELU, every second block dense, tied embeddings, noisy gating, ALiBi
    ["moe.num_shared_experts=1", "model.activation=gelu", "moe.layer_freq=2",
     "model.tie_embeddings=true", "moe.noisy_gating=true", "model.position_embedding=alibi",
     "model.num_layers=4"],
    # the features of Qwen3-MoE / DeepSeekMoE: head dim apart from hidden/heads, QK-norm,
    # first-k-dense, a gated shared expert of its own width, expert choice
    ["model.kv_channels=12", "model.qk_norm=head", "moe.first_k_dense=1",
     "moe.num_shared_experts=1", "moe.shared_expert_ffn_hidden_size=24",
     "moe.shared_expert_gate=true", "moe.router=expert_choice", "moe.capacity_factor=2.0",
     "model.num_layers=3"],
])
def test_forward_flops_match_flop_counter(monkeypatch, overrides):
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", _matmul_sdpa)
    cfg = load_config(None, ["model.vocab_size=256", "model.num_layers=2", "model.hidden_size=32",
                             "model.num_heads=4",
                             "model.num_kv_heads=2", "model.ffn_hidden_size=48",
                             "moe.num_experts=4", "moe.top_k=2", f"train.seq_len={S}"] + overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    x = torch.randint(0, cfg.model.vocab_size, (B, S))
    with FlopCounterMode(display=False) as counter:
        model(x)
    forward = counter.get_total_flops()
    assert forward_flops_per_token(model, S) * B * S == pytest.approx(forward, rel=1e-12)
    assert model_flops_per_token(cfg) * B * S == pytest.approx(3 * forward, rel=1e-12)


def test_backward_costs_twice_the_forward(monkeypatch):
    """The 3x of a training step, on a dense model (the experts' own autograd
    Functions hide their backward matmuls from FlopCounterMode)."""
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", _matmul_sdpa)
    cfg = load_config(None, ["model.vocab_size=256", "model.num_layers=2", "model.hidden_size=32",
                             "model.num_heads=4", "model.ffn_hidden_size=48",
                             "moe.num_experts=0", f"train.seq_len={S}"])
    model = build_model(cfg.model, cfg.moe)
    x = torch.randint(0, cfg.model.vocab_size, (B, S))
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        out.logits.float().pow(2).mean().backward()
    assert counter.get_total_flops() == pytest.approx(model_flops_per_token(cfg) * B * S,
                                                      rel=0.02)


def test_peak_and_mfu():
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, "bf16") is None
    assert peak_tflops(cpu, "bf16", configured=2.0) == 2.0
    meter = PerfMeter(flops_per_token=1e9, world_size=4, device=cpu, peak=None)
    scalars = meter.scalars(tokens_per_sec=8000.0)
    assert scalars["perf/tflops"] == pytest.approx(1e9 * 8000 / 4 / 1e12)
    assert "perf/mfu" not in scalars and scalars["memory/rss"] > 0
    meter.peak = 4.0  # 2 TFLOP/s achieved per device
    assert meter.scalars(8000.0)["perf/mfu"] == pytest.approx(0.5)
