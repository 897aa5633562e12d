"""Router quality study: which routing trains the tiny model best, at equal
active compute, and does that agree with the papers?

    make quality            # = python benchmarks/quality.py
    python benchmarks/quality.py --steps 40 --seeds 1   # a quick look

Trains ``configs/tiny.yaml`` on the bundled Shakespeare corpus (byte
tokens) for a fixed number of steps with each routing variant and each seed,
each run a ``moe-train train`` child process with one thread, ``--jobs`` (2)
at a time. Runs start seed-major (every variant of seed 1, then of seed 2),
so that slow phases of a shared machine hit every variant alike.

Equal active compute: every variant runs 2 expert FFNs of width F per token
(top-1 runs one expert of width 2F instead; expert choice with c = 2 runs
2 per token on average; capacity 1.25 runs at most 2).

Writes docs/routing-quality.md (tables and the comparison with the published
directions) and docs/routing-quality.png (validation curves, mean over seeds,
and each variant's paired difference to top-2 with its min-max band). Each seed draws its own validation batches (they
depend on train.seed), and every variant of a seed sees the same ones: the
paired per-seed differences are what the verdicts use.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO_ROOT, "configs", "tiny.yaml")
# metrics.jsonl keys (docs/monitoring.md).
VAL_KEY, TPS_KEY = "loss/val", "perf/tokens_per_sec"


def machine_info() -> Dict[str, str]:
    """CPU model, core count and load average (no torch or deepspeed import)."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return {"cpu": cpu, "nproc": str(os.cpu_count()), "load average": load}


# name -> (label, overrides on top of the tiny config). The tiny config has
# E=8, F=256, the Switch aux loss at 1e-2 and the z-loss at 1e-3.
VARIANTS: Dict[str, tuple] = {
    "top1": ("token choice top-1 (expert width 2F)",
             ["moe.top_k=1", "moe.ffn_hidden_size=512"]),
    "top2": ("token choice top-2", ["moe.top_k=2"]),
    "top2_cap1.25": ("top-2, capacity factor 1.25",
                     ["moe.top_k=2", "moe.capacity_factor=1.25"]),
    "ec_c2": ("expert choice c=2 (position groups)",
              ["moe.router=expert_choice", "moe.capacity_factor=2"]),
    "seq_aux": ("top-2, sequence-wise aux loss (1e-2)",
                ["moe.top_k=2", "moe.aux_loss=sequence", "moe.aux_loss_coef=0.01"]),
    "aux_free": ("top-2, aux-loss-free bias (gamma 1e-3)",
                 ["moe.top_k=2", "moe.aux_loss=none", "moe.expert_bias_update_rate=0.001"]),
}


def run_variant(name: str, seed: int, steps: int, eval_every: int, eval_iters: int,
                workdir: str) -> Dict:
    """Train one variant for one seed in a child process (``moe-train train``
    with one thread: two such runs share a 2-core machine better than one run
    with two threads, and far better when the machine is oversubscribed);
    return its curves and averages."""
    run_dir = os.path.join(workdir, f"{name}-seed{seed}")
    overrides = VARIANTS[name][1] + [
        f"train.seed={seed}", f"train.max_steps={steps}", f"train.eval_every={eval_every}",
        f"train.eval_iters={eval_iters}", "train.log_every=5", "train.save_every=0",
        "train.keep_last=1", "train.heatmap_every=0", f"train.warmup_steps={max(1, steps // 10)}"]
    cmd = [sys.executable, "-m", "moe_train.cli", "train", "--config", TINY, "--run-dir", run_dir]
    for item in overrides:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    with open(os.path.join(workdir, f"{name}-seed{seed}.log"), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    elapsed = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}); see "
                           f"{os.path.join(workdir, name + '-seed' + str(seed) + '.log')}")
    return dict(read_run(run_dir, steps), elapsed_s=elapsed)


def read_run(run_dir: str, steps: int) -> Dict:
    """Curves and averages of one finished run from its metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    val = {r["step"]: r[VAL_KEY] for r in rows if VAL_KEY in r}
    # Load and drops over the second half of training, when routing has settled.
    late = [r for r in rows if r["step"] > steps // 2]
    loads = [v for r in late for k, v in r.items()
             if k.startswith("moe/layer_") and k.endswith("load_max_over_mean")]
    drops = [v for r in late for k, v in r.items()
             if k.startswith("moe/layer_") and k.endswith("dropped_fraction")]
    tps = [r[TPS_KEY] for r in rows if TPS_KEY in r]
    tps = tps[1:] or tps  # the first window holds the warm-up
    return {"val": val, "tokens_per_sec": statistics.median(tps) if tps else float("nan"),
            "load_max_over_mean": statistics.mean(loads) if loads else float("nan"),
            # Dropless runs may log no dropped fraction at all: nothing was dropped.
            "dropped_fraction": statistics.mean(drops) if drops else 0.0}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _half_spread(xs: Sequence[float]) -> float:
    return (max(xs) - min(xs)) / 2


def _pm(xs: Sequence[float], digits: int = 3) -> str:
    """mean ± half the min-max spread over seeds."""
    half = _half_spread(xs)
    return f"{_mean(xs):.{digits}f} ± {half:.{digits}f}" if len(xs) > 1 else f"{xs[0]:.{digits}f}"


def paired(results, a: str, b: str, step: int) -> List[float]:
    """Per-seed val(a) - val(b) at ``step`` (same seed, same val batches)."""
    return [ra["val"][step] - rb["val"][step] for ra, rb in zip(results[a], results[b])]


def steps_to_reach(results, name: str, target: float) -> int:
    """First eval step where the seed-mean validation loss of ``name`` is <= target (or -1)."""
    for step in sorted(results[name][0]["val"]):
        if _mean([r["val"][step] for r in results[name]]) <= target:
            return step
    return -1


def _verdict(diffs: Sequence[float], better: str, worse: str) -> str:
    """'agrees' when every seed's paired difference favours ``better``; 'disagrees'
    when every seed favours ``worse``; otherwise the seeds split."""
    if all(d < 0 for d in diffs):
        return "agrees"
    if all(d > 0 for d in diffs):
        return "disagrees"
    return f"inconclusive (the seeds split between {better} and {worse})"


def comparisons(results, final: int, mid: int) -> List[str]:
    lines = []
    top2_final = _mean([r["val"][final] for r in results["top2"]])
    reach = steps_to_reach(results, "ec_c2", top2_final)
    d_ec = paired(results, "ec_c2", "top2", final)
    d_ec_mid = paired(results, "ec_c2", "top2", mid)
    reach_text = (f"reaches top-2's final loss ({top2_final:.3f}) at step {reach} of {final}"
                  if reach > 0 else f"does not reach top-2's final loss ({top2_final:.3f})")
    lines.append(
        f"- **Expert choice c=2 converges faster than top-2** (Zhou et al. 2022, Fig. 2a: same "
        f"perplexity in under half the steps): **{_verdict(d_ec, 'expert choice', 'top-2')}**. "
        f"Paired val-loss difference EC − top-2 per seed: at step {mid} "
        f"{', '.join(f'{d:+.3f}' for d in d_ec_mid)}; at step {final} "
        f"{', '.join(f'{d:+.3f}' for d in d_ec)}. Expert choice {reach_text}"
        + (" (under half the steps, as in the paper)." if 0 < reach <= final // 2 else "."))
    d_k = paired(results, "top2", "top1", final)
    lines.append(
        f"- **Top-2 beats top-1 at the same steps** (GShard; Switch Sec. 2.2 and its top-1 vs "
        f"top-2 comparison): **{_verdict(d_k, 'top-2', 'top-1')}**. Paired difference top-2 − "
        f"top-1 at step {final}: {', '.join(f'{d:+.3f}' for d in d_k)}. Here top-1 has experts "
        f"of width 2F so both run the same FLOPs per token; the papers compare at equal "
        f"expert width, where top-2 also spends more compute.")
    d_b = paired(results, "aux_free", "seq_aux", final)
    load_free = _mean([r["load_max_over_mean"] for r in results["aux_free"]])
    load_seq = _mean([r["load_max_over_mean"] for r in results["seq_aux"]])
    # "Matches": the mean paired difference is within the seed-to-seed spread
    # of either variant's final loss (half the min-max range).
    noise = max(_half_spread([r["val"][final] for r in results[n]]) for n in ("aux_free", "seq_aux"))
    if all(d < 0 for d in d_b):
        verdict = "agrees (aux-free is better on every seed)"
    elif abs(_mean(d_b)) <= noise:
        verdict = "agrees (they match within the seed spread)"
    elif _mean(d_b) < 0:
        verdict = "agrees (aux-free is better on average, the seeds split)"
    else:
        verdict = "disagrees (aux-free is worse by more than the seed spread)"
    lines.append(
        f"- **Aux-loss-free balancing matches or beats the aux loss** (DeepSeek-V3 Sec. 2.1.2 "
        f"and Wang et al. 2024): **{verdict}**. Paired difference aux-free − sequence aux at "
        f"step {final}: {', '.join(f'{d:+.3f}' for d in d_b)} (seed spread {noise:.3f}). "
        f"Load max/mean: aux-free {load_free:.2f}, sequence aux {load_seq:.2f}"
        + (f": here the bias balances less than the loss does. It moves by gamma = 1e-3 "
           f"per step, at most {final * 1e-3:.2f} in {final} steps, against softmax scores "
           "of ~1/8 (DeepSeek-V3 trains for ~10^5 steps), so at this length aux-free's loss "
           "comes with a less even load." if load_free > load_seq else "."))
    return lines


def write_png(results, path: str) -> None:
    """Left: validation loss, mean over seeds. Right: each variant minus
    top-2 on the same seed (paired: same validation batches), mean with the
    min-max band over seeds; below zero is better than top-2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=100)
    for name, runs in results.items():
        steps = sorted(runs[0]["val"])
        label = VARIANTS[name][0]
        ax.plot(steps, [_mean([r["val"][s] for r in runs]) for s in steps], label=label)
        if "top2" in results:
            diffs = [paired(results, name, "top2", s) for s in steps]
            line, = dx.plot(steps, [_mean(d) for d in diffs], label=label)
            dx.fill_between(steps, [min(d) for d in diffs], [max(d) for d in diffs],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats / byte), mean over seeds")
    ax.set_title("Routing variants, configs/tiny.yaml")
    ax.legend(fontsize=8)
    dx.axhline(0.0, color="black", linewidth=0.8)
    dx.set_xlabel("optimizer step")
    dx.set_ylabel("val loss − top-2 val loss, same seed")
    dx.set_title("Paired difference to top-2 (band: min-max over seeds)")
    for a_ in (ax, dx):
        a_.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_markdown(results, args, path: str, png_name: str, elapsed: float, load: str) -> None:
    steps = sorted(next(iter(results.values()))[0]["val"])
    final, mid = steps[-1], steps[len(steps) // 2 - 1] if len(steps) > 1 else steps[-1]
    shown = sorted({steps[0], mid, final})
    info = machine_info()
    top2_tps = _mean([r["tokens_per_sec"] for r in results["top2"]])
    out = ["# Routing quality on the tiny model", "",
           "Generated by `make quality` (`python benchmarks/quality.py "
           f"--steps {args.steps} --seeds {args.seeds}`); do not edit by hand.", "",
           f"Setup: `configs/tiny.yaml` (4 layers, d=128, 8 experts of width F=256, seq 128, "
           f"global batch 16 = 2 micro-batches of 8, fp32, Shakespeare bytes), {args.steps} "
           f"steps, warmup {max(1, args.steps // 10)}, validation every {args.eval_every} steps "
           f"on {args.eval_iters} batches, seeds {', '.join(str(s) for s in range(1, args.seeds + 1))}. "
           "Every variant runs 2 expert FFNs of width F per token on average. Whole study: "
           f"{elapsed / 60:.1f} min on {info['nproc']} x {info['cpu']}, {args.jobs} runs at a "
           f"time with one thread each (load average at the end "
           f"{load}: on a shared machine throughput is indicative "
           "only).", "",
           "## Validation loss (mean ± half the min-max spread over seeds)", "",
           "| variant | " + " | ".join(f"step {s}" for s in shown) + " |",
           "|---|" + "---|" * len(shown)]
    for name, runs in results.items():
        out.append(f"| {VARIANTS[name][0]} | "
                   + " | ".join(_pm([r['val'][s] for r in runs]) for s in shown) + " |")
    out += ["", "## Throughput, load and drops", "",
            "Tokens/s: median over the logged windows of training steps (not evaluation). "
            "Load max/mean: the busiest expert's tokens over the mean, averaged over layers and "
            "the logs of the second half (1.0 is perfect balance). Dropped: token choice, the "
            "share of (token, expert) assignments cut by capacity; expert choice, the share of "
            "tokens no expert chose (they pass through the residual). The runs ran two at a "
            "time on a machine whose load changed during the study, so the tokens/s column "
            "compares runs measured under different loads: it is no speed ranking "
            "(benchmarks/moe_layer.py measures speed).", "",
            "| variant | tokens/s | vs top-2 | load max/mean | dropped |", "|---|---|---|---|---|"]
    for name, runs in results.items():
        tps = _mean([r["tokens_per_sec"] for r in runs])
        out.append(f"| {VARIANTS[name][0]} | {tps:,.0f} | {tps / top2_tps:.2f} | "
                   f"{_pm([r['load_max_over_mean'] for r in runs], 2)} | "
                   f"{_pm([r['dropped_fraction'] for r in runs], 3)} |")
    out += ["", f"![validation curves]({png_name})", "",
            "## Against the published directions", ""]
    out += comparisons(results, final, mid)
    out += ["", f"Caveats: a 4-layer, 8-expert model trained for {args.steps} steps on a "
            "1 MB corpus is far from the papers' scale; two seeds give a spread, not a "
            "confidence interval. Expert choice here uses causal position groups of one "
            "micro-batch (8 tokens per group, docs/moe.md), much smaller groups than the "
            "paper's, which limits the experts' choice. Rerun with more `--steps` or "
            "`--seeds` for firmer answers.", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(out))


def run_study(names, args, workdir):
    """Every (seed, variant) run, ``args.jobs`` at a time; (results, seconds)."""
    jobs = [(seed, name) for seed in range(1, args.seeds + 1) for name in names]
    start = time.time()
    done: Dict[tuple, Dict] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_variant, name, seed, args.steps, args.eval_every,
                               args.eval_iters, workdir): (seed, name) for seed, name in jobs}
        for future in concurrent.futures.as_completed(futures):
            seed, name = futures[future]
            r = done[(seed, name)] = future.result()
            print(f"[quality] {name} seed {seed}: val {r['val'][max(r['val'])]:.4f}, "
                  f"{r['tokens_per_sec']:.0f} tok/s, {r['elapsed_s']:.0f}s "
                  f"({(time.time() - start) / 60:.1f} min so far)", flush=True)
    elapsed = time.time() - start
    with open(os.path.join(workdir, "study.json"), "w") as fh:
        json.dump({"elapsed_s": elapsed, "argv": sys.argv[1:],
                   "load_average": machine_info()["load average"]}, fh)
    return {n: [done[(seed, n)] for seed in range(1, args.seeds + 1)] for n in names}, elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The defaults are the study of docs/routing-quality.md: 13.5 min on a
    # 2-core machine shared with other jobs (the same study at 40 steps took
    # 27 min there under a heavier load), within 30 min on 2 cores.
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-iters", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at a time, one thread each (default 2, for 2 cores)")
    parser.add_argument("--workdir", default=os.path.join("runs", "quality"),
                        help="each study writes its runs to WORKDIR/<time>/")
    parser.add_argument("--report-from", metavar="STUDY_DIR",
                        help="write the report from a finished study's runs instead of training "
                             "(the same --steps, --seeds, --eval-every and --eval-iters)")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "docs", "routing-quality.md"))
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if (unknown or args.steps < 2 or args.seeds < 1 or args.jobs < 1
            or not 0 < args.eval_every <= args.steps):
        print(f"quality.py: bad arguments (variants must be among {', '.join(VARIANTS)}; "
              "steps >= 2; seeds >= 1; 0 < eval-every <= steps)", file=sys.stderr)
        return 2
    if args.report_from:
        # Rebuild the report from a finished study (its runs and study.json).
        workdir = args.report_from
        with open(os.path.join(workdir, "study.json")) as fh:
            study = json.load(fh)
        elapsed, load = study["elapsed_s"], study.get("load_average", "not recorded")
        results = {n: [read_run(os.path.join(workdir, f"{n}-seed{seed}"), args.steps)
                       for seed in range(1, args.seeds + 1)] for n in names}
    else:
        workdir = os.path.join(args.workdir, time.strftime("%Y%m%d-%H%M%S"))
        results, elapsed = run_study(names, args, workdir)
        load = machine_info()["load average"]
    png = os.path.splitext(args.out)[0] + ".png"
    write_png(results, png)
    needed = {"top1", "top2", "ec_c2", "seq_aux", "aux_free"}
    if needed <= set(names):
        write_markdown(results, args, args.out, os.path.basename(png), elapsed, load)
        print(f"wrote {args.out} and {png}")
    else:
        print(f"wrote {png} (the report needs the variants {', '.join(sorted(needed))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
