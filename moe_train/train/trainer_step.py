"""The steps of a run: one training step (forward and backward over the
micro-batches, the ranks' agreement on skipping or stopping, the update), one
evaluation pass, and the metrics of a logged step. :class:`StepMixin` is a base
of :class:`moe_train.train.trainer.Trainer`, which builds everything it uses
and decides when each step runs (batch semantics and the averaging over ranks:
the trainer module's docstring).

Like trainer.py, this file never imports torch.distributed: collectives come
from moe_train.parallel.collectives, the update from the engine.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from moe_train.config import Config
from moe_train.moe.balancing import update_expert_biases
from moe_train.moe.routing_noise import keyed_micro_batches
from moe_train.parallel.collectives import any_rank, reduce_mean, reduce_sum
from moe_train.train import nonfinite
from moe_train.train.metrics import can_drop, moe_layer_metrics


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    # CE in fp32 even when the logits come out of bf16 autocast.
    return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]),
                           targets_BS.reshape(-1))


class StepMixin:
    """The per-step methods of :class:`~moe_train.train.trainer.Trainer`. They
    use what ``Trainer.__init__`` sets: ``cfg``, ``topology``, ``device``,
    ``model``, ``engine``, ``accum``, ``rows_per_rank``, ``data``,
    ``train_ds``, ``val_data`` and ``signals``."""

    def _model_kwargs(self, inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``document_ids`` for the model when data.document_mask is on."""
        if not self.cfg.data.document_mask:
            return {}
        from moe_train.model.document_mask import document_ids

        return {"document_ids": document_ids(inputs, self.data.eod_id)}

    # -- one step -------------------------------------------------------------

    def _batch(self, step: int) -> List[torch.Tensor]:
        """This rank's micro-batches of optimizer step ``step``."""
        from moe_train.data import sample_batch

        t, r = self.cfg.train, self.topology.dp_rank
        batch = sample_batch(self.train_ds, step, t.global_batch_size, t.seq_len, t.seed)
        rows = batch[r * self.rows_per_rank:(r + 1) * self.rows_per_rank]
        return list(rows.split(t.micro_batch_size))

    def _train_step(self, step: int) -> Dict[str, Any]:
        """Forward/backward over the micro-batches, sync, clip, update.
        Returns detached tensors (converted to floats only when logged)."""
        model, device = self.model, self.device
        model.train()
        lm_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        named: Dict[str, torch.Tensor] = {}
        counts: List[torch.Tensor] = []
        selected: List[torch.Tensor] = []
        dropped: List[torch.Tensor] = []
        engine = self.engine
        lr = engine.lr
        t = self.cfg.train
        # Each micro-batch routes under its own noise key (moe/routing_noise.py).
        for micro in keyed_micro_batches(self._batch(step), t.seed, step,
                                         self.topology.dp_rank, self.accum):
            micro = micro.to(device, non_blocking=True)
            inputs, targets = micro[:, :-1], micro[:, 1:]
            with _autocast(self.cfg, device):
                out = engine(inputs, **self._model_kwargs(inputs))
                lm = _lm_loss(out.logits, targets)
                loss = lm + out.aux_loss
            engine.backward(loss)
            lm_sum += lm.detach()
            aux_sum += out.aux_loss.detach().float()
            for name, value in out.losses.items():
                named[name] = named.get(name, 0) + value.detach().float()
            for i, stats in enumerate(out.moe_stats):
                if i == len(counts):
                    counts.append(torch.zeros_like(stats["tokens_per_expert"]))
                    dropped.append(torch.zeros((), device=device))
                counts[i] += stats["tokens_per_expert"]
                dropped[i] += stats["dropped_fraction"].to(device)
                if "selected_per_expert" in stats:
                    if i == len(selected):
                        selected.append(torch.zeros_like(stats["selected_per_expert"]))
                    selected[i] += stats["selected_per_expert"]
        # The engine clips first so that every rank can agree on skipping a
        # non-finite step (and on a stop signal) before anything is updated.
        pre_norm = engine.clip()
        skip, stop = self._agree(lm_sum + aux_sum, pre_norm)
        if skip and engine.skip():
            grad_norm = pre_norm
        else:  # (an engine that cannot skip, DeepSpeed, updates anyway)
            grad_norm = engine.step()
        rate = self.cfg.moe.expert_bias_update_rate
        if rate > 0 and selected and not skip:
            # Aux-loss-free balancing steers by the load of the whole global
            # batch: every rank sums the same counts, so the replicated
            # biases stay identical without being sent anywhere.
            loads = reduce_sum(torch.stack(selected).double(), self.topology)
            update_expert_biases(model, list(loads), rate)
        n = self.accum
        return {"lm": lm_sum / n, "aux": aux_sum / n,
                "named": {k: v / n for k, v in named.items()},
                "counts": counts, "dropped": [d / n for d in dropped],
                "grad_norm": grad_norm.detach(), "lr": lr, "skipped": skip, "stop": stop}

    def _agree(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor]):
        """``(skip, stop signal number)``, the same on every rank: one small
        all-reduce of this rank's non-finite verdict and received signal."""
        flags = torch.stack([nonfinite.local_nonfinite(loss, grad_norm),
                             torch.tensor(float(self.signals.pending()), device=self.device)])
        skip, stop = any_rank(flags, self.topology).tolist()
        return skip > 0, int(stop)

    def evaluate(self) -> Dict[str, float]:
        """Mean LM loss (cross-entropy only) over the fixed validation batches
        of each blend part (``""`` without a blend), in eval mode, without
        touching the training RNG streams."""
        model = self.model
        model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        names = list(self.val_data)
        totals = torch.zeros(len(names), device=self.device)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for i, name in enumerate(names):
                for batch in self.val_data[name]:
                    batch = batch.to(self.device)
                    with _autocast(self.cfg, self.device):
                        inputs = batch[:, :-1]
                        logits = model(inputs, **self._model_kwargs(inputs)).logits
                        totals[i] += _lm_loss(logits, batch[:, 1:])
                totals[i] /= max(1, len(self.val_data[name]))
        model.train()
        return dict(zip(names, reduce_mean(totals, self.topology).tolist()))

    def _step_metrics(self, result: Dict[str, Any], counts: List[torch.Tensor],
                      perf: Dict[str, float]):
        """The scalars and histograms of a logged step (averaged over the
        data-parallel ranks; ``counts`` already summed over them)."""
        # (train/skipped_steps is added by fit: steps skipped since the last log.)
        named = result["named"]
        names = sorted(named)
        # One collective for every scalar, then one host transfer.
        packed = reduce_mean(torch.stack(
            [result["lm"], result["aux"]] + [named[k] for k in names] + result["dropped"]),
            self.topology).tolist()
        lm, aux = packed[0], packed[1]
        scalars = {"loss/train": lm + aux, "train/lm_loss": lm, "train/aux_loss": aux}
        scalars.update({f"train/{k}": packed[2 + i] for i, k in enumerate(names)})
        scalars.update({"train/lr": result["lr"], "train/grad_norm": result["grad_norm"].item()})
        scalars.update(perf)
        scalars.update(moe_layer_metrics(counts, packed[2 + len(names):], can_drop(self.cfg.moe)))
        histograms = {f"moe/layer_{i}/tokens_per_expert": c.long() for i, c in enumerate(counts)}
        return scalars, histograms
