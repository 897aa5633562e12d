"""Model features of real MoE families, each against transformers' own module
built from a tiny random config (no download): head dim apart from
hidden/heads and per-head QK-norm (Qwen3-MoE), whole-projection QK-norm
(OLMoE), the sigmoid-gated shared expert of its own width (Qwen2-MoE),
first-k dense blocks (DeepSeekMoE) and an expert width apart from the dense
one."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_train.config import ModelConfig, MoEConfig  # noqa: E402
from moe_train.hf.experts_io import set_expert_weights  # noqa: E402
from moe_train.model.attention import Attention  # noqa: E402
from moe_train.model.mlp import MLP  # noqa: E402
from moe_train.model.transformer import build_model  # noqa: E402
from moe_train.moe.layer import MoELayer  # noqa: E402


def _hf_attention(module_cls, rotary_cls, hf_cfg, x):
    hf_cfg._attn_implementation = "sdpa"  # no mask -> is_causal, as ours
    torch.manual_seed(1)
    attn = module_cls(hf_cfg, layer_idx=0).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    pos = torch.arange(x.shape[1])[None]
    cos_sin = rotary_cls(hf_cfg)(x, pos)
    return attn, attn(x, cos_sin, None)[0]


def _copy_attention(ours: Attention, hf) -> None:
    with torch.no_grad():
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            getattr(ours, a).weight.copy_(getattr(hf, b).weight)
        ours.q_norm.weight.copy_(hf.q_norm.weight)
        ours.k_norm.weight.copy_(hf.k_norm.weight)


def test_head_dim_and_per_head_qk_norm_equal_qwen3_moe_attention():
    from transformers.models.qwen3_moe import modeling_qwen3_moe as q3

    hf_cfg = transformers.Qwen3MoeConfig(hidden_size=32, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                         rope_theta=1000.0, vocab_size=16, num_hidden_layers=1)
    x = torch.randn(2, 7, 32)
    hf, want = _hf_attention(q3.Qwen3MoeAttention, q3.Qwen3MoeRotaryEmbedding, hf_cfg, x)
    ours = Attention(ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=2, kv_channels=16,
                                 qk_norm="head", norm_eps=1e-6,
                                 rope=_rope(1000.0)))
    assert ours.wq.weight.shape == (64, 32) and ours.q_norm.weight.shape == (16,)
    _copy_attention(ours, hf)
    torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.forward_reference(x), want, rtol=1e-5, atol=1e-5)


def _rope(base):
    from moe_train.config import RopeConfig

    return RopeConfig(base=base)


def test_projection_qk_norm_equals_olmoe_attention():
    from transformers.models.olmoe import modeling_olmoe as ol

    hf_cfg = transformers.OlmoeConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      rms_norm_eps=1e-5, vocab_size=16, num_hidden_layers=1)
    x = torch.randn(2, 7, 32)
    hf, want = _hf_attention(ol.OlmoeAttention, ol.OlmoeRotaryEmbedding, hf_cfg, x)
    ours = Attention(ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=2,
                                 qk_norm="projection", rope=_rope(hf_cfg.rope_parameters["rope_theta"])))
    assert ours.q_norm.weight.shape == (32,) and ours.k_norm.weight.shape == (16,)
    _copy_attention(ours, hf)
    torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)


def test_gated_shared_expert_of_its_own_width_equals_qwen2_moe_block():
    from transformers.models.qwen2_moe import modeling_qwen2_moe as q2

    hf_cfg = transformers.Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=12,
                                         shared_expert_intermediate_size=40, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=False,
                                         vocab_size=16, num_hidden_layers=1)
    torch.manual_seed(2)
    hf = q2.Qwen2MoeSparseMoeBlock(hf_cfg).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MoELayer(MoEConfig(num_experts=4, top_k=2, normalize_topk=False, num_shared_experts=1,
                              shared_expert_ffn_hidden_size=40, shared_expert_gate=True),
                    hidden_size=16, ffn_hidden_size=12, activation="swiglu").eval()
    assert ours.shared_experts.w1.weight.shape == (40, 16)
    F = 12
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        gate_up = hf.experts.gate_up_proj
        set_expert_weights(ours.experts, gate_up[:, :F], gate_up[:, F:], hf.experts.down_proj)
        ours.shared_experts.w1.weight.copy_(hf.shared_expert.gate_proj.weight)
        ours.shared_experts.w3.weight.copy_(hf.shared_expert.up_proj.weight)
        ours.shared_experts.w2.weight.copy_(hf.shared_expert.down_proj.weight)
        ours.shared_gate.weight.copy_(hf.shared_expert_gate.weight)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ours(x).output, hf(x), rtol=1e-5, atol=1e-5)


def test_first_k_dense_blocks_and_expert_width_apart_from_dense():
    cfg = ModelConfig(vocab_size=16, hidden_size=16, num_layers=4, num_heads=2, ffn_hidden_size=48)
    model = build_model(cfg, MoEConfig(num_experts=4, top_k=2, first_k_dense=1,
                                       ffn_hidden_size=8, num_shared_experts=2))
    # DeepSeekMoE: block 0 dense of width model.ffn_hidden_size, then MoE.
    assert [b.is_moe for b in model.blocks] == [False, True, True, True]
    assert isinstance(model.blocks[0].ffn, MLP) and model.blocks[0].ffn.w1.weight.shape == (48, 16)
    moe = model.blocks[1].ffn
    assert moe.shared_experts.w1.weight.shape == (16, 16)  # 2 shared x 8
    n_expert = sum(p.numel() for p in moe.experts.parameters())
    assert n_expert == 4 * 3 * 16 * 8
    model = build_model(cfg, MoEConfig(num_experts=4, first_k_dense=1, layer_freq=2))
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]


@pytest.mark.parametrize("sets, field", [
    (["model.qk_norm=head", "parallel.tensor_parallel_size=2"], "model.qk_norm"),
    (["model.qk_norm=both"], "model.qk_norm"),
    (["moe.shared_expert_gate=true"], "moe.shared_expert_gate"),
    (["moe.first_k_dense=-1"], "moe.first_k_dense"),
    (["model.kv_channels=0"], "model.kv_channels"),
])
def test_bad_feature_values_name_the_field(sets, field):
    from moe_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=field):
        load_config(None, sets)


def test_kv_channels_lifts_the_divisibility_of_hidden_by_heads():
    from moe_train.config import load_config

    cfg = load_config(None, ["model.num_heads=3", "model.num_kv_heads=1", "model.kv_channels=16"])
    assert cfg.model.head_dim == 16
