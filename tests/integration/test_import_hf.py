"""``moe-train import`` against transformers' own models, built locally from
tiny random configs (no download): Mixtral, OLMoE and Qwen3-MoE import with
HF's logits, export back to the same tensors, train from the import; dense
Llama, Mistral and Qwen3 upcycle into an MoE whose logits equal the dense
model's; bad input is one line and exit status 2."""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

from moe_train import cli, load_model  # noqa: E402
from moe_train.config import config_from_dict  # noqa: E402
from moe_train.hf.convert import hf_to_model  # noqa: E402
from moe_train.hf.importer import import_hf, read_tensors  # noqa: E402

V = 384  # >= the byte tokenizer (256 bytes + EOD), so the import also trains on the bundled corpus
COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-6)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=24, num_local_experts=4,
                                                  num_experts_per_tok=2, **COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=24, num_experts=4,
                                              num_experts_per_tok=2, norm_topk_prob=False,
                                              eos_token_id=None, pad_token_id=None, **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[0], **COMMON),
    "llama": lambda: transformers.LlamaConfig(intermediate_size=40, **COMMON),
    "mistral": lambda: transformers.MistralConfig(intermediate_size=40, sliding_window=None, **COMMON),
    "qwen3": lambda: transformers.Qwen3Config(intermediate_size=40, head_dim=16,
                                              tie_word_embeddings=True, **COMMON),
}
MOE, DENSE = ("mixtral", "olmoe", "qwen3_moe"), ("llama", "mistral", "qwen3")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """model_type -> a saved transformers checkpoint with O(1) random weights
    (the default init, std 0.02 and norms at 1, would hide a wrong mapping
    under the tolerance) and a tokenizer.json to be copied."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for mt, make in CONFIGS.items():
        model = transformers.AutoModelForCausalLM.from_config(make())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(1.0 + 0.3 * torch.randn_like(p))
                elif name.endswith("gate.weight"):  # routers: decisive, per-token routing
                    p.copy_(torch.randn_like(p))
                else:
                    p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        path = str(root / mt)
        model.save_pretrained(path)
        with open(os.path.join(path, "tokenizer.json"), "w") as fh:
            fh.write('{"fake": "copied as is"}')
        out[mt] = path
    return out


def hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        return model(ids).logits


def ids_for(seed=0, S=24):
    return torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mt", MOE)
def test_import_gives_transformers_logits(hf_dirs, tmp_path, mt):
    out = import_hf(hf_dirs[mt], str(tmp_path / "imp"))
    model, cfg = load_model(out)
    ids = ids_for()
    with torch.no_grad():
        ours = model(ids).logits
    want = hf_logits(hf_dirs[mt], ids)
    assert want.abs().max() > 1.0  # O(1) logits, so 1e-4 is a real bound
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    assert open(os.path.join(out, "tokenizer.json")).read() == '{"fake": "copied as is"}'
    assert cfg.data.tokenizer == os.path.join(out, "tokenizer.json")
    if mt == "qwen3_moe":
        assert cfg.moe.first_k_dense == 1 and cfg.model.head_dim == 16


@pytest.mark.parametrize("mt", MOE)
def test_export_round_trip_is_exact(hf_dirs, tmp_path, mt):
    from moe_train.train.export import export_hf

    model, cfg = load_model(import_hf(hf_dirs[mt], str(tmp_path / "imp")))
    exported = export_hf(model, cfg, str(tmp_path / "exp"))
    with open(os.path.join(exported, "config.json")) as fh:
        assert json.load(fh)["model_type"] == mt
    a = read_tensors([os.path.join(hf_dirs[mt], "model.safetensors")])
    with safe_open(os.path.join(exported, "model.safetensors"), "pt") as f:
        b = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = ids_for(1)
    torch.testing.assert_close(hf_logits(exported, ids), hf_logits(hf_dirs[mt], ids),
                               rtol=0, atol=0)


@pytest.mark.parametrize("mt", DENSE)
def test_upcycled_logits_equal_the_dense_model(hf_dirs, tmp_path, mt):
    out = import_hf(hf_dirs[mt], str(tmp_path / "up"), upcycle_experts=4,
                    overrides=["moe.top_k=2"])
    moe, cfg = load_model(out)
    assert cfg.moe.num_experts == 4 and all(b.is_moe for b in moe.blocks)
    dense_cfg = config_from_dict(cfg.to_dict(), ["moe.num_experts=0"])
    from moe_train.model.transformer import build_model

    dense = build_model(dense_cfg.model, dense_cfg.moe).eval()
    hf_to_model(read_tensors([os.path.join(hf_dirs[mt], "model.safetensors")]), dense, mt)
    ids = ids_for(2)
    with torch.no_grad():
        got, want = moe(ids).logits, dense(ids).logits
    # Every expert is the dense MLP and the two gates sum to 1 in fp32, so
    # the only difference is the rounding of g1*y + g2*y (~1e-7 relative).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(want, hf_logits(hf_dirs[mt], ids), rtol=1e-4, atol=1e-4)
    assert cfg.model.tie_embeddings == (mt == "qwen3")
    # The routers start random, not uniform: the experts are told apart from step 1.
    assert moe.blocks[0].ffn.router.weight.abs().sum() > 0


def test_five_steps_from_an_import_lower_the_loss(hf_dirs, tmp_path):
    from moe_train.parallel.topology import Topology
    from moe_train.train.trainer import Trainer

    out = import_hf(hf_dirs["mixtral"], str(tmp_path / "imp"), overrides=["data.tokenizer=byte"])
    cfg = config_from_dict(
        load_model(out)[1].to_dict(),
        ["train.init_from=" + out, "train.max_steps=5", "train.warmup_steps=0", "train.lr=1e-2",
         "train.min_lr=1e-2", "train.seq_len=32", "train.global_batch_size=4",
         "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=0",
         "train.save_every=0", f"train.run_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, Topology())
    imported = dict(load_model(out)[0].named_parameters())
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), imported[name].detach()), name
    assert trainer.start_step == 0
    summary = trainer.fit()
    assert summary["steps"] == 5
    assert summary["train_loss"] < summary["first_loss"]


def _run(args, capsys):
    code = cli.main(["import"] + args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_input_is_one_line_exit_2(hf_dirs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _run(["--hf", str(empty), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "config.json" in err and "\n" not in err

    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (gpt / "model.safetensors").write_bytes(b"")
    code, err = _run(["--hf", str(gpt), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "'gpt2'" in err and "mixtral, olmoe, qwen3_moe" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(open(os.path.join(hf_dirs["mixtral"], "config.json")).read())
    (broken / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    code, err = _run(["--hf", str(broken), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "model-00002-of-00002.safetensors" in err and "\n" not in err

    from safetensors.torch import save_file

    short = tmp_path / "short"
    short.mkdir()
    (short / "config.json").write_text(open(os.path.join(hf_dirs["mixtral"], "config.json")).read())
    tensors = read_tensors([os.path.join(hf_dirs["mixtral"], "model.safetensors")])
    del tensors["model.norm.weight"]
    save_file(tensors, str(short / "model.safetensors"), metadata={"format": "pt"})
    code, err = _run(["--hf", str(short), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "no tensor model.norm.weight" in err and "\n" not in err

    code, err = _run(["--hf", hf_dirs["llama"], "--upcycle-experts", "1",
                      "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "--upcycle-experts (1) must be >= 2" in err
    code, err = _run(["--hf", hf_dirs["llama"], "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "--upcycle-experts" in err
    assert not (tmp_path / "o").exists()


NATIVE = {
    "qwen3_moe": ["model.qk_norm=head", "model.kv_channels=16", "moe.first_k_dense=1",
                  "moe.normalize_topk=false", "moe.top_k=1"],
    "olmoe": ["model.qk_norm=projection", "moe.score_order=topk_then_softmax"],
    "mixtral": ["model.rope.layout=interleaved"],
}


@pytest.mark.parametrize("mt", sorted(NATIVE))
def test_export_picks_the_architecture_and_gives_our_logits(tmp_path, mt):
    from moe_train.model.transformer import build_model
    from moe_train.train.export import export_hf

    cfg = config_from_dict({"model": {"vocab_size": V, "hidden_size": 32, "num_layers": 3,
                                      "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 40,
                                      "max_seq_len": 32, "norm_eps": 1e-6},
                            "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 24},
                            "train": {"seq_len": 32}}, NATIVE[mt])
    torch.manual_seed(3)
    model = build_model(cfg.model, cfg.moe).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.dim() == 1 else
                    torch.randn_like(p) if "router" in name else
                    torch.randn_like(p) / p.shape[-1] ** 0.5)
    out = export_hf(model, cfg, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert hf.config.model_type == mt
    ids = ids_for(4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sets, message", [
    (["model.qk_norm=head", "moe.num_shared_experts=1"],
     "cannot export to Qwen3-MoE: moe.num_shared_experts is 1; Mixtral, OLMoE and Qwen3-MoE "
     "have no shared experts"),
    (["model.qk_norm=projection", "moe.first_k_dense=1"],
     "cannot export to OLMoE: moe.first_k_dense is 1; OLMoE has an MoE feed-forward in every block"),
    (["model.qk_norm=projection", "model.kv_channels=16"],
     "cannot export to OLMoE: model.kv_channels is 16"),
    (["moe.first_k_dense=1"], "cannot export to Mixtral: moe.first_k_dense is 1"),
])
def test_what_no_architecture_expresses_is_refused_with_the_reason(sets, message):
    from moe_train.train.export import ExportError, check_exportable

    cfg = config_from_dict({"model": {"vocab_size": V, "hidden_size": 32, "num_layers": 2,
                                      "num_heads": 4, "max_seq_len": 32},
                            "train": {"seq_len": 32}}, sets)
    with pytest.raises(ExportError) as err:
        check_exportable(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
