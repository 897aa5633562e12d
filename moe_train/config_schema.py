"""The configuration schema: one dataclass per component (``ModelConfig``,
``MoEConfig``, ...) and :class:`Config` holding them, the allowed values of the
fields that take a choice, and :class:`ConfigError`.

Every component receives its own sub-config, never the whole :class:`Config`.
Cross-field rules live in :meth:`Config.validate`
(:mod:`moe_train.config_validate`); loading a Config from YAML and ``--set``
overrides lives in :mod:`moe_train.config`, which re-exports every name here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class ConfigError(ValueError):
    """A bad configuration value. The message names the field path."""


# ----------------------------------------------------------------------------
# Sub-configs


@dataclass
class RopeScalingConfig:
    """Context-length scaling of RoPE (transformers' ``rope_scaling`` names)."""

    type: str = "linear"
    """linear (position interpolation) | ntk (NTK-aware) | dynamic (dynamic NTK) | yarn."""
    factor: float = 1.0
    """Scale s = L'/L: the new context length over the trained one."""
    original_max_position_embeddings: Optional[int] = None
    """Trained context length L; needed by dynamic and yarn (defaults to model.max_seq_len)."""
    beta_fast: float = 32.0
    """YaRN: rotations above which a dimension is not interpolated."""
    beta_slow: float = 1.0
    """YaRN: rotations below which a dimension is fully interpolated."""
    attention_factor: Optional[float] = None
    """YaRN: cos/sin magnitude; None means 0.1*ln(s)+1 as in the paper."""


@dataclass
class RopeConfig:
    """Rotary position embedding (RoFormer, arXiv 2104.09864)."""

    base: float = 10000.0
    """theta base."""
    layout: str = "half"
    """half (GPT-NeoX/LLaMA rotate_half) | interleaved (RoFormer/GPT-J/ChatGLM pairs)."""
    rotary_fraction: float = 1.0
    """Fraction of each head's dims that rotate (ChatGLM: 0.5); the rest pass through."""
    scaling: Optional[RopeScalingConfig] = None
    """Optional context-length scaling; null means none."""


@dataclass
class ModelConfig:
    """A decoder-only transformer."""

    vocab_size: Optional[int] = None
    """Vocabulary size; null means the dataset's, rounded up to a multiple of 128 (byte: 257 -> 384)."""
    hidden_size: int = 128
    """Model width D."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads H."""
    num_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; null means num_heads."""
    ffn_hidden_size: Optional[int] = None
    """Dense MLP hidden size F; null means 4*hidden (gelu) or 8/3*hidden rounded to 8 (swiglu)."""
    kv_channels: Optional[int] = None
    """Head dimension d (Megatron's kv_channels, transformers' head_dim); null means
    hidden_size / num_heads. Qwen3 sets it apart from the width (128 at hidden 2048, 32 heads)."""
    qk_norm: Optional[str] = None
    """RMSNorm of queries and keys before RoPE: null (none) | head (one weight of size d
    shared by the heads: Qwen3) | projection (over the whole q and k projections: OLMoE)."""
    norm: str = "rmsnorm"
    """rmsnorm | layernorm."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    activation: str = "swiglu"
    """swiglu | gelu, for the dense MLP and the experts."""
    position_embedding: str = "rope"
    """rope | alibi."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """RoPE settings, used when position_embedding is rope."""
    max_seq_len: int = 256
    """Longest sequence the model is trained on."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head."""
    init_std: float = 0.02
    """Std of the normal init (Megatron); output projections get init_std/sqrt(2*num_layers)."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return int(math.ceil(8 * self.hidden_size / 3 / 8) * 8)
        return 4 * self.hidden_size


# The weight each balancing loss's paper uses (moe.aux_loss_coef: null).
AUX_LOSS_COEF_DEFAULTS = {"switch": 1e-2, "shazeer": 1e-1, "sequence": 1e-2, "none": 0.0}


@dataclass
class MoEConfig:
    """A Mixture-of-Experts layer. ``hidden_size``, ``ffn_hidden_size`` and
    ``activation`` may be left null: the model fills them from ModelConfig."""

    num_experts: int = 8
    """Experts E in each MoE layer. 0 turns MoE off (every block dense)."""
    top_k: int = 2
    """Experts per token K (token choice)."""
    router: str = "token_choice"
    """token_choice | expert_choice."""
    score_order: str = "softmax_then_topk"
    """softmax_then_topk (Switch, GShard, DeepSeek) | topk_then_softmax (Mixtral)."""
    normalize_topk: bool = True
    """Renormalise the K chosen gates to sum to 1 (softmax_then_topk with
    top_k > 1; at top_k 1 Switch keeps the raw probability as the gate)."""
    capacity_factor: Optional[float] = None
    """Token choice: slots per expert = ceil(c*T*K/E), null means dropless.
    Expert choice: c, the experts per token (k = B*c/E per position group,
    spread over positions), null means the paper's c = 2; at most num_experts."""
    min_capacity: int = 0
    """Token choice: lower bound on the slots per expert when capacity applies."""
    capacity_priority: str = "position"
    """Token choice, who keeps a slot: position (causal-safe: all choices of
    position t before any of t+1) | gshard (all first choices of the group
    first: leaks the future in a causal LM)."""
    expert_choice_group: str = "position"
    """Expert choice routing group: position (causal-safe: one position across
    the batch) | batch (the paper's: all tokens of the batch; leaks the future)."""
    layer_freq: int = 1
    """Every layer_freq-th block is MoE (1: all blocks)."""
    first_k_dense: int = 0
    """The first k blocks are dense whatever layer_freq says (DeepSeekMoE's
    first_k_dense_replace: 1)."""
    num_shared_experts: int = 0
    """Always-on experts added to every token (DeepSeek)."""
    shared_expert_ffn_hidden_size: Optional[int] = None
    """Hidden size of the shared-expert MLP as a whole; null means
    num_shared_experts * the routed experts' ffn size (DeepSeekMoE: 2 x 1408)."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(x . w_gate), one scalar per token (Qwen2-MoE)."""
    noisy_gating: bool = False
    """Shazeer 2017 noisy top-k gating (training only)."""
    jitter_eps: float = 0.0
    """Switch input jitter: multiply router input by U(1-eps, 1+eps) in training."""
    aux_loss: str = "switch"
    """switch | shazeer | sequence (DeepSeek-V3 per-sequence) | none: the load-balancing loss."""
    aux_loss_coef: Optional[float] = None
    """Weight of the load-balancing loss; null means the paper's for moe.aux_loss:
    switch 1e-2 (Switch alpha), shazeer 0.1 (Shazeer w_importance = w_load for
    LMs), sequence 1e-2 (DeepSeek-V3's 1e-4 leans on the bias)."""
    z_loss_coef: float = 0.0
    """ST-MoE router z-loss weight (beta; 1e-3 in the paper); 0 turns it off."""
    expert_bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3 gamma; 1e-3 in the paper): per-step
    update of a per-expert selection bias; 0 turns it off. Token choice only."""
    expert_impl: str = "auto"
    """auto (grouped_mm on CUDA in bf16, loop elsewhere) | grouped_mm (torch._grouped_mm,
    no host sync) | loop (per-expert matmuls, one autograd Function) |
    reference (slow masked loop, the oracle)."""
    hidden_size: Optional[int] = None
    """Model width D; null means model.hidden_size."""
    ffn_hidden_size: Optional[int] = None
    """Hidden size of each expert; null means model's dense ffn size."""
    activation: Optional[str] = None
    """swiglu | gelu; null means model.activation."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @property
    def aux_loss_weight(self) -> float:
        """``aux_loss_coef``, or the paper's weight for ``aux_loss`` when null."""
        if self.aux_loss_coef is not None:
            return self.aux_loss_coef
        return AUX_LOSS_COEF_DEFAULTS.get(self.aux_loss, 0.0)


@dataclass
class ParallelConfig:
    """How ranks are arranged. Data parallelism is derived: dp = world / tp."""

    expert_parallel_size: int = 1
    """EP: ranks that share one layer's experts; num_experts must divide by it."""
    tensor_parallel_size: int = 1
    """TP: ranks that split attention and dense MLP matrices (megatron-core)."""
    backend: Optional[str] = None
    """torch.distributed backend; null picks nccl with CUDA, gloo otherwise."""
    dp_shard_size: int = 1
    """Ranks of the data-parallel group that shard parameters, gradients and
    optimizer state (FSDP2): 1 replicates, the data-parallel size shards fully
    (ZeRO-3 class), a divisor in between is HSDP. Must divide the dp size."""


@dataclass
class BlendPart:
    """One dataset of a blend (data.blend)."""

    path: str = ""
    """A data.dataset value: built-in corpus, prepare-data directory or Megatron prefix."""
    weight: float = 1.0
    """Share of the training samples, relative to the other parts' weights (> 0)."""
    name: Optional[str] = None
    """Name in loss/val/<name>; null means the last component of path."""


@dataclass
class DataConfig:
    """Where tokens come from."""

    dataset: str = "shakespeare"
    """shakespeare (bundled, offline) | stdlib (Python's own source) | a directory from prepare-data."""
    tokenizer: str = "byte"
    """byte (no download) | path to a local Hugging Face tokenizer.json."""
    val_fraction: float = 0.05
    """Share of the corpus held out for validation."""
    cache_dir: Optional[str] = None
    """Where prepared token files of the built-in corpora are cached; null means ~/.cache/moe_train."""
    blend: Optional[List[BlendPart]] = None
    """Weighted mix of datasets (list of {path, weight, name}); set, it replaces data.dataset."""
    document_mask: bool = False
    """Attend within a document only (Megatron's --reset-attention-mask); needs end-of-document ids."""


@dataclass
class TrainConfig:
    """The training loop (Megatron's meaning for the batch sizes)."""

    max_steps: int = 200
    """Optimizer steps."""
    seed: int = 1234
    """Seed of init and data order."""
    precision: str = "fp32"
    """fp32 | bf16 (autocast; router and RoPE stay fp32)."""
    run_dir: Optional[str] = None
    """Run directory (config.yaml, tb/, metrics.jsonl, checkpoints/); null means runs/<time>."""
    global_batch_size: int = 8
    """Sequences per optimizer step, across all data-parallel ranks."""
    micro_batch_size: int = 8
    """Sequences per rank per forward; accumulation = global / (micro * dp)."""
    seq_len: int = 128
    """Tokens per training sequence."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW decay (not applied to norms, biases and embeddings... see docs)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 turns it off."""
    log_every: int = 10
    """Steps between metric logs."""
    eval_every: int = 100
    """Steps between validation; 0 turns it off."""
    eval_iters: int = 4
    """Validation batches per evaluation."""
    save_every: int = 100
    """Steps between checkpoints (one is always written at the end); 0 means only at the end."""
    keep_last: int = 3
    """Checkpoints kept."""
    max_skipped_steps: int = 5
    """Consecutive steps with a non-finite loss or gradient norm (each skipped,
    no update) after which the run stops with exit status 3."""
    heatmap_every: int = 50
    """Steps between the layers x experts load heatmap image."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device, for perf/mfu; null: known CUDA GPUs' data
    sheet value, and no MFU elsewhere (CPU)."""
    deepspeed_config: Optional[str] = None
    """Path of a DeepSpeed JSON config; set means the DeepSpeed engine trains."""
    init_from: Optional[str] = None
    """Start from the weights of this checkpoint (e.g. a `moe-train import` output) with a
    fresh optimizer at step 0; ignored when resuming."""
    recompute: str = "none"
    """Activation recompute: none | full (each transformer block) | selective
    (attention core and expert MLPs; routing runs once)."""


@dataclass
class Config:
    """The whole run. Each component receives only its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Cross-field checks. Raises ConfigError naming the field path."""
        from moe_train.config_validate import validate  # it imports this module

        validate(self, world_size)
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# Allowed values and cross-field validation

CHOICES = {
    "model.norm": ("rmsnorm", "layernorm"),
    "model.activation": ("swiglu", "gelu"),
    "model.qk_norm": ("head", "projection", None),
    "model.position_embedding": ("rope", "alibi"),
    "model.rope.layout": ("half", "interleaved"),
    "model.rope.scaling.type": ("linear", "ntk", "dynamic", "yarn"),
    "moe.router": ("token_choice", "expert_choice"),
    "moe.score_order": ("softmax_then_topk", "topk_then_softmax"),
    "moe.capacity_priority": ("position", "gshard"),
    "moe.expert_choice_group": ("position", "batch"),
    "moe.aux_loss": ("switch", "shazeer", "sequence", "none"),
    "moe.activation": ("swiglu", "gelu", None),
    "moe.expert_impl": ("auto", "grouped_mm", "loop", "reference"),
    "parallel.backend": ("nccl", "gloo", None),
    "train.precision": ("fp32", "bf16"),
    "train.recompute": ("none", "full", "selective"),
}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_choice(path: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` is one of CHOICES[path]. Modules
    built straight from a sub-config (no validate()) call it too, so the
    allowed values are written down once."""
    allowed = CHOICES[path]
    _check(value in allowed, f"{path} ({value!r}) must be one of: "
           + ", ".join("null" if a is None else a for a in allowed))


def moe_for_model(moe: MoEConfig, model: ModelConfig) -> MoEConfig:
    """Fill the MoE layer's sizes that were left null from the model."""
    return dataclasses.replace(
        moe,
        hidden_size=moe.hidden_size or model.hidden_size,
        ffn_hidden_size=moe.ffn_hidden_size or model.ffn_size,
        activation=moe.activation or model.activation,
    )
