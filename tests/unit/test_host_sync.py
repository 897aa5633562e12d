"""Host-sync budgets of one MoE layer's forward and backward with
``moe.expert_impl = grouped_mm`` (issue 10, part 2), counted on CPU by a
TorchDispatchMode over the ops that synchronise on CUDA (tests/sync_counter.py):

- dropless token choice at EP=1: none (router top-k, permute, dispatch,
  grouped experts, combine, losses, stats; forward and backward);
- capacity (drops) and expert choice by position: at most one (how many
  assignments were kept); expert choice over the batch: none;
- the counter itself sees what it must (a test that it can fail).

The EP>1 budget (only the split-size exchange) is checked in
tests/distributed/test_ep_layer.py.
"""
import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.moe import MoELayer
from sync_counter import SyncCounter

D, FFN, E = 16, 32, 8


def run_layer(**overrides):
    torch.manual_seed(0)
    fields = dict(num_experts=E, top_k=2, hidden_size=D, ffn_hidden_size=FFN,
                  activation="swiglu", expert_impl="grouped_mm")
    fields.update(overrides)
    layer = MoELayer(MoEConfig(**fields), init_std=0.3)
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    x = torch.randn(4, 6, D, requires_grad=True)
    probe = torch.randn(4, 6, D)
    with SyncCounter() as counter:
        out = layer(x)
        ((out.output * probe).sum() + out.aux_loss).backward()
        for value in out.stats.values():   # the per-step stats stay on the device too
            value.add(1)
    assert x.grad is not None and layer.experts.w1.grad is not None
    return counter


@pytest.mark.parametrize("overrides", [
    {},
    {"top_k": 1, "score_order": "topk_then_softmax"},
    {"aux_loss": "sequence", "z_loss_coef": 1e-3},
    {"aux_loss": "shazeer"},
    {"num_shared_experts": 1},
    {"activation": "gelu"},
], ids=["top2", "top1_mixtral", "sequence_loss_zloss", "shazeer", "shared", "gelu"])
def test_dropless_grouped_mm_makes_no_host_sync(overrides):
    counter = run_layer(**overrides)
    assert counter.total == 0, dict(counter.counts)


@pytest.mark.parametrize("overrides", [
    {"capacity_factor": 1.0},
    {"router": "expert_choice", "z_loss_coef": 1e-3},
    {"router": "expert_choice", "capacity_factor": 1.0},
], ids=["token_choice_capacity", "expert_choice_position", "expert_choice_position_c1"])
def test_capacity_makes_at_most_one_host_sync(overrides):
    counter = run_layer(**overrides)
    assert counter.total <= 1, dict(counter.counts)


def test_expert_choice_over_the_batch_makes_no_host_sync():
    # Every expert keeps exactly its k of the one group: shapes are known.
    with pytest.warns(UserWarning, match="leaks the future"):
        counter = run_layer(router="expert_choice", expert_choice_group="batch")
    assert counter.total == 0, dict(counter.counts)


def test_the_counter_sees_every_kind():
    t = torch.tensor([1, 0, 2])
    mask = t > 0
    with SyncCounter() as counter:
        t.sum().item()
        t.nonzero()
        t.masked_select(mask)
        t[mask]
        t.repeat_interleave(t)
        t.repeat_interleave(t, output_size=3)   # not a sync
        torch.unique(t)
        torch.bincount(t)
        t.tolist()
        t.index_select(0, t)                      # not a sync
    assert dict(counter.counts) == {
        "_local_scalar_dense": 1, "nonzero": 1, "masked_select": 1, "bool_index": 1,
        "repeat_interleave_without_output_size": 1, "unique": 1, "bincount": 1, "tolist": 1}


def test_loop_impl_counts_its_split():
    # The CPU loop reads the counts on the host to split the rows: the
    # counter must see it (so the zero above is not the counter's blindness).
    counter = run_layer(expert_impl="loop")
    assert counter.total >= 1
