"""Cross-field validation of a :class:`moe_train.config.Config`: every rule
that involves more than one field, or a value torch or numpy would refuse
later, checked before anything is built or written. Errors are
:class:`moe_train.config.ConfigError`, one line naming the field path."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, List, Optional

from moe_train.config_schema import CHOICES, Config, ConfigError, _check, check_choice
from moe_train.config_limits import check_int_limits, check_limits


def _walk(obj: Any, prefix: str):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}.{f.name}" if prefix else f.name
        yield path, value
        if dataclasses.is_dataclass(value):
            yield from _walk(value, path)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Check every cross-field rule of ``cfg``; ``world_size`` adds the
    parallel-layout rules. Raises ConfigError."""
    check_int_limits(cfg, ConfigError)  # first: later messages format the values
    for path, value in _walk(cfg, ""):
        if path in CHOICES:
            check_choice(path, value)

    m, e, p, t, d = cfg.model, cfg.moe, cfg.parallel, cfg.train, cfg.data
    for path, value in _walk(cfg, ""):
        if path.endswith(("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len",
                          "max_steps", "global_batch_size", "micro_batch_size", "seq_len",
                          "expert_parallel_size", "tensor_parallel_size", "dp_shard_size", "layer_freq",
                          "top_k", "eval_iters", "keep_last", "log_every")) and value is not None:
            _check(value >= 1, f"{path} ({value}) must be >= 1")
    if m.kv_channels is None:
        _check(m.hidden_size % m.num_heads == 0,
               f"model.num_heads ({m.num_heads}) must divide model.hidden_size ({m.hidden_size}) "
               "(or set model.kv_channels)")
    else:
        _check(m.kv_channels >= 1, f"model.kv_channels ({m.kv_channels}) must be >= 1")
    _check(m.kv_heads >= 1 and m.num_heads % m.kv_heads == 0,
           f"model.num_kv_heads ({m.num_kv_heads}) must divide model.num_heads ({m.num_heads})")
    _check(0.0 < m.rope.rotary_fraction <= 1.0,
           f"model.rope.rotary_fraction ({m.rope.rotary_fraction}) must be in (0, 1]")
    rot = int(m.head_dim * m.rope.rotary_fraction)
    _check(m.position_embedding != "rope" or (rot >= 2 and rot % 2 == 0),
           f"model.rope.rotary_fraction ({m.rope.rotary_fraction}) times head_dim ({m.head_dim}) "
           "must give an even number of rotary dims >= 2")
    _check(m.rope.base > 0, f"model.rope.base ({m.rope.base}) must be > 0")
    if m.rope.scaling is not None:
        _check(m.rope.scaling.factor >= 1.0,
               f"model.rope.scaling.factor ({m.rope.scaling.factor}) must be >= 1")
    _check(m.init_std > 0, f"model.init_std ({m.init_std}) must be > 0")

    _check(e.num_experts >= 0, f"moe.num_experts ({e.num_experts}) must be >= 0")
    if e.enabled:
        _check(e.top_k <= e.num_experts,
               f"moe.top_k ({e.top_k}) must be <= moe.num_experts ({e.num_experts})")
        _check(e.capacity_factor is None or e.capacity_factor > 0,
               f"moe.capacity_factor ({e.capacity_factor}) must be > 0, or null for dropless")
        _check(e.min_capacity >= 0, f"moe.min_capacity ({e.min_capacity}) must be >= 0")
        _check(e.router != "expert_choice" or e.capacity_factor is None
               or e.capacity_factor <= e.num_experts,
               f"moe.capacity_factor ({e.capacity_factor}) must be <= moe.num_experts "
               f"({e.num_experts}) with moe.router expert_choice: c is experts per token")
        _check(not (e.router == "expert_choice" and e.noisy_gating),
               "moe.noisy_gating applies to moe.router token_choice only")
        _check(e.num_shared_experts >= 0,
               f"moe.num_shared_experts ({e.num_shared_experts}) must be >= 0")
        _check(e.first_k_dense >= 0, f"moe.first_k_dense ({e.first_k_dense}) must be >= 0")
        _check(e.shared_expert_ffn_hidden_size is None or e.shared_expert_ffn_hidden_size >= 1,
               f"moe.shared_expert_ffn_hidden_size ({e.shared_expert_ffn_hidden_size}) must be "
               ">= 1, or null")
        _check(e.num_shared_experts > 0 or not (e.shared_expert_gate
                                                or e.shared_expert_ffn_hidden_size),
               "moe.shared_expert_gate and moe.shared_expert_ffn_hidden_size need "
               "moe.num_shared_experts >= 1")
        _check(0.0 <= e.jitter_eps < 1.0, f"moe.jitter_eps ({e.jitter_eps}) must be in [0, 1)")
        _check(e.aux_loss_coef is None or 0 <= e.aux_loss_coef < math.inf,
               f"moe.aux_loss_coef ({e.aux_loss_coef}) must be a finite number >= 0, or null "
               "for the paper's weight")
        _check(not (e.router == "token_choice" and e.score_order == "topk_then_softmax"
                    and e.top_k == 1 and e.expert_bias_update_rate == 0),
               "moe.score_order (topk_then_softmax) with moe.top_k 1 makes every gate 1, so the "
               "router gets no gradient from the loss: use softmax_then_topk (Switch: the gate is "
               "the router probability) or a balancing that needs no router gradient "
               "(moe.expert_bias_update_rate > 0)")
        _check(any((i + 1) % e.layer_freq == 0 for i in range(e.first_k_dense, m.num_layers)),
               (f"moe.layer_freq ({e.layer_freq}) and moe.first_k_dense ({e.first_k_dense}) "
                f"leave no MoE block among the model.num_layers ({m.num_layers})" if e.first_k_dense
                else f"moe.layer_freq ({e.layer_freq}) must be <= model.num_layers "
                     f"({m.num_layers})")
               + ": no block would be MoE (set moe.num_experts 0 for a dense model)")
        _check(e.z_loss_coef >= 0, f"moe.z_loss_coef ({e.z_loss_coef}) must be >= 0")
        _check(e.expert_bias_update_rate >= 0,
               f"moe.expert_bias_update_rate ({e.expert_bias_update_rate}) must be >= 0")
        _check(not (e.router == "expert_choice" and e.expert_bias_update_rate > 0),
               f"moe.expert_bias_update_rate ({e.expert_bias_update_rate}) applies to moe.router "
               "token_choice only (expert choice is balanced by construction); set it to 0")
        if e.expert_impl == "grouped_mm":
            from moe_train.moe.expert_impls import grouped_mm_unavailable_reason
            reason = grouped_mm_unavailable_reason(e.hidden_size or m.hidden_size,
                                                   e.ffn_hidden_size or m.ffn_size)
            _check(reason is None, str(reason))
        _check(e.num_experts % p.expert_parallel_size == 0,
               f"moe.num_experts ({e.num_experts}) must be divisible by "
               f"parallel.expert_parallel_size ({p.expert_parallel_size})")
    else:
        _check(p.expert_parallel_size == 1,
               "parallel.expert_parallel_size must be 1 when moe.num_experts is 0")

    _check(t.seq_len <= m.max_seq_len,
           f"train.seq_len ({t.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})")
    _check(0 < t.lr < math.inf, f"train.lr ({t.lr}) must be a finite number > 0")
    _check(0 <= t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must be in [0, train.lr]")
    _check(t.warmup_steps >= 0, f"train.warmup_steps ({t.warmup_steps}) must be >= 0")
    _check(t.weight_decay >= 0, f"train.weight_decay ({t.weight_decay}) must be >= 0")
    _check(t.grad_clip >= 0, f"train.grad_clip ({t.grad_clip}) must be >= 0")
    _check(t.save_every >= 0, f"train.save_every ({t.save_every}) must be >= 0")
    _check(t.eval_every >= 0, f"train.eval_every ({t.eval_every}) must be >= 0")
    _check(t.heatmap_every >= 0, f"train.heatmap_every ({t.heatmap_every}) must be >= 0")
    _check(t.peak_tflops is None or t.peak_tflops > 0,
           f"train.peak_tflops ({t.peak_tflops}) must be > 0, or null")
    _check(0.0 < d.val_fraction < 1.0, f"data.val_fraction ({d.val_fraction}) must be in (0, 1)")
    names = set()
    for i, part in enumerate(d.blend or []):
        _check(bool(part.path), f"data.blend[{i}].path must name a dataset")
        _check(part.weight > 0 and math.isfinite(part.weight),
               f"data.blend[{i}].weight ({part.weight}) must be > 0")
        name = part.name or os.path.basename(os.path.normpath(part.path))
        _check(name not in names, f"data.blend[{i}].name ({name!r}) is used twice; "
               "give each part its own name")
        names.add(name)

    _check(not (t.deepspeed_config and p.dp_shard_size > 1),
           f"parallel.dp_shard_size ({p.dp_shard_size}) must be 1 with train.deepspeed_config: "
           "DeepSpeed shards with its own ZeRO stages (zero_optimization.stage)")

    tp = p.tensor_parallel_size
    # A q/k norm weight sees only this rank's heads under TP, so its gradient
    # would need a TP all-reduce that grad_sync does not do.
    _check(m.qk_norm is None or tp == 1,
           f"model.qk_norm ({m.qk_norm}) needs parallel.tensor_parallel_size 1 (got {tp}): "
           "the q/k norm weights would need a tensor-parallel gradient reduction")
    _check(m.num_heads % tp == 0 and m.kv_heads % tp == 0,
           f"parallel.tensor_parallel_size ({tp}) must divide model.num_heads ({m.num_heads}) "
           f"and model.num_kv_heads ({m.kv_heads})")
    if world_size is not None:
        _check(world_size % tp == 0,
               f"parallel.tensor_parallel_size ({tp}) must divide the world size ({world_size})")
        dp = world_size // tp
        _check(dp % p.expert_parallel_size == 0,
               f"parallel.expert_parallel_size ({p.expert_parallel_size}) must divide the "
               f"data-parallel size ({dp} = world {world_size} / tp {tp})")
        _check(dp % p.dp_shard_size == 0,
               f"parallel.dp_shard_size ({p.dp_shard_size}) must divide the data-parallel "
               f"size ({dp} = world {world_size} / tp {tp})")
        _check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
               f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
               f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})")
    else:
        _check(t.global_batch_size % t.micro_batch_size == 0,
               f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
               f"train.micro_batch_size ({t.micro_batch_size})")
    check_limits(cfg, ConfigError)  # what torch/numpy would refuse later (config_limits.py)


def config_warnings(cfg: Config) -> List[str]:
    """One-line notes on settings that are allowed but probably not meant
    (the trainer prints them once, as ``warning: ...``)."""
    t = cfg.train
    out = []
    if t.warmup_steps > t.max_steps:
        out.append(f"train.warmup_steps ({t.warmup_steps}) > train.max_steps ({t.max_steps}): "
                   f"the learning rate stops at {t.max_steps / t.warmup_steps:.0%} of train.lr "
                   "and never decays")
    return out


# ----------------------------------------------------------------------------
# Building from dicts, YAML and --set overrides
