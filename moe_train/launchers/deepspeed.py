"""DeepSpeed glue: the DeepSpeed engine (ZeRO 0/1/2, bf16, accumulation,
clipping) around the model that ``train(cfg)`` built and parallelized.

Nothing here changes the math: the model, its expert-parallel all-to-all and
the AdamW + warmup/cosine schedule are moe_train's; DeepSpeed only reduces the
gradients, partitions the optimizer state (ZeRO) and steps.

Expert parameters are partitioned and reduced over the expert-data-parallel
group, dense ones over the whole data-parallel world, as DeepSpeed's own MoE
does: each expert parameter is marked ``allreduce = False`` and
``group_name = "ep_size_<ep>"``, the optimizer gets separate MoE parameter
groups (``split_params_into_different_moe_groups_for_optimizer``), and
DeepSpeed's expert groups are created from our topology and checked to hold
exactly megatron-core's ranks.

DeepSpeed recognises MoE models by its own ``deepspeed.moe.layer.MoE`` class
only; :class:`_ExpertParallelEngineMixin` tells it that this model has MoE
layers too, which switches on the expert-group paths of gradient reduction
and of the ZeRO optimizer. DeepSpeed's MoE checkpoint code, however, only
knows where its own MoE class keeps experts, so checkpoints add the model in
moe_train's logical layout (``model/``, every expert under its EP=1 name),
from which each rank puts back its own experts after
``engine.load_checkpoint``.

Checkpoint layout (the plain trainer's names, so ``find_checkpoint``,
``load_model`` and export read DeepSpeed runs too)::

    RUN_DIR/checkpoints/step_N/   DeepSpeed's files (mp_rank_00_model_states.pt,
                                  zero_pp_rank_R_..._optim_states.pt, ...)
                                  + model/ (DCP), rng/rank_R.pt, trainer.pt, config.yaml
    RUN_DIR/checkpoints/latest    the name of the newest complete step_N

A save goes into ``.tmp-step_N`` and is renamed when every rank is done, so a
killed run leaves ``latest`` pointing at a complete checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, List, Optional

import torch

from moe_train.config import Config, ConfigError
from moe_train.parallel.collectives import group_ranks, process_group_exists
from moe_train.parallel.expert_parallel import is_expert_param, moe_layers
from moe_train.parallel.topology import init_single_process_group
from moe_train.train import InputError

AUTO = "auto"

# Sections that would replace moe_train's own optimizer and schedule.
_REJECTED_SECTIONS = {
    "optimizer": "the optimizer is moe_train's AdamW (train.lr, train.beta1, train.beta2, "
                 "train.weight_decay)",
    "scheduler": "the schedule is moe_train's warmup + cosine (train.warmup_steps, train.min_lr)",
}
SUPPORTED_ZERO_STAGES = (0, 1, 2)

# The file DeepSpeed writes for every checkpoint (module, scheduler, client state).
DS_MODEL_STATES = "mp_rank_00_model_states.pt"


# ----------------------------------------------------------------------------
# The DeepSpeed JSON config, filled from and checked against train.*


def _err(path: str, message: str) -> ConfigError:
    return ConfigError(f"train.deepspeed_config ({path}): {message}")


def load_deepspeed_json(path: str) -> Dict[str, Any]:
    """The JSON object at ``path``. Raises ConfigError naming the file."""
    if not os.path.isfile(path):
        raise ConfigError(f"train.deepspeed_config: file not found: {path}")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise _err(path, f"not valid JSON: {str(exc).splitlines()[0]}")
    if not isinstance(data, dict):
        raise _err(path, "must be a JSON object")
    return data


def _fill(ds: Dict[str, Any], key: str, ours: Any, field: str, path: str) -> None:
    """Set ``ds[key]`` from our field when absent or "auto"; otherwise it must agree."""
    value = ds.get(key, AUTO)
    if value == AUTO:
        ds[key] = ours
    elif value != ours:
        shown = json.dumps(ours)
        raise _err(path, f"{key} ({json.dumps(value)}) conflicts with {field} "
                         f"({shown}); set it to \"auto\" or to {shown}")


def resolve_deepspeed_config(cfg: Config, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` ranks.

    ``"auto"`` (or an absent key) takes moe_train's value: the batch sizes
    (train_micro_batch_size_per_gpu = train.micro_batch_size,
    gradient_accumulation_steps = global / (micro x dp), train_batch_size =
    train.global_batch_size), gradient_clipping = train.grad_clip and
    bf16.enabled = (train.precision == bf16). An explicit value that differs
    is an error, as are optimizer/scheduler sections, fp16 and ZeRO stage 3.
    Raises ConfigError (one line, naming the field) before anything starts.
    """
    path = cfg.train.deepspeed_config
    ds = load_deepspeed_json(path)
    t, p = cfg.train, cfg.parallel
    if p.tensor_parallel_size != 1:
        raise ConfigError(f"parallel.tensor_parallel_size ({p.tensor_parallel_size}) must be 1 "
                          "with train.deepspeed_config: the DeepSpeed engine runs data and expert "
                          "parallelism only")
    for section, why in _REJECTED_SECTIONS.items():
        if section in ds:
            raise _err(path, f"remove the \"{section}\" section: {why}")
    if (ds.get("fp16") or {}).get("enabled") not in (None, False):
        raise _err(path, "fp16.enabled is not supported (no loss scaling in moe_train); "
                         "use bf16 with train.precision=bf16")

    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise _err(path, "zero_optimization must be an object")
    stage = zero.setdefault("stage", 0)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise _err(path, f"zero_optimization.stage ({stage!r}) must be one of 0, 1, 2: ZeRO-3 "
                         "partitions parameters, which the expert-parallel layers do not gather")

    dp = world_size // p.tensor_parallel_size
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be divisible "
                          f"by train.micro_batch_size ({t.micro_batch_size}) x data-parallel "
                          f"size ({dp})")
    accum = t.global_batch_size // (t.micro_batch_size * dp)
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", path)
    _fill(ds, "gradient_accumulation_steps", accum,
          "train.global_batch_size / (train.micro_batch_size x data-parallel size)", path)
    _fill(ds, "train_batch_size", t.global_batch_size, "train.global_batch_size", path)
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip", path)
    bf16 = ds.setdefault("bf16", {})
    if not isinstance(bf16, dict):
        raise _err(path, "bf16 must be an object")
    enabled = bf16.get("enabled", AUTO)
    if enabled == AUTO:
        bf16["enabled"] = t.precision == "bf16"
    elif enabled is not (t.precision == "bf16"):
        raise _err(path, f"bf16.enabled ({json.dumps(enabled)}) conflicts with train.precision "
                         f"({t.precision}); set it to \"auto\" or train.precision to "
                         f"{'bf16' if enabled else 'fp32'}")
    ds.setdefault("steps_per_print", 2 ** 31 - 1)  # our metrics logger reports progress
    return ds


# ----------------------------------------------------------------------------
# Expert groups and parameter groups


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert groups of size ``ep_size``."""
    return f"ep_size_{ep_size}"


def create_expert_groups(topology) -> str:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups for
    ``topology.ep_size`` and check that this rank's groups hold the same ranks
    as megatron-core's (``topology.ep_group`` / ``topology.expert_dp_group``).
    Returns the group name. Needs ``deepspeed.comm`` initialized."""
    from deepspeed.utils import groups

    name = expert_group_name(topology.ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(topology.ep_size)
    if topology.ep_group is None:  # one process: no groups to compare
        return name
    ours = {"expert-parallel": group_ranks(topology.ep_group),
            "expert-data-parallel": group_ranks(topology.expert_dp_group),
            "data-parallel": group_ranks(topology.dp_group)}
    theirs = {"expert-parallel": list(groups._get_expert_parallel_group_ranks(name)),
              "expert-data-parallel": list(groups._get_expert_data_parallel_group_ranks(name)),
              "data-parallel": group_ranks(groups._get_data_parallel_group())}
    for kind in ours:
        if sorted(ours[kind]) != sorted(theirs[kind]):
            raise RuntimeError(f"rank {topology.rank}: DeepSpeed's {kind} group {theirs[kind]} "
                               f"differs from megatron-core's {ours[kind]}")
    return name


def mark_expert_params(model: torch.nn.Module, group_name: str) -> int:
    """Mark every routed-expert parameter as DeepSpeed's MoE does
    (``allreduce = False``, ``group_name``). Returns how many were marked."""
    count = 0
    for name, param in model.named_parameters():
        if is_expert_param(param) or is_expert_param(name):
            param.allreduce = False
            param.group_name = group_name
            count += 1
    return count


class _ExpertParallelEngineMixin:
    """Makes DeepSpeed treat moe_train's MoE layers as MoE layers. DeepSpeed
    only looks for its own ``MoE`` class; without ``has_moe_layers`` its
    gradient reduction and ZeRO optimizer ignore the expert groups (and fail
    on the MoE parameter groups, or would average different experts)."""

    def _configure_distributed_model(self, model):
        super()._configure_distributed_model(model)
        experts = [layer.cfg.num_experts for _, layer in moe_layers(self.module)]
        if experts:
            self.has_moe_layers = True
            self.num_experts = experts


@contextlib.contextmanager
def _engine_class():
    """``deepspeed.initialize`` builds ``deepspeed.DeepSpeedEngine``: for the
    duration of the call, that name is a subclass with the mixin above."""
    import deepspeed

    original = deepspeed.DeepSpeedEngine
    engine_cls = type("ExpertParallelEngine", (_ExpertParallelEngineMixin, original), {})
    deepspeed.DeepSpeedEngine = engine_cls
    try:
        yield
    finally:
        deepspeed.DeepSpeedEngine = original


def build_engine(model: torch.nn.Module, optimizer_param_groups: List[Dict[str, Any]],
                 cfg: Config, topology):
    """``deepspeed.initialize`` for a model built and parallelized by moe_train.

    ``optimizer_param_groups``: dicts with ``params``, ``weight_decay`` and a
    unique ``name`` (moe_train.train.optim's decay / no_decay groups); expert
    parameters are moved into MoE groups of their own. The optimizer is a
    torch AdamW (train.lr, betas, weight decay) and the schedule moe_train's
    warmup + cosine; batch sizes, clipping, bf16 and ZeRO come from
    :func:`resolve_deepspeed_config`. Returns the engine; its ``optimizer``
    and ``lr_scheduler`` attributes are DeepSpeed's wrappers.
    """
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from moe_train.train.optim import build_scheduler

    ds_config = resolve_deepspeed_config(cfg, topology.world_size)
    if not process_group_exists():
        # DeepSpeed needs a process group even for one process.
        init_single_process_group(cfg.parallel.backend)
    deepspeed.init_distributed(dist_backend=cfg.parallel.backend or None,
                               dist_init_required=False)
    group_name = create_expert_groups(topology)
    mark_expert_params(model, group_name)

    # Only what defines a group: lr and betas are set below, and a scheduler
    # already attached to another optimizer may have left its keys behind.
    groups = [{"params": list(g["params"]), "weight_decay": g.get("weight_decay", 0.0),
               "name": g["name"]} for g in optimizer_param_groups]
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    groups = [g for g in groups if g["params"]]
    t = cfg.train
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
    scheduler = build_scheduler(optimizer, t)
    with _engine_class():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config,
                                               dist_init_required=False)
    _take_over_clipping(engine)
    return engine


def _take_over_clipping(engine) -> None:
    """Without ZeRO in fp32, DeepSpeed clips by the mean of the per-rank norms
    (each rank's norm covers only its own experts), which is not the norm of
    the whole gradient: there moe_train's global norm clips instead, and
    DeepSpeed's own clipping is turned off. ZeRO 1/2 (sum of the squared
    partitions over the data-parallel world) and the bf16 optimizer (expert
    norms summed over the expert-parallel group) compute the true norm."""
    engine.moe_train_max_norm = None
    if not (engine.zero_optimization() or engine.bfloat16_enabled()):
        engine.moe_train_max_norm = engine.gradient_clipping()
        engine._config.gradient_clipping = 0.0


def backward_step(engine, loss: torch.Tensor, topology) -> Optional[torch.Tensor]:
    """One micro-batch: ``engine.backward(loss)`` (DeepSpeed divides by the
    accumulation steps and reduces the gradients at the boundary) and
    ``engine.step()`` (which updates only at the boundary). Returns the global
    gradient norm (before clipping) at the boundary, else None."""
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(loss)
    norm = None
    if boundary and engine.moe_train_max_norm is not None:
        from moe_train.parallel import clip_grad_norm

        norm = clip_grad_norm(engine.module, engine.moe_train_max_norm, topology).detach()
    engine.step()
    if boundary and norm is None:
        value = engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if value is None else float(value))
    return norm


# ----------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(engine, run_dir: str, step: int, cfg: Config, keep_last: int,
                    topology) -> str:
    """Write checkpoint ``step`` of this run and make it visible atomically;
    return its directory. A collective: every rank calls it.

    ``engine.save_checkpoint`` writes DeepSpeed's files (each rank its ZeRO
    partition); beside them go the model in moe_train's logical layout
    (``model/``: every expert under its EP=1 name, each rank writing its own,
    so ``load_model`` and export read DeepSpeed runs too), each rank's RNG
    state, ``trainer.pt`` and ``config.yaml``.
    """
    from moe_train.parallel import dist_checkpoint
    from moe_train.train import checkpoint as ckpt

    tmp = ckpt.begin_save(run_dir, step, topology)
    root, tmp_name = os.path.split(tmp)
    engine.save_checkpoint(root, tag=tmp_name, client_state={"moe_train_step": step},
                           save_latest=False)
    dist_checkpoint.save(tmp, engine.module, None, topology)
    return ckpt.finish_save(tmp, step, cfg, keep_last, topology,
                            {"engine": "deepspeed",
                             "zero_stage": engine.zero_optimization_stage()})


def load_checkpoint(engine, ckpt_dir: str, cfg: Config, topology) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`: DeepSpeed's
    state (module, ZeRO optimizer partitions, scheduler) through
    ``engine.load_checkpoint``, this rank's experts from ``model/``, the RNG
    states; return the step to continue from. A collective."""
    from moe_train.parallel import dist_checkpoint
    from moe_train.train import checkpoint as ckpt

    if not os.path.isfile(os.path.join(ckpt_dir, DS_MODEL_STATES)):
        raise InputError(f"checkpoint {ckpt_dir} was not written by the DeepSpeed engine "
                         f"(no {DS_MODEL_STATES}); resume it without train.deepspeed_config")
    root, tag = os.path.split(os.path.normpath(ckpt_dir))
    path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise InputError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
    # DeepSpeed restored every rank's module from rank 0's file, which holds
    # rank 0's experts: ZeRO 1/2 then overwrite them from each rank's own
    # partition, but without ZeRO they would stay wrong. model/ has them all.
    try:
        dist_checkpoint.load_model_state(os.path.join(ckpt_dir, dist_checkpoint.MODEL_DIR),
                                         engine.module, topology)
    except dist_checkpoint.CheckpointError as exc:
        raise InputError(f"checkpoint {ckpt_dir}: {exc}")
    state = torch.load(os.path.join(ckpt_dir, ckpt.TRAINER_FILE), weights_only=True)
    step = int(state["step"])
    rng_file = os.path.join(ckpt_dir, ckpt.RNG_DIR, f"rank_{topology.rank}.pt")
    if state.get("world_size") == topology.world_size and os.path.isfile(rng_file):
        ckpt.set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        ckpt.reseed(cfg.train.seed, step, topology.rank)
    return step
