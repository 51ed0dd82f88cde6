"""``EngramTrainer``: the transformers ``Trainer`` with Engram's optimizer groups and sparse tables.

The stock ``Trainer`` builds one AdamW over every parameter and clips and logs the gradient norm
with ``torch.nn.utils.clip_grad_norm_``, which cannot read sparse gradients: tables built with
``EngramConfig(sparse_grad=True)`` then fail at the first step (``NotImplementedError ...
'SparseCPU'``). ``EngramTrainer`` is a drop-in replacement::

    from engram.hf.trainer import EngramTrainer

    trainer = EngramTrainer(model=model, args=TrainingArguments(..., max_grad_norm=1.0),
                            train_dataset=ds, data_collator=collator)
    trainer.train()

- optimizer: :func:`engram.training.optim.build_optimizer` (AdamW for dense weights; the paper's Adam at
  ``table_lr_mult`` x lr, no weight decay, for tables: :class:`~engram.training.optim.RowSparseAdam`
  when their gradients are sparse), combined into one :class:`~engram.training.optim.CombinedOptimizer`
  so the Trainer's LR scheduler, checkpointing and accelerate see one optimizer. It reads
  ``learning_rate``, ``weight_decay``, ``adam_beta1`` / ``adam_beta2`` from the arguments; pass
  ``optimizers=(...)`` to use your own instead.
- clipping and the logged ``grad_norm``: :func:`engram.training.optim.clip_grad_norm_`, which counts each
  coalesced sparse row once and scales dense and sparse gradients alike (equal to torch's
  clipping when every gradient is dense; tested).

It overrides ``Trainer._clip_grad_norm`` / ``_get_grad_norm`` (internal, same signatures in
transformers 5.23 and 5.24; see :mod:`engram.hf.compat`) for single-process and DDP runs; mixed
DTensor meshes and DeepSpeed keep the Trainer's own code.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import Trainer

from engram.training.optim import CombinedOptimizer, build_optimizer, clip_grad_norm_

__all__ = ["EngramTrainer"]


class EngramTrainer(Trainer):
    """``transformers.Trainer`` for Engram models (see the module docstring)."""

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is None:
            a = self.args
            self.optimizer = CombinedOptimizer(build_optimizer(
                self.model, lr=a.learning_rate, weight_decay=a.weight_decay, betas=(a.adam_beta1, a.adam_beta2),
            ))
        return self.optimizer

    def _engram_norm(self, model: Any, max_norm: float) -> Any:
        if self._has_mixed_mesh_grads(model):
            return None
        return clip_grad_norm_(model.parameters(), max_norm)

    def _clip_grad_norm(self, model: Any) -> Any:
        norm = self._engram_norm(model, self.args.max_grad_norm)
        return super()._clip_grad_norm(model) if norm is None else norm

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        if grad_norm is None:
            grad_norm = self._engram_norm(model, math.inf)
        return super()._get_grad_norm(model, grad_norm=grad_norm)
