"""Sampling filters against transformers' own logits processors (an
independent implementation of the same rules), and the sampler's contract:
temperature 0 is the argmax, a seed fixes the draw."""
import pytest
import torch

from moe_train.infer.sampling import filter_logits, next_token

transformers = pytest.importorskip("transformers")


def _finite(x):
    return torch.isfinite(x)


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.9), (None, 0.3), (7, 0.6),
                                         (1, None), (None, 1e-6)])
def test_filters_keep_what_transformers_keeps(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ref = logits.clone()
    if top_k is not None:
        ref = transformers.TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = transformers.TopPLogitsWarper(top_p)(None, ref)
    got = filter_logits(logits, top_k, top_p)
    assert torch.equal(_finite(got), _finite(ref))
    assert torch.equal(got[_finite(got)], logits[_finite(got)])


def test_nucleus_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # 0.5 alone is below 0.8; 0.5 + 0.3 reaches it: those two stay.
    assert _finite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert _finite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]


def test_temperature_zero_is_argmax_and_a_seed_fixes_the_draw():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(next_token(logits, 0.0), logits.argmax(-1))
    assert torch.equal(next_token(logits, 1.0, top_k=1), logits.argmax(-1))
    a = [next_token(logits, 1.0, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    draws = torch.stack([next_token(logits, 1.0, generator=torch.Generator().manual_seed(s))
                         for s in range(20)])
    assert len({tuple(d.tolist()) for d in draws}) > 1
