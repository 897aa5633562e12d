"""``moe-train plan``: the zoo's parameter counts against the published
figures (references.md), the activation estimate against the tensors autograd
really saves, the JSON contract and the one-line layout errors. The per-rank
bytes against a real world-2 EP=2 run are in
tests/distributed/test_plan_memory.py."""
import json
import os

import pytest
import torch

from moe_train.cli import main as cli_main
from moe_train.config import config_from_dict, load_config
from moe_train.plan import activation_bytes, count_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ZOO = os.path.join(ROOT, "configs", "models")

# references.md, "Published model sizes": totals / actives from the model cards.
PUBLISHED = {
    "olmoe-1b-7b": (6.9e9, 1.3e9),
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
    "deepseek-moe-16b": (16.4e9, 2.8e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_zoo_counts_equal_the_published_totals_and_actives(name):
    counts = count_params(load_config(os.path.join(ZOO, f"{name}.yaml")))
    total, active = PUBLISHED[name]
    # The published figures are rounded to 0.1B: 2% covers the rounding
    # (1.3B active of OLMoE is 1.28B counted, 1.5% off).
    assert counts.total == pytest.approx(total, rel=0.02)
    assert counts.active == pytest.approx(active, rel=0.02)


def test_gpu_1b_is_about_one_billion():
    from moe_train.plan import make_plan

    plan = make_plan(load_config(os.path.join(ZOO, "gpu-1b.yaml")), 1)  # vocab from the data: 384
    assert 0.8e9 < plan["total_params"] < 1.2e9


SMALL = [
    {"model": {"vocab_size": 256, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
               "num_kv_heads": 2, "ffn_hidden_size": 128, "max_seq_len": 64},
     "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 96},
     "train": {"micro_batch_size": 4, "seq_len": 64, "global_batch_size": 4}},
    {"model": {"vocab_size": 64, "hidden_size": 128, "num_layers": 3, "num_heads": 4,
               "ffn_hidden_size": 256, "max_seq_len": 64},
     "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 64, "first_k_dense": 1,
             "num_shared_experts": 1},
     "train": {"micro_batch_size": 2, "seq_len": 64, "global_batch_size": 2}},
]


@pytest.mark.parametrize("data", SMALL, ids=["gqa-moe", "dense-first-shared"])
def test_activation_estimate_is_within_20_percent_of_what_autograd_saves(data):
    from moe_train.model.transformer import build_model

    cfg = config_from_dict(data)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    est = activation_bytes(cfg, 1)
    assert est["none"] == pytest.approx(sum(saved.values()), rel=0.2)
    assert est["full"] < est["selective"] < est["none"]


def test_json_has_the_contract_keys(capsys):
    assert cli_main(["plan", "--set", "parallel.expert_parallel_size=2", "--world", "4",
                     "--set", "train.global_batch_size=32",
                     "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"total_params", "active_params", "per_rank_bytes"} <= set(plan)
    cfg = load_config(None)
    cfg.model.vocab_size = 384  # tiny.yaml leaves it null: byte 257 ids rounded up to 128s
    assert plan["total_params"] == sum(p.numel() for p in
                                       __import__("moe_train.model.transformer", fromlist=["x"])
                                       .build_model(cfg.model, cfg.moe).parameters())
    # EP=2 halves the experts; the fp32 native engine keeps 4+4+8 bytes each.
    rb = plan["per_rank_bytes"]
    assert rb["grads"] == rb["params"] and rb["optimizer"] == 2 * rb["params"]


@pytest.mark.parametrize("args, field", [
    (["--world", "3", "--set", "parallel.expert_parallel_size=2"], "parallel.expert_parallel_size"),
    (["--world", "2", "--set", "parallel.tensor_parallel_size=4"], "parallel.tensor_parallel_size"),
    (["--world", "0"], "--world"),
    (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
])
def test_impossible_layouts_get_the_train_errors(args, field, capsys):
    assert cli_main(["plan"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and field in err and "\n" not in err


@pytest.mark.parametrize("stage, sharded", [(0, 0), (1, 12), (2, 14)])
def test_deepspeed_bytes_follow_the_zero_paper(tmp_path, stage, sharded):
    # references.md: 16 bytes per parameter under mixed precision (bf16
    # weights and grads, fp32 master and two moments); ZeRO-1 shards 12 of
    # them, ZeRO-2 14 (ZeRO-3, all 16, is refused with expert parallelism).
    from moe_train.plan import make_plan

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": stage}}))
    world = 4
    cfg = load_config(None, ["moe.num_experts=0", f"train.deepspeed_config={ds}",
                             "train.precision=bf16", "train.global_batch_size=32"], world)
    plan = make_plan(cfg, world)
    P = plan["total_params"]
    assert plan["per_rank_bytes"]["total"] == pytest.approx((16 - sharded) * P + sharded * P / world,
                                                            abs=4)


def test_native_bytes_shard_over_dp_shard_size_and_experts_over_ep():
    from moe_train.plan import make_plan

    cfg = load_config(None, ["parallel.dp_shard_size=4", "parallel.expert_parallel_size=2",
                             "train.global_batch_size=32"], 4)
    plan = make_plan(cfg, 4)
    expert = plan["expert_params"]
    dense = plan["total_params"] - expert
    # dense over the 4 sharding ranks; experts over EP 2 and then over the
    # gcd(4, dp/ep = 2) = 2 expert-data-parallel ranks that can shard them.
    want = 4 * (dense / 4 + expert / 2 / 2)
    assert plan["per_rank_bytes"]["params"] == pytest.approx(want, abs=1)
