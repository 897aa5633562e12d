"""Checkpoints do not depend on the expert-parallel layout that wrote them.

At world 2 with EP=2 a run trains 6 steps and saves at step 3 (each rank
writes its own two experts); that run's in-memory state at the moment of the
save, and its validation loss at step 3, are the reference. The step-3
checkpoint is then loaded

- at EP=1 in one process, at EP=4 on 4 ranks and at TP=2 (EP=1) on 2
  ranks: the validation loss is the saving run's (rtol 1e-5), every expert
  weight and every expert's AdamW state (exp_avg, exp_avg_sq, step) equals
  the saving run's exactly, whichever rank holds it now, and the dense
  parameters too (TP shards put back together for the comparison);
- and training continues in each layout: steps 4-6 log the losses of the
  uninterrupted 6-step EP=2 run (rtol 1e-5; micro-batches of 2 everywhere
  so the per-micro-batch Switch loss matches).

Resume exactness at world 2, EP=2, with random routing jitter (so the
per-rank RNG state matters): a run resumed from its step-3 checkpoint logs
exactly the losses, learning rates and gradient norms of the uninterrupted
6-step run and ends with the same weights (equality, not tolerance).
"""
import json
import os
import re

import pytest
import torch

from moe_train.config import load_config
from moe_train.parallel.dist_checkpoint import read_state

from .harness import init_topology_gloo, run_distributed

BASE = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.max_seq_len=32",
        "moe.num_experts=4", "moe.top_k=2", "moe.router=token_choice",
        "moe.capacity_factor=null", "moe.z_loss_coef=0.001", "train.precision=fp32",
        "train.seq_len=16", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.lr=0.01", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=3",
        "train.eval_iters=2", "train.save_every=3", "train.keep_last=5",
        "train.heatmap_every=0", "train.seed=5"]
JITTER = ["moe.jitter_eps=0.1"]
KEYS = ("loss/train", "train/lm_loss", "train/aux_loss", "train/grad_norm", "train/lr", "loss/val")
RTOL = 1e-5


def config(run_dir, ep, steps, extra=()):
    cfg = load_config(None, BASE + list(extra) + [f"parallel.expert_parallel_size={ep}",
                                                  f"train.max_steps={steps}"])
    cfg.train.run_dir = run_dir
    return cfg


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r for r in map(json.loads, fh)}


def _whole(tensor, param, topology):
    """``tensor`` (a parameter or its optimizer state) as the TP=1 tensor:
    TP shards concatenated with a plain all_gather."""
    tensor = tensor.detach().clone()
    if not getattr(param, "tensor_model_parallel", False) or tensor.shape != param.shape:
        return tensor
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(topology.tp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=topology.tp_group)
    return torch.cat(parts, dim=param.partition_dim)


def local_state(model, opt, topology):
    """This rank's parameters and AdamW state, by single-model name, TP shards whole."""
    from moe_train.parallel import logical_entries

    params, optim = {}, {}
    for name, p in model.named_parameters():
        for gname, view in logical_entries(model, name, p):
            params[gname] = _whole(view, p, topology)
        for k, v in opt.state[p].items():
            for gname, view in logical_entries(model, name, v):
                optim.setdefault(gname, {})[k] = _whole(view, p, topology)
    return {"params": params, "optim": optim}


def _expert_of(name):
    """Global expert index of a logical expert entry (``...experts.<g>.w1``), else None."""
    match = re.search(r"\.experts\.(\d+)\.w[123]$", name)
    return None if match is None else int(match.group(1))


def make_trainer(cfg, resume=None):
    from moe_train.parallel.topology import env_world_size, init_topology
    from moe_train.train.trainer import Trainer

    cfg.validate(env_world_size())
    return Trainer(cfg, init_topology(cfg.parallel), resume=resume)


def save_at_ep2(rank, world, root):
    """World 2, EP 2: the uninterrupted runs, the checkpoint and the reference."""
    import moe_train.train.checkpoint as ckpt

    # One process group for the three runs of this worker.
    init_topology_gloo(expert_parallel_size=2)
    out = {}
    save = ckpt.save_checkpoint

    def save_and_capture(run_dir, step, model, optimizer, *args, **kwargs):
        # The reference: the saving run's own state at the moment it saves.
        if step == 3:
            out["saved_state"] = local_state(model, optimizer, kwargs["topology"])
        return save(run_dir, step, model, optimizer, *args, **kwargs)

    ckpt.save_checkpoint = save_and_capture
    try:
        make_trainer(config(os.path.join(root, "straight"), 2, 6)).fit()
    finally:
        ckpt.save_checkpoint = save
    # Resume exactness with jitter: the per-rank RNG state must come back.
    make_trainer(config(os.path.join(root, "jitter_straight"), 2, 6, JITTER)).fit()
    make_trainer(config(os.path.join(root, "jitter_resumed"), 2, 6, JITTER),
                 resume=os.path.join(root, "jitter_straight", "checkpoints", "step_3")).fit()
    return out


# Where the step-3 checkpoint of the EP=2 run is loaded: (world, ep, tp).
LAYOUTS = {"ep1": (1, 1, 1), "ep4": (4, 4, 1), "tp2": (2, 1, 2)}


def load_elsewhere(rank, world, root, layout):
    """Load the EP=2 checkpoint in ``layout``, report what was loaded, continue."""
    _, ep, tp = LAYOUTS[layout]
    if world > 1:
        init_topology_gloo(tensor_parallel_size=tp, expert_parallel_size=ep)
    trainer = make_trainer(config(os.path.join(root, layout), ep, 6,
                                  [f"parallel.tensor_parallel_size={tp}"]),
                           resume=os.path.join(root, "straight", "checkpoints", "step_3"))
    out = {"start_step": trainer.start_step, "val_loss": trainer.evaluate()[""],
           "state": local_state(trainer.model, trainer.engine.optimizer, trainer.topology)}
    out["summary"] = trainer.fit()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reshard"))
    saved = run_distributed(save_at_ep2, 2, root, timeout=180)
    loaded = {"ep1": [load_elsewhere(0, 1, root, "ep1")]}
    for layout in ("ep4", "tp2"):
        loaded[layout] = run_distributed(load_elsewhere, LAYOUTS[layout][0], root, layout,
                                         timeout=240)
    return root, saved, loaded


def merged(reports, key):
    """Union over ranks of a {name: value} report; replicas must agree exactly."""
    out = {}
    for report in reports:
        for name, value in report[key].items():
            if name in out:
                assert _equal(out[name], value), name
            out[name] = value
    return out


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def test_each_ep_rank_wrote_its_own_experts(runs):
    root, _, _ = runs
    ckpt = os.path.join(root, "straight", "checkpoints", "step_3")
    files = sorted(os.listdir(os.path.join(ckpt, "model")))
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    names = set(read_state(os.path.join(ckpt, "model")))
    for layer in (0, 1):
        for e in range(4):
            assert f"blocks.{layer}.ffn.experts.{e}.w1" in names
    # Experts 0-1 live in rank 0's file, 2-3 in rank 1's: nothing was gathered.
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(os.path.join(ckpt, "model")).read_metadata().storage_data
    for index, info in storage.items():
        expert = _expert_of(index.fqn)
        if expert is not None:
            assert info.relative_path == f"__{expert // 2}_0.distcp", index.fqn
    assert sorted(os.listdir(os.path.join(ckpt, "rng"))) == ["rank_0.pt", "rank_1.pt"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_load_in_another_layout_gives_the_saved_model(runs, layout):
    root, saved, loaded = runs
    reports = loaded[layout]
    assert all(r["start_step"] == 3 for r in reports)
    # Validation loss: the saving run evaluated right before its step-3 save.
    val = records(os.path.join(root, "straight"))[3]["loss/val"]
    for r in reports:
        assert r["val_loss"] == pytest.approx(val, rel=RTOL)

    want = [s["saved_state"] for s in saved]
    got = [r["state"] for r in reports]
    want_params, got_params = merged(want, "params"), merged(got, "params")
    assert got_params.keys() == want_params.keys()
    for name in want_params:
        assert torch.equal(got_params[name], want_params[name]), name
    want_opt, got_opt = merged(want, "optim"), merged(got, "optim")
    assert got_opt.keys() == want_opt.keys()
    experts = [n for n in want_opt if _expert_of(n) is not None]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (w1, w2, w3)
    for name in want_opt:
        assert want_opt[name].keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        assert _equal(got_opt[name], want_opt[name]), name
    # Each rank of the new layout holds only its own experts (E/ep of them).
    for r in reports:
        held = {_expert_of(n) for n in r["state"]["params"] if _expert_of(n) is not None}
        assert len(held) == 4 // LAYOUTS[layout][1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_continues_in_another_layout(runs, layout):
    root, _, loaded = runs
    assert all(r["summary"]["steps"] == 6 for r in loaded[layout])
    want, got = records(os.path.join(root, "straight")), records(os.path.join(root, layout))
    assert sorted(got) == [4, 5, 6]
    for step in got:
        for key in KEYS:
            assert (key in got[step]) == (key in want[step]), (step, key)
            if key in want[step]:
                assert got[step][key] == pytest.approx(want[step][key], rel=RTOL), \
                    (layout, step, key)


def test_resume_at_ep2_is_exact(runs):
    root, _, _ = runs
    straight = os.path.join(root, "jitter_straight")
    resumed = os.path.join(root, "jitter_resumed")
    want, got = records(straight), records(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        for key in KEYS:
            if key in want[step]:
                assert got[step][key] == want[step][key], (step, key)
    a = read_state(os.path.join(straight, "checkpoints", "step_6", "model"))
    b = read_state(os.path.join(resumed, "checkpoints", "step_6", "model"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
