"""Generation with the KV cache against recomputing the whole sequence.

    .venv/bin/python benchmarks/generate.py [--quick] [--threads N]

configs/tiny.yaml's model (D=128, 4 layers, E=8, K=2; RoPE) and an ALiBi
twin continue a 16-token prompt by N greedy tokens (N = 224, --quick 96)
two ways: ``cached`` (moe_train.infer.generate.generate_ids: the prompt is
one forward, each new token one forward of one position) and ``full``
(each new token runs the whole sequence again, no cache). Both give the same
tokens (checked here). The figure is the median over interleaved repeats
(process CPU time with one thread on CPU, wall time on GPU); the claim is
the ratio, which grows with N since ``full`` is quadratic in the length.
"""
from __future__ import annotations

import argparse

import torch

from common import median, pick_device, print_machine, print_table, spread, time_interleaved
from moe_train.config import load_config
from moe_train.infer.generate import generate_ids
from moe_train.model.transformer import build_model


def full_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor([seq], device=next(model.parameters()).device)
            seq.append(int(model(ids).logits[0, -1].argmax()))
    return seq[len(prompt):]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device()
    print_machine(device)
    n = 96 if args.quick else 224
    rows = []
    for name, overrides in (("rope", []), ("alibi", ["model.position_embedding=alibi"])):
        cfg = load_config(None, overrides)
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.moe).to(device).eval()
        prompt = list(range(65, 81))
        cached = list(generate_ids(model, prompt, n, temperature=0.0))
        assert cached == full_greedy(model, prompt, n), f"{name}: cached and full decode differ"
        times = time_interleaved({
            "cached": lambda: list(generate_ids(model, prompt, n, temperature=0.0)),
            "full": lambda: full_greedy(model, prompt, n),
        }, repeats=3 if args.quick else 5, warmup=1, device=device,
            clock="cpu" if device.type == "cpu" else "wall")
        c, f = median(times["cached"]), median(times["full"])
        rows.append([name, n, n / c, n / f, f / c,
                     f"{max(spread(times['cached']), spread(times['full'])):.0%}"])
    print_table("Greedy generation, tokens/s: KV cache vs recomputing the sequence",
                ["model", "new tokens", "cached tok/s", "full tok/s", "speedup", "spread"], rows,
                note="same tokens both ways (asserted); speedup = full time / cached time")


if __name__ == "__main__":
    main()
