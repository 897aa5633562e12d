"""The DeepSpeed engine (ZeRO 0/1/2, bf16, accumulation, clipping) around the
model that ``train(cfg)`` built and parallelized: one implementation of
:class:`moe_train.train.engine.Engine`.

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
import os
from typing import Any, Dict, Optional

import torch
from torch import nn

from moe_train.config import Config
from moe_train.parallel.collectives import group_ranks, process_group_exists
from moe_train.parallel.expert_parallel import is_expert_param, moe_layers
from moe_train.parallel.topology import init_single_process_group
from moe_train.train import InputError
from moe_train.train import checkpoint as ckpt
from moe_train.train.deepspeed_config import resolve_deepspeed_config
from moe_train.train.engine import Engine

# The file DeepSpeed writes for every checkpoint (module, scheduler, client state).
DS_MODEL_STATES = "mp_rank_00_model_states.pt"


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


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` for a model built and parallelized by moe_train.

    The optimizer is a torch AdamW (train.lr, betas, weight decay, moe_train's
    decay / no_decay groups, expert parameters moved into MoE groups of their
    own) and the schedule moe_train's warmup + cosine; batch sizes, clipping,
    bf16 and ZeRO come from :func:`resolve_deepspeed_config`. ``ds`` is
    DeepSpeed's engine; ``optimizer`` and ``scheduler`` are its wrappers.
    """

    def __init__(self, model: nn.Module, cfg: Config, topology):
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        from moe_train.train.optim import build_optimizer, build_scheduler

        self.model, self.cfg, self.topology = model, cfg, topology
        ds_config = resolve_deepspeed_config(cfg, topology.world_size)
        if not process_group_exists():
            # DeepSpeed needs a process group even for one process.
            init_single_process_group(cfg.parallel.backend)
        from moe_train.console import deepspeed_comm_op_notice

        with deepspeed_comm_op_notice(topology.is_main):
            deepspeed.init_distributed(dist_backend=cfg.parallel.backend or None,
                                       dist_init_required=False)
        group_name = create_expert_groups(topology)
        mark_expert_params(model, group_name)

        # Only what defines a group: lr and betas are set below.
        groups = [{"params": list(g["params"]), "weight_decay": g.get("weight_decay", 0.0),
                   "name": g["name"]} for g in build_optimizer(model, cfg.train).param_groups]
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
        groups = [g for g in groups if g["params"]]
        t = cfg.train
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
        scheduler = build_scheduler(optimizer, t)
        with _engine_class():
            self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    lr_scheduler=scheduler, config=ds_config,
                                                    dist_init_required=False)
        self.optimizer, self.scheduler = self.ds.optimizer, self.ds.lr_scheduler
        self.max_norm = _take_over_clipping(self.ds)

    def __call__(self, inputs: torch.Tensor, **kwargs):
        return self.ds(inputs, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by the accumulation steps itself and reduces at the
        # boundary; engine.step() must run after every micro-batch (it counts
        # them), but the boundary's is left to step(), after clip().
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.backward(loss)
        if not boundary:
            self.ds.step()

    _clipped = None  # (norm,) once clip() ran this step, until step() uses it

    def clip(self) -> Optional[torch.Tensor]:
        norm = None  # DeepSpeed clips by the true global norm inside step()
        if self.max_norm is not None:
            from moe_train.parallel import clip_grad_norm

            norm = clip_grad_norm(self.ds.module, self.max_norm, self.topology).detach()
        self._clipped = (norm,)
        return norm

    def step(self) -> torch.Tensor:
        norm = self._clipped[0] if self._clipped is not None else self.clip()
        self._clipped = None
        self.ds.step()
        if norm is None:
            value = self.ds.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if value is None else float(value))
        return norm

    def state(self) -> Dict[str, Any]:
        return {"engine": "deepspeed", "zero_stage": self.ds.zero_optimization_stage()}

    def save(self, run_dir: str, step: int, keep_last: int) -> str:
        """``ds.save_checkpoint`` writes DeepSpeed's files (each rank its ZeRO
        partition) into the temporary directory of the atomic-save protocol;
        beside them go the model in moe_train's logical layout (``model/``:
        every expert under its EP=1 name, each rank writing its own, so
        ``load_model`` and export read DeepSpeed runs too); ``finish_save``
        adds each rank's RNG state, ``trainer.pt`` and ``config.yaml``."""
        tmp = ckpt.begin_save(run_dir, step, self.topology)
        root, tmp_name = os.path.split(tmp)
        error = None  # a full disk: finish_save cleans up and raises SaveError on every rank
        try:
            self.ds.save_checkpoint(root, tag=tmp_name, client_state={"moe_train_step": step},
                                    save_latest=False)
            ckpt.write_model_optimizer(tmp, self.ds.module, None, self.topology)
        except ckpt.write_errors() as exc:
            from moe_train.train.checkpoint_space import describe

            error = describe(exc)
        return ckpt.finish_save(tmp, step, self.cfg, keep_last, self.topology, self.state(),
                                error)

    def load(self, ckpt_dir: str) -> int:
        """DeepSpeed's state (module, ZeRO optimizer partitions, scheduler)
        through ``ds.load_checkpoint``, this rank's experts from ``model/``,
        the RNG states."""
        if not os.path.isfile(os.path.join(ckpt_dir, DS_MODEL_STATES)):
            raise InputError(f"checkpoint {ckpt_dir} was not written by the DeepSpeed engine "
                             f"(no {DS_MODEL_STATES}); resume it without train.deepspeed_config")
        root, tag = os.path.split(os.path.normpath(ckpt_dir))
        path, _ = self.ds.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise InputError(f"DeepSpeed could not load checkpoint {ckpt_dir}")
        # DeepSpeed restored every rank's module from rank 0's file, which holds
        # rank 0's experts: ZeRO 1/2 then overwrite them from each rank's own
        # partition, but without ZeRO they would stay wrong. model/ has them all.
        ckpt.read_model_optimizer(ckpt_dir, self.ds.module, None, self.topology)
        state = torch.load(os.path.join(ckpt_dir, ckpt.TRAINER_FILE), weights_only=True)
        step = int(state["step"])
        rng_file = os.path.join(ckpt_dir, ckpt.RNG_DIR, f"rank_{self.topology.rank}.pt")
        if state.get("world_size") == self.topology.world_size and os.path.isfile(rng_file):
            ckpt.set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            ckpt.reseed(self.cfg.train.seed, step, self.topology.rank)
        return step


def _take_over_clipping(engine) -> Optional[float]:
    """Without ZeRO in fp32, DeepSpeed clips by the mean of the per-rank norms
    (each rank's norm covers only its own experts), which is not the norm of
    the whole gradient: there moe_train's global norm clips instead, and
    DeepSpeed's own clipping is turned off (returns the max norm then, else
    None). ZeRO 1/2 (sum of the squared partitions over the data-parallel
    world) and the bf16 optimizer (expert norms summed over the
    expert-parallel group) compute the true norm."""
    if engine.zero_optimization() or engine.bfloat16_enabled():
        return None
    max_norm = engine.gradient_clipping()
    engine._config.gradient_clipping = 0.0
    return max_norm
