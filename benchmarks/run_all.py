"""Run every benchmark, one fresh process each, and keep the output.

    make bench                                  # = .venv/bin/python benchmarks/run_all.py
    .venv/bin/python benchmarks/run_all.py --quick
    .venv/bin/python benchmarks/run_all.py --only moe_layer,memory

Each script prints Markdown tables; this runner prints them as they come and
writes everything to ``runs/bench/<time>.md`` (``--out`` to choose), ready to
be pasted into docs/performance.md. The scripts:

  moe_layer      MoE layer fwd+bwd tokens/s: ours vs dense, naive, DeepSpeed
                 (megatron-core on GPU), phase breakdown, prototype changes
  moe_layer_thp  the same for K=2 with THP_MEM_ALLOC_ENABLE=1 (CPU only)
  memory         peak memory of the layer vs dense, fresh process per variant
  ep_dispatch    EP=2 on two gloo ranks: all-to-all share, bytes, bandwidth
  train_step     training step tokens/s and MFU, MoE vs dense twin
  generate       greedy generation tokens/s, KV cache vs recomputing the sequence
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def plan(quick: bool, cuda: bool):
    q = ["--quick"] if quick else []
    jobs = [
        ("moe_layer", ["moe_layer.py", "--proto"] + q, {}),
        ("memory", ["memory.py", "--proto"] + q, {}),
        ("ep_dispatch", ["ep_dispatch.py"] + q, {}),
        ("train_step", ["train_step.py"] + q, {}),
        ("generate", ["generate.py"] + q, {}),
    ]
    if not cuda:
        jobs.insert(1, ("moe_layer_thp", ["moe_layer.py", "--thp", "--no-profile",
                                          "--variants", "dense,naive,ours_tc,proto_gather",
                                          "--configs", "8:2,16:2,64:2"] + q, {}))
    return jobs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (minutes)")
    p.add_argument("--only", default=None, help="comma list of benchmark names")
    p.add_argument("--out", default=None, help="output Markdown file")
    args = p.parse_args(argv)
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    jobs = plan(args.quick, cuda)
    if args.only:
        wanted = set(args.only.split(","))
        jobs = [j for j in jobs if j[0] in wanted]
    out = args.out or os.path.join(ROOT, "runs", "bench", time.strftime("%Y%m%d-%H%M%S") + ".md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    failed = []
    with open(out, "w") as log:
        log.write(f"# Benchmark run {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  f"{' (quick)' if args.quick else ''}\n\n")
        for name, cmd, env_extra in jobs:
            header = f"## {name}: `python benchmarks/{' '.join(cmd)}`\n"
            print(header, flush=True)
            log.write(header + "\n")
            env = dict(os.environ, **env_extra)
            env.setdefault("PYTHONWARNINGS", "ignore")
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable] + [os.path.join(HERE, cmd[0])] + cmd[1:],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                # Library chatter (DeepSpeed's accelerator notice, profiler markers) is not a result.
                if any(s in line for s in ("[WARNING]", "USDT:", "UserWarning", "warnings.warn")):
                    continue
                print(line, end="", flush=True)
                log.write(line)
            rc = proc.wait()
            footer = f"\n({name}: exit {rc}, {time.perf_counter() - t0:.0f} s)\n\n"
            print(footer, flush=True)
            log.write(footer)
            if rc != 0:
                failed.append(name)
    print(f"wrote {out}")
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
