"""Peak memory of one MoE layer forward+backward against the dense equivalent.

    .venv/bin/python benchmarks/memory.py [--quick]

Method. Each (variant, E, K) runs in a fresh process (so that no variant
inherits another's heap), which builds the layer and its input, runs one
warm-up forward+backward, then measures two peaks:

  activations  grads already allocated (zeroed in place, as with
               zero_grad(set_to_none=False)): the peak above that level is
               what the forward saves for the backward plus the temporaries
               of both passes. The implementation decides this one.
  step         grads set to None first (zero_grad's default): the peak also
               holds the new weight gradients, E/K times larger for an MoE
               than for its dense equivalent whatever the implementation.

On CPU a peak is VmHWM (peak RSS, reset through /proc/self/clear_refs just
before) minus VmRSS before, with glibc told to mmap every block over 64 KiB
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave RSS at once. Each child
first measures a tensor of known size and reports the error of the method.
On GPU it is torch.cuda.max_memory_allocated minus memory_allocated before.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import common  # first: it may set allocator env before any tensor exists
import torch

VARIANTS = ["dense", "naive", "deepspeed", "ours_tc", "ours_ec"]
CONFIGS = [(8, 2), (16, 2), (64, 1), (64, 2)]


def child(name: str, E: int, K: int, D: int, F: int, B: int, S: int) -> dict:
    import variants
    device = common.pick_device()
    torch.set_num_threads(1)
    if name == "deepspeed":
        common.init_single_process_dist(device)
        common.quiet_deepspeed()
    # Calibration: a tensor of known size, filled so that its pages are touched.
    known = 64 * 2 ** 20
    calib = common.measure_peak(lambda: torch.empty(known // 4, device=device).fill_(1.0), device)

    torch.manual_seed(0)
    module = variants.build(name, D, F, E, K).to(device)
    variants.share_router([module], torch.randn(E, D, device=device) * 0.02)
    x = torch.randn(B, S, D, device=device, requires_grad=True)
    g = torch.randn(B, S, D, device=device)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())

    variants.fwd_bwd(module, x, g)       # warm-up: lazy inits, code pages
    module.zero_grad(set_to_none=True)
    x.grad = None
    gc.collect()
    step_peak = common.measure_peak(lambda: variants.fwd_bwd(module, x, g), device)

    def keep_grads():
        for p in module.parameters():
            if p.grad is not None:
                p.grad.zero_()
        if x.grad is not None:
            x.grad.zero_()
        y, aux = module(x)
        outs, grads = [y], [g]
        if aux is not None and aux.requires_grad:
            outs.append(aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.backward(outs, grads)

    keep_grads()                           # every grad exists from here on
    gc.collect()
    act_peak = common.measure_peak(keep_grads, device)
    return {"variant": name, "E": E, "K": K, "param_bytes": param_bytes,
            "step_peak": step_peak, "act_peak": act_peak,
            "calib_error": (calib - known) / known}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="D=256, F=512, T=2048, fewer configs")
    p.add_argument("--configs", default=None, help="E:K list, e.g. 64:2,8:1")
    p.add_argument("--variants", default=None)
    p.add_argument("--proto", action="store_true", help="add proto_gather (prototypes 3+4 of prototypes.py)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    common.add_thp_flag(p)
    args = p.parse_args(argv)

    D, F = (256, 512) if args.quick else (512, 1024)
    B, S = (64, 32) if args.quick else (64, 128)
    if args.child:
        name, E, K = args.child.split(":")
        print(json.dumps(child(name, int(E), int(K), D, F, B, S)))
        return

    t_start = time.perf_counter()
    device = common.pick_device()
    configs = ([(8, 2), (64, 2)] if args.quick else CONFIGS) if args.configs is None else \
        [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    names = args.variants.split(",") if args.variants else VARIANTS + (["proto_gather"] if args.proto else [])
    common.print_machine(device)
    method = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
              "peak RSS (VmHWM) of a fresh process per variant, glibc mmap threshold 64 KiB")
    print(f"Peak memory of one MoE layer forward+backward, D={D} F={F} T={B * S}, fp32; "
          f"method: {method}\n", flush=True)
    rows, ratio_rows, calib = [], [], []
    for E, K in configs:
        res = {}
        for n in names:
            extra = ["--quick"] if args.quick else []
            try:
                res[n] = common.run_json_subprocess(
                    [__file__, "--child", f"{n}:{E}:{K}"] + extra, env_extra=common.MALLOC_ENV)
            except Exception as e:  # noqa: BLE001
                print(f"note: {n} at E={E} K={K} failed: {str(e)[-500:]}")
                continue
            calib.append(res[n]["calib_error"])
            r = res[n]
            rows.append([E, K, n, common.fmt_bytes(r["param_bytes"]), common.fmt_bytes(r["act_peak"]),
                         common.fmt_bytes(r["step_peak"])])
            print(f"  E={E} K={K} {n}: activations {common.fmt_bytes(r['act_peak'])}, "
                  f"step {common.fmt_bytes(r['step_peak'])}", flush=True)
        if "dense" in res:
            dn = res["dense"]
            for n in names:
                if n != "dense" and n in res:
                    ratio_rows.append([E, K, n, res[n]["act_peak"] / dn["act_peak"],
                                       res[n]["step_peak"] / dn["step_peak"]])
    common.print_table("Peak memory above the level before forward+backward",
                       ["E", "K", "variant", "parameters", "activations peak", "step peak (incl. new grads)"],
                       rows)
    common.print_table("Peak memory / dense (target for ours: activations <= 1.3)",
                       ["E", "K", "variant", "activations / dense", "step / dense"], ratio_rows,
                       note="dense = one SwiGLU MLP of width K*F (same active FLOPs). "
                            "Method check: a 64 MiB tensor measured with an error of "
                            + (f"{min(calib):+.1%} .. {max(calib):+.1%}" if calib else "n/a") + ".")
    print(common.elapsed_note(t_start))


if __name__ == "__main__":
    main()
