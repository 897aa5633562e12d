"""``moe-train plan``: what a config costs before anything is allocated.

The model is built on the meta device (shapes only, no storage), so even
Mixtral-8x7B is counted in seconds on a CPU. From the parameter shapes and
the layout (``parallel.*``, ``train.precision`` or the DeepSpeed config) it
derives, per rank:

- parameters, gradients and optimizer state in bytes. Sharding: attention,
  dense MLPs and shared experts split over TP (megatron-core column/row
  parallel); routed experts over EP; everything over
  ``parallel.dp_shard_size`` (FSDP2: dense parameters across that many
  data-parallel ranks, expert parameters across ``gcd(dp_shard_size,
  dp / ep)`` expert-data-parallel ranks). With ``train.deepspeed_config``
  (resolved and checked as train does) its ZeRO stage shards the optimizer
  (1), then the gradients (2) over the data-parallel ranks
  (expert-data-parallel ones for experts).
  Bytes per parameter (ZeRO paper, arXiv 1910.02054): the native engine keeps
  fp32 weights and gradients under bf16 autocast, so 4 + 4 + 8 (two AdamW
  moments); DeepSpeed bf16 keeps bf16 weights and gradients, 2 + 2 + 12 (fp32
  master copy and two moments).
- an activation estimate per micro-batch, with and without recompute (see
  :func:`activation_bytes`).

Active parameters count, per token, the embeddings, attention, dense and
shared MLPs, routers, norms and LM head, plus top_k routed experts per MoE
layer (expert choice: capacity_factor, default 2, experts per token on
average), as the model cards do.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from moe_train.config import Config, ConfigError, load_config, moe_for_model

GIB = 1024 ** 3


@dataclass
class ParamCounts:
    """Parameter counts of the whole (unsharded) model by how they shard."""

    total: int = 0
    tp_sharded: int = 0
    """attention projections, dense MLPs, shared experts: split over TP."""
    expert: int = 0
    """routed experts: split over EP."""
    replicated: int = 0
    """embeddings, LM head, norms, routers: whole on every rank."""
    inactive_expert: float = 0.0
    """routed-expert parameters a token does not use."""
    per_layer_expert: List[int] = field(default_factory=list)

    @property
    def active(self) -> int:
        return int(round(self.total - self.inactive_expert))


def count_params(cfg: Config) -> ParamCounts:
    """Build the model of ``cfg`` on the meta device and classify its parameters."""
    from moe_train.model.attention import Attention
    from moe_train.model.transformer import build_model
    from moe_train.moe.layer import MoELayer

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe)
    counts = ParamCounts()
    seen = set()

    def numel(module) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    e = cfg.moe
    k_eff = e.top_k if e.router == "token_choice" else (e.capacity_factor or 2.0)
    for module in model.modules():
        if isinstance(module, Attention):
            for name in ("wq", "wk", "wv", "wo"):
                counts.tp_sharded += numel(getattr(module, name))
        elif isinstance(module, MoELayer):
            n = numel(module.experts)
            counts.expert += n
            counts.per_layer_expert.append(n)
            counts.inactive_expert += n * (1 - min(k_eff, e.num_experts) / e.num_experts)
            if module.shared_experts is not None:
                counts.tp_sharded += numel(module.shared_experts)
    for block in model.blocks:
        if not block.is_moe:
            counts.tp_sharded += numel(block.ffn)
    counts.replicated = numel(model)  # whatever is left: embeddings, head, norms, routers
    counts.total = counts.tp_sharded + counts.expert + counts.replicated
    return counts


def _deepspeed(cfg: Config, world: int) -> Optional[dict]:
    # The config DeepSpeed would get ("auto" resolved from our fields).
    if not cfg.train.deepspeed_config:
        return None
    from moe_train.train.deepspeed_config import resolve_deepspeed_config

    return resolve_deepspeed_config(cfg, world)


def _enabled(ds: dict, key: str) -> bool:
    v = ds.get(key, {})
    return bool(v.get("enabled", False)) if isinstance(v, dict) else False


def rank_bytes(cfg: Config, counts: ParamCounts, world: int) -> Dict[str, int]:
    """Bytes of parameters, gradients and optimizer state on one rank."""
    p = cfg.parallel
    tp, ep = p.tensor_parallel_size, p.expert_parallel_size
    dp = world // tp
    expert_dp = dp // ep
    dense = counts.tp_sharded / tp + counts.replicated
    expert = counts.expert / ep
    ds = _deepspeed(cfg, world)
    if ds is None:
        shard = p.dp_shard_size
        expert_shard = math.gcd(shard, expert_dp)
        local = dense / shard + expert / expert_shard
        out = {"params": local * 4, "grads": local * 4, "optimizer": local * 8}
    else:
        half = _enabled(ds, "bf16") or _enabled(ds, "fp16")
        stage = int(ds.get("zero_optimization", {}).get("stage", 0) or 0)

        def part(stage_needed: int) -> float:
            if stage >= stage_needed:
                return dense / dp + expert / expert_dp
            return dense + expert

        wb = 2 if half else 4
        out = {"params": part(3) * wb, "grads": part(2) * wb,
               "optimizer": part(1) * (12 if half else 8)}
    out = {k: int(math.ceil(v)) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def activation_bytes(cfg: Config, world: int) -> Dict[str, int]:
    """Estimated bytes of the activations autograd keeps for one micro-batch
    of ``train.micro_batch_size x train.seq_len`` tokens, per rank.

    Counted per token and block, in the compute dtype (2 bytes under bf16):
    the two norms' inputs and outputs (4D); q, k, v projections, rotated q and
    k and the attention output (H.d + 2G.d + H.d + G.d + H.d, over TP; GQA
    goes through SDPA's enable_gqa, so k and v are never expanded to H
    heads); MoE: router logits and probabilities (2E
    fp32), per routed copy the dispatched input, the expert's w1, w3, silu and
    product (4F) and output (2D + 4F, K copies); the shared/dense MLP 4F (over
    TP). Plus the fp32 logits and their softmax (2V). SDPA's flash/efficient
    kernels keep no S x S matrix, which is not counted.

    ``recompute full`` keeps each block's input (D) and one block's whole set
    during its recompute; ``selective`` drops the attention core (rotated
    q/k) and the expert and shared MLP intermediates.
    """
    m, t, tp = cfg.model, cfg.train, cfg.parallel.tensor_parallel_size
    e = moe_for_model(cfg.moe, m)
    from moe_train.model.transformer import is_moe_block

    a = 2 if t.precision == "bf16" else 4
    D, V, d = m.hidden_size, m.vocab_size, m.head_dim
    H, G = m.num_heads / tp, m.kv_heads / tp
    tokens = t.micro_batch_size * t.seq_len
    k_eff = e.top_k if e.router == "token_choice" else (e.capacity_factor or 2.0)
    shared_f = (e.shared_expert_ffn_hidden_size or e.num_shared_experts * e.ffn_hidden_size) / tp

    attn_keep = 4 * D + (H * d + 2 * G * d) + H * d
    attn_core = H * d + G * d
    full, selective, block_max = 0.0, 0.0, 0.0
    for i in range(m.num_layers):
        if is_moe_block(i, cfg.moe):
            ffn_keep = 2 * e.num_experts * 4 / a + k_eff * 2 * D + (D if shared_f else 0)
            ffn_core = k_eff * 4 * e.ffn_hidden_size + 4 * shared_f
        else:
            ffn_keep, ffn_core = 0.0, 4 * m.ffn_size / tp
        block = attn_keep + attn_core + ffn_keep + ffn_core
        full += block
        selective += attn_keep + ffn_keep
        block_max = max(block_max, block)
    head = 2 * V * 4 / a
    none_b = (full + head) * tokens * a
    return {
        "none": int(none_b),
        "selective": int((selective + block_max + head) * tokens * a),
        "full": int((m.num_layers * D + block_max + head) * tokens * a),
    }


def make_plan(cfg: Config, world: int) -> dict:
    """Everything ``moe-train plan --json`` prints. A null ``model.vocab_size``
    is what training would infer from the data (found without reading it)."""
    if cfg.model.vocab_size is None:
        from moe_train.data.vocab import planned_vocab_size

        cfg = copy.deepcopy(cfg)
        cfg.model.vocab_size = planned_vocab_size(cfg)
    counts = count_params(cfg)
    per_rank = rank_bytes(cfg, counts, world)
    acts = activation_bytes(cfg, world)
    p = cfg.parallel
    return {
        "total_params": counts.total,
        "active_params": counts.active,
        "expert_params": counts.expert,
        "world": world,
        "layout": {"tensor_parallel_size": p.tensor_parallel_size,
                   "expert_parallel_size": p.expert_parallel_size,
                   "data_parallel_size": world // p.tensor_parallel_size,
                   "dp_shard_size": p.dp_shard_size,
                   "precision": cfg.train.precision,
                   "engine": "deepspeed" if cfg.train.deepspeed_config else "native"},
        "per_rank_bytes": per_rank,
        "activation_bytes_per_micro_batch": acts,
        "recompute": cfg.train.recompute,
        "per_rank_total_bytes": per_rank["total"] + acts[cfg.train.recompute],
    }


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def render(plan: dict) -> str:
    """The human-readable table."""
    lay, rb, act = plan["layout"], plan["per_rank_bytes"], plan["activation_bytes_per_micro_batch"]
    lines = [
        f"parameters: {_fmt_params(plan['total_params'])} total, "
        f"{_fmt_params(plan['active_params'])} active per token "
        f"({_fmt_params(plan['expert_params'])} in routed experts)",
        f"layout: world {plan['world']} = tp {lay['tensor_parallel_size']} x dp "
        f"{lay['data_parallel_size']}; ep {lay['expert_parallel_size']}, dp_shard_size "
        f"{lay['dp_shard_size']}, {lay['precision']}, {lay['engine']} engine",
        "per rank:",
        f"  parameters         {_fmt_bytes(rb['params'])}",
        f"  gradients          {_fmt_bytes(rb['grads'])}",
        f"  optimizer state    {_fmt_bytes(rb['optimizer'])}",
        f"  activations / micro-batch (estimate): {_fmt_bytes(act['none'])} without recompute, "
        f"{_fmt_bytes(act['selective'])} selective, {_fmt_bytes(act['full'])} full",
        f"  total with train.recompute={plan['recompute']}: {_fmt_bytes(plan['per_rank_total_bytes'])}",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from moe_train.train.export import _Parser

    p = _Parser(prog="moe-train plan",
                description="Count parameters and per-rank memory of a config without allocating it.")
    p.add_argument("--config", metavar="YAML", help="config file (default: the embedded tiny.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--world", type=int, default=1, help="number of ranks (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``moe-train plan``; returns the exit status (2 after one ``error:`` line)."""
    from moe_train.cli import fail
    from moe_train.train.export import _UsageError

    try:
        args = _parser().parse_args(argv)
        if args.world < 1:
            raise ConfigError(f"--world ({args.world}) must be >= 1")
        cfg = load_config(args.config, args.set, args.world)
        from moe_train.train.engine import check_engine_config

        check_engine_config(cfg, args.world)  # the DeepSpeed config's own checks, as train
        plan = make_plan(cfg, args.world)
    except (_UsageError, ConfigError) as exc:
        return fail(str(exc))
    print(json.dumps(plan, indent=2) if args.json else render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
