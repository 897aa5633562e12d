"""Export to Hugging Face: transformers' own MixtralForCausalLM, loaded from the
exported directory, must give our model's logits; configs Mixtral cannot
express must be refused with a one-line error naming the field."""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

from moe_train import cli  # noqa: E402
from moe_train.config import config_from_dict  # noqa: E402
from moe_train.model.transformer import build_model  # noqa: E402
from moe_train.train.checkpoint import save_checkpoint  # noqa: E402
from moe_train.train.export import (INDEX_FILE, SINGLE_FILE, ExportError,  # noqa: E402
                                    check_exportable, export_hf)

V, S = 96, 16
TOL = 1e-4


def tiny_cfg(overrides=()):
    """E=4 experts, top-2, GQA (4 query heads, 2 kv heads, head_dim 8)."""
    base = {
        "model": {"vocab_size": V, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "ffn_hidden_size": 24, "max_seq_len": 32,
                  "norm_eps": 1e-6},
        "moe": {"num_experts": 4, "top_k": 2},
        "train": {"seq_len": S, "global_batch_size": 2, "micro_batch_size": 2},
    }
    return config_from_dict(base, list(overrides))


def randomized_model(cfg, seed=0):
    """build_model, then O(1) random weights everywhere: the default init
    (std 0.02, norms at 1) makes every expert's output tiny and the norms
    interchangeable, so a wrong mapping could hide under the tolerance."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.moe)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "router" in name:  # decisive routing, different per token
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def load_hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    return model.eval()


def batch(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, S), generator=g)


def assert_same_logits(ours, hf, ids):
    with torch.no_grad():
        a = ours(ids).logits
        b = hf(ids).logits
    assert a.shape == b.shape == (ids.shape[0], ids.shape[1], V)
    assert a.abs().max() > 0.5  # the comparison is not between near-zero numbers
    diff = (a - b).abs().max().item()
    assert diff < TOL, f"max |ours - transformers| = {diff}"


VARIANTS = {
    "base": [],
    "tied_interleaved_topk_then_softmax": [
        "model.tie_embeddings=true", "model.rope.layout=interleaved",
        "moe.score_order=topk_then_softmax", "model.rope.base=500.0"],
    # top-1 exports only as topk_then_softmax (gate 1), which the config
    # refuses (the router would get no gradient): top-2 here.
    "rope_linear": ["model.rope.scaling={type: linear, factor: 4.0}"],
    "rope_ntk": ["model.rope.scaling={type: ntk, factor: 8.0}"],
    # base and original length put YaRN's ramp inside the 4 frequency pairs,
    # so beta_fast (not the default 32) changes the result.
    "rope_yarn": ["model.rope.base=50.0", "model.rope.scaling={type: yarn, factor: 4.0, "
                  "beta_fast: 8.0, original_max_position_embeddings: 512, attention_factor: 1.3}"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_mixtral_gives_our_logits(variant, tmp_path):
    cfg = tiny_cfg(VARIANTS[variant])
    model = randomized_model(cfg)
    out = export_hf(model, cfg, str(tmp_path / "hf"))
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", SINGLE_FILE,
                                       "tokenizer.json", "tokenizer_config.json"]
    hf = load_hf(out)
    c = hf.config
    assert (c.num_local_experts, c.num_experts_per_tok, c.num_key_value_heads) == (4, cfg.moe.top_k, 2)
    assert c.tie_word_embeddings == cfg.model.tie_embeddings
    assert_same_logits(model, hf, batch())
    assert_same_logits(model, hf, batch(seed=2, n=2)[:, :11])  # a shorter length too


def test_file_layout_is_what_transformers_writes_and_a_wrong_mapping_fails(tmp_path):
    cfg = tiny_cfg()
    model = randomized_model(cfg)
    out = export_hf(model, cfg, str(tmp_path / "hf"))
    hf = load_hf(out)

    # transformers' own save_pretrained writes the same names and shapes.
    hf.save_pretrained(str(tmp_path / "resaved"))
    def layout(path):
        with safe_open(os.path.join(path, SINGLE_FILE), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert layout(out) == layout(str(tmp_path / "resaved"))
    with open(os.path.join(out, "config.json")) as fh:
        config = json.load(fh)
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["intermediate_size"] == 24 and config["router_jitter_noise"] == 0.0

    # The comparison can fail: swap two experts of layer 0 in the HF model.
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(hf.model.layers[0].mlp.experts, name)
            w[[0, 1]] = w[[1, 0]].clone()
    with pytest.raises(AssertionError):
        assert_same_logits(model, hf, batch())


def test_sharded_export_loads_and_carries_the_tokenizer(tmp_path):
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    tokenizer.parent.mkdir()
    tokenizer.write_text('{"version": "1.0"}')
    cfg = tiny_cfg([f"data.tokenizer={tokenizer.parent}"])
    model = randomized_model(cfg, seed=3)
    out = export_hf(model, cfg, str(tmp_path / "hf"), max_shard_bytes=20_000)
    files = sorted(os.listdir(out))
    assert INDEX_FILE in files and SINGLE_FILE not in files
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == tokenizer.read_text()
    with open(os.path.join(out, INDEX_FILE)) as fh:
        index = json.load(fh)
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert_same_logits(model, load_hf(out), batch())


REFUSED = [
    ("model.position_embedding=alibi", "model.position_embedding is alibi"),
    ("moe.router=expert_choice", "moe.router is expert_choice"),
    ("moe.capacity_factor=1.0", "moe.capacity_factor is 1.0"),
    ("model.norm=layernorm", "model.norm is layernorm"),
    ("model.rope.scaling={type: dynamic, factor: 2.0}", "model.rope.scaling.type is dynamic"),
    ("model.rope.rotary_fraction=0.5", "model.rope.rotary_fraction is 0.5"),
    ("moe.layer_freq=2", "moe.layer_freq is 2"),
    ("moe.num_shared_experts=1", "moe.num_shared_experts is 1"),
    ("moe.noisy_gating=true", "moe.noisy_gating is true"),
    ("moe.expert_bias_update_rate=0.001", "moe.expert_bias_update_rate is 0.001"),
    ("moe.normalize_topk=false", "moe.normalize_topk is false"),
    ("moe.top_k=1", "moe.top_k is 1 with moe.score_order softmax_then_topk"),
    ("moe.activation=gelu", "moe.activation is gelu"),
    ("model.activation=gelu", "model.activation is gelu"),
    ("moe.num_experts=0", "moe.num_experts is 0"),
]


@pytest.mark.parametrize("override,message", REFUSED, ids=[o for o, _ in REFUSED])
def test_inexpressible_configs_are_refused_naming_the_field(override, message):
    cfg = tiny_cfg([override])
    with pytest.raises(ExportError) as err:
        check_exportable(cfg)
    text = str(err.value)
    assert text.startswith("cannot export to Mixtral: " + message)
    assert "\n" not in text and isinstance(err.value, ValueError)


def test_refused_export_writes_nothing(tmp_path):
    cfg = tiny_cfg(["model.position_embedding=alibi"])
    model = randomized_model(cfg)
    with pytest.raises(ExportError, match="transformers' Mixtral only has RoPE"):
        export_hf(model, cfg, str(tmp_path / "hf"))
    assert os.listdir(tmp_path) == []


def _checkpoint(model, cfg, run_dir):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    return save_checkpoint(str(run_dir), 2, model, opt, sched, cfg, keep_last=1)


def test_cli_exports_a_run_dir_and_a_checkpoint_dir(tmp_path, capsys):
    cfg = tiny_cfg(["model.rope.layout=interleaved"])
    model = randomized_model(cfg, seed=5)
    ckpt = _checkpoint(model, cfg, tmp_path / "run")
    ids = batch(seed=6)

    out = tmp_path / "hf"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf",
                     "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert_same_logits(model, load_hf(str(out)), ids)
    capsys.readouterr()  # transformers' loading progress

    # An existing output is refused, then replaced with --overwrite.
    argv = ["export", "--checkpoint", ckpt, "--output", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert cli.main(argv + ["--overwrite"]) == 0
    assert_same_logits(model, load_hf(str(out)), ids)
    assert sorted(os.listdir(tmp_path)) == ["hf", "run"]  # no temp dirs left behind


@pytest.mark.parametrize("case", ["format", "missing", "alibi", "usage"])
def test_cli_errors_are_one_line_and_exit_2(case, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["export", "--checkpoint", str(run), "--format", "hf", "--output", str(tmp_path / "hf")]
    expect = {"format": "--format gguf is not supported; the only format is hf",
              "missing": "does not exist",
              "alibi": "cannot export to Mixtral: model.position_embedding is alibi",
              "usage": "--output"}[case]
    if case == "format":
        argv[4] = "gguf"
    elif case == "alibi":
        cfg = tiny_cfg(["model.position_embedding=alibi"])
        _checkpoint(randomized_model(cfg), cfg, run)
    elif case == "usage":
        argv = argv[:5]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expect in err
    assert not (tmp_path / "hf").exists()
