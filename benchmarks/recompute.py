"""Activation recompute (train.recompute): peak memory and time of a training step.

    .venv/bin/python benchmarks/recompute.py [--quick]

A training step (forward, backward, fp32) of an MoE transformer at
seq_len 1024 with recompute none, full and selective. Memory: each mode in a
fresh process (memory.py's method: on CPU the peak RSS above the level before
the step, glibc mmap threshold 64 KiB; on GPU max_memory_allocated), with the
weight gradients already allocated so the peak is what the step adds:
saved activations plus temporaries. Time: the three modes interleaved in one
process (common.time_interleaved), median of the repeats, as a ratio to none.
"""
from __future__ import annotations

import argparse
import json
import time

import common  # first: it may set allocator env before any tensor exists
import torch
import torch.nn.functional as F

MODES = ["none", "full", "selective"]


def _setup(mode: str, quick: bool, device):
    from moe_train.config import load_config
    from moe_train.model.recompute import apply_recompute
    from moe_train.parallel.build import build_parallel_model
    from moe_train.parallel.topology import Topology

    D = 128 if quick else 256
    cfg = load_config(None, [f"model.hidden_size={D}", "model.num_layers=4", "model.num_heads=4",
                             "model.vocab_size=256", "model.max_seq_len=1024",
                             "moe.num_experts=8", "moe.top_k=2"])
    model = build_parallel_model(cfg.model, cfg.moe, Topology(device=device), 0, device)
    apply_recompute(model, mode).train()
    ids = torch.randint(0, 256, (2, 1025), generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        for p in model.parameters():  # keep the grads allocated: measure the step's own memory
            p.grad.zero_()

    return model, step


def child_memory(mode: str, quick: bool) -> dict:
    device = common.pick_device()
    torch.set_num_threads(1)
    _, step = _setup(mode, quick, device)
    step()  # warm-up: grads allocated, lazy inits done
    return {"mode": mode, "peak": common.measure_peak(step, device)}


def child_time(quick: bool, repeats: int) -> dict:
    device = common.pick_device()
    steps = {m: _setup(m, quick, device)[1] for m in MODES}
    times = common.time_interleaved(steps, repeats=repeats, warmup=1, device=device)
    return {m: common.median(t) for m, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="hidden 128 instead of 256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "time":
        print(json.dumps(child_time(args.quick, args.repeats)))
        return
    if args.child:
        print(json.dumps(child_memory(args.child, args.quick)))
        return

    t_start = time.perf_counter()
    device = common.pick_device()
    common.print_machine(device)
    extra = ["--quick"] if args.quick else []
    peaks = {m: common.run_json_subprocess([__file__, "--child", m] + extra,
                                           env_extra=common.MALLOC_ENV)["peak"] for m in MODES}
    times = common.run_json_subprocess([__file__, "--child", "time", "--repeats",
                                        str(args.repeats)] + extra)
    rows = [[m, common.fmt_bytes(peaks[m]), peaks[m] / peaks["none"], times[m],
             times[m] / times["none"]] for m in MODES]
    common.print_table(
        "Training step at seq_len 1024 (batch 2, 4 layers, 8 experts top-2, fp32)",
        ["recompute", "peak above weights+grads", "peak / none", "step s", "time / none"], rows,
        note="peak: fresh process per mode; time: modes interleaved in one process, median.")
    print(common.elapsed_note(t_start))


if __name__ == "__main__":
    main()
