"""Data: tokenizers, built-in offline corpora, prepare-data (txt, JSONL,
Parquet; bare or Megatron indexed layout), memory-mapped token splits,
blends and deterministic batch sampling. See docs/data.md."""
from moe_train.data.corpus import CORPORA, corpus_files, shakespeare_files, stdlib_files
from moe_train.data.dataset import (
    TokenDataset,
    check_enough,
    load_splits,
    sample_batch,
    val_batches,
)
from moe_train.data.prepare import prepare
from moe_train.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer, token_dtype

__all__ = [
    "CORPORA", "corpus_files", "shakespeare_files", "stdlib_files",
    "TokenDataset", "check_enough", "load_splits", "sample_batch", "val_batches",
    "prepare",
    "ByteTokenizer", "HFTokenizer", "build_tokenizer", "token_dtype",
]
