"""Routing configs that cannot learn or do nothing are refused in one line;
a warmup longer than the run is a one-line warning; the balancing-loss
weight defaults to each paper's."""
import pytest

from moe_train.config import ConfigError, MoEConfig, load_config
from moe_train.config_validate import config_warnings


@pytest.mark.parametrize("override, needle", [
    (["moe.router=expert_choice", "moe.capacity_factor=9"], "moe.capacity_factor (9.0) must be <="),
    (["moe.top_k=1", "moe.score_order=topk_then_softmax"],
     "moe.score_order (topk_then_softmax) with moe.top_k 1 makes every gate 1"),
    (["model.num_layers=4", "moe.layer_freq=5"], "moe.layer_freq (5) must be <= model.num_layers (4)"),
    (["model.num_layers=4", "moe.layer_freq=2", "moe.first_k_dense=4"],
     "moe.layer_freq (2) and moe.first_k_dense (4) leave no MoE block"),
    (["train.lr=.inf"], "train.lr (inf) must be a finite number > 0"),
    (["train.lr=.nan"], "train.lr (nan) must be a finite number > 0"),
    (["moe.aux_loss_coef=.inf"], "moe.aux_loss_coef (inf) must be a finite number >= 0"),
])
def test_refused_in_one_line_naming_the_field(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


@pytest.mark.parametrize("override", [
    ["moe.router=expert_choice", "moe.capacity_factor=8"],
    # top-1 with gate 1 is fine when the bias balances without router gradient.
    ["moe.top_k=1", "moe.score_order=topk_then_softmax", "moe.expert_bias_update_rate=0.001"],
    ["moe.top_k=1", "moe.score_order=softmax_then_topk"],
    ["model.num_layers=4", "moe.layer_freq=4"],
    ["model.num_layers=4", "moe.layer_freq=2", "moe.first_k_dense=3"],
    ["moe.num_experts=0", "moe.layer_freq=9"],
])
def test_accepted(override):
    load_config(None, override)


def test_topk_then_softmax_top1_really_gets_no_router_gradient():
    # Why the refusal: with one expert per token the softmax over the single
    # chosen logit is 1 whatever the logit, so d(output)/d(router) = 0.
    import torch

    from moe_train.moe.layer import MoELayer

    def router_grad(order):
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig(num_experts=4, top_k=1, hidden_size=8, ffn_hidden_size=16,
                                   score_order=order, aux_loss="none"), init_std=0.5)
        layer(torch.randn(2, 3, 8)).output.square().sum().backward()
        return layer.router.weight.grad.abs().max().item()

    assert router_grad("topk_then_softmax") == 0.0
    assert router_grad("softmax_then_topk") > 1e-3


def test_warmup_longer_than_run_warns_in_one_line():
    cfg = load_config(None, ["train.max_steps=10", "train.warmup_steps=20"])
    (msg,) = config_warnings(cfg)
    assert msg.startswith("train.warmup_steps (20) > train.max_steps (10)") and "\n" not in msg
    assert "50%" in msg
    assert config_warnings(load_config(None, ["train.max_steps=20", "train.warmup_steps=20"])) == []


def test_aux_loss_weight_defaults_to_each_paper():
    # Shazeer et al. 2017 App. C.1: w_importance = w_load = 0.1 for the LMs;
    # Switch alpha = 1e-2. An explicit value wins.
    assert MoEConfig(aux_loss="shazeer").aux_loss_weight == 0.1
    assert MoEConfig(aux_loss="switch").aux_loss_weight == 0.01
    assert MoEConfig(aux_loss="sequence").aux_loss_weight == 0.01
    assert MoEConfig(aux_loss="shazeer", aux_loss_coef=0.3).aux_loss_weight == 0.3
    assert load_config(None, ["moe.aux_loss=shazeer"]).moe.aux_loss_weight == 0.1


def test_moe_layer_alone_defaults_to_swiglu():
    import torch

    from moe_train.moe.layer import MoELayer

    layer = MoELayer(MoEConfig(num_experts=4, hidden_size=8, ffn_hidden_size=16))
    assert layer.cfg.activation == "swiglu"
    assert layer(torch.randn(2, 3, 8)).output.shape == (2, 3, 8)
