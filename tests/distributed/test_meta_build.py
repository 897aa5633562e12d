"""The meta-device build: a rank allocates only its own shards, and what it
holds is exactly the world-1 model's slice.

One spawned world of 2 ranks with expert parallelism 2 does both checks:

- a small model: each rank holds the dense parameters plus E/2 experts (the
  element count says so), with values equal, under their EP=1 names, to the
  single-process build's (initialization depends only on seed and name);
- a model whose expert weights are about 1 GB in fp32: the peak resident
  memory the build adds stays under half of that plus the dense part (the
  rank never holds, even for a moment, the experts of the other rank).
"""
import gc
import resource

import torch

from moe_train.config import ModelConfig, MoEConfig
from moe_train.parallel.build import build_parallel_model
from moe_train.parallel.expert_parallel import is_expert_param, logical_entries
from moe_train.parallel.topology import Topology

from .harness import init_topology_gloo, run_distributed

SEED = 5
SMALL = (ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     ffn_hidden_size=48, max_seq_len=16),
         MoEConfig(num_experts=4, top_k=2, num_shared_experts=1))
# Experts: 5 layers x 8 experts x 3 matrices x 1024 x 2048 x 4 bytes = 1.007 GB.
BIG = (ModelConfig(vocab_size=256, hidden_size=1024, num_layers=5, num_heads=8, ffn_hidden_size=2048,
                   max_seq_len=16),
       MoEConfig(num_experts=8, top_k=2))


def _split(model):
    expert = sum(p.numel() for n, p in model.named_parameters()
                 if is_expert_param(p) or is_expert_param(n))
    return sum(p.numel() for p in model.parameters()) - expert, expert


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _worker(rank, world):
    topo = init_topology_gloo(expert_parallel_size=2)
    small = build_parallel_model(*SMALL, topo, SEED, torch.device("cpu"))
    state = {k: v.detach().clone() for n, p in small.named_parameters()
             for k, v in logical_entries(small, n, p)}
    counts = _split(small)
    del small
    gc.collect()
    before, peak_before = _rss_bytes(), _peak_rss_bytes()
    big = build_parallel_model(*BIG, topo, SEED, torch.device("cpu"))
    peak = _peak_rss_bytes()
    dense, expert = _split(big)
    return {"state": state, "counts": counts, "before": before, "peak_before": peak_before,
            "peak": peak, "big_dense_bytes": 4 * dense, "big_local_expert_bytes": 4 * expert}


def test_each_rank_materializes_only_its_shards():
    results = run_distributed(_worker, 2, timeout=300)
    full = build_parallel_model(*SMALL, Topology(), SEED, torch.device("cpu"))
    full_state = {k: v for n, p in full.named_parameters() for k, v in logical_entries(full, n, p)}
    dense, expert = _split(full)
    E = SMALL[1].num_experts
    seen = set()
    for rank, res in enumerate(results):
        assert res["counts"] == (dense, expert // 2), rank     # dense + E/2 experts, never E
        for name, value in res["state"].items():
            assert torch.equal(value, full_state[name].detach()), (rank, name)
            seen.add(name)
    assert seen == set(full_state)                              # the two ranks cover the model
    assert sum(f".experts.{E - 1}.w1" in n for n in results[1]["state"]) == 2  # 2 MoE layers

    expert_bytes = 5 * 8 * 3 * 1024 * 2048 * 4
    for rank, res in enumerate(results):
        assert res["big_local_expert_bytes"] == expert_bytes // 2
        added = res["peak"] - res["before"]
        # The measurement means something only if the build set the peak.
        assert res["peak"] > res["peak_before"] and added >= expert_bytes // 2, res
        # Half the experts plus the dense part is exactly what the rank keeps
        # (measured: +0.05 MiB over it in most runs). About one run in seven
        # showed ~95 MiB more RSS than the tensors (cause not found: allocator
        # arenas of the gloo threads are the suspect), hence 128 MiB of slack;
        # building all experts and dropping half would add ~500 MiB more.
        assert added < expert_bytes // 2 + res["big_dense_bytes"] + 128 * 2 ** 20, \
            (rank, added / 2 ** 20, res["big_dense_bytes"] / 2 ** 20)
