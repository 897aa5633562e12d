import pytest

from moe_train.config import ConfigError, config_from_dict, load_config, moe_for_model


def test_default_config_loads_and_validates():
    cfg = load_config(None)
    assert cfg.moe.num_experts > 0 and cfg.model.hidden_size % cfg.model.num_heads == 0


@pytest.mark.parametrize("override, needle", [
    (["moe.top_k=9"], "moe.top_k"),
    (["model.num_heads=3"], "model.num_heads"),
    (["model.num_kv_heads=3"], "model.num_kv_heads"),
    (["train.seq_len=4096"], "train.seq_len"),
    (["train.lr=-1"], "train.lr"),
    (["moe.router=random"], "moe.router"),
    (["moe.bogus=1"], "moe.bogus"),
    (["train.max_steps=ten"], "train.max_steps"),
    (["moe.normalize_topk=3"], "moe.normalize_topk"),
    (["train.recompute=some"], "train.recompute"),
    (["parallel.dp_shard_size=0"], "parallel.dp_shard_size"),
    (["parallel.dp_shard_size=2", "train.deepspeed_config=ds.json"], "parallel.dp_shard_size"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_ep_must_divide_experts():
    with pytest.raises(ConfigError, match="parallel.expert_parallel_size"):
        config_from_dict({"moe": {"num_experts": 6}, "parallel": {"expert_parallel_size": 4}})


def test_world_size_rules():
    with pytest.raises(ConfigError, match="global_batch_size"):
        config_from_dict({"train": {"global_batch_size": 6, "micro_batch_size": 2}}, world_size=2)


def test_dp_shard_size_divides_the_data_parallel_size():
    base = {"train": {"global_batch_size": 48, "micro_batch_size": 1},
            "parallel": {"tensor_parallel_size": 2, "dp_shard_size": 4}}
    with pytest.raises(ConfigError, match=r"parallel.dp_shard_size \(4\) must divide the "
                                          r"data-parallel size \(6"):
        config_from_dict(base, world_size=12)
    assert config_from_dict(base, world_size=16).parallel.dp_shard_size == 4
    for recompute in ("none", "full", "selective"):
        assert load_config(None, [f"train.recompute={recompute}"]).train.recompute == recompute


def test_overrides_parse_yaml_scalars_and_nested_sections():
    cfg = load_config(None, ["moe.capacity_factor=1.25", "model.rope.layout=interleaved",
                             "model.rope.scaling={type: linear, factor: 2.0}"])
    assert cfg.moe.capacity_factor == 1.25
    assert cfg.model.rope.layout == "interleaved"
    assert cfg.model.rope.scaling.factor == 2.0


def test_moe_sizes_filled_from_model():
    cfg = load_config(None)
    moe = moe_for_model(cfg.moe, cfg.model)
    assert moe.hidden_size == cfg.model.hidden_size and moe.activation == cfg.model.activation


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 reads 1e-3 as a string; a float field must still take it.
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
