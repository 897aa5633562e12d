"""Training step end to end: MoE against a dense model with the same active parameters.

    .venv/bin/python benchmarks/train_step.py [--quick] [--threads N]

One step = the trainer's inner loop without data loading and logging:
global_batch / micro_batch micro-batches of forward, cross-entropy + router
aux losses, backward; then gradient clipping and the trainer's AdamW
(moe_train.train.optim.build_optimizer), for:

  tiny   configs/tiny.yaml as it is (D=128, 4 layers, E=8, K=2, F=256)
  small  D=512, 4 layers, 8 heads, E=16, K=2, F=1024, 8 x 256 tokens

and for each its dense twin: num_experts 0 and a dense ffn of width K*F, the
same active parameters (up to the router). (The moe+proto variant of earlier
runs is gone: prototypes 3+4 became moe_train's own path.) Steps of the two models are
interleaved; the figure is the median over repeats after warm-up (process
CPU time with one thread on CPU, see moe_layer.py; wall time on GPU).

MFU = model FLOPs per step / step time / peak, the peak being the FLOP/s of
one large fp32 matmul measured in the same run on the same threads. Model
FLOPs per step = 6 * N_active * tokens + 12 * L * S * D * tokens (attention
scores and values, forward+backward, counted without the causal half as in
PaLM's appendix B). N_active counts the matmul weights a token goes through:
attention, the router, K experts (or the dense MLP) and the LM head; not the
embedding table (a lookup) and not the norms.
"""
from __future__ import annotations

import argparse
import time

import common  # first: it may set allocator env before any tensor exists
import torch
import torch.nn.functional as F
from moe_train.config import load_config

SMALL = [
    "model.hidden_size=512", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=8",
    "model.ffn_hidden_size=1024", "model.max_seq_len=256",
    "moe.num_experts=16", "moe.top_k=2",
    "train.micro_batch_size=8", "train.global_batch_size=8", "train.seq_len=256",
]


def dense_twin(overrides, cfg):
    """The dense model with the MoE's active parameters: E=0, ffn = K*F."""
    from moe_train.config import moe_for_model
    F_expert = moe_for_model(cfg.moe, cfg.model).ffn_hidden_size
    return overrides + ["moe.num_experts=0", f"model.ffn_hidden_size={cfg.moe.top_k * F_expert}"]


def active_params(model) -> int:
    """Matmul weights one token goes through (see the module docstring)."""
    from moe_train.moe.layer import MoELayer
    n = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.startswith("embed."):
            continue
        if ".experts.w" in name:
            continue  # stacked experts, counted per layer below: K experts' worth
        n += p.numel()
    if model.lm_head.weight is model.embed.weight:
        n += model.lm_head.weight.numel()
    for m in model.modules():
        if isinstance(m, MoELayer):
            per_expert = sum(p[0].numel() for p in m.experts.parameters())
            k = m.cfg.top_k if m.cfg.router == "token_choice" else (m.cfg.capacity_factor or 2.0)
            n += int(k * per_expert)
    return n


def make_step(cfg, device, clock: str = "wall"):
    from moe_train.data.tokenizer import ByteTokenizer
    from moe_train.data.vocab import padded_vocab_size
    from moe_train.model.transformer import build_model
    if cfg.model.vocab_size is None:  # what training on the byte-tokenized default data sets
        cfg.model.vocab_size = padded_vocab_size(ByteTokenizer.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.moe).to(device)
    model.train()
    try:  # the trainer's optimizer (decay / no-decay groups)
        from moe_train.train.optim import build_optimizer
        opt = build_optimizer(model, cfg.train)
    except ImportError:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                                betas=(cfg.train.beta1, cfg.train.beta2),
                                weight_decay=cfg.train.weight_decay)
    B, S, V = cfg.train.micro_batch_size, cfg.train.seq_len, cfg.model.vocab_size
    accum = cfg.train.global_batch_size // B
    g = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(accum):
        tokens = torch.randint(0, V, (B, S + 1), generator=g).to(device)
        micro.append((tokens[:, :-1], tokens[:, 1:]))

    import time as _time
    now = _time.process_time if clock == "cpu" else _time.perf_counter
    optimizer_seconds = []

    def step():
        opt.zero_grad(set_to_none=True)
        for inputs, targets in micro:
            out = model(inputs)
            loss = F.cross_entropy(out.logits.reshape(-1, V).float(), targets.reshape(-1)) + out.aux_loss
            (loss / accum).backward()
        common.sync(device)
        t0 = now()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        common.sync(device)
        optimizer_seconds.append(now() - t0)

    total = sum(p.numel() for p in model.parameters())
    return step, model, accum * B * S, total, optimizer_seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, a smaller 'small'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    common.add_thp_flag(p)
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    device = common.pick_device()
    cpu_time = device.type == "cpu" and args.threads == 1
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    clock = "cpu" if cpu_time else "wall"
    repeats = args.repeats or (3 if args.quick else 7)
    small = SMALL + (["model.hidden_size=256", "model.ffn_hidden_size=512", "train.seq_len=128",
                      "model.num_layers=2"] if args.quick else [])
    tiny_path = f"{common.REPO_ROOT}/configs/tiny.yaml"
    common.print_machine(device)
    peak = common.matmul_peak_flops(device, n=2048 if device.type == "cpu" else 8192,
                                    clock=clock)
    print(f"matmul peak (fp32, {'1 thread, CPU time' if cpu_time else str(device)}): "
          f"{peak / 1e9:,.1f} GFLOP/s\n", flush=True)

    rows = []
    for label, overrides in (("tiny", []), ("small", small)):
        cfg = load_config(tiny_path, overrides)
        dcfg = load_config(tiny_path, dense_twin(overrides, cfg))
        runs = {}
        for kind, c in (("moe", cfg), ("dense", dcfg)):
            step, model, tokens, total, opt_s = make_step(c, device, clock)
            n_act = active_params(model)
            m = c.model
            flops = 6 * n_act * tokens + 12 * m.num_layers * c.train.seq_len * m.hidden_size * tokens
            runs[kind] = dict(step=step, tokens=tokens, total=total, n_act=n_act, flops=flops, opt_s=opt_s)
        times = common.time_interleaved({k: v["step"] for k, v in runs.items()}, repeats=repeats,
                                        warmup=args.warmup, device=device, clock=clock)
        for kind, r in runs.items():
            t = common.median(times[kind])
            opt_share = common.median(r["opt_s"][-repeats:]) / t
            rows.append([label, kind, f"{r['total'] / 1e6:.2f} M", f"{r['n_act'] / 1e6:.2f} M",
                         r["tokens"], r["tokens"] / t, r["flops"] / t / 1e9, r["flops"] / t / peak,
                         opt_share, common.spread(times[kind])])
        ratio = common.median([d / m for m, d in zip(times["moe"], times["dense"])])
        fb = [(t - o) for t, o in zip(times["moe"], runs["moe"]["opt_s"][-repeats:])]
        fb_dense = [(t - o) for t, o in zip(times["dense"], runs["dense"]["opt_s"][-repeats:])]
        fb_ratio = common.median([d / m for m, d in zip(fb, fb_dense)])
        rows.append([label, "moe / dense throughput", "", "", "", ratio, "", "", "", ""])
        rows.append([label, "same, without clip+AdamW", "", "", "", fb_ratio, "", "", "", ""])
        print(f"  {label}: done", flush=True)
        del runs
    unit = "tokens/s per core" if cpu_time else "tokens/s"
    common.print_table("Training step (forward, loss, backward, clip, AdamW)",
                       ["config", "model", "params", "active params", "tokens/step", unit,
                        "GFLOP/s", "MFU", "clip+AdamW share", "spread"], rows,
                       note=f"MFU against the measured fp32 matmul peak of {peak / 1e9:,.1f} GFLOP/s.")
    print(common.elapsed_note(t_start))


if __name__ == "__main__":
    main()
