"""The expert-choice schedule: k[p, e] by tensor arithmetic equals the slot
walk, sums to B*c per position on average, and never exceeds max_slots."""
import itertools
import math

import pytest
import torch

from moe_train.moe.expert_choice_schedule import (max_slots, slots_per_expert,
                                                  slots_per_expert_reference)


@pytest.mark.parametrize("batch,n_exp,c", list(itertools.product(
    [1, 3, 8], [4, 8, 64], [0.3, 1.0, 1.1, 1.25, 2.0, None])) + [(2, 4, 4.0), (3, 2, 2.0)])
def test_schedule_matches_slot_walk(batch, n_exp, c):
    positions = list(range(0, 70)) + [1000, 4095, 123457]
    got = slots_per_expert(torch.tensor(positions), batch, n_exp, c)
    want = torch.tensor(slots_per_expert_reference(positions, batch, n_exp, c))
    assert torch.equal(got, want)
    assert int(got.max()) <= max_slots(batch, n_exp, c) <= batch
    # Positions 0..P-1 hold floor(P*B*c) assignments: the decimal c exactly
    # (1.1 * 10 is 11, not 11.000000000000002 -> 12 slots of float rounding).
    rate = batch * (2.0 if c is None else c)
    assert int(got[:70].sum()) == math.floor(round(70 * rate, 9))
