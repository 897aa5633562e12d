"""HSDP's layout rule: experts shard over gcd(dp_shard_size, dp / ep)
expert-data-parallel ranks, and a gcd of 1 (with more than one such rank)
is refused in one line naming the field; FSDP with TP is accepted. (Training under HSDP against one
process: tests/distributed/test_fsdp.py.)"""
import pytest

from moe_train.config import ConfigError, load_config
from moe_train.parallel.fsdp import expert_shard_size
from moe_train.train.trainer import _refuse_unbuilt


@pytest.mark.parametrize("shard,expert_dp,want", [(2, 4, 2), (4, 2, 2), (8, 8, 8), (2, 1, 1),
                                                  (4, 6, 2)])
def test_expert_shard_size_is_the_gcd(shard, expert_dp, want):
    assert expert_shard_size(shard, expert_dp) == want


def _cfg(*extra):
    return load_config(None, ["parallel.tensor_parallel_size=1", *extra])


def test_hsdp_accepted_when_experts_share_a_factor(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    _refuse_unbuilt(_cfg("parallel.dp_shard_size=2", "parallel.expert_parallel_size=2"))
    _refuse_unbuilt(_cfg("parallel.dp_shard_size=4", "parallel.expert_parallel_size=4"))


def test_hsdp_refused_when_experts_share_no_factor(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "12")  # dp 12, ep 4: 3 expert-data-parallel ranks
    with pytest.raises(ConfigError, match=r"^parallel.dp_shard_size \(2\) shares no factor "
                                          r"with the expert-data-parallel size 3"):
        _refuse_unbuilt(_cfg("parallel.dp_shard_size=2", "parallel.expert_parallel_size=4"))


def test_fsdp_and_hsdp_accepted_with_tensor_parallelism(monkeypatch):
    # Built (parallel/fsdp.py); trained against world 1 in test_fsdp.py.
    monkeypatch.setenv("WORLD_SIZE", "8")  # tp 2, dp 4
    for shard in (2, 4):
        _refuse_unbuilt(load_config(None, ["parallel.tensor_parallel_size=2",
                                           f"parallel.dp_shard_size={shard}",
                                           "parallel.expert_parallel_size=2"]))
