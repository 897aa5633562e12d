"""prepare-data inputs: .txt / .jsonl / .jsonl.gz / .parquet, end-of-document
ids, HF tokenizers (tokenizer.json and AutoTokenizer directories), workers,
the Megatron layout, and one-line errors for bad input.

References are independent of the code under test: the ``tokenizers``
library's own encoding of each document (plus the EOD id where the rule puts
it), raw file bytes, and megatron-core's IndexedDataset reading our files.
"""
import gzip
import json
import math
import os

import numpy as np
import pytest

from moe_train.cli import main as cli_main
from moe_train.config import ConfigError, DataConfig
from moe_train.data import load_splits, prepare
from moe_train.data.tokenizer import build_tokenizer

tokenizers = pytest.importorskip("tokenizers")

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — 東京 ünïcode",
    "to be or not to be, that is the question",
    "x",
    "A longer document. " * 30,
]
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here, with <|endoftext|> special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS * 20, trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def reference_split(token_lists, eod, val_fraction):
    """The documented rule: per document, the last ceil(n*f) tokens to val,
    each non-empty piece followed by the EOD id."""
    train, val = [], []
    for ids in token_lists:
        k = math.ceil(len(ids) * val_fraction)
        for out, piece in ((train, ids[:len(ids) - k]), (val, ids[len(ids) - k:])):
            if piece:
                out.extend(list(piece) + [eod])
    return train, val


def write_inputs(d, docs):
    """The same documents as .txt files, one .txt of lines, .jsonl, .jsonl.gz, .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(exist_ok=True)
    txts = []
    for i, text in enumerate(docs):
        p = d / f"doc{i:02d}.txt"
        p.write_bytes(text.encode("utf-8"))
        txts.append(str(p))
    lines = d / "lines.txt"
    lines.write_text("".join(t + "\n" for t in docs), encoding="utf-8")
    jsonl = d / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)),
                     encoding="utf-8")
    gz = d / "docs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(jsonl.read_text(encoding="utf-8"))
    parquet = d / "docs.parquet"
    # Two row groups, so the reader crosses a group boundary.
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), str(parquet),
                   row_group_size=3)
    return txts, str(lines), str(jsonl), str(gz), str(parquet)


def splits(out):
    meta = json.loads(open(os.path.join(out, "meta.json")).read())
    dt = np.dtype(meta["dtype"])
    return (np.fromfile(os.path.join(out, "train.bin"), dt).tolist(),
            np.fromfile(os.path.join(out, "val.bin"), dt).tolist(), meta)


def test_every_input_format_gives_the_tokens_of_the_txt_files(tmp_path, bpe_path):
    from tokenizers import Tokenizer

    txts, lines, jsonl, gz, parquet = write_inputs(tmp_path / "in", DOCS)
    ref_tok = Tokenizer.from_file(bpe_path)
    eod = ref_tok.token_to_id(EOT)
    want = reference_split([ref_tok.encode(t, add_special_tokens=False).ids for t in DOCS],
                           eod, 0.2)
    runs = {
        "txt": dict(inputs=txts),
        "glob": dict(inputs=[str(tmp_path / "in" / "doc*.txt")]),
        "lines": dict(inputs=[lines], split_lines=True),
        "jsonl": dict(inputs=[jsonl]),
        "jsonl.gz": dict(inputs=[gz]),
        "parquet": dict(inputs=[parquet], column="body"),
    }
    for name, kw in runs.items():
        out = str(tmp_path / name)
        prepare(kw.pop("inputs"), out, bpe_path, 0.2, **kw)
        train, val, meta = splits(out)
        assert (train, val) == want, name
        assert meta["eod_id"] == eod and meta["documents"] == len(DOCS)
        assert meta["vocab_size"] == ref_tok.get_vocab_size()
        # The tokenizer travels with the data.
        assert open(os.path.join(out, "tokenizer", "tokenizer.json")).read() == \
            open(bpe_path).read()


def test_eod_follows_every_document_byte_tokenizer(tmp_path):
    _, _, jsonl, _, _ = write_inputs(tmp_path / "in", DOCS)
    out = str(tmp_path / "out")
    prepare([jsonl], out, "byte", 0.1)
    train, val, meta = splits(out)
    assert meta["vocab_size"] == 257 and meta["eod_id"] == 256
    # Cutting each split after its EOD ids gives back each document's pieces;
    # head + tail are the document's UTF-8 bytes.
    heads = np.split(np.array(train), np.nonzero(np.array(train) == 256)[0] + 1)[:-1]
    tails = np.split(np.array(val), np.nonzero(np.array(val) == 256)[0] + 1)[:-1]
    assert len(tails) == len(DOCS) and all(t[-1] == 256 for t in heads + tails)
    got = []
    for doc in DOCS:
        n = len(doc.encode())
        head = list(heads.pop(0)[:-1]) if n - math.ceil(n * 0.1) > 0 else []
        got.append(bytes(head + list(tails.pop(0)[:-1])).decode())
    assert got == DOCS and not heads


def test_two_workers_write_what_one_writes(tmp_path, bpe_path):
    # Small blocks: a whole-file .txt document crosses many blocks (each
    # tokenized on its own), JSONL is cut into many blocks.
    big = tmp_path / "big.txt"
    big.write_text("line of text number %d, ünïcode — 東京\n" * 400, encoding="utf-8")
    _, _, jsonl, gz, parquet = write_inputs(tmp_path / "in", DOCS * 40)
    inputs = [str(big), jsonl, gz, parquet]
    outs = []
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}")
        prepare(inputs, out, bpe_path, 0.05, workers=workers, block_bytes=512, column="body")
        outs.append(splits(out))
    assert outs[0][0] == outs[1][0] and outs[0][1] == outs[1][1]
    assert outs[0][2]["documents"] == 1 + 3 * len(DOCS) * 40
    # With the byte tokenizer, blocks do not change the tokens at all: the
    # whole-file document equals its raw bytes whatever the block size.
    for workers in (1, 2):
        out = str(tmp_path / f"b{workers}")
        prepare([str(big)], out, "byte", 0.05, workers=workers, block_bytes=100)
        train, val, _ = splits(out)
        assert bytes(train[:-1] + val[:-1]) == big.read_bytes() and train[-1] == val[-1] == 256


def test_auto_tokenizer_directory(tmp_path, bpe_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    d = tmp_path / "hf"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=bpe_path, eos_token=EOT)
    fast.save_pretrained(str(d))
    tok = build_tokenizer(str(d))
    ref = Tokenizer.from_file(bpe_path)
    assert tok.eod_id == ref.token_to_id(EOT) and tok.vocab_size == ref.get_vocab_size()
    for text in DOCS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    out = str(tmp_path / "out")
    txts = write_inputs(tmp_path / "in", DOCS)[0]
    meta = prepare(txts, out, str(d), 0.2, workers=2)
    assert meta["tokenizer_tag"].startswith("hf-") and "tokenizer_config.json" in \
        meta["tokenizer_files"]
    assert splits(out)[:2] == reference_split(
        [ref.encode(t, add_special_tokens=False).ids for t in DOCS], tok.eod_id, 0.2)


def test_megatron_layout_is_read_by_megatron_core(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _, _, jsonl, _, _ = write_inputs(tmp_path / "in", DOCS)
    out = tmp_path / "mg"
    prepare([jsonl], str(out), "byte", 0.1, layout="megatron")
    ds = IndexedDataset(str(out / "train"))
    docs = [list(ds[i]) for i in range(len(ds))]
    # One document per piece, each ending with the EOD id, as preprocess_data.py --append-eod.
    want = [list(d.encode()[:len(d.encode()) - math.ceil(len(d.encode()) * 0.1)]) + [256]
            for d in DOCS if len(d.encode()) - math.ceil(len(d.encode()) * 0.1) > 0]
    assert docs == want and ds.index.dtype == np.uint16
    train, val, meta = load_splits(DataConfig(dataset=str(out)))
    assert train[:].tolist() == [t for d in want for t in d]
    assert meta["layout"] == "megatron"


def test_megatron_core_builder_dataset_is_read_as_is(tmp_path):
    """A prefix written by megatron-core's own builder (as Megatron-LM's
    preprocess_data.py does) loads with no conversion; val is the final
    whole documents."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=int(n)).astype(np.int32) for n in rng.integers(5, 50, 40)]
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in docs:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(prefix + ".idx")

    train, val, meta = load_splits(DataConfig(dataset=prefix, val_fraction=0.1))
    stream = np.concatenate(docs)
    cut = len(train)
    assert np.array_equal(np.concatenate([train[:], val[:]]), stream)
    starts = np.cumsum([0] + [len(d) for d in docs])
    assert cut in starts and cut >= len(stream) * 0.9 > starts[list(starts).index(cut) - 1]
    assert meta["vocab_size"] == int(stream.max()) + 1
    # The prefix given with its .idx name works too.
    assert len(load_splits(DataConfig(dataset=prefix + ".idx", val_fraction=0.1))[0]) == cut


# ----------------------------------------------------------------------------
# Bad input: one line, exit 2, naming the file (and line)


def run_cli(argv, capsys):
    capsys.readouterr()
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def test_bad_inputs_one_line_exit_2(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{not json}\n')
    no_key = tmp_path / "nokey.jsonl"
    no_key.write_text('{"text": "ok"}\n{"body": "x"}\n')
    pq_file = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), str(pq_file))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n\n')
    out = str(tmp_path / "out")
    cases = [
        (["--input", str(bad_json)], ["bad.jsonl", "line 4", "not valid JSON"]),
        (["--input", str(no_key)], ["nokey.jsonl", "line 2", "'text'"]),
        (["--input", str(pq_file)], ["t.parquet", "column 'text'", "body"]),
        (["--input", str(empty)], ["empty.txt", "no tokens"]),
        (["--input", str(blank)], ["blank.jsonl", "no tokens"]),
        (["--input", str(tmp_path / "nope*.jsonl")], ["nope*.jsonl", "matches no file"]),
        (["--input", str(empty), "--tokenizer", str(tmp_path / "no" / "tokenizer.json")],
         ["data.tokenizer", "not found"]),
    ]
    for args, words in cases:
        code, err = run_cli(["prepare-data", *args, "--output", out], capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error:"), (args, err)
        for w in words:
            assert w in err, (w, err)
        assert not os.path.exists(out), "a failed prepare leaves no output directory behind"


def test_failed_prepare_keeps_the_earlier_dataset(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello there"}\n')
    out = str(tmp_path / "out")
    prepare([str(good)], out, "byte", 0.2)
    before = splits(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2"):
        prepare([str(bad)], out, "byte", 0.2)
    assert splits(out) == before
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_idx_without_bin_names_the_file(tmp_path):
    prefix = tmp_path / "ds"
    (tmp_path / "ds.idx").write_bytes(b"MMIDIDX\x00\x00")
    with pytest.raises(ConfigError, match=r"data\.dataset .*ds\.idx has no .*ds\.bin"):
        load_splits(DataConfig(dataset=str(prefix)))


def test_a_document_without_newlines_is_cut_between_characters(tmp_path):
    from moe_train.data.sources import _utf8_cut

    text = "ab—東京🙂é" * 50  # 1- to 4-byte characters, no newline anywhere
    data = text.encode("utf-8")
    for end in range(1, 60):
        cut = _utf8_cut(data[:end])
        data[:cut].decode("utf-8")  # strict: no half character before the cut
        assert end - 3 <= cut <= end
    # Through prepare with tiny blocks: the byte ids are exactly the file's bytes.
    doc = tmp_path / "one-line.txt"
    doc.write_bytes(data)
    out = str(tmp_path / "out")
    prepare([str(doc)], out, "byte", 0.1, block_bytes=7)
    train, val, _ = splits(out)
    assert bytes(train[:-1] + val[:-1]) == data


def test_corrupt_gzip_names_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 100)[:40])
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz: not a valid gzip file"):
        prepare([str(bad)], str(tmp_path / "out"), "byte", 0.1)
