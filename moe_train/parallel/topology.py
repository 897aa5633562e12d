"""Process groups for data, tensor and expert parallelism, built in one place.

The layout is megatron-core's (order tp-ep-dp): world = tp x dp; the experts of
a layer are sharded over an expert-parallel group of ``ep`` ranks that share a
tensor-parallel rank, and the ranks that hold the same experts form the
expert-data-parallel group (size dp / ep). A single process gets a topology of
ones and no process groups at all.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from moe_train.config import ParallelConfig
from moe_train.parallel.device import default_backend, pick_device


@dataclass
class Topology:
    """Where this process sits. Groups are None in a single process."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    expert_dp_size: int = 1
    expert_dp_rank: int = 0
    dp_group: Any = None
    tp_group: Any = None
    ep_group: Any = None
    expert_dp_group: Any = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that prints and writes logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE from the launcher's environment (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_topology(cfg: ParallelConfig, timeout_minutes: int = 10) -> Topology:
    """Join the process group the launcher set up (torchrun, deepspeed, Ray
    all export RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) and build the groups."""
    # megatron-core's TP backward overlaps comm and compute only with this set
    # before CUDA starts; harmless on CPU.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    if world == 1 and not torch.distributed.is_initialized():
        return Topology(device=device)

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        dist.init_process_group(backend=cfg.backend or default_backend(),
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel_size,
            expert_model_parallel_size=cfg.expert_parallel_size,
            # Experts are not tensor-sharded: every TP rank of an EP group runs
            # the same expert math on the same (TP-replicated) tokens.
            expert_tensor_parallel_size=1 if cfg.tensor_parallel_size == 1 else None,
            create_gloo_process_groups=False,
        )
    return Topology(
        world_size=world,
        rank=dist.get_rank(),
        local_rank=local_rank,
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        expert_dp_size=ps.get_expert_data_parallel_world_size(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        dp_group=ps.get_data_parallel_group(),
        tp_group=ps.get_tensor_model_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        device=device,
    )


def init_single_process_group(backend: Optional[str] = None) -> None:
    """A process group of one on loopback, for libraries (DeepSpeed) that need
    a group even when ``init_topology`` made none. Sets the launcher variables
    so that DeepSpeed does not go looking for MPI."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)
    torch.distributed.init_process_group(backend=backend or default_backend(),
                                         init_method=f"tcp://127.0.0.1:{port}",
                                         rank=0, world_size=1)


def destroy_topology(topology: Optional[Topology] = None) -> None:
    """Tear down megatron-core's groups and the default process group."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()
