"""Expert-parallel dispatch on 2 ranks: how much of the layer is all-to-all.

    .venv/bin/python benchmarks/ep_dispatch.py [--quick]

Two processes (torch.multiprocessing spawn, gloo on CPU / nccl on GPU), each
with its own T tokens (D=512, F=1024, E=8, K=2, T=4096 per rank, one thread
per rank on CPU). Each rank times, interleaved, one forward+backward of

  ep2   the MoELayer with expert parallelism applied (E/2 experts per rank,
        AllToAllDispatcher over the 2-rank EP group)
  ep1   the same layer unsharded, on the same local tokens (no communication)

While ep2 runs, every ``torch.distributed.all_to_all_single`` call is timed
and its bytes counted (the counts exchange, the token exchange and the return
exchange of the forward, and the two reverse exchanges of the backward). In
the same run, all_to_all_single alone is timed on a buffer of the size the
layer's token exchange moves, which gives the bandwidth the layer could get.
All figures are wall time (communication waits are not CPU time); the
all-to-all time includes waiting for the slower rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import common  # first: it may set allocator env before any tensor exists
import torch


def _timed_a2a(record):
    import torch.distributed as dist
    original = dist.all_to_all_single

    def wrapper(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                async_op=False):
        t0 = time.perf_counter()
        work = original(output, input, output_split_sizes, input_split_sizes, group=group,
                        async_op=async_op)
        if async_op:
            work.wait()
        common.sync(input.device)
        dt = time.perf_counter() - t0
        if record["on"]:
            rank = dist.get_rank(group)
            world = dist.get_world_size(group)
            row_bytes = input[0].numel() * input.element_size() if input.dim() > 1 else input.element_size()
            splits = input_split_sizes or [input.shape[0] // world] * world
            sent = sum(s for r, s in enumerate(splits) if r != rank) * row_bytes
            record["calls"] += 1
            record["seconds"] += dt
            record["bytes_cross"] += sent
            record["bytes_total"] += input.numel() * input.element_size()
        return work
    dist.all_to_all_single = wrapper
    return original


def worker(rank: int, world: int, port: int, args: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = {}
    try:
        result = _run(rank, world, args)
    except BaseException as e:  # noqa: BLE001 - report to the parent
        import traceback
        result = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    try:
        from moe_train.parallel.topology import destroy_topology
        destroy_topology()
    finally:
        sys.stdout.flush()
        os._exit(0)  # autograd collectives can abort in exit handlers


def _run(rank: int, world: int, a: dict) -> dict:
    import copy
    import torch.distributed as dist

    from moe_train.config import MoEConfig, ParallelConfig
    from moe_train.moe.layer import MoELayer
    from moe_train.parallel.expert_parallel import apply_expert_parallel
    from moe_train.parallel.topology import init_topology

    torch.set_num_threads(1)
    topo = init_topology(ParallelConfig(expert_parallel_size=world), timeout_minutes=5)
    device = topo.device
    D, F, E, K, B, S = a["D"], a["F"], a["E"], a["K"], a["B"], a["S"]
    torch.manual_seed(0)
    ep1 = MoELayer(MoEConfig(num_experts=E, top_k=K), hidden_size=D, ffn_hidden_size=F,
                   activation="swiglu").to(device)
    ep2 = apply_expert_parallel(copy.deepcopy(ep1), topo)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, S, D, generator=gen).to(device).requires_grad_()
    g = torch.randn(B, S, D, generator=gen).to(device)

    def step(layer):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)
        torch.autograd.backward([out.output, out.aux_loss], [g, torch.ones_like(out.aux_loss)])

    record = {"on": False, "calls": 0, "seconds": 0.0, "bytes_cross": 0, "bytes_total": 0}
    original_a2a = _timed_a2a(record)
    t_ep2, t_ep1, a2a_s, cross, total, calls = [], [], [], [], [], []
    for r in range(a["warmup"] + a["repeats"]):
        for which in (("ep2", "ep1") if r % 2 == 0 else ("ep1", "ep2")):
            dist.barrier()
            record.update(on=(which == "ep2"), calls=0, seconds=0.0, bytes_cross=0, bytes_total=0)
            common.sync(device)
            t0 = time.perf_counter()
            step(ep2 if which == "ep2" else ep1)
            common.sync(device)
            dt = time.perf_counter() - t0
            record["on"] = False
            if r < a["warmup"]:
                continue
            if which == "ep2":
                t_ep2.append(dt)
                a2a_s.append(record["seconds"])
                cross.append(record["bytes_cross"])
                total.append(record["bytes_total"])
                calls.append(record["calls"])
            else:
                t_ep1.append(dt)

    # Bare all_to_all_single on the bytes one token exchange moves (equal splits).
    rows = int(x.shape[0] * x.shape[1] * K)
    buf_in = torch.randn(rows, D, device=device)
    buf_out = torch.empty_like(buf_in)
    bare = []
    for i in range(a["warmup"] + a["repeats"] * 2):
        dist.barrier()
        common.sync(device)
        t0 = time.perf_counter()
        original_a2a(buf_out, buf_in, group=topo.ep_group)
        common.sync(device)
        if i >= a["warmup"]:
            bare.append(time.perf_counter() - t0)
    bare_cross = buf_in.numel() * buf_in.element_size() * (world - 1) // world
    med = common.median
    return {"rank": rank, "t_ep2": med(t_ep2), "t_ep1": med(t_ep1), "a2a": med(a2a_s),
            "share": med([s / t for s, t in zip(a2a_s, t_ep2)]),
            "bytes_cross": med(cross), "bytes_total": med(total), "calls": med(calls),
            "bare_s": med(bare), "bare_bytes_cross": bare_cross,
            "ep_over_ep1": med([e2 / e1 for e2, e1 in zip(t_ep2, t_ep1)]),
            "spread": max(common.spread(t_ep2), common.spread(t_ep1))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="D=256, F=512, T=1024 per rank")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    common.add_thp_flag(p)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    world = 2
    device = common.pick_device()
    if device.type == "cuda" and torch.cuda.device_count() < world:
        print(f"note: {torch.cuda.device_count()} GPU(s) for {world} ranks: EP benchmark skipped.")
        return
    cfg = dict(D=256, F=512, B=8, S=128) if args.quick else dict(D=512, F=1024, B=32, S=128)
    cfg.update(E=args.experts, K=args.topk, warmup=args.warmup,
               repeats=args.repeats or (3 if args.quick else 7))
    common.print_machine(device)
    T = cfg["B"] * cfg["S"]
    print(f"EP dispatch, 2 ranks ({'nccl' if device.type == 'cuda' else 'gloo'}, "
          f"1 thread per rank on CPU): D={cfg['D']} F={cfg['F']} E={cfg['E']} K={cfg['K']} "
          f"T={T} per rank, fp32, wall time, median of {cfg['repeats']} interleaved repeats\n",
          flush=True)
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world, common.free_port(), cfg, out_dir), nprocs=world, join=True)
        res = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                res.append(json.load(f))
    for r in res:
        if "error" in r:
            raise RuntimeError(r["error"])
    rows = []
    for r in res:
        bw_layer = r["bytes_cross"] / r["a2a"] if r["a2a"] > 0 else 0.0
        bw_bare = r["bare_bytes_cross"] / r["bare_s"]
        rows.append([r["rank"], 1e3 * r["t_ep1"], 1e3 * r["t_ep2"], r["ep_over_ep1"], 1e3 * r["a2a"],
                     r["share"], int(r["calls"]), common.fmt_bytes(r["bytes_cross"]),
                     bw_layer / 2 ** 20, bw_bare / 2 ** 20,
                     1e3 * r["bytes_cross"] / bw_bare, r["spread"]])
    common.print_table(
        "EP=2 MoE layer forward+backward: share of all-to-all",
        ["rank", "EP=1 ms", "EP=2 ms", "EP2/EP1", "all-to-all ms", "a2a share",
         "a2a calls", "bytes to other rank", "MiB/s in layer", "MiB/s bare a2a",
         "ms at bare bw", "spread"], rows,
        note="EP=1: the unsharded layer on the same local tokens. bytes to other rank: rows "
             "that cross ranks in the 5 exchanges of one step (counts, tokens, outputs, and the "
             "two backward exchanges). MiB/s bare a2a: all_to_all_single alone, same run, on "
             "the bytes of one token exchange with even splits. ms at bare bw: the time the "
             "layer's bytes would take at that bandwidth; the rest of the all-to-all time is "
             "waiting for the other rank (routing imbalance, a shared CPU).")
    print(common.elapsed_note(t_start))


if __name__ == "__main__":
    main()
