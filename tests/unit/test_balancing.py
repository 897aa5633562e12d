"""DeepSeek's two balancing options against the papers' formulas written as
plain loops: the sequence-wise auxiliary loss (DeepSeek-V3 Eq 17-20) and
auxiliary-loss-free balancing (V3 Sec 2.1.2: a selection-only expert bias
moved by the sign of the load error)."""
import contextlib
import math

import pytest
import torch

from moe_train.config import Config, ConfigError, MoEConfig, ModelConfig
from moe_train.model.transformer import build_model
from moe_train.moe import losses as L
from moe_train.moe.balancing import expert_bias_routers, update_expert_bias, update_expert_biases
from moe_train.moe.router import ExpertChoiceRouter, TokenChoiceRouter

B, S, D, E = 3, 5, 8, 4


def _cfg(**kw):
    base = dict(num_experts=E, top_k=2, hidden_size=D)
    base.update(kw)
    return MoEConfig(**base)


@contextlib.contextmanager
def _one_thread():
    # The simulation makes hundreds of tiny calls; thread hand-offs on a
    # shared CPU cost more than the math.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------
# Sequence-wise auxiliary loss


def _sequence_loss_loop(probs, ids, batch, seq, coef):
    """V3 Eq 17-20 by hand: per sequence f_i = E/(K*S) * count_i,
    P_i = mean_t s'_{i,t}, L_b = coef * sum_i f_i P_i; mean over sequences."""
    E_, K = len(probs[0]), len(ids[0])
    total = 0.0
    for b in range(batch):
        counts = [0] * E_
        P = [0.0] * E_
        for s in range(seq):
            t = b * seq + s
            for k in range(K):
                counts[ids[t][k]] += 1
            for i in range(E_):
                P[i] += probs[t][i] / seq
        f = [E_ / (K * seq) * c for c in counts]
        total += coef * sum(f[i] * P[i] for i in range(E_))
    return total / batch


@pytest.mark.parametrize("K", [1, 2, 3])
def test_sequence_loss_matches_loop(K):
    torch.manual_seed(K)
    probs = torch.randn(B * S, E).softmax(-1)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(B * S)])
    got = L.sequence_load_balancing_loss(probs, ids, B, S, 0.01)
    want = _sequence_loss_loop(probs.tolist(), ids.tolist(), B, S, 0.01)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_sequence_loss_gradient_matches_formula():
    # dL/dp_{t,i} = coef / B * f_{b(t),i} / S: only P carries the gradient.
    torch.manual_seed(0)
    probs = torch.randn(B * S, E).softmax(-1).requires_grad_(True)
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(B * S)])
    L.sequence_load_balancing_loss(probs, ids, B, S, 0.5).backward()
    for b in range(B):
        counts = [0] * E
        for s in range(S):
            for e in ids[b * S + s].tolist():
                counts[e] += 1
        for s in range(S):
            for i in range(E):
                want = 0.5 / B * (E / (2 * S) * counts[i]) / S
                assert probs.grad[b * S + s, i].item() == pytest.approx(want, rel=1e-5)


def test_sequence_loss_is_coef_at_perfect_balance():
    # Every sequence gives each expert exactly K*S/E of its choices: f = 1,
    # so L = coef * sum_i P_i = coef for any probabilities.
    seq = 4
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]] * B)
    probs = torch.randn(B * seq, E).softmax(-1)
    got = L.sequence_load_balancing_loss(probs, ids, B, seq, 0.03)
    assert got.item() == pytest.approx(0.03, rel=1e-6)
    # Uniform P with any choice also gives coef: sum_i f_i = E.
    ids = torch.tensor([[0, 1]] * (B * seq))
    got = L.sequence_load_balancing_loss(torch.full((B * seq, E), 1 / E), ids, B, seq, 0.03)
    assert got.item() == pytest.approx(0.03, rel=1e-6)


def test_sequence_loss_sees_per_sequence_imbalance_switch_does_not():
    # Sequence 0 uses only experts 0, 1 and sequence 1 only 2, 3: the batch is
    # balanced (Switch gives its minimum coef) but each sequence is not.
    seq = 4
    ids = torch.tensor([[0, 1]] * seq + [[2, 3]] * seq)
    probs = torch.tensor([[0.4, 0.4, 0.1, 0.1]] * seq + [[0.1, 0.1, 0.4, 0.4]] * seq)
    switch = L.switch_load_balancing_loss(probs, ids, 1.0)
    seqwise = L.sequence_load_balancing_loss(probs, ids, 2, seq, 1.0)
    assert switch.item() == pytest.approx(1.0)
    want = _sequence_loss_loop(probs.tolist(), ids.tolist(), 2, seq, 1.0)
    assert seqwise.item() == pytest.approx(want)
    assert seqwise.item() == pytest.approx(1.6)  # 2 * (0.4 + 0.4) per sequence


def test_sequence_loss_with_one_sequence_equals_switch():
    torch.manual_seed(1)
    probs = torch.randn(S, E).softmax(-1)
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(S)])
    assert L.sequence_load_balancing_loss(probs, ids, 1, S, 0.1).item() == pytest.approx(
        L.switch_load_balancing_loss(probs, ids, 0.1).item(), rel=1e-6)


@pytest.mark.parametrize("noisy", [False, True])
def test_router_sequence_loss_is_load_balancing_key(noisy):
    torch.manual_seed(2)
    router = TokenChoiceRouter(_cfg(aux_loss="sequence", aux_loss_coef=0.02, noisy_gating=noisy))
    if noisy:
        torch.nn.init.normal_(router.weight, std=0.5)
        torch.nn.init.normal_(router.noise_weight, std=0.5)
    router.eval()  # no noise: selection scores are the clean logits
    x = torch.randn(B * S, D)
    d = router(x, B, S)
    assert set(d.losses) == {"load_balancing"}
    logits = (x.double() @ router.weight.double().t()).tolist()
    probs, ids = [], []
    for row in logits:
        z = sum(math.exp(v) for v in row)
        probs.append([math.exp(v) / z for v in row])
        ids.append(sorted(range(E), key=lambda e: -row[e])[:2])
    want = _sequence_loss_loop(probs, ids, B, S, 0.02)
    assert d.losses["load_balancing"].item() == pytest.approx(want, rel=1e-5)


def test_sequence_loss_does_not_change_routing():
    # The loss reads the whole sequence, but only as a training objective:
    # the forward (experts and gates) is the same as with any other loss.
    torch.manual_seed(3)
    a = TokenChoiceRouter(_cfg(aux_loss="sequence"))
    b = TokenChoiceRouter(_cfg(aux_loss="switch"))
    b.load_state_dict(a.state_dict())
    x = torch.randn(B * S, D)
    da, db = a(x, B, S), b(x, B, S)
    assert torch.equal(da.token_index, db.token_index)
    assert torch.equal(da.expert_index, db.expert_index)
    assert torch.equal(da.weight, db.weight)


# ----------------------------------------------------------------------------
# Biased selection


def _biased_loop(logits, bias, K, order, normalize):
    """V3 Eq 16 by hand: choose by p_i + b_i, gate with the unbiased score."""
    out = {}
    for t, row in enumerate(logits):
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        chosen = sorted(range(len(row)), key=lambda e: -(p[e] + bias[e]))[:K]
        if order == "softmax_then_topk":
            gates = [p[e] for e in chosen]
            if normalize and K > 1:
                gates = [g / sum(gates) for g in gates]
        else:
            zk = sum(math.exp(row[e]) for e in chosen)
            gates = [math.exp(row[e]) / zk for e in chosen]
        out.update({(t, e): g for e, g in zip(chosen, gates)})
    return out


def _as_dict(d):
    return {(t, e): w for t, e, w in zip(d.token_index.tolist(), d.expert_index.tolist(),
                                         d.weight.tolist())}


def _assert_same(got, want, tol=1e-5):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol), key


@pytest.mark.parametrize("order,normalize,K", [("softmax_then_topk", True, 2),
                                               ("softmax_then_topk", False, 2),
                                               ("softmax_then_topk", True, 1),
                                               ("topk_then_softmax", True, 2)])
def test_large_bias_forces_expert_but_gate_is_unbiased(order, normalize, K):
    torch.manual_seed(4)
    router = TokenChoiceRouter(_cfg(top_k=K, score_order=order, normalize_topk=normalize,
                                    expert_bias_update_rate=1e-3))
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(B * S, D)
    logits = (x.double() @ router.weight.double().t()).tolist()
    # Without the bias, expert 3 is not everyone's choice.
    assert any(3 not in sorted(range(E), key=lambda e: -row[e])[:K] for row in logits)
    with torch.no_grad():
        router.expert_bias[3] = 10.0
    d = router(x, B, S)
    got = _as_dict(d)
    assert {t for (t, e) in got if e == 3} == set(range(B * S))
    _assert_same(got, _biased_loop(logits, [0, 0, 0, 10.0], K, order, normalize))
    if K == 1:  # the raw unbiased probability, not p + b
        for t, row in enumerate(logits):
            assert got[(t, 3)] == pytest.approx(math.exp(row[3]) / sum(math.exp(v) for v in row),
                                                abs=1e-6)
    assert d.selected_per_expert.tolist()[3] == B * S


def test_moderate_bias_matches_loop():
    torch.manual_seed(5)
    router = TokenChoiceRouter(_cfg(expert_bias_update_rate=1e-3))
    torch.nn.init.normal_(router.weight, std=0.5)
    bias = [0.05, -0.1, 0.2, -0.03]
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor(bias))
    x = torch.randn(B * S, D)
    logits = (x.double() @ router.weight.double().t()).tolist()
    want = _biased_loop(logits, bias, 2, "softmax_then_topk", True)
    _assert_same(_as_dict(router(x, B, S)), want)
    # The bias did change some choice, so the check above is not the unbiased one.
    assert want.keys() != _biased_loop(logits, [0] * E, 2, "softmax_then_topk", True).keys()


@pytest.mark.parametrize("aux", ["switch", "sequence", "shazeer"])
def test_losses_count_the_unbiased_choice(aux):
    # V3 Eq 18: f_i counts s_{i,t} in TopK(s), without the bias. A bias that
    # forces expert 3 everywhere must leave every loss as without the bias.
    torch.manual_seed(12)
    kw = dict(aux_loss=aux, z_loss_coef=1e-3)
    plain = TokenChoiceRouter(_cfg(**kw))
    biased = TokenChoiceRouter(_cfg(expert_bias_update_rate=1e-3, **kw))
    with torch.no_grad():
        biased.weight.copy_(plain.weight)
        biased.expert_bias[3] = 10.0
    x = torch.randn(B * S, D)
    dp, db = plain(x, B, S), biased(x, B, S)
    assert db.selected_per_expert[3] == B * S > dp.selected_per_expert[3]  # routing did change
    assert set(db.losses) == set(dp.losses)
    for key in dp.losses:
        assert db.losses[key].item() == pytest.approx(dp.losses[key].item(), rel=1e-6), key


def test_zero_bias_routes_like_no_bias():
    torch.manual_seed(6)
    plain = TokenChoiceRouter(_cfg())
    biased = TokenChoiceRouter(_cfg(expert_bias_update_rate=1e-3))
    with torch.no_grad():
        biased.weight.copy_(plain.weight)
    x = torch.randn(B * S, D)
    _assert_same(_as_dict(biased(x, B, S)), _as_dict(plain(x, B, S)), tol=1e-7)


def test_selected_per_expert_counts_before_capacity():
    torch.manual_seed(7)
    router = TokenChoiceRouter(_cfg(capacity_factor=0.5, expert_bias_update_rate=1e-3))
    with torch.no_grad():
        router.expert_bias[0] = 10.0
    x = torch.randn(B * S, D)
    d = router(x, B, S)
    logits = (x.double() @ router.weight.double().t()).tolist()
    want = [0] * E
    for (t, e) in _biased_loop(logits, [10.0, 0, 0, 0], 2, "softmax_then_topk", True):
        want[e] += 1
    assert d.selected_per_expert.tolist() == want
    assert d.tokens_per_expert().tolist() != want  # capacity dropped some of expert 0's


def test_bias_gets_no_gradient_and_gates_train_the_router():
    torch.manual_seed(8)
    router = TokenChoiceRouter(_cfg(expert_bias_update_rate=1e-3))
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    assert "expert_bias" not in dict(router.named_parameters())
    d = router(torch.randn(B * S, D), B, S)
    ((d.weight ** 2).sum() + sum(d.losses.values())).backward()
    assert router.expert_bias.grad is None and not router.expert_bias.requires_grad
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_bias_survives_state_dict_round_trip():
    torch.manual_seed(9)
    a = TokenChoiceRouter(_cfg(expert_bias_update_rate=1e-3))
    update_expert_bias(a, torch.tensor([9, 1, 5, 5]), 0.25)
    sd = a.state_dict()
    assert sd["expert_bias"].tolist() == [-0.25, 0.25, 0.0, 0.0]
    b = TokenChoiceRouter(_cfg(expert_bias_update_rate=1e-3))
    b.load_state_dict(sd)
    assert torch.equal(b.expert_bias, a.expert_bias) and b.expert_bias.dtype == torch.float32
    # Off: no buffer, so state dicts without the feature keep their keys.
    assert set(TokenChoiceRouter(_cfg()).state_dict()) == {"weight"}


def test_bias_stays_fp32_through_bf16_cast_and_selects_in_fp32():
    torch.manual_seed(10)
    router = TokenChoiceRouter(_cfg(expert_bias_update_rate=1e-3))
    torch.nn.init.normal_(router.weight, std=0.5)
    bias = torch.tensor([0.5011, -0.1003, 0.2507, 0.0])  # not representable in bf16
    with torch.no_grad():
        router.expert_bias.copy_(bias)
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, bias)
    x = torch.randn(B * S, D).bfloat16()
    d = router(x, B, S)
    assert d.weight.dtype == torch.float32
    logits = (x.double() @ router.weight.double().t()).tolist()
    _assert_same(_as_dict(d), _biased_loop(logits, bias.tolist(), 2, "softmax_then_topk", True))
    # The update still lands; in bf16, 0.5011 - 1e-3 would round to 0.5.
    update_expert_bias(router, torch.tensor([10, 0, 0, 0]), 1e-3)
    assert router.expert_bias[0].item() == pytest.approx(0.5001, abs=1e-6)
    assert router.expert_bias.dtype == torch.float32


# ----------------------------------------------------------------------------
# Update rule


def test_update_rule_matches_formula():
    torch.manual_seed(11)
    for trial in range(5):
        router = TokenChoiceRouter(_cfg(num_experts=6, expert_bias_update_rate=1e-3))
        start = torch.randn(6) * 0.1
        with torch.no_grad():
            router.expert_bias.copy_(start)
        load = torch.randint(0, 20, (6,))
        if trial == 0:
            load = torch.tensor([3, 3, 3, 1, 5, 3])  # mean 3: four experts exactly at it
        rate = 0.01 * (trial + 1)
        update_expert_bias(router, load, rate)
        loads = load.tolist()
        mean = sum(loads) / len(loads)
        for i in range(6):
            sign = 1 if mean > loads[i] else (-1 if mean < loads[i] else 0)
            assert router.expert_bias[i].item() == pytest.approx(start[i].item() + rate * sign,
                                                                 abs=1e-7)


def test_update_rule_errors():
    router = TokenChoiceRouter(_cfg(expert_bias_update_rate=1e-3))
    with pytest.raises(ValueError, match="shape"):
        update_expert_bias(router, torch.ones(E + 1), 1e-3)
    with pytest.raises(ValueError, match="no expert bias"):
        update_expert_bias(TokenChoiceRouter(_cfg()), torch.ones(E), 1e-3)


def test_expert_bias_routers_in_layer_order_and_bulk_update():
    model_cfg = ModelConfig(hidden_size=16, num_layers=3, num_heads=2, vocab_size=32)
    model = build_model(model_cfg, MoEConfig(num_experts=E, top_k=2, expert_bias_update_rate=1e-3))
    routers = expert_bias_routers(model)
    assert routers == [blk.ffn.router for blk in model.moe_blocks] and len(routers) == 3
    keys = [k for k in model.state_dict() if k.endswith("expert_bias")]
    assert keys == [f"blocks.{i}.ffn.router.expert_bias" for i in range(3)]
    loads = [torch.tensor([4, 0, 0, 0]), torch.tensor([0, 4, 0, 0]), torch.tensor([1, 1, 1, 1])]
    update_expert_biases(model, loads, 0.5)
    assert [r.expert_bias.tolist() for r in routers] == [
        [-0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="2 per-layer loads for 3 routers"):
        update_expert_biases(model, loads[:2], 0.5)
    # Off: nothing to update and the call is a no-op.
    plain = build_model(model_cfg, MoEConfig(num_experts=E, top_k=2))
    assert expert_bias_routers(plain) == []
    update_expert_biases(plain, [], 1e-3)


def _skewed_router(seed):
    torch.manual_seed(seed)
    router = TokenChoiceRouter(MoEConfig(num_experts=8, top_k=2, hidden_size=16,
                                         expert_bias_update_rate=1e-3)).eval()
    u = torch.zeros(16)
    u[0] = 1.0
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        router.weight[0] += 1.5 * u  # every token leans on u, so experts 0 and 1 win
        router.weight[1] += 1.0 * u
    gen = torch.Generator().manual_seed(seed + 1)
    return router, lambda n: torch.randn(n, 16, generator=gen) + 1.5 * u


def _max_over_mean(router, tokens, n=4096):
    counts = router(tokens(n), 1, n).selected_per_expert.double()
    return (counts.max() / counts.mean()).item()


@pytest.mark.parametrize("seed", [0, 5])
def test_bias_updates_balance_a_skewed_router(seed):
    # No gradient training: only the bias moves, at V3's gamma = 1e-3, from
    # each step's selection counts. The skew must fall from > 2 to < 1.3
    # (measured on a fresh batch at the final bias), and stay with rate 0.
    with _one_thread(), torch.no_grad():
        results = {}
        for rate in (1e-3, 0.0):
            router, tokens = _skewed_router(seed)
            before = _max_over_mean(router, tokens)
            for _ in range(800):
                update_expert_bias(router, router(tokens(256), 1, 256).selected_per_expert, rate)
            results[rate] = (before, _max_over_mean(router, tokens), router.expert_bias.clone())
    before, after, bias = results[1e-3]
    assert before > 2.0 and after < 1.3, (before, after)
    assert bias[0] < 0 and bias[0] == bias.min()  # the most overloaded expert lost the most
    before0, after0, bias0 = results[0.0]
    assert before0 > 2.0 and after0 > 2.0 and torch.all(bias0 == 0)


# ----------------------------------------------------------------------------
# Config


def test_config_accepts_and_rejects():
    cfg = Config(moe=MoEConfig(aux_loss="sequence", expert_bias_update_rate=1e-3))
    cfg.validate()
    with pytest.raises(ConfigError, match=r"moe.aux_loss \('seq'\) must be one of: .*sequence"):
        Config(moe=MoEConfig(aux_loss="seq")).validate()
    with pytest.raises(ConfigError, match=r"moe.expert_bias_update_rate \(-0.1\) must be >= 0"):
        Config(moe=MoEConfig(expert_bias_update_rate=-0.1)).validate()
    with pytest.raises(ConfigError, match=r"moe.expert_bias_update_rate \(0.001\) applies to "
                                          r"moe.router token_choice only"):
        Config(moe=MoEConfig(router="expert_choice", expert_bias_update_rate=1e-3)).validate()
    Config(moe=MoEConfig(router="expert_choice", expert_bias_update_rate=0.0)).validate()
    with pytest.raises(ValueError, match="moe.expert_bias_update_rate"):
        ExpertChoiceRouter(_cfg(expert_bias_update_rate=1e-3))
