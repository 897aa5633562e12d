"""How many tokens each expert picks at each position, for causal-safe expert choice.

Legend: S positions, B batch rows (the B tokens of one position group),
E experts, c capacity factor, R = B*c assignments per position on average.

Expert choice costs c expert MLPs per token: E experts x k tokens = T*c
assignments for T tokens (Zhou et al. 2022, k = T*c/E). In a causal LM the
routing group of position s holds only the B tokens at s (the future must not
evict the past), so k = B*c/E is often a fraction: E=64, B=4, c=2 gives 1/8.
Rounding it up to 1 would run E*k/B = 16 experts per token instead of 2.

Instead the fraction is spread over positions on a schedule that depends on
the position alone, never on the data (so it leaks nothing): number the
assignment slots of the whole sequence j = 0, 1, 2, ...; position p owns the
slots ``[floor(p*R), floor((p+1)*R))`` and slot j belongs to expert
``j mod E``. So

    k[p, e] = #{ j in [floor(p*R), floor((p+1)*R)) : j = e (mod E) }

and at each position every expert with k[p, e] > 0 picks its k[p, e] best
tokens of the group, exactly as in the paper. Over positions 0..P-1 the
group gets floor(P*R) assignments (c per token, within 1/(P*B)), each expert
within one of P*R/E, and a single row (B=1, generation) routes every position
exactly as it does inside a longer forward, because k depends on the absolute
position and not on how many positions the forward holds.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Tuple

import torch

DEFAULT_CAPACITY_FACTOR = 2.0  # the paper's c


def _rate(batch: int, capacity_factor: Optional[float]) -> Fraction:
    c = DEFAULT_CAPACITY_FACTOR if capacity_factor is None else capacity_factor
    # The decimal the user wrote (1.1 is 11/10, not 1.100000000000000088...),
    # so that floor(p*R) has no float error at any position.
    return batch * Fraction(repr(float(c)))


def max_slots(batch: int, num_experts: int, capacity_factor: Optional[float]) -> int:
    """The most tokens one expert can pick at one position (host integer,
    from the config alone): ceil(ceil(R)/E), at most B."""
    return min(batch, -(-math.ceil(_rate(batch, capacity_factor)) // num_experts))


def slots_per_expert(positions_S: torch.Tensor, batch: int, num_experts: int,
                     capacity_factor: Optional[float]) -> torch.Tensor:
    """[S, E] long: k[p, e], the tokens expert e picks at each position p of
    ``positions_S`` (absolute positions, long), clamped to the group size B."""
    rate = _rate(batch, capacity_factor)
    p = positions_S.long()[:, None]                                          # [S, 1]
    start = (p * rate.numerator) // rate.denominator                         # floor(p*R)
    end = ((p + 1) * rate.numerator) // rate.denominator
    e = torch.arange(num_experts, device=positions_S.device)[None, :]        # [1, E]

    def below(x):  # #{j in [0, x): j = e (mod E)}, for x >= 0
        return (x - e + num_experts - 1) // num_experts

    return (below(end) - below(start)).clamp(max=batch)


def slots_per_expert_reference(positions, batch: int, num_experts: int,
                               capacity_factor: Optional[float]) -> Tuple[Tuple[int, ...], ...]:
    """The same schedule by walking the slots one by one (for tests)."""
    rate = _rate(batch, capacity_factor)
    out = []
    for p in positions:
        k = [0] * num_experts
        for j in range(math.floor(p * rate), math.floor((p + 1) * rate)):
            k[j % num_experts] += 1
        out.append(tuple(min(batch, v) for v in k))
    return tuple(out)
