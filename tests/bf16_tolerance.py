"""How far a bf16 result may sit from its fp32 reference, derived from
bf16's epsilon and the reduction lengths (used by the bf16 tests).

bf16 keeps 8 significant bits, so rounding to nearest has a relative error
of at most U = 2^-8 (half the spacing 2^-7 just above 1). Under autocast a
matmul rounds both operands to bf16 and accumulates in fp32 (oneDNN on CPU,
cuBLAS on GPU), so a length-n dot product y = sum_k a_k b_k comes out as
sum_k a_k b_k (1 + d_k + e_k) with |d_k|, |e_k| <= U:

    worst case   |dy| <= 2U * sum_k |a_k b_k|             <= 2U * n * m
    typical      std(dy) = U * sqrt(2/3) * sqrt(sum_k (a_k b_k)^2)
                         = U * sqrt(2/3) * sqrt(n) * m

(d, e independent and uniform on [-U, U], variance U^2/3 each; m the rms of
one term a_k b_k). For terms of random sign the output itself has rms
sqrt(n) * m, so the typical error is U*sqrt(2/3) of the output's rms for any
n: the reduction length sets the worst case, 2U*sqrt(n) output rms, not the
typical error. A path through L such matmuls, whose layers have gains near
one (normalised networks), collects L independent relative errors, and every
bf16 output rounding adds one more of variance U^2/3:

    sigma = U * sqrt((2L + R) / 3) * rms(y)

with R the bf16 roundings of intermediate results along the path. The
largest of N Gaussian errors is about sqrt(2 ln N) sigma (4.3 sigma for
N = 10^4), so a comparison allows 6 sigma, capped by the worst case.
"""
import math

import torch

U = 2.0 ** -8


def rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def bf16_atol(reference: torch.Tensor, matmuls: int, roundings: int = 1,
              reduction: int = None) -> float:
    """6 sigma of the derivation above for outputs of ``reference``'s scale;
    with ``reduction`` (the longest dot product n), no more than the
    worst-case bound 2U * sqrt(n) * rms per matmul plus U per rounding."""
    scale = rms(reference)
    tol = 6 * U * math.sqrt((2 * matmuls + roundings) / 3) * scale
    if reduction is not None:
        tol = min(tol, (2 * U * math.sqrt(reduction) * matmuls + U * roundings) * scale)
    return tol
