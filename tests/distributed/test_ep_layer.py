"""MoELayer at EP=2 and EP=4 against EP=1 on the same global tokens.

Routing groups and capacity are rank-local under EP (each rank routes its own
micro-batch), so the reference is one EP=1 layer with the same init run on
each rank's tokens in turn. Each parallel rank checks, in fp32:

- its output and input gradient against the reference on its tokens;
- before gradient sync: router / shared-expert gradients against the
  reference gradient of its own loss, and its local experts' gradients
  against the SUM over all ranks' losses (the backward all-to-all brings the
  other ranks' token gradients to the expert's owner);
- after ``sync_gradients``: every gradient against the gradient of the mean
  loss over ranks (experts per expert, mapped by ``logical_entries``).

The reference runs ``moe.expert_impl = reference`` (the masked loop); the
EP layers run ``loop`` and ``grouped_mm``, so the three implementations are
held equal at EP=2 and EP=4 too.

The parent also checks that the ranks together covered every parameter of
the EP=1 layer. One spawn per world size runs every routing case.
"""
import warnings

import pytest
import torch

from moe_train.config import MoEConfig
from moe_train.moe import MoELayer
from moe_train.moe.dispatcher import LocalDispatcher
from moe_train.moe.routing import RoutingDecision

from sync_counter import SyncCounter

from .harness import assert_checks, init_topology_gloo, run_distributed

D, FFN, E, B, S = 8, 16, 8, 4, 3
IMPLS = ("loop", "grouped_mm")
RTOL, ATOL = 1e-5, 1e-6

CASES = {
    "token_choice_k1_dropless": dict(top_k=1),
    "token_choice_k2_dropless_shared": dict(top_k=2, num_shared_experts=1, z_loss_coef=1e-3),
    "token_choice_k2_capacity_1": dict(top_k=2, capacity_factor=1.0),
    "expert_choice_position": dict(router="expert_choice", expert_choice_group="position",
                                   z_loss_coef=1e-3),
    # B*c/E = 1/2: experts take turns by position, so at EP=4 some ranks'
    # experts get no token at some positions.
    "expert_choice_position_c1": dict(router="expert_choice", capacity_factor=1.0),
}


def build_layer(case: str, impl: str = "auto") -> MoELayer:
    """The same full EP=1 layer on every rank (same seed)."""
    torch.manual_seed(1234)
    cfg = MoEConfig(num_experts=E, hidden_size=D, ffn_hidden_size=FFN, activation="swiglu",
                    expert_impl=impl, **CASES[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = MoELayer(cfg, init_std=0.3)
    # A decisive router so capacity overflows and ranks route unevenly.
    torch.nn.init.normal_(layer.router.weight, std=1.0)
    return layer


def rank_inputs(rank: int):
    """Rank ``rank``'s micro-batch and the fixed projection its loss uses."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g)


def loss_of(out, proj):
    return (out.output * proj).sum() + out.aux_loss


def reference(case: str, world: int):
    """EP=1 layer on each rank's tokens: outputs, input grads and per-rank grads."""
    from moe_train.parallel import logical_entries

    layer = build_layer(case, "reference")
    outs, x_grads, grads, aux = [], [], [], []
    for r in range(world):
        layer.zero_grad(set_to_none=True)
        x, proj = rank_inputs(r)
        x.requires_grad_(True)
        out = layer(x)
        loss_of(out, proj).backward()
        outs.append(out.output.detach())
        aux.append(out.aux_loss.detach())
        x_grads.append(x.grad)
        grads.append({k: g.clone() for n, p in layer.named_parameters()
                      for k, g in logical_entries(layer, n, p.grad)})
    return outs, x_grads, grads, aux


def ep_worker(rank: int, world: int, ep: int):
    from moe_train.parallel import (apply_expert_parallel, is_expert_param, logical_entries,
                                    sync_gradients)

    topo = init_topology_gloo(expert_parallel_size=ep)
    assert topo.ep_size == ep and topo.dp_size == world
    report = {}
    for case, impl in [(c, i) for c in CASES for i in IMPLS]:
        if impl == IMPLS[0]:
            ref_out, ref_xg, ref_grads, ref_aux = reference(case, world)
        layer = apply_expert_parallel(build_layer(case, impl), topo)
        x, proj = rank_inputs(rank)
        x.requires_grad_(True)
        with SyncCounter() as syncs:   # ops that would sync on CUDA
            out = layer(x)
            loss_of(out, proj).backward()
        checks = [("output", out.output.detach(), ref_out[rank]),
                  ("aux_loss", out.aux_loss.detach(), ref_aux[rank]),
                  ("x.grad", x.grad, ref_xg[rank])]
        names = []
        pre = {n: p.grad.clone() for n, p in layer.named_parameters()}
        for n, grad in pre.items():
            for gn, g in logical_entries(layer, n, grad):
                names.append(gn)
                if is_expert_param(n):   # gradient of the sum of every rank's loss
                    expected = sum(grads[gn] for grads in ref_grads)
                else:
                    expected = ref_grads[rank][gn]
                checks.append((f"pre-sync {gn}", g, expected))
        sync_gradients(layer, topo)
        for n, p in layer.named_parameters():
            for gn, g in logical_entries(layer, n, p.grad):
                expected = sum(grads[gn] for grads in ref_grads) / world
                checks.append((f"synced {gn}", g, expected))
        report[f"{case}/{impl}"] = {"checks": checks, "names": names, "syncs": dict(syncs.counts),
                        "all_names": list(ref_grads[0]),
                        "local_experts": layer.experts.num_experts}
    report["dispatcher_edge"] = dispatcher_edge_case(rank, topo)
    return report


def _fake_experts(x_routed, counts, offset):
    """Expert e multiplies by (e + 1): enough to see which expert got a row."""
    if isinstance(x_routed, list):  # LocalDispatcher: one block per local expert
        return [x * (offset + e + 1.0) for e, x in enumerate(x_routed)]
    scale = torch.repeat_interleave(torch.arange(len(counts)) + offset + 1.0, counts)
    return x_routed * scale[:, None]


def dispatcher_edge_case(rank: int, topo):
    """Hand-made decisions: rank 0 routes nothing; every other rank routes
    everything to rank 0's two experts, so rank 0 receives from every source
    and the other ranks receive nothing."""
    from moe_train.moe.all_to_all import AllToAllDispatcher

    num_experts, T = 2 * topo.ep_size, 3
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    if rank == 0:       # routes nothing at all
        tok, exp = [], []
    else:               # token 1 to both experts of rank 0
        tok, exp = [0, 1, 1, 2], [0, 1, 0, 1]
    weight = torch.rand(len(tok), generator=g).requires_grad_(True)
    logits = torch.zeros(T, num_experts)
    decision = RoutingDecision(token_index=torch.tensor(tok, dtype=torch.long),
                               expert_index=torch.tensor(exp, dtype=torch.long),
                               weight=weight, logits=logits, probs=logits.softmax(-1),
                               num_experts=num_experts, dropped_fraction=torch.tensor(0.0))
    disp = AllToAllDispatcher(topo.ep_group, num_experts)
    x_routed, counts, meta = disp.dispatch(x, decision)
    received = counts.tolist()
    y = disp.combine(_fake_experts(x_routed, counts, disp.expert_offset), meta)
    y.pow(2).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    decision.weight = w_ref
    local = LocalDispatcher()
    xr, c, m = local.dispatch(x_ref, decision)
    y_ref = local.combine(_fake_experts(xr, c, 0), m)
    y_ref.pow(2).sum().backward()
    # Rank 0 holds experts 0, 1: each gets two rows from every other rank.
    expected_counts = [2 * (topo.ep_size - 1)] * 2 if rank == 0 else [0, 0]
    return [("counts", torch.tensor(received), torch.tensor(expected_counts)),
            ("y", y.detach(), y_ref.detach()),
            ("x.grad", x.grad, x_ref.grad),
            ("weight.grad", weight.grad, w_ref.grad)]


@pytest.fixture(scope="module", params=[(2, 2), (4, 4)], ids=["ep2", "ep4"])
def ep_run(request):
    world, ep = request.param
    return world, run_distributed(ep_worker, world, ep, timeout=150)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_ep_layer_equals_ep1(ep_run, case, impl):
    world, reports = ep_run
    covered = set()
    for rank, report in enumerate(reports):
        r = report[f"{case}/{impl}"]
        assert r["local_experts"] == E // world
        assert_checks(r["checks"], f"rank {rank}", RTOL, ATOL)
        covered.update(r["names"])
    # Every parameter (every expert's slice) of the EP=1 layer was compared on some rank.
    assert covered == set(reports[0][f"{case}/{impl}"]["all_names"])


# Host syncs of one EP layer's forward and backward with grouped_mm: the
# split sizes all_to_all_single needs (one copy of both lists), plus the one
# of capacity or of expert choice's slot schedule (how many assignments were
# kept).
SYNC_BUDGET = {"token_choice_k1_dropless": 1, "token_choice_k2_dropless_shared": 1,
               "token_choice_k2_capacity_1": 2, "expert_choice_position": 2,
               "expert_choice_position_c1": 2}


@pytest.mark.parametrize("case", list(CASES))
def test_ep_grouped_mm_host_syncs(ep_run, case):
    _, reports = ep_run
    for rank, report in enumerate(reports):
        syncs = report[f"{case}/grouped_mm"]["syncs"]
        assert sum(syncs.values()) <= SYNC_BUDGET[case], (rank, syncs)
        assert syncs.get("tolist", 0) == 1, (rank, syncs)   # the split-size exchange


def test_dispatcher_empty_and_remote_ranks(ep_run):
    world, reports = ep_run
    for rank, report in enumerate(reports):
        assert_checks(report["dispatcher_edge"], f"rank {rank}", RTOL, ATOL)


def test_expert_param_names_and_single_process_parallelize():
    """No processes needed: name rules, and parallelize is a no-op in one process."""
    from moe_train.parallel import is_expert_param, local_expert_range, logical_entries, parallelize
    from moe_train.parallel.topology import Topology

    assert is_expert_param("blocks.3.ffn.experts.w1")
    assert is_expert_param("experts.w2")
    assert not is_expert_param("blocks.3.ffn.shared_experts.w1.weight")
    assert not is_expert_param("blocks.3.ffn.w1.weight")
    assert not is_expert_param("blocks.3.ffn.router.weight")
    assert list(local_expert_range(8, 4, 2)) == [4, 5]
    with pytest.raises(ValueError, match="divisible"):
        local_expert_range(6, 4, 0)

    layer = build_layer("token_choice_k2_dropless_shared")
    x, _ = rank_inputs(0)
    before = layer(x).output
    names = [n for n, _ in layer.named_parameters()]
    assert parallelize(layer, Topology()) is layer
    torch.testing.assert_close(layer(x).output, before, rtol=0, atol=0)
    assert [n for n, _ in layer.named_parameters()] == names
    entries = [k for n, p in layer.named_parameters() for k, _ in logical_entries(layer, n, p)]
    assert "experts.0.w1" in entries and f"experts.{E - 1}.w2" in entries
    assert "router.weight" in entries and "experts.w1" not in entries
    marked = {n for n, p in layer.named_parameters() if is_expert_param(p)}
    assert marked == {n for n in names if is_expert_param(n)} == {"experts.w1", "experts.w2",
                                                                  "experts.w3"}


def _raising_worker(rank, world):
    import torch.distributed as dist

    init_topology_gloo()
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()   # rank 0 waits for a rank that will never come


def test_harness_reports_worker_traceback_and_stops_the_others():
    import time

    from .harness import WorkerError

    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"(?s)rank 1 raised.*ValueError: boom on rank 1"):
        run_distributed(_raising_worker, 2, timeout=60)
    assert time.monotonic() - start < 45   # not the gloo timeout
