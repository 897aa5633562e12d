"""The files of an exported model directory besides its weights and
config.json: the tokenizer, ``generation_config.json`` and ordinary file
permissions, so that ``AutoTokenizer.from_pretrained(DIR)`` and
``pipeline("text-generation", model=DIR)`` work on the export as on any
published model.

- Byte tokenizer (``data.tokenizer: byte``): a ``tokenizer.json`` built with
  the ``tokenizers`` library, 256 tokens with id = byte value, plus the
  end-of-document id 256 as the special token ``<|endoftext|>`` (the eos of
  ``generation_config.json``). It is GPT-2's byte-level scheme with no
  merges: the ByteLevel pre-tokenizer maps each UTF-8 byte to one printable
  character, the BPE vocabulary maps that character back to the byte's
  value, and the ByteLevel decoder undoes the mapping. So the ids equal
  :class:`moe_train.data.tokenizer.ByteTokenizer`'s for every text.
- A Hugging Face ``tokenizer.json`` (``data.tokenizer: PATH``) is copied,
  with the ``tokenizer_config.json``, ``special_tokens_map.json`` and
  ``generation_config.json`` beside it when there are (a model brought in by
  ``moe-train import`` keeps its own special tokens and eos that way).
- Otherwise ``tokenizer_config.json`` names the generic
  ``PreTrainedTokenizerFast``: AutoTokenizer would pick the class of the
  architecture (LlamaTokenizerFast for Mixtral), whose defaults (a BOS
  token, legacy spacing) do not match the training encoding.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

from moe_train.config import Config

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
BYTE_EOD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters
    (the ``tokenizers`` ByteLevel pre-tokenizer applies the same map)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    out, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_tokenizer_json() -> str:
    """The ``tokenizer.json`` text of the byte tokenizer: 256 tokens, id =
    byte, and ``<|endoftext|>`` = 256, the end-of-document id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from moe_train.data.tokenizer import ByteTokenizer

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: the whole text becomes its bytes, nothing added.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOD_TOKEN, special=True)])
    assert tok.token_to_id(BYTE_EOD_TOKEN) == ByteTokenizer.eod_id
    return tok.to_str(pretty=True)


def _tokenizer_source(cfg: Config) -> Optional[str]:
    tok = cfg.data.tokenizer
    path = os.path.join(tok, TOKENIZER_FILE) if os.path.isdir(tok) else tok
    return path if os.path.isfile(path) else None


def eod_id(cfg: Config) -> Optional[int]:
    """The end-of-document id of ``data.tokenizer`` (None when it has none)."""
    from moe_train.config import ConfigError
    from moe_train.data.tokenizer import build_tokenizer

    try:
        return int(build_tokenizer(cfg.data.tokenizer).eod_id)
    except (ConfigError, ValueError, OSError):
        return None


def generation_config(cfg: Config) -> dict:
    """``generation_config.json``: greedy, with the length limit of the model
    (positions beyond ``model.max_seq_len`` were never trained) and the
    end-of-document id as eos, where generation stops (as ``moe-train
    generate`` does)."""
    return {"max_length": cfg.model.max_seq_len, "do_sample": False,
            "bos_token_id": None, "eos_token_id": eod_id(cfg), "pad_token_id": None}


def write_tokenizer(cfg: Config, directory: str) -> bool:
    """Write the tokenizer files of ``cfg.data.tokenizer`` into ``directory``;
    False when there is no local tokenizer file to export."""
    if cfg.data.tokenizer == "byte":
        with open(os.path.join(directory, TOKENIZER_FILE), "w") as fh:
            fh.write(byte_tokenizer_json())
    else:
        source = _tokenizer_source(cfg)
        if source is None:
            return False
        shutil.copyfile(source, os.path.join(directory, TOKENIZER_FILE))
        for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE, GENERATION_CONFIG_FILE):
            sibling = os.path.join(os.path.dirname(source), name)
            if os.path.isfile(sibling):
                shutil.copyfile(sibling, os.path.join(directory, name))
        if os.path.isfile(os.path.join(directory, TOKENIZER_CONFIG_FILE)):
            return True
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                        "model_max_length": cfg.model.max_seq_len,
                        "clean_up_tokenization_spaces": False}
    if cfg.data.tokenizer == "byte":
        tokenizer_config["eos_token"] = BYTE_EOD_TOKEN
    with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w") as fh:
        json.dump(tokenizer_config, fh, indent=2)
        fh.write("\n")
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_permissions(directory: str) -> None:
    """Give ``directory`` and everything in it the modes a plain ``mkdir`` and
    ``open`` would (0755 and 0644 under the usual umask 022): the temporary
    directory the export is written in starts private (0700)."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_export_files(cfg: Config, directory: str) -> None:
    """Tokenizer files, ``generation_config.json`` and permissions of an
    export being written in ``directory`` (call last, after the weights)."""
    write_tokenizer(cfg, directory)
    if not os.path.isfile(os.path.join(directory, GENERATION_CONFIG_FILE)):
        with open(os.path.join(directory, GENERATION_CONFIG_FILE), "w") as fh:
            json.dump(generation_config(cfg), fh, indent=2)
            fh.write("\n")
    set_permissions(directory)
