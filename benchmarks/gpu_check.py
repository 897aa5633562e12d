"""The GPU check in one command: ``make gpu-check`` (this script).

On a CUDA machine, in a few minutes on one GPU, it

1. runs the unit tests marked ``gpu`` (the grouped_mm experts against the
   reference in bf16, the layer under ``torch.cuda.set_sync_debug_mode("error")``);
2. trains 20 bf16 steps of the ~1B MoE config (``configs/models/gpu-1b.yaml``,
   or the same sizes inline if that file is absent) on random tokens and
   prints tokens/s, model TFLOP/s and MFU against the GPU's peak
   (moe_train/train/flops.py: PaLM model FLOPs, vendor peak table);
3. times one MoE layer (``moe.expert_impl = auto``: grouped_mm on CUDA)
   forward+backward against a dense SwiGLU of the same active FLOPs (width
   K*F), bf16 autocast, at E=8/K=2 and E=64/K=8.

Without CUDA it says so in one line and exits 0. ``--cpu-smoke`` runs steps
2 and 3 at toy sizes on the CPU instead (the code path, not the figures; a
unit test runs it). ``--out FILE`` also writes the figures as JSON.

    .venv/bin/python benchmarks/gpu_check.py [--steps 20] [--skip-tests] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import common  # noqa: F401  (repo root on sys.path)
import torch
import torch.nn.functional as F

from moe_train.config import MoEConfig, config_from_dict
from moe_train.model.mlp import MLP
from moe_train.moe.layer import MoELayer

GPU_1B = os.path.join(common.REPO_ROOT, "configs", "models", "gpu-1b.yaml")
# The sizes of configs/models/gpu-1b.yaml, for a checkout without that file.
INLINE_1B = {
    "model": {"vocab_size": 256, "hidden_size": 1024, "num_layers": 12, "num_heads": 16,
              "num_kv_heads": 4, "activation": "swiglu", "position_embedding": "rope",
              "max_seq_len": 2048, "tie_embeddings": False},
    "moe": {"num_experts": 16, "top_k": 2, "ffn_hidden_size": 1536, "capacity_factor": None,
            "aux_loss": "switch", "z_loss_coef": 0.001},
    "train": {"precision": "bf16", "seq_len": 2048, "micro_batch_size": 8,
              "global_batch_size": 8},
}
SMOKE = {
    "model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
              "num_kv_heads": 2, "max_seq_len": 32},
    "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 32},
    "train": {"precision": "bf16", "seq_len": 32, "micro_batch_size": 2, "global_batch_size": 2},
}
# (E, K, D, F, tokens): D and K*F as OLMoE-1B-7B (d=2048, 64 experts of 1024, top 8).
LAYER_CASES = [(8, 2, 2048, 4096, 16384), (64, 8, 2048, 1024, 16384)]
SMOKE_LAYER_CASES = [(8, 2, 32, 32, 64), (64, 8, 32, 16, 64)]


def load_1b_config(smoke: bool):
    """The ~1B config (the YAML file when present), or the toy one."""
    if smoke:
        return config_from_dict(SMOKE), "inline toy config (--cpu-smoke)"
    if os.path.isfile(GPU_1B):
        import yaml

        with open(GPU_1B) as fh:
            data = yaml.safe_load(fh)
        data.setdefault("train", {})["global_batch_size"] = data["train"].get("micro_batch_size", 8)
        return config_from_dict(data), os.path.relpath(GPU_1B, common.REPO_ROOT)
    return config_from_dict(INLINE_1B), "inline copy of configs/models/gpu-1b.yaml"


def sync(device: torch.device) -> None:
    common.sync(device)


def train_steps(cfg, device: torch.device, steps: int) -> Dict[str, float]:
    """``steps`` bf16 training steps on random tokens; times the second half
    (after warm-up) and returns tokens/s, TFLOP/s and MFU."""
    from moe_train.model.transformer import build_model
    from moe_train.train.flops import model_flops_per_token, peak_tflops

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe).to(device)
    params = sum(p.numel() for p in model.parameters())
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    B, S, V = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, V, (B, S + 1), generator=g).to(device) for _ in range(2)]
    warm = max(1, steps // 4)
    losses: List[float] = []
    t0 = None
    for step in range(steps):
        if step == warm:
            sync(device)
            t0 = time.perf_counter()
        ids = batches[step % 2]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = model(ids[:, :-1])
            loss = F.cross_entropy(out.logits.float().reshape(-1, V), ids[:, 1:].reshape(-1))
            loss = loss + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync(device)
    elapsed = time.perf_counter() - t0
    tokens = (steps - warm) * B * S
    tok_s = tokens / elapsed
    flops = model_flops_per_token(cfg)
    tflops = tok_s * flops / 1e12
    peak = peak_tflops(device, "bf16", cfg.train.peak_tflops)
    finite = all(torch.isfinite(x).item() for x in losses)
    return {"params": params, "tokens_per_s": tok_s, "tflops": tflops,
            "mfu": (tflops / peak) if peak else float("nan"), "peak_tflops": peak or float("nan"),
            "first_loss": losses[0].item(), "last_loss": losses[-1].item(),
            "finite": finite, "step_s": elapsed / (steps - warm)}


def _fwd_bwd(module, x, grad):
    module.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        out = module(x)
    y = out.output if hasattr(out, "output") else out
    aux = getattr(out, "aux_loss", None)
    if aux is not None and aux.requires_grad:
        torch.autograd.backward([y, aux], [grad.to(y.dtype), torch.ones_like(aux)])
    else:
        y.backward(grad.to(y.dtype))


def layer_vs_dense(device: torch.device, cases, repeats: int,
                   warmup: int = 2) -> List[Dict[str, float]]:
    """MoE layer (expert_impl auto) and dense SwiGLU of width K*F, bf16
    autocast, forward+backward, interleaved; throughput ratio moe/dense."""
    rows = []
    for E, K, D, Fh, T in cases:
        torch.manual_seed(0)
        moe = MoELayer(MoEConfig(num_experts=E, top_k=K, hidden_size=D, ffn_hidden_size=Fh,
                                 activation="swiglu"), init_std=0.02).to(device)
        dense = MLP(D, K * Fh, "swiglu").to(device)
        S = min(T, 2048)
        x = torch.randn(T // S, S, D, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        times = common.time_interleaved(
            {"moe": lambda: _fwd_bwd(moe, x, grad), "dense": lambda: _fwd_bwd(dense, x, grad)},
            repeats=repeats, warmup=warmup, device=device, clock="wall")
        ratio = common.median([td / tm for tm, td in zip(times["moe"], times["dense"])])
        active = 3 * 2 * 3 * D * K * Fh * x.shape[0] * x.shape[1]   # fwd+bwd, 3 matmuls
        rows.append({"E": E, "K": K, "D": D, "F": Fh, "tokens": x.shape[0] * x.shape[1],
                     "impl": moe.experts.resolved_impl(device, torch.bfloat16),
                     "moe_ms": 1e3 * common.median(times["moe"]),
                     "dense_ms": 1e3 * common.median(times["dense"]),
                     "moe_tflops": active / common.median(times["moe"]) / 1e12,
                     "dense_tflops": active / common.median(times["dense"]) / 1e12,
                     "moe_over_dense": ratio})
        del moe, dense, x, grad
    return rows


def run_gpu_tests(timeout: int) -> Tuple[int, str]:
    """``pytest -m gpu`` on the unit tests; returns (exit code, last line)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/unit"]
    proc = subprocess.run(cmd, cwd=common.REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()]
    if proc.returncode not in (0, 5):
        print(proc.stdout[-4000:] + proc.stderr[-2000:])
    return proc.returncode, lines[-1] if lines else ""


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="training steps (bf16)")
    p.add_argument("--repeats", type=int, default=10, help="timed layer repeats")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="toy sizes on the CPU: checks the code path, measures nothing")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}); nothing to check here.")
        return 0
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda")
    t_start = time.perf_counter()
    name = "CPU (smoke)" if args.cpu_smoke else torch.cuda.get_device_name(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"gpu-check on {name}, torch {torch.__version__}, {date}", flush=True)
    report: Dict[str, object] = {"device": name, "torch": torch.__version__, "date": date}

    ok = True
    if not args.skip_tests and not args.cpu_smoke:
        code, last = run_gpu_tests(timeout=240)
        print(f"\n1. unit tests marked gpu: {last} (exit {code})", flush=True)
        report["gpu_tests"] = {"exit": code, "summary": last}
        ok &= code == 0

    cfg, source = load_1b_config(args.cpu_smoke)
    steps = 2 if args.cpu_smoke else args.steps
    r = train_steps(cfg, device, steps)
    report["train"] = dict(r, config=source, steps=steps)
    print(f"\n2. {steps} bf16 training steps of {source}: {r['params'] / 1e9:.2f}B parameters, "
          f"micro-batch {cfg.train.micro_batch_size} x {cfg.train.seq_len}", flush=True)
    common.print_table("Training step", ["tokens/s", "model TFLOP/s", "peak TFLOP/s", "MFU",
                                         "s/step", "loss first -> last"],
                       [[r["tokens_per_s"], r["tflops"], r["peak_tflops"], r["mfu"], r["step_s"],
                         f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"]])
    ok &= bool(r["finite"])

    cases = SMOKE_LAYER_CASES if args.cpu_smoke else LAYER_CASES
    rows = layer_vs_dense(device, cases, 1 if args.cpu_smoke else args.repeats,
                          warmup=0 if args.cpu_smoke else 2)
    report["layer"] = rows
    common.print_table(
        "3. MoE layer vs dense SwiGLU of the same active FLOPs, bf16 fwd+bwd",
        ["E", "K", "D", "F", "tokens", "impl", "moe ms", "dense ms", "moe TFLOP/s",
         "dense TFLOP/s", "moe/dense throughput"],
        [[x["E"], x["K"], x["D"], x["F"], x["tokens"], x["impl"], x["moe_ms"], x["dense_ms"],
          x["moe_tflops"], x["dense_tflops"], x["moe_over_dense"]] for x in rows],
        note="Targets on an H100/H200-class GPU: moe/dense >= 0.80 at E=64 K=8; "
             "training step MFU >= 40%.")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
    print(common.elapsed_note(t_start))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
