"""The replicated trainer path (torch DDP for the dense gradients, overlapped
with the backward, plus the hand-written expert reduction under EP) gives
the gradients of the hand-written all-reduce after the backward
(:func:`moe_train.parallel.sync_gradients`, itself checked against one
process in test_grad_sync.py).

One spawned world of 2 ranks, for EP 2 (experts reduced by hand over the
expert-data-parallel group, here one rank: only scaled by 1/dp) and EP 1
(experts inside DDP), each with recompute none, full and selective: two
``NativeEngine`` s, one per path, train 2 steps of 2 accumulated
micro-batches per rank (each rank its own rows; Switch jitter and Shazeer
noisy gating on, shared expert, z-loss). Checked per step:

- after the first micro-batch both paths hold the same local, unreduced
  gradients (DDP's ``no_sync``: no reduction before the last micro-batch);
- after the last backward, before ``clip()``, the DDP path's dense
  gradients are already reduced (equal on both ranks): the reduction ran in
  the backward;
- after ``clip()`` every gradient and the global norm equal the hand-written
  path's (rtol 1e-5; bit-equal at world 2 in practice), and after the two
  updates so do the weights.
"""
import pytest
import torch
import torch.distributed as dist

from moe_train.config import load_config
from moe_train.model.recompute import apply_recompute
from moe_train.moe.routing_noise import keyed_micro_batches
from moe_train.parallel.build import build_parallel_model
from moe_train.parallel.grad_sync import split_params
from moe_train.train.trainer_step import _lm_loss

from .harness import init_topology_gloo, run_distributed

RTOL, ATOL = 1e-5, 1e-7
ACCUM, STEPS, V = 2, 2, 64
CFG = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
       "model.ffn_hidden_size=48", "model.max_seq_len=16", f"model.vocab_size={V}",
       "moe.num_experts=4", "moe.top_k=2", "moe.jitter_eps=0.1", "moe.noisy_gating=true",
       "moe.aux_loss=shazeer", "moe.z_loss_coef=0.001", "moe.num_shared_experts=1",
       "moe.shared_expert_gate=true", "train.seq_len=12", "train.global_batch_size=8",
       "train.micro_batch_size=2", "train.lr=0.01", "train.warmup_steps=1",
       "train.grad_clip=0.5", "train.seed=5"]
LAYOUTS = (2, 1)                          # expert_parallel_size
MODES = ("none", "full", "selective")


def _engine(cfg, topo, mode, path):
    from moe_train.train.engine_native import NativeEngine

    model = build_parallel_model(cfg.model, cfg.moe, topo, cfg.train.seed, topo.device)
    apply_recompute(model, mode).train()
    return NativeEngine(model, cfg, topo, ACCUM, replicate_with=path)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _same_on_both_ranks(tensors, group):
    """True where every dense gradient is equal on the two ranks."""
    flat = torch.cat([t.flatten() for t in tensors])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    return bool(torch.equal(high, low))


def _run(cfg, topo, mode):
    engines = {path: _engine(cfg, topo, mode, path) for path in ("ddp", "allreduce")}
    assert engines["ddp"].ddp is not None and engines["allreduce"].ddp is None
    report = {"experts_by_hand": engines["ddp"].ddp.experts_by_hand, "steps": []}
    rows = ACCUM * cfg.train.micro_batch_size
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 * step + topo.dp_rank)
        micro = list(torch.randint(0, V, (rows, cfg.train.seq_len + 1), generator=gen)
                     .split(cfg.train.micro_batch_size))
        record = {}
        for path, engine in engines.items():
            for m, ids in enumerate(keyed_micro_batches(micro, cfg.train.seed, step,
                                                        topo.dp_rank, ACCUM)):
                out = engine(ids[:, :-1])
                engine.backward(_lm_loss(out.logits, ids[:, 1:]) + out.aux_loss)
                if m == 0:
                    record[f"{path} first"] = _grads(engine.model)
            dense = [p.grad for _, p in split_params(engine.model)[0]]
            record[f"{path} dense reduced before clip"] = _same_on_both_ranks(dense, topo.dp_group)
            record[f"{path} norm"] = engine.clip().clone()
            record[f"{path} grads"] = _grads(engine.model)
            engine.step()
        report["steps"].append(record)
    report["weights"] = {path: {n: p.detach().clone() for n, p in e.model.named_parameters()}
                         for path, e in engines.items()}
    return report


def _worker(rank, world):
    from megatron.core import parallel_state as ps

    cfg = load_config(None, CFG)
    out = {}
    for ep in LAYOUTS:
        topo = init_topology_gloo(expert_parallel_size=ep)
        out[ep] = {mode: _run(cfg, topo, mode) for mode in MODES}
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def reports():
    return run_distributed(_worker, 2, timeout=300)


def _close(got, want, what):
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("ep", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_ddp_path_equals_hand_written_all_reduce(reports, ep, mode):
    for rank, report in enumerate(reports):
        run = report[ep][mode]
        assert run["experts_by_hand"] == (ep > 1)
        for step, rec in enumerate(run["steps"]):
            where = f"rank {rank} ep {ep} {mode} step {step}"
            _close(rec["ddp first"], rec["allreduce first"], f"{where} first micro-batch")
            # Neither path has reduced anything yet after the first micro-batch.
            assert any(not torch.equal(g, reports[1 - rank][ep][mode]["steps"][step]["ddp first"][n])
                       for n, g in rec["ddp first"].items()), where
            assert rec["ddp dense reduced before clip"], where
            assert not rec["allreduce dense reduced before clip"], where
            torch.testing.assert_close(rec["ddp norm"], rec["allreduce norm"], rtol=RTOL, atol=0)
            _close(rec["ddp grads"], rec["allreduce grads"], f"{where} synced")
        _close(run["weights"]["ddp"], run["weights"]["allreduce"], f"rank {rank} ep {ep} {mode}")
