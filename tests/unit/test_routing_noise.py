"""Routing noise comes from a keyed generator: a pure function of (seed,
step, micro-batch, layer), replayed by recompute, cleared after each step."""
import contextlib

import pytest
import torch
from torch.utils.checkpoint import CheckpointError, checkpoint

from moe_train.config import MoEConfig
from moe_train.moe import routing_noise as rn
from moe_train.moe.layer import MoELayer
from moe_train.moe.router import TokenChoiceRouter

B, S, D, E = 2, 6, 8, 4


@pytest.fixture(autouse=True)
def no_key_left():
    assert rn.current_key() is None
    yield
    rn.set_key(None)


def _router(**kw):
    base = dict(num_experts=E, top_k=2, hidden_size=D)
    base.update(kw)
    torch.manual_seed(0)
    router = TokenChoiceRouter(MoEConfig(**base)).train()
    if base.get("noisy_gating"):
        with torch.no_grad():  # zero init would make the noise the whole score
            router.weight.normal_(0, 0.3)
            router.noise_weight.normal_(0, 0.3)
    return router


def _routing(d):
    return d.token_index.tolist(), d.expert_index.tolist(), d.weight.tolist()


def test_layer_seed_is_a_function_of_every_field():
    key = rn.RoutingNoiseKey(seed=1, step=2, micro_batch=3)
    seeds = {key.layer_seed(0), key.layer_seed(1),
             rn.RoutingNoiseKey(2, 2, 3).layer_seed(0), rn.RoutingNoiseKey(1, 3, 3).layer_seed(0),
             rn.RoutingNoiseKey(1, 2, 4).layer_seed(0)}
    assert len(seeds) == 5
    assert key.layer_seed(0) == rn.RoutingNoiseKey(1, 2, 3).layer_seed(0)
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_jitter_under_a_key_is_the_keyed_uniform_draw():
    # Independent of the router: the jitter is x * U(1-eps, 1+eps) drawn from
    # a generator seeded with the key's seed for the router's layer.
    router = _router(jitter_eps=0.2, aux_loss="none")
    router.layer_index = 3
    key = rn.RoutingNoiseKey(seed=7, step=4, micro_batch=1)
    x = torch.randn(B * S, D)
    torch.manual_seed(123)
    with rn.use_key(key):
        d = router(x, B, S)
    g = torch.Generator().manual_seed(key.layer_seed(3))
    u = torch.empty(B * S, D).uniform_(0.8, 1.2, generator=g)
    torch.testing.assert_close(d.logits, (x * u) @ router.weight.t(), rtol=1e-6, atol=1e-6)
    # The global generator was neither used nor moved by the router.
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    with rn.use_key(key):
        router(x, B, S)
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize("kw", [dict(jitter_eps=0.2), dict(noisy_gating=True)])
def test_same_key_same_routing_other_key_other_routing(kw):
    router = _router(**kw)
    x = torch.randn(B * S, D) * 3
    key = rn.RoutingNoiseKey(seed=1, step=0, micro_batch=0)
    with rn.use_key(key):
        a, b = router(x, B, S), router(x, B, S)
    assert _routing(a) == _routing(b)
    # Another data-parallel micro-batch (or layer) draws other noise.
    other = []
    for k, layer in ((rn.RoutingNoiseKey(1, 0, 1), 0), (key, 1)):
        router.layer_index = layer
        with rn.use_key(k):
            other.append(_routing(router(x, B, S)))
    router.layer_index = 0
    assert all(o != _routing(a) for o in other)


def test_independent_streams_across_micro_batches():
    # The draws of two data-parallel ranks are uncorrelated: sample
    # correlation of 4096 normals ~ N(0, 1/64); 5 sigma = 0.08.
    a, b = (torch.randn(4096, generator=torch.Generator().manual_seed(
        rn.RoutingNoiseKey(1, 5, m).layer_seed(0))) for m in (0, 1))
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.08


def test_keyed_micro_batches_sets_and_clears_the_key():
    seen = []
    for micro in rn.keyed_micro_batches(["a", "b"], seed=3, step=9, dp_rank=2, accum=2):
        seen.append((micro, rn.current_key()))
    assert seen == [("a", rn.RoutingNoiseKey(3, 9, 4)), ("b", rn.RoutingNoiseKey(3, 9, 5))]
    assert rn.current_key() is None
    with pytest.raises(RuntimeError):
        for _ in rn.keyed_micro_batches([1, 2], 3, 9, 0, 2):
            raise RuntimeError("a failing step")
    assert rn.current_key() is None


@pytest.mark.parametrize("kw", [dict(jitter_eps=0.3), dict(noisy_gating=True)])
def test_recompute_replays_the_noise(kw):
    # Recompute re-runs the layer's forward during backward, after the trainer
    # may have moved on to another key: checkpoint_context_fn brings back the
    # key of the first forward, so the replay routes exactly as the forward did
    # and the gradients equal those of the plain forward.
    cfg = MoEConfig(num_experts=E, top_k=2, hidden_size=D, ffn_hidden_size=16,
                    aux_loss="none", **kw)
    torch.manual_seed(0)
    layer = MoELayer(cfg).train()
    if kw.get("noisy_gating"):
        with torch.no_grad():
            layer.router.weight.normal_(0, 0.3)
            layer.router.noise_weight.normal_(0, 0.3)
    x = torch.randn(B, S, D) * 3
    proj = torch.randn(B, S, D)
    key = rn.RoutingNoiseKey(seed=1, step=2, micro_batch=0)

    def grads(recompute, context_fn=None):
        layer.zero_grad()
        with rn.use_key(key):
            if recompute:
                out = checkpoint(lambda h: layer(h).output, x, use_reentrant=False,
                                 context_fn=context_fn or rn.checkpoint_context_fn)
            else:
                out = layer(x).output
        # Backward under another key: the next micro-batch's.
        with rn.use_key(rn.RoutingNoiseKey(seed=1, step=2, micro_batch=1)):
            (out * proj).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()
                              if p.grad is not None}

    out, want = grads(recompute=False)
    out_rc, got = grads(recompute=True)
    assert torch.equal(out_rc, out)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    # Without the context function the replay draws the other key's noise:
    # routing changes and the gradients are wrong (or checkpoint refuses the
    # mismatched shapes), which is what this test guards against.
    try:
        _, wrong = grads(recompute=True,
                         context_fn=lambda: (contextlib.nullcontext(), contextlib.nullcontext()))
    except CheckpointError:  # checkpoint's own check: the replay kept other tokens
        return
    assert any(not torch.allclose(wrong[n], want[n], rtol=1e-5, atol=1e-6) for n in want)
