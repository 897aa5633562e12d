"""A complete export: AutoTokenizer reads the byte tokenizer's
tokenizer.json and gives the training ids, pipeline("text-generation") runs
on the export directory, generation_config.json loads, and the files have
ordinary permissions (0644 in a 0755 directory under umask 022)."""
from __future__ import annotations

import os
import stat

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from moe_train.data.tokenizer import ByteTokenizer  # noqa: E402
from moe_train.train.export import export_hf  # noqa: E402
from tests.integration.test_export_hf import randomized_model, tiny_cfg  # noqa: E402

TEXTS = ["Hello, world!", "  leading spaces, tabs\tand\nnewlines\r\n",
         "ünïcödé: 日本語, emoji 🙂, NUL \x00 and DEL \x7f", "ROMEO:\nBut soft! what light"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    old = os.umask(0o022)
    try:
        cfg = tiny_cfg(["model.vocab_size=384"])  # 257 ids rounded up to 128, as training does
        out = export_hf(randomized_model(cfg), cfg, str(tmp_path_factory.mktemp("e") / "hf"))
    finally:
        os.umask(old)
    return out


def test_auto_tokenizer_gives_the_training_ids(export_dir):
    tok = transformers.AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
    assert len(tok) == 257 and tok.eos_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|endoftext|>") == ByteTokenizer.eod_id
    ours = ByteTokenizer()
    for text in TEXTS:
        assert tok(text)["input_ids"] == ours.encode(text), text
        assert tok.decode(ours.encode(text)) == text
    # The vocabulary holds exactly the 256 ids, each its own token.
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(list(range(256)))) == list(range(256))


def test_pipeline_generates_text(export_dir):
    pipe = transformers.pipeline("text-generation", model=export_dir, device="cpu")
    prompt = "ROMEO:"
    out = pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert isinstance(out, str) and out.startswith(prompt) and len(out.encode("utf-8", "replace")) > len(prompt)


def test_generation_config_loads(export_dir):
    gen = transformers.GenerationConfig.from_pretrained(export_dir)
    assert gen.max_length == 32 and gen.do_sample is False
    assert gen.eos_token_id == ByteTokenizer.eod_id


def test_ordinary_permissions(export_dir):
    assert stat.S_IMODE(os.stat(export_dir).st_mode) == 0o755
    names = os.listdir(export_dir)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "config.json", "model.safetensors"} <= set(names)
    for name in names:
        assert stat.S_IMODE(os.stat(os.path.join(export_dir, name)).st_mode) == 0o644, name


def test_a_local_tokenizer_json_gives_the_training_ids_too(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from moe_train.data.tokenizer import HFTokenizer

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=120,
                                                            special_tokens=["[UNK]", "</s>"]))
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    ours = HFTokenizer(str(path))
    cfg = tiny_cfg([f"data.tokenizer={path}", f"model.vocab_size={ours.vocab_size}"])
    out = export_hf(randomized_model(cfg), cfg, str(tmp_path / "hf"))
    auto = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in TEXTS[::3]:
        assert auto(text)["input_ids"] == ours.encode(text), text
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == ours.eod_id == 1


def test_the_tokenizers_own_config_files_travel_with_it(tmp_path):
    from moe_train.train.export_files import byte_tokenizer_json

    src = tmp_path / "imported"
    src.mkdir()
    (src / "tokenizer.json").write_text(byte_tokenizer_json())
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast", '
                                               '"eos_token": "A"}')
    (src / "generation_config.json").write_text('{"eos_token_id": 65, "max_length": 20}')
    cfg = tiny_cfg([f"data.tokenizer={src / 'tokenizer.json'}", "model.vocab_size=384"])
    out = export_hf(randomized_model(cfg), cfg, str(tmp_path / "hf"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).read_text() == (src / name).read_text(), name
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == 65
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "A"
