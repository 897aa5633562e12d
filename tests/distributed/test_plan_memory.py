"""``moe-train plan`` per-rank bytes against what a real world-2, EP=2 run
allocates: parameters, gradients and AdamW moments summed over the tensors
each rank holds after one optimizer step."""
import torch

from moe_train.config import config_from_dict

from .harness import init_topology_gloo, run_distributed

CFG = {"model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 3, "num_heads": 4,
                 "num_kv_heads": 2, "ffn_hidden_size": 48, "max_seq_len": 16},
       "moe": {"num_experts": 4, "top_k": 2, "ffn_hidden_size": 24, "first_k_dense": 1,
               "num_shared_experts": 1},
       "parallel": {"expert_parallel_size": 2},
       "train": {"global_batch_size": 4, "micro_batch_size": 2, "seq_len": 16}}


def allocated_worker(rank: int, world: int):
    from moe_train.model.transformer import build_model
    from moe_train.parallel import parallelize
    from moe_train.train.optim import build_optimizer

    cfg = config_from_dict(CFG, world_size=world)
    topo = init_topology_gloo(expert_parallel_size=2)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model, cfg.moe), topo)
    opt = build_optimizer(model, cfg.train)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    out = model(ids)
    (out.logits.float().square().mean() + out.aux_loss).backward()
    opt.step()
    params = {id(p): p for p in model.parameters()}.values()

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return {"params": nbytes(params), "grads": nbytes(p.grad for p in params),
            "optimizer": nbytes(moments)}


def test_plan_per_rank_bytes_equal_a_world2_ep2_run():
    from moe_train.plan import make_plan

    plan = make_plan(config_from_dict(CFG, world_size=2), 2)["per_rank_bytes"]
    got = run_distributed(allocated_worker, 2)
    for rank in range(2):
        assert got[rank] == {k: plan[k] for k in ("params", "grads", "optimizer")}, rank
