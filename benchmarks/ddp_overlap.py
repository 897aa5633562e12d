"""Data parallelism with dp_shard_size 1: the trainer's DDP path against the hand-written all-reduce.

    .venv/bin/python benchmarks/ddp_overlap.py [--quick] [--world 2]

Two replicated copies of the same MoE model (same seed, TP 1, fp32) train
side by side on ``--world`` gloo ranks (one thread each), step by step on
the same rows, each through the trainer's own ``NativeEngine`` (forward,
backward of 2 accumulated micro-batches, ``clip``, ``step``):

- ``allreduce``: ``NativeEngine(..., replicate_with="allreduce")``, the old
  path: backward, then ``moe_train.parallel.sync_gradients`` (bucketed
  all-reduce after the backward, no overlap);
- ``ddp``: the trainer's path now (``moe_train.parallel.ddp``): torch
  ``DistributedDataParallel`` all-reduces 25 MB buckets of dense gradients
  from autograd hooks while the last micro-batch's backward is still
  running (``no_sync`` on the first); under EP the expert gradients are
  reduced by hand after the backward.

Both layouts run in the same world: EP 1 (DDP reduces every gradient) and
EP = world (DDP the dense ones, experts by hand). The variants alternate
within each step (rotating order), timed with a barrier before and after; a
variant's time is the median over steps after warm-up of the slowest rank's
time, reported as a ratio to ``allreduce``. Exactness: the largest relative
difference between the two variants' losses over all steps, and the largest
absolute difference of any weight after the last step.
"""
from __future__ import annotations

import argparse
import time

import common  # noqa: F401 - puts the repository on sys.path
import torch

ACCUM = 2


def _cfg(quick: bool):
    from moe_train.config import load_config

    D = 64 if quick else 128
    seq, micro = (64, 1) if quick else (256, 2)
    return load_config(None, [f"model.hidden_size={D}", "model.num_layers=4", "model.num_heads=4",
                              "model.num_kv_heads=2", f"model.ffn_hidden_size={2 * D}",
                              "model.vocab_size=256", "model.max_seq_len=256",
                              "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=null",
                              f"train.seq_len={seq}", f"train.micro_batch_size={micro}",
                              "train.global_batch_size=8", "train.lr=0.001",
                              "train.warmup_steps=1", "train.grad_clip=1.0"])


def _engine(cfg, topo, path):
    from moe_train.parallel.build import build_parallel_model
    from moe_train.train.engine_native import NativeEngine

    model = build_parallel_model(cfg.model, cfg.moe, topo, 0, topo.device)
    return NativeEngine(model, cfg, topo, ACCUM, replicate_with=path)


def _layout(rank, world, cfg, ep, steps, warmup):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from moe_train.train.trainer_step import _lm_loss
    from tests.distributed.harness import init_topology_gloo

    topo = init_topology_gloo(expert_parallel_size=ep)
    names = ["allreduce", "ddp"]
    engines = {name: _engine(cfg, topo, name) for name in names}
    gen = torch.Generator().manual_seed(1000 + rank)
    losses = {n: [] for n in names}
    times = {n: [] for n in names}
    t = cfg.train
    for step in range(warmup + steps):
        ids = torch.randint(0, 256, (ACCUM * t.micro_batch_size, t.seq_len + 1), generator=gen)
        for k in range(len(names)):
            name = names[(step + k) % len(names)]
            engine = engines[name]
            dist.barrier()
            t0 = time.perf_counter()
            total = torch.zeros(())
            for micro in ids.split(t.micro_batch_size):
                out = engine(micro[:, :-1])
                loss = _lm_loss(out.logits, micro[:, 1:]) + out.aux_loss
                engine.backward(loss)
                total += loss.detach() / ACCUM
            engine.clip()
            engine.step()
            dist.barrier()
            if step >= warmup:
                times[name].append(time.perf_counter() - t0)
            dist.all_reduce(total)
            losses[name].append(total.item() / world)
    weights = max(float((a.detach() - b.detach()).abs().max()) for a, b in
                  zip(engines["allreduce"].model.parameters(), engines["ddp"].model.parameters()))
    weight_diff = torch.tensor(weights)
    dist.all_reduce(weight_diff, op=dist.ReduceOp.MAX)
    ps.destroy_model_parallel()
    return {"losses": losses, "times": times, "weight_diff": float(weight_diff)}


def _worker(rank, world, quick, steps, warmup):
    cfg = _cfg(quick)
    return {ep: _layout(rank, world, cfg, ep, steps, warmup) for ep in (1, world)}


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
    common.print_machine()
    rows = []
    for ep in results[0]:
        r0 = results[0][ep]
        ref, ddp = r0["losses"]["allreduce"], r0["losses"]["ddp"]
        worst = max(abs(a - b) / abs(a) for a, b in zip(ref, ddp))
        med = {n: common.median(max(r[ep]["times"][n][i] for r in results)
                                for i in range(steps)) for n in r0["times"]}
        rows.append([f"EP {ep}" + (" (experts by hand)" if ep > 1 else ""),
                     f"{med['allreduce']:.4f}", f"{med['ddp']:.4f}",
                     f"{med['ddp'] / med['allreduce']:.3f}", f"{worst:.2e}",
                     f"{r0['weight_diff']:.2e}"])
        print(f"EP {ep} losses allreduce:", " ".join(f"{x:.6f}" for x in ref))
        print(f"EP {ep} losses ddp:      ", " ".join(f"{x:.6f}" for x in ddp))
    size = "hidden 64, 2x1 rows of 64" if args.quick else "hidden 128, 2x2 rows of 256"
    common.print_table(
        f"dp_shard_size 1, world {args.world} (gloo, CPU), {size} per rank, "
        f"{steps} timed steps after 2 warm-up",
        ["layout", "allreduce step s", "ddp step s", "ddp / allreduce",
         "max rel loss diff", "max abs weight diff"], rows)
    print(common.elapsed_note(t0))


if __name__ == "__main__":
    main()
