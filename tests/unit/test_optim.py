"""Optimizer groups and the learning-rate schedule, against the rules and the
formula written out here independently of moe_train.train.optim."""
import copy
import math

import pytest
import torch

from moe_train.config import TrainConfig, config_from_dict
from moe_train.model.transformer import build_model
from moe_train.train.optim import (build_optimizer, build_scheduler, fused_supported, lr_at,
                                   split_decay)


def tiny_model(tie=False, norm="rmsnorm"):
    cfg = config_from_dict({
        "model": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                  "ffn_hidden_size": 64,
                  "tie_embeddings": tie, "norm": norm},
        "moe": {"num_experts": 4, "top_k": 2, "layer_freq": 2},
    })
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.moe)


def expected_no_decay(name, param):
    """The documented rule, by name: norms, biases and the embedding."""
    return (name.startswith("embed.") or "norm" in name or name.endswith(".bias")
            or param.ndim < 2)


@pytest.mark.parametrize("tie, norm", [(False, "rmsnorm"), (True, "layernorm")])
def test_groups_follow_the_rule_and_cover_every_parameter_once(tie, norm):
    model = tiny_model(tie, norm)
    decay, no_decay = split_decay(model)
    params = dict(model.named_parameters())
    assert sorted(decay + no_decay) == sorted(params)
    assert not set(decay) & set(no_decay)
    for name in no_decay:
        assert expected_no_decay(name, params[name]), name
    for name in decay:
        assert not expected_no_decay(name, params[name]), name
    # The kinds that must be decayed are all there: attention, dense MLP,
    # experts, router, and the LM head unless it is the (undecayed) embedding.
    assert "blocks.0.attn.wq.weight" in decay
    assert "blocks.0.ffn.w1.weight" in decay
    assert "blocks.1.ffn.experts.w1" in decay and "blocks.1.ffn.experts.w2" in decay
    assert any("router" in n for n in decay)
    assert ("lm_head.weight" in decay) is (not tie)
    assert "embed.weight" in no_decay


def test_optimizer_weight_decay_per_group():
    model = tiny_model()
    cfg = TrainConfig(weight_decay=0.25, lr=1e-3)
    opt = build_optimizer(model, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["decay"]["weight_decay"] == 0.25
    assert by_name["no_decay"]["weight_decay"] == 0.0
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == len(list(model.parameters()))


def reference_lr(s, peak, floor, warmup, total):
    """Linear warmup (update s gets peak*(s+1)/warmup), then half a cosine
    from peak at s=warmup to floor at s=total."""
    if s < warmup:
        return peak * (s + 1) / warmup
    frac = min(1.0, (s - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * (1 + math.cos(math.pi * frac)) / 2


@pytest.mark.parametrize("warmup, total", [(5, 30), (0, 10), (10, 10)])
def test_scheduler_follows_the_formula(warmup, total):
    cfg = TrainConfig(lr=2e-3, min_lr=1e-4, warmup_steps=warmup, max_steps=total)
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for s in range(total + 3):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for s, lrs in enumerate(seen):
        want = reference_lr(s, 2e-3, 1e-4, warmup, total)
        assert lrs == pytest.approx([want] * len(lrs), rel=1e-12, abs=1e-15), s
        assert lr_at(s, cfg) == pytest.approx(want, rel=1e-12)


def test_schedule_landmarks():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert lr_at(0, cfg) == pytest.approx(0.25)
    assert lr_at(3, cfg) == pytest.approx(1.0)       # last warmup update at the peak
    assert lr_at(4, cfg) == pytest.approx(1.0)       # cosine starts at the peak
    assert lr_at(9, cfg) == pytest.approx(0.55)      # halfway: mean of peak and floor
    assert lr_at(14, cfg) == pytest.approx(0.1)
    assert lr_at(100, cfg) == pytest.approx(0.1)     # stays at the floor
    decay = [lr_at(s, cfg) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_fused_adamw_steps_like_the_per_tensor_loop():
    # The trainer's optimizer takes torch's fused kernel where it can; the
    # reference is torch's plain per-tensor AdamW (foreach=False) on a copy.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5),
                                torch.nn.LayerNorm(5))
    ref_model = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert opt.defaults["fused"]
    ref = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                             for g in build_optimizer(ref_model, cfg).param_groups],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)
    for step in range(3):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(step)
            m(torch.randint(0, 11, (4,), generator=g)).pow(2).sum().backward()
            o.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_fused_needs_one_supported_device_type():
    assert fused_supported([torch.zeros(2)])
    assert not fused_supported([torch.zeros(2, device="meta")])
    assert not fused_supported([torch.zeros(2, dtype=torch.long)])
