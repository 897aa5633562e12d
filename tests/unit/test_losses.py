"""Auxiliary losses against their formulas, recomputed with plain loops."""
import math
import statistics

import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.moe import losses as L
from moe_train.moe.router import build_router


def _switch_loop(logits, ids, E, coef):
    """Switch Eq 4-6 by hand, differentiable through the probabilities."""
    T, K = ids.shape
    probs = [torch.softmax(logits[t], -1) for t in range(T)]
    total = 0.0
    for i in range(E):
        f_i = sum(1 for t in range(T) for k in range(K) if int(ids[t, k]) == i) / (T * K)
        P_i = sum(probs[t][i] for t in range(T)) / T
        total = total + f_i * P_i
    return coef * E * total


def test_switch_equals_coef_under_uniform_routing():
    T, E, K, coef = 12, 4, 2, 0.01
    probs = torch.full((T, E), 1.0 / E)
    # P uniform: whatever the top-K tie-break picks, the loss is alpha.
    lopsided = torch.zeros(T, K, dtype=torch.long) + torch.arange(K)
    assert L.switch_load_balancing_loss(probs, lopsided, coef).item() == pytest.approx(coef)
    # f uniform with skewed P: still alpha (sum_i P_i = 1).
    balanced = torch.arange(T * K).view(T, K) % E
    skewed = torch.softmax(torch.randn(T, E), -1)
    assert L.switch_load_balancing_loss(skewed, balanced, coef).item() == pytest.approx(coef)


def test_switch_through_router_with_constant_logits():
    cfg = MoEConfig(num_experts=4, top_k=2, hidden_size=8, aux_loss_coef=0.03)
    router = build_router(cfg)
    torch.nn.init.zeros_(router.weight)
    d = router(torch.randn(6, 8), 2, 3)
    assert d.losses["load_balancing"].item() == pytest.approx(0.03)


def test_switch_matches_loop_outputs_and_gradients():
    torch.manual_seed(0)
    T, E, K, coef = 10, 5, 2, 0.02
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    ids = logits.detach().topk(K, -1).indices
    fast = L.switch_load_balancing_loss(torch.softmax(logits, -1), ids, coef)
    (g_fast,) = torch.autograd.grad(fast, logits)
    slow = _switch_loop(logits, ids, E, coef)
    (g_slow,) = torch.autograd.grad(slow, logits)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-6)
    assert torch.allclose(g_fast.double(), g_slow, atol=1e-7)
    assert fast.item() > coef  # random routing is worse than balanced


def test_cv_squared_is_tensor2tensor_population_form():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    vals = x.tolist()
    want = statistics.pvariance(vals) / (statistics.fmean(vals) ** 2)
    assert L.cv_squared(x).item() == pytest.approx(want, rel=1e-6)
    assert L.cv_squared(torch.full((5,), 3.0)).item() == pytest.approx(0.0, abs=1e-12)
    assert L.cv_squared(torch.zeros(5)).item() == 0.0  # eps keeps it finite


def test_importance_loss_matches_loop():
    torch.manual_seed(1)
    T, E, coef = 7, 4, 0.1
    gates = torch.rand(T, E) * (torch.rand(T, E) > 0.5)
    importance = [sum(float(gates[t, i]) for t in range(T)) for i in range(E)]
    want = coef * statistics.pvariance(importance) / statistics.fmean(importance) ** 2
    assert L.importance_loss(gates, coef).item() == pytest.approx(want, rel=1e-5)


def _phi(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def test_smooth_load_matches_kth_excluding_loop_and_gradients():
    torch.manual_seed(2)
    T, E, K = 6, 5, 2
    clean = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    raw_noise = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    std = torch.nn.functional.softplus(raw_noise)
    noisy = clean + torch.randn(T, E, dtype=torch.float64) * std
    load = L.smooth_load(clean, noisy, std, K)
    c, n, s = clean.detach().tolist(), noisy.detach().tolist(), std.detach().tolist()
    want = []
    for i in range(E):
        total = 0.0
        for t in range(T):
            others = sorted((n[t][j] for j in range(E) if j != i), reverse=True)
            kth_excluding = others[K - 1]
            total += _phi((c[t][i] - kth_excluding) / s[t][i])
        want.append(total)
    assert torch.allclose(load.detach(), torch.tensor(want, dtype=torch.float64), atol=1e-10)
    # Gradient reaches both W_g's logits and the noise scale (what makes Load trainable).
    g_clean, g_noise = torch.autograd.grad(L.load_loss(load, 0.1), (clean, raw_noise))
    assert g_clean.abs().sum() > 0 and g_noise.abs().sum() > 0


def test_z_loss_matches_loop():
    torch.manual_seed(3)
    T, E, coef = 5, 6, 1e-3
    logits = torch.randn(T, E) * 3
    want = coef * sum(math.log(sum(math.exp(float(v)) for v in logits[t])) ** 2 for t in range(T)) / T
    assert L.z_loss(logits, coef).item() == pytest.approx(want, rel=1e-5)


def test_count_load():
    ids = torch.tensor([[0, 2], [2, 1], [2, 0]])
    assert L.count_load(ids, 4).tolist() == [2.0, 1.0, 3.0, 0.0]


def test_router_loss_keys_per_option():
    x = torch.randn(8, 8)

    def keys(**kw):
        return set(build_router(MoEConfig(num_experts=4, hidden_size=8, **kw))(x, 2, 4).losses)

    assert keys() == {"load_balancing"}
    assert keys(z_loss_coef=1e-3) == {"load_balancing", "z_loss"}
    assert keys(aux_loss="shazeer") == {"importance", "load"}
    assert keys(aux_loss="none") == set()
    assert keys(router="expert_choice") == set()  # EC ignores aux_loss
    assert keys(router="expert_choice", z_loss_coef=1e-3) == {"z_loss"}


def test_router_z_loss_value_is_weighted():
    torch.manual_seed(4)
    router = build_router(MoEConfig(num_experts=4, hidden_size=8, aux_loss="none", z_loss_coef=0.5))
    x = torch.randn(6, 8)
    d = router(x, 1, 6)
    want = 0.5 * torch.logsumexp(x @ router.weight.t(), -1).pow(2).mean()
    assert d.losses["z_loss"].item() == pytest.approx(want.item(), rel=1e-5)


def _cv2(values):
    """CV^2 = population variance / mean^2 (Shazeer Eq 6-7, 11), in floats."""
    return statistics.pvariance(values) / statistics.mean(values) ** 2


def test_router_shazeer_losses_train_smooth_eval_counts():
    # Expected values by plain loops over tokens and experts (Shazeer et al.
    # 2017, Eq 3-11), not by the functions of losses.py under test.
    from moe_train.moe.routing_noise import RoutingNoiseKey, use_key

    torch.manual_seed(5)
    T, D, E, K, w = 12, 8, 4, 2, 0.1
    cfg = MoEConfig(num_experts=E, top_k=K, hidden_size=D, noisy_gating=True, aux_loss="shazeer",
                    aux_loss_coef=w)
    router = build_router(cfg)
    with torch.no_grad():  # move off the zero init so the loss is not trivial
        router.weight.normal_(0, 0.5)
        router.noise_weight.normal_(0, 0.5)
    x = torch.randn(T, D)
    key = RoutingNoiseKey(seed=1, step=0, micro_batch=0)
    with use_key(key):
        d = router.train()(x, 1, T)
    # The router's draw: the first normals of its layer's keyed generator.
    normal = torch.randn(T, E, generator=torch.Generator().manual_seed(key.layer_seed(0)))
    Wg, Wn = router.weight.detach().double(), router.noise_weight.detach().double()
    xs = x.double()
    clean = [[float(xs[t] @ Wg[i]) for i in range(E)] for t in range(T)]
    std = [[math.log1p(math.exp(float(xs[t] @ Wn[i]))) for i in range(E)] for t in range(T)]
    H = [[clean[t][i] + float(normal[t, i]) * std[t][i] for i in range(E)] for t in range(T)]

    importance, load = [0.0] * E, [0.0] * E
    for t in range(T):
        chosen = sorted(range(E), key=lambda i: -H[t][i])[:K]           # KeepTopK (Eq 5)
        z = sum(math.exp(H[t][i]) for i in chosen)
        for i in chosen:
            importance[i] += math.exp(H[t][i]) / z                      # G = Softmax (Eq 3)
        for i in range(E):
            kth_excluding = sorted((H[t][j] for j in range(E) if j != i), reverse=True)[K - 1]
            load[i] += _phi((clean[t][i] - kth_excluding) / std[t][i])  # Eq 8-10
    assert d.losses["importance"].item() == pytest.approx(w * _cv2(importance), rel=1e-4)
    assert d.losses["load"].item() == pytest.approx(w * _cv2(load), rel=1e-4)
    d.losses["load"].backward()
    assert router.noise_weight.grad.abs().sum() > 0  # load trains W_noise

    # Eval: no noise; the load is the count of top-K choices per expert.
    d_eval = router.eval()(x, 1, T)
    counts = [0] * E
    for t in range(T):
        for i in sorted(range(E), key=lambda i: -clean[t][i])[:K]:
            counts[i] += 1
    assert d_eval.losses["load"].item() == pytest.approx(w * _cv2(counts), rel=1e-5)
