"""Data parallelism with dp_shard_size 1: torch DDP against the hand-written all-reduce.

    .venv/bin/python benchmarks/ddp_overlap.py [--quick] [--world 2]

Two replicated copies of the same MoE model (same seed, EP 1, TP 1, fp32)
train side by side on ``--world`` gloo ranks (one thread each), step by
step on the same rows:

- ``allreduce``: the trainer's path (backward, then
  ``moe_train.parallel.sync_gradients``: bucketed all-reduce after the
  backward, no overlap);
- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` (its reducer
  all-reduces 25 MB buckets from autograd hooks while the backward is still
  running: communication overlapped with compute).

Both then clip by the global norm (``clip_grad_norm``) and step AdamW. The
variants alternate within each step (rotating order), timed with a barrier
before and after; a variant's time is the median over steps after warm-up,
reported as a ratio to ``allreduce``. Exactness: the largest relative
difference between the two variants' losses over all steps (the first step
is the same forward, so later steps show what the gradient reduction did).
"""
from __future__ import annotations

import argparse
import time

import common  # noqa: F401 - puts the repository on sys.path
import torch


def _cfg(quick: bool):
    from moe_train.config import load_config

    D = 64 if quick else 128
    return load_config(None, [f"model.hidden_size={D}", "model.num_layers=4", "model.num_heads=4",
                              "model.num_kv_heads=2", f"model.ffn_hidden_size={2 * D}",
                              "model.vocab_size=256", "model.max_seq_len=256",
                              "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=null",
                              "train.lr=0.001", "train.grad_clip=1.0"])


def _worker(rank, world, quick, steps, warmup):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from moe_train.parallel import clip_grad_norm, sync_gradients
    from moe_train.parallel.build import build_parallel_model
    from moe_train.train.optim import build_optimizer
    from moe_train.train.trainer import _lm_loss
    from tests.distributed.harness import init_topology_gloo

    topo = init_topology_gloo()
    cfg = _cfg(quick)
    seq, rows = (64, 2) if quick else (256, 4)
    models = {name: build_parallel_model(cfg.model, cfg.moe, topo, 0, topo.device)
              for name in ("allreduce", "ddp")}
    wrapped = {"allreduce": models["allreduce"],
               "ddp": DistributedDataParallel(models["ddp"], process_group=topo.dp_group)}
    opts = {name: build_optimizer(m, cfg.train) for name, m in models.items()}
    gen = torch.Generator().manual_seed(1000 + rank)
    losses = {n: [] for n in models}
    times = {n: [] for n in models}
    names = list(models)
    for step in range(warmup + steps):
        ids = torch.randint(0, 256, (rows, seq + 1), generator=gen)
        for k in range(len(names)):
            name = names[(step + k) % len(names)]
            model = models[name]
            dist.barrier()
            t0 = time.perf_counter()
            out = wrapped[name](ids[:, :-1])
            loss = _lm_loss(out.logits, ids[:, 1:]) + out.aux_loss
            loss.backward()
            if name == "allreduce":
                sync_gradients(model, topo)
            clip_grad_norm(model, cfg.train.grad_clip, topo)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            dist.barrier()
            if step >= warmup:
                times[name].append(time.perf_counter() - t0)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses[name].append(mean.item() / world)
    return {"losses": losses, "times": times}


def main() -> None:
    from tests.distributed.harness import run_distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 12)
    t0 = time.perf_counter()
    results = run_distributed(_worker, args.world, args.quick, steps, 2, timeout=1800)
    r0 = results[0]
    ref, ddp = r0["losses"]["allreduce"], r0["losses"]["ddp"]
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref, ddp))
    med = {n: common.median(max(r["times"][n][i] for r in results)
                            for i in range(steps)) for n in r0["times"]}
    common.print_machine()
    common.print_table(
        f"dp_shard_size 1, world {args.world} (gloo, CPU), {steps} timed steps after 2 warm-up",
        ["variant", "median step s", "ratio to allreduce", "max rel loss diff vs allreduce"],
        [[n, f"{med[n]:.4f}", f"{med[n] / med['allreduce']:.3f}",
          "0" if n == "allreduce" else f"{worst:.2e}"] for n in med])
    print("losses allreduce:", " ".join(f"{x:.6f}" for x in ref))
    print("losses ddp:      ", " ".join(f"{x:.6f}" for x in ddp))
    print(common.elapsed_note(t0))


if __name__ == "__main__":
    main()
