"""FSDP2 full sharding and HSDP with expert and tensor parallelism:
optimizer state per rank; checkpoints that move between FSDP+EP=2 (world 2)
and replicated EP=1 (world 1) in both directions onto the same curve; world
4 layouts (full shard with EP 2, HSDP, TP=2 x FSDP, full shard without EP)
trained against world 1. (World-2 FSDP runs against world 1 are in
test_train_equivalence.py.)"""
import os

import pytest
import torch

from moe_train.config import load_config
from moe_train.parallel.build import build_parallel_model
from moe_train.parallel.expert_parallel import is_expert_param
from moe_train.train.optim import build_optimizer
from moe_train.train.trainer import train

from .harness import init_topology_gloo, run_distributed
from .test_train_equivalence import BASE, records

FSDP_EP2 = ["parallel.dp_shard_size=2", "parallel.expert_parallel_size=2"]
STEPS, SAVE = 6, 3
COMMON = [f"train.max_steps={STEPS}", f"train.save_every={SAVE}", "train.eval_every=3"]


def _cfg(run_dir, extra=()):
    cfg = load_config(None, BASE + COMMON + list(extra))
    cfg.train.run_dir = run_dir
    return cfg


def _optimizer_share(cfg, topo):
    """(elements of AdamW state on this rank, elements of the whole model's)."""
    cfg.model.vocab_size = 384  # what the trainer infers for the byte tokenizer
    model = build_parallel_model(cfg.model, cfg.moe, topo, 0, torch.device("cpu"), 2)
    opt = build_optimizer(model, cfg.train)
    model(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    opt.step()
    local = sum(v.to_local().numel() for s in opt.state.values() for k, v in s.items()
                if k != "step")
    # A DTensor's numel is its global one; experts hold E/ep of E (EP=2).
    total = sum(p.numel() * (2 if is_expert_param(n) else 1) for n, p in model.named_parameters())
    return local, 2 * total  # two AdamW moments per element


def _worker(rank, world, run_dir, resume):
    from moe_train.train.trainer import Trainer

    topo = init_topology_gloo(expert_parallel_size=2)
    share = _optimizer_share(_cfg(run_dir, FSDP_EP2), topo) if resume is None else None
    return {"summary": Trainer(_cfg(run_dir, FSDP_EP2), topo, resume).fit(), "share": share}


def test_fsdp_ep2_checkpoints_cross_load_with_replicated_ep1(tmp_path):
    straight = str(tmp_path / "world1")
    train(_cfg(straight))
    fsdp = str(tmp_path / "fsdp_ep2")
    results = run_distributed(_worker, 2, fsdp, None, timeout=300)

    # ~1/dp of the AdamW state per rank (experts are split by EP already, the
    # rest by FSDP): the two ranks together hold it once.
    shares = [r["share"] for r in results]
    assert sum(local for local, _ in shares) == shares[0][1]
    for local, total in shares:
        assert local == pytest.approx(total / 2, rel=0.1)

    # Replicated EP=1 resumes the FSDP+EP=2 checkpoint, FSDP+EP=2 resumes the
    # world-1 one: both continue on the straight run's curve.
    from_fsdp = str(tmp_path / "from_fsdp")
    train(_cfg(from_fsdp), resume=os.path.join(fsdp, "checkpoints", f"step_{SAVE}"))
    from_world1 = str(tmp_path / "from_world1")
    run_distributed(_worker, 2, from_world1,
                    os.path.join(straight, "checkpoints", f"step_{SAVE}"), timeout=300)
    want = records(straight)
    for run in (fsdp, from_fsdp, from_world1):
        got = records(run)
        for step in range(SAVE + 1, STEPS + 1):
            for key in ("loss/train", "train/grad_norm"):
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), \
                    (run, step, key)
        assert got[STEPS]["loss/val"] == pytest.approx(want[STEPS]["loss/val"], rel=1e-5), run


FSDP4_EP2 = ["parallel.dp_shard_size=4", "parallel.expert_parallel_size=2"]
MICRO2 = ["train.micro_batch_size=2", "train.save_every=0"]


def _world4_worker(rank, world, run_dir):
    return train(_cfg(run_dir, FSDP4_EP2 + MICRO2))


def test_world4_full_shard_with_ep2_trains_like_one_process(tmp_path):
    """World 4, dp_shard_size 4, EP=2: experts sharded along the expert
    dimension over 2 expert-data-parallel ranks, everything else over 4."""
    from moe_train.train.checkpoint import load_model

    ref, run = str(tmp_path / "world1"), str(tmp_path / "fsdp4_ep2")
    train(_cfg(ref, MICRO2))
    run_distributed(_world4_worker, 4, run, timeout=240)
    want, got = records(ref), records(run)
    for step in want:
        for key in ("loss/train", "train/grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)
    ref_state, state = load_model(ref)[0].state_dict(), load_model(run)[0].state_dict()
    for name, value in state.items():
        # atol = lr / 100, as in test_train_equivalence.py.
        torch.testing.assert_close(value, ref_state[name], rtol=1e-4, atol=1e-4)


TEN = MICRO2 + ["train.max_steps=10"]


@pytest.fixture(scope="module")
def ten_step_reference(tmp_path_factory):
    """World 1, 10 steps in micro-batches of 2, checkpoints at steps 5 and 10."""
    run_dir = str(tmp_path_factory.mktemp("world1"))
    train(_cfg(run_dir, TEN + ["train.save_every=5"]))
    return run_dir
HSDP = {"hsdp2": ["parallel.dp_shard_size=2"] + TEN + ["train.save_every=5"],
        "hsdp2_ep2": ["parallel.dp_shard_size=2", "parallel.expert_parallel_size=2"] + TEN}


def _hsdp_worker(rank, world, run_dirs, ports):
    # Both layouts in one spawned world, each train() joining and leaving its
    # own process group (on its own port): the second build must not reuse
    # the first one's meshes (fsdp._BUILDS; this order failed without it).
    for (name, extra), port in zip(HSDP.items(), ports):
        os.environ["MASTER_PORT"] = str(port)
        train(_cfg(run_dirs[name], extra))
    # Resume the EP=1 HSDP checkpoint of step 5 under HSDP with EP=2: the
    # shards are gathered into the logical layout and scattered back.
    os.environ["MASTER_PORT"] = str(ports[-1])
    train(_cfg(run_dirs["resumed"], HSDP["hsdp2_ep2"]),
          resume=os.path.join(run_dirs["hsdp2"], "checkpoints", "step_5"))


def test_world4_hsdp_with_and_without_ep2_trains_like_one_process(ten_step_reference,
                                                                   tmp_path):
    """World 4, dp_shard_size 2 (HSDP: a 2 x 2 replicate x shard mesh over
    the data-parallel ranks). EP=1: experts on the same 2 x 2 mesh; EP=2: the
    expert-data-parallel groups have 2 ranks, so experts are fully sharded
    over them while blocks and root are HSDP. 10 steps against world 1, and
    steps 6-10 of the EP=1 run's step-5 checkpoint resumed under EP=2."""
    from moe_train.train.checkpoint import load_model

    from .harness import free_port

    ref = ten_step_reference
    run_dirs = {name: str(tmp_path / name) for name in list(HSDP) + ["resumed"]}
    run_distributed(_hsdp_worker, 4, run_dirs, [free_port() for _ in range(3)], timeout=300)
    want = records(ref)
    ref_state = load_model(ref)[0].state_dict()
    assert max(want) == 10
    for name, run in run_dirs.items():
        got = records(run)
        for step in (range(6, 11) if name == "resumed" else want):
            for key in ("loss/train", "train/grad_norm"):
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), \
                    (name, step, key)
        assert got[10]["loss/val"] == pytest.approx(want[10]["loss/val"], rel=1e-5), name
        state = load_model(run)[0].state_dict()
        for key, value in state.items():
            # atol = lr / 100, as in test_train_equivalence.py.
            torch.testing.assert_close(value, ref_state[key], rtol=1e-5, atol=1e-4,
                                       msg=lambda m: f"{name} {key}: {m}")


# World 4 as TP=2 x dp 2, FSDP2 full shard over dp with EP=2 (experts: one
# expert-data-parallel rank each), then dp 4 full shard with EP=1.
TP_FSDP = {"tp2_fsdp2_ep2": ["parallel.tensor_parallel_size=2", "parallel.dp_shard_size=2",
                             "parallel.expert_parallel_size=2"] + TEN + ["train.save_every=5"],
           "fsdp4": ["parallel.dp_shard_size=4"] + TEN}


def _tp_fsdp_worker(rank, world, run_dirs, resume, ports):
    # Each train() joins and leaves its own process group (own port).
    for (name, extra), port in zip(TP_FSDP.items(), ports):
        os.environ["MASTER_PORT"] = str(port)
        train(_cfg(run_dirs[name], extra))
    # Load under TP=2 x FSDP (shards scattered back into TP-local tensors).
    os.environ["MASTER_PORT"] = str(ports[-1])
    train(_cfg(run_dirs["tp2_resumed"], TP_FSDP["tp2_fsdp2_ep2"]), resume=resume)


def test_world4_fsdp_with_tp2_and_without_ep_trains_like_one_process(ten_step_reference,
                                                                     tmp_path):
    """FSDP2 composed with TP: TP=2 x full shard over dp=2 with EP=2, and
    dp_shard_size 4 with EP=1, give world 1's losses, gradient norms,
    validation loss and final weights over 10 steps. Checkpoints cross both
    ways: world 1 resumes TP=2 x FSDP's step 5, TP=2 x FSDP resumes world 1's."""
    from moe_train.train.checkpoint import load_model

    from .harness import free_port

    ref = ten_step_reference
    run_dirs = {name: str(tmp_path / name) for name in list(TP_FSDP) + ["tp2_resumed"]}
    run_distributed(_tp_fsdp_worker, 4, run_dirs,
                    os.path.join(ref, "checkpoints", "step_5"),
                    [free_port() for _ in range(3)], timeout=300)
    run_dirs["world1_resumed"] = str(tmp_path / "world1_resumed")
    train(_cfg(run_dirs["world1_resumed"], TEN),
          resume=os.path.join(run_dirs["tp2_fsdp2_ep2"], "checkpoints", "step_5"))
    want = records(ref)
    ref_state = load_model(ref)[0].state_dict()
    for name, run in run_dirs.items():
        got = records(run)
        for step in (range(6, 11) if name.endswith("resumed") else want):
            for key in ("loss/train", "train/grad_norm"):
                assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), \
                    (name, step, key)
        assert got[10]["loss/val"] == pytest.approx(want[10]["loss/val"], rel=1e-5), name
        state = load_model(run)[0].state_dict()
        assert state.keys() == ref_state.keys(), name
        for key, value in state.items():
            # atol = lr / 100, as in test_train_equivalence.py.
            torch.testing.assert_close(value, ref_state[key], rtol=1e-5, atol=1e-4,
                                       msg=lambda m: f"{name} {key}: {m}")
