"""prepare-data throughput: MB/s of input for the byte tokenizer and a
byte-level BPE tokenizer, with 1 and 2 worker processes, measured in one run.

    python benchmarks/prepare_data.py            # about 8 MB of JSONL
    python benchmarks/prepare_data.py --mb 32 --workers 1,2,4

The corpus is real text available offline: this interpreter's standard
library sources (the ``stdlib`` built-in corpus), one file per JSONL line.
The BPE tokenizer is trained here with the ``tokenizers`` library (8k
vocabulary, GPT-2-style byte-level pre-tokenizer) on the first MB. Each
configuration runs ``--repeats`` times, interleaved, and the table shows the
median; ratios are against 1 worker of the same tokenizer. Target: 2 workers
at least 1.7x one worker (on a machine with 2 idle cores or more).

Wall-clock ratios need idle cores. The CPU columns do not: ``main CPU`` is
the main process (reading, writing; with 1 worker also tokenizing),
``worker CPU`` the worker processes together, and ``bound`` the speedup the
split allows on ``workers + 1`` idle cores, ``cpu(1 worker) / max(main,
workers' / workers)`` (Amdahl's law with the main process as the serial part).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_train.data import prepare, stdlib_files  # noqa: E402


def write_corpus(path: str, megabytes: float) -> int:
    """JSONL of stdlib source files, repeated until ``megabytes``; its size."""
    files = stdlib_files()
    target, size = int(megabytes * 2 ** 20), 0
    with open(path, "w", encoding="utf-8") as out:
        while size < target:
            for f in files:
                with open(f, encoding="utf-8", errors="replace") as fh:
                    line = json.dumps({"text": fh.read()}) + "\n"
                out.write(line)
                size += len(line.encode("utf-8"))
                if size >= target:
                    break
    return size


def train_bpe(corpus: str, path: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    with open(corpus, encoding="utf-8") as fh:
        total = 0
        for line in fh:
            texts.append(json.loads(line)["text"])
            total += len(line)
            if total > 2 ** 20:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size in MB (default 8)")
    ap.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-prepare-")
    try:
        corpus = os.path.join(tmp, "corpus.jsonl")
        size = write_corpus(corpus, args.mb)
        tokenizers = {"byte": "byte", "bpe-8k": train_bpe(corpus, os.path.join(tmp, "bpe.json"))}
        times = {(t, w): [] for t in tokenizers for w in workers}
        cpu = {(t, w): [] for t in tokenizers for w in workers}
        tokens = {}
        for _ in range(args.repeats):
            for (name, w) in times:  # interleaved, so drifting load hits every row alike
                out = os.path.join(tmp, f"out-{name}-{w}")
                self0 = resource.getrusage(resource.RUSAGE_SELF)
                kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                meta = prepare([corpus], out, tokenizers[name], 0.05, workers=w)
                times[(name, w)].append(time.perf_counter() - start)
                self1 = resource.getrusage(resource.RUSAGE_SELF)
                kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[(name, w)].append((
                    self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime,
                    kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime))
                tokens[name] = meta["train_tokens"] + meta["val_tokens"]
                shutil.rmtree(out)
        print(f"prepare-data on {size / 2 ** 20:.1f} MB of JSONL (stdlib sources), "
              f"{os.cpu_count()} CPUs, median of {args.repeats}\n")
        print("| tokenizer | workers | tokens | seconds | MB/s | vs 1 worker | main CPU s "
              "| worker CPU s | bound |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in tokenizers:
            base = statistics.median(times[(name, workers[0])])
            base_cpu = statistics.median(sum(c) for c in cpu[(name, workers[0])])
            for w in workers:
                t = statistics.median(times[(name, w)])
                main_cpu = statistics.median(c[0] for c in cpu[(name, w)])
                work_cpu = max(0.0, statistics.median(c[1] for c in cpu[(name, w)]))
                bound = base_cpu / max(main_cpu, work_cpu / w) if w > 1 else 1.0
                print(f"| {name} | {w} | {tokens[name]:,} | {t:.2f} | "
                      f"{size / 2 ** 20 / t:.1f} | {base / t:.2f}x | {main_cpu:.2f} | "
                      f"{work_cpu:.2f} | {bound:.2f}x |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
