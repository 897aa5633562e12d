"""MoE layer forward+backward throughput: ours against dense, naive and DeepSpeed.

    .venv/bin/python benchmarks/moe_layer.py [--quick] [--threads N]

For each E in {8,16,64} and K in {1,2} (D=512, F=1024, T=8192 tokens as
B=64 x S=128), one process times, interleaved, one forward+backward of:

  dense      a SwiGLU MLP of width K*F: same active FLOPs, no routing (the limit)
  naive      transformers' pre-5.x MixtralSparseMoeBlock masked loop
  deepspeed  deepspeed.moe.layer.MoE, same experts, no capacity drop, ep_size=1
  megatron   megatron-core MoELayer (GPU only)
  ours_tc    moe_train MoELayer, token choice (default config: switch aux loss,
             expert_impl auto = loop on CPU, grouped_mm on CUDA)
  ours_gmm   ours_tc with expert_impl grouped_mm (torch._grouped_mm)
  ours_ec    moe_train MoELayer, expert choice with c=K (the same T*K rows)

All token-choice variants share one router weight, so they route the same
tokens to the same experts. B=64 makes expert choice's per-position groups
exact: each expert picks 64*K/E tokens per position, T*K rows in all.

CPU timing: by default one thread, and the figure is process CPU time, not
wall time: on a machine shared with other jobs a descheduled process gains
wall time but not CPU time, so CPU time is what holds still. tokens/s is then
per core. ``--threads N`` (N > 1) switches to wall time.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Dict

import common  # first: it may set allocator env before any tensor exists
import torch
import variants

PROTOS = ("proto_tc", "proto_chunk", "proto_gather")
CONFIGS = [(8, 1), (8, 2), (16, 1), (16, 2), (64, 1), (64, 2)]

# Profiler op names -> phase, for the breakdown of where the time goes.
PHASES = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::baddbmm",
               "aten::addmm_"),
    "gather/scatter/copy": ("aten::index_select", "aten::index_add", "aten::index_add_",
                            "aten::scatter_add_", "aten::scatter_add", "aten::index",
                            "aten::index_put_", "aten::_index_put_impl_", "aten::cat",
                            "aten::copy_", "aten::gather", "aten::scatter", "aten::scatter_",
                            "aten::masked_select", "aten::index_select_backward",
                            "aten::nonzero", "aten::where", "aten::clone", "aten::contiguous"),
    "routing": ("aten::topk", "aten::sort", "aten::argsort", "aten::bincount", "aten::one_hot",
                "aten::cumsum", "aten::_softmax", "aten::_softmax_backward_data",
                "aten::logsumexp", "aten::argmax", "aten::max", "aten::eq", "aten::lt",
                "aten::_local_scalar_dense", "aten::item"),
    "elementwise": ("aten::mul", "aten::mul_", "aten::silu", "aten::silu_backward", "aten::add",
                    "aten::add_", "aten::sum", "aten::div", "aten::div_", "aten::fill_",
                    "aten::zero_", "aten::sub", "aten::neg", "aten::pow", "aten::mean",
                    "aten::exp", "aten::sigmoid", "aten::zeros_like", "aten::ones_like",
                    "aten::rsub", "aten::gelu", "aten::gelu_backward"),
}


def phase_of(op: str) -> str:
    for phase, ops in PHASES.items():
        if op in ops:
            return phase
    return "other (dispatch overhead, views, autograd)"


def profile_phases(module, x, grad_y, iters: int = 2) -> Dict[str, float]:
    """Self CPU seconds of one forward+backward (mean of ``iters``), summed per phase."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            variants.fwd_bwd(module, x, grad_y)
    out: Dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        out[phase_of(ev.key)] += ev.self_cpu_time_total / 1e6 / iters
    return dict(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (D=256, F=512, T=2048) for development")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: CPU-time figures)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--configs", default=None, help="E:K list, e.g. 64:2,8:1")
    p.add_argument("--ffn", type=int, default=None,
                   help="expert width F (e.g. 8: the experts cost ~nothing, so the time is the "
                        "routing, dispatch and combine overhead)")
    p.add_argument("--variants", default=None, help="comma list (default: all that run here)")
    p.add_argument("--no-profile", action="store_true", help="skip the phase breakdown")
    p.add_argument("--profile-iters", type=int, default=2, help="iterations per phase profile")
    p.add_argument("--proto", action="store_true",
                   help="add proto_tc: ours_tc with prototypes 1+2 of prototypes.py (prototypes "
                        "3+4 are moe_train's own path now, so proto_chunk/proto_gather = ours_tc)")
    common.add_thp_flag(p)
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    device = common.pick_device()
    cpu_time = device.type == "cpu" and args.threads == 1
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    D, F = (256, 512) if args.quick else (512, 1024)
    F = args.ffn or F
    B, S = (64, 32) if args.quick else (64, 128)
    T = B * S
    repeats = args.repeats or (3 if args.quick else 5)
    configs = CONFIGS if args.configs is None else [tuple(int(v) for v in c.split(":"))
                                                   for c in args.configs.split(",")]
    names = ["dense", "naive", "deepspeed", "ours_tc", "ours_gmm", "ours_ec"]
    if device.type == "cuda":
        names.insert(3, "megatron")
    else:
        print("note: megatron-core's MoELayer joins only on GPU (it needs CUDA for its RNG "
              "tracker and dispatcher); skipped on CPU.")
    if args.proto:
        names += ["proto_tc"]
    if args.variants:
        names = [n for n in args.variants.split(",")]
    try:
        common.init_single_process_dist(device)
        common.quiet_deepspeed()
    except Exception as e:  # noqa: BLE001
        print(f"note: no torch.distributed ({e}); DeepSpeed skipped")
        names = [n for n in names if n != "deepspeed"]

    common.print_machine(device)
    clock = "process CPU time, 1 thread" if cpu_time else "wall time"
    print(f"MoE layer fwd+bwd: D={D} F={F} T={T} (B={B} S={S}) fp32, {device}, "
          f"median of {repeats} interleaved repeats after {args.warmup} warm-up, {clock}\n",
          flush=True)

    rows, ratio_rows, phase_rows, ms_rows = [], [], [], []
    for E, K in configs:
        torch.manual_seed(0)
        mods = {}
        for n in names:
            try:
                mods[n] = variants.build(n, D, F, E, K).to(device)
            except Exception as e:  # noqa: BLE001 - an optional peer that cannot run here
                print(f"note: {n} skipped at E={E} K={K}: {type(e).__name__}: {e}")
        variants.share_router(mods.values(), torch.randn(E, D, device=device) * 0.02)
        x = torch.randn(B, S, D, device=device, requires_grad=True)
        g = torch.randn(B, S, D, device=device)
        fns = {n: (lambda m=m: variants.fwd_bwd(m, x, g)) for n, m in mods.items()}
        times = common.time_interleaved(fns, repeats=repeats, warmup=args.warmup, device=device,
                                        clock="cpu" if cpu_time else "wall")
        med = {n: common.median(v) for n, v in times.items()}
        rows.append([E, K] + [T / med[n] if n in med else "-" for n in names]
                    + [max(common.spread(v) for v in times.values())])
        ms_rows.append([E, K] + [1e3 * med[n] if n in med else "-" for n in names])

        def paired(a, b):
            # Median over repeats of t_b / t_a, each pair from the same repeat.
            if a not in times or b not in times:
                return "-"
            return common.median([tb / ta for ta, tb in zip(times[a], times[b])])

        ratio_rows.append([E, K, paired("ours_tc", "dense"), paired("ours_tc", "naive"),
                           paired("ours_tc", "deepspeed"), paired("ours_gmm", "dense"),
                           paired("ours_gmm", "ours_tc"), paired("ours_ec", "dense"),
                           paired("ours_ec", "naive"), paired("ours_ec", "deepspeed")]
                          + ([paired("ours_tc", "megatron")] if "megatron" in names else [])
                          + [v for p_ in PROTOS if p_ in names
                             for v in (paired(p_, "ours_tc"), paired(p_, "naive"), paired(p_, "dense"))])
        if not args.no_profile and "ours_tc" in mods and "dense" in mods:
            prof_names = [n for n in ("dense", "naive", "ours_tc", "proto_tc") if n in mods]
            ph = {n: profile_phases(mods[n], x, g, args.profile_iters) for n in prof_names}
            for phase in list(PHASES) + ["other (dispatch overhead, views, autograd)"]:
                phase_rows.append([E, K, phase] + [1e3 * ph[n].get(phase, 0.0) for n in prof_names])
        del mods, fns
        print(f"  E={E} K={K}: " + ", ".join(f"{n} {T / t:,.0f} tok/s" for n, t in med.items()),
              flush=True)

    unit = "tokens/s per core (CPU time)" if cpu_time else "tokens/s"
    common.print_table(f"MoE layer forward+backward, {unit}", ["E", "K"] + names + ["max spread"], rows,
                       note="max spread: (max-min)/median over the repeats of the noisiest variant.")
    common.print_table("The same as ms per forward+backward", ["E", "K"] + names, ms_rows)
    ratio_head = ["E", "K", "tc/dense", "tc/naive", "tc/deepspeed", "gmm/dense", "gmm/tc",
                  "ec/dense", "ec/naive", "ec/deepspeed"]
    if "megatron" in names:
        ratio_head.append("tc/megatron")
    for p_ in PROTOS:
        if p_ in names:
            ratio_head += [f"{p_}/tc", f"{p_}/naive", f"{p_}/dense"]
    common.print_table("Throughput ratios (median of per-repeat ratios; > 1 means ours is faster)",
                       ratio_head, ratio_rows,
                       note="tc = ours, token choice, expert_impl auto (loop on CPU, grouped_mm on "
                            "CUDA); gmm = ours with expert_impl grouped_mm; ec = ours, expert choice "
                            "(c = K). Targets (CPU): tc/dense >= 0.95 and tc/deepspeed >= 1.2 at "
                            "E=64 K=2; tc/naive > 1 everywhere.")
    if phase_rows:
        common.print_table("Where the time goes: self CPU ms of one forward+backward (torch.profiler)",
                           ["E", "K", "phase"] + prof_names, phase_rows,
                           note=f"Mean of {args.profile_iters} profiled iterations after the timed ones "
                                "(the profiler adds a few microseconds per op).")
    print(common.elapsed_note(t_start))


if __name__ == "__main__":
    main()
