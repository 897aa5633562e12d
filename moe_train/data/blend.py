"""Weighted blends of datasets (``data.blend``) and the one entry the trainer
uses to get its data, :func:`load_data`.

Which dataset the global sample ``i`` comes from is Megatron's BlendedDataset
rule (megatron-core's ``build_blending_indices``): sample ``i`` goes to the
dataset whose share lags its weight most, ``argmax_d(w_d * max(i, 1) -
count_d)``. It depends on the weights alone, so after ``n`` samples each
dataset has given ``n * w_d`` of them to within one, and any prefix is the
same however long the run. The windows themselves are drawn like
:func:`moe_train.data.dataset.sample_batch`: dataset ``d``'s rows of step
``s`` start at ``default_rng([seed, s, 2, d])``. The batch of a step is thus
a pure function of ``(seed, step)`` and a resume continues it exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np

from moe_train.config import ConfigError, DataConfig
from moe_train.data.dataset import TokenDataset, _check_key, _rows, check_enough, load_splits

if TYPE_CHECKING:
    import torch

_BLEND_STREAM = 2  # entropy word that keeps blend draws apart from other streams


def blending_indices_reference(weights: Sequence[float], size: int) -> np.ndarray:
    """The dataset of each of ``size`` samples by Megatron's greedy rule, as
    a plain loop (the reference the C++ helper is tested against)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.zeros(len(w), dtype=np.int64)
    out = np.zeros(size, dtype=np.int16)
    for i in range(size):
        d = int(np.argmax(w * max(float(i), 1.0) - counts))  # first maximum on ties
        out[i] = d
        counts[d] += 1
    return out


def blending_indices(weights: Sequence[float], size: int) -> np.ndarray:
    """The dataset of each of ``size`` samples, from megatron-core's C++
    ``build_blending_indices`` (what BlendedDataset calls)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import helpers_cpp
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    helpers_cpp.build_blending_indices(dataset_index, sample_index, w, len(w), size, False)
    return dataset_index


class Blend:
    """Training datasets drawn in proportion to ``weights`` (see the module
    docstring). ``names`` label the parts."""

    def __init__(self, names: List[str], weights: List[float], datasets: List[TokenDataset]):
        self.names, self.datasets = names, datasets
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self._index = np.zeros(0, dtype=np.int16)

    def dataset_index(self, size: int) -> np.ndarray:
        """The part of each of the first ``size`` global samples. Computed
        once for twice the length asked and reused: the rule is
        prefix-stable, so a longer table starts with the shorter one."""
        if len(self._index) < size:
            self._index = blending_indices(self.weights, max(size, 2 * len(self._index), 1024))
        return self._index[:size]

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def sample_batch(self, step: int, batch_size: int, seq_len: int,
                     seed: int) -> "torch.Tensor":
        """The global batch of ``step``: ``[batch_size, seq_len + 1]``; row
        ``r`` is global sample ``step * batch_size + r`` of its part."""
        import torch

        _check_key(seed, step, "step")
        first = step * batch_size
        parts = self.dataset_index(first + batch_size)[first:]
        batch = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        for d, ds in enumerate(self.datasets):
            where = np.nonzero(parts == d)[0]
            if len(where):
                rng = np.random.default_rng([seed, step, _BLEND_STREAM, d])
                batch[torch.from_numpy(where)] = _rows(ds, rng, len(where), seq_len)
        return batch

    def __repr__(self) -> str:
        return "Blend(" + ", ".join(f"{n}: {w:.3f}" for n, w in zip(self.names, self.weights)) + ")"


@dataclass
class TrainData:
    """What the trainer trains and validates on.

    ``train`` is a TokenDataset or a :class:`Blend`; ``val`` maps each part's
    name to its validation split (one entry, named ``""``, without a blend);
    ``weights`` the parts' normalized weights; ``vocab_size`` the largest
    tokenizer vocabulary among the parts; ``eod_id`` the end-of-document id
    (None when a part does not record one: a bare Megatron prefix)."""

    train: object
    val: Dict[str, TokenDataset]
    weights: Dict[str, float]
    vocab_size: int
    eod_id: Optional[int] = None


def part_name(part) -> str:
    """A blend part's name: ``name``, else the last component of its path."""
    return part.name or os.path.basename(os.path.normpath(part.path))


def load_data(data_cfg: DataConfig, seq_len: int, need_val: bool) -> TrainData:
    """Open ``data.dataset``, or every part of ``data.blend``, and check each
    holds at least one sequence (train, and val when ``need_val``). Parts of
    a blend must share one tokenizer. Raises ConfigError naming the field."""
    if not data_cfg.blend:
        train, val, meta = load_splits(data_cfg)
        check_enough(train, seq_len, "train")
        if need_val:
            check_enough(val, seq_len, "val")
        return TrainData(train, {"": val}, {"": 1.0}, int(meta.get("vocab_size") or 0),
                         meta.get("eod_id"))
    names, trains, vals, metas = [], [], {}, []
    for i, part in enumerate(data_cfg.blend):
        field = f"data.blend[{i}].path"
        try:
            train, val, meta = load_splits(data_cfg, part.path)
            check_enough(train, seq_len, "train")
            if need_val:
                check_enough(val, seq_len, "val")
        except ValueError as exc:  # ConfigError included: say which part
            raise ConfigError(f"{field} ({part.path!r}): "
                              + str(exc).replace(f"data.dataset ({part.path!r}) ", "")) from exc
        tags = {m.get("tokenizer_tag") for m in metas + [meta]} - {None}
        if len(tags) > 1:
            raise ConfigError(f"{field} ({part.path!r}) was prepared with tokenizer "
                              f"{meta.get('tokenizer')}, another part with a different one; "
                              "a blend needs one tokenizer")
        names.append(part_name(part))
        trains.append(train)
        vals[names[-1]] = val
        metas.append(meta)
    total = sum(p.weight for p in data_cfg.blend)
    weights = {n: p.weight / total for n, p in zip(names, data_cfg.blend)}
    vocab = max(int(m.get("vocab_size") or 0) for m in metas)
    eods = {m.get("eod_id") for m in metas}
    return TrainData(Blend(names, [p.weight for p in data_cfg.blend], trains), vals, weights,
                     vocab, eods.pop() if len(eods) == 1 else None)
