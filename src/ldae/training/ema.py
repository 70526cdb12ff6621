"""Exponential moving average of weights, and frozen sub-modules that stay in eval mode.

``EMA`` is an ``nn.Module`` holding a frozen copy of a model, so its weights travel with the owning
LightningModule (device moves, ``state_dict``, checkpoints) under the prefix ``<name>.module.``.

Frozen modules (:func:`ldae.nets.weights.freeze`, re-exported here): :class:`FrozenEvalMixin` (put it
first in a LightningModule's bases) re-applies ``eval()`` to modules marked by ``freeze`` after every
``train()``, so that a frozen network inside a trained one keeps dropout off and norm statistics fixed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ldae.nets.semantic_encoder import calibrate_code_norm
from ldae.nets.weights import freeze, is_frozen

__all__ = ["EMA", "EMACodeNorm", "EMAStepMixin", "FrozenEvalMixin", "adam_from_config", "freeze", "keep_frozen_eval"]


def keep_frozen_eval(root: nn.Module) -> None:
    """Put every module marked by :func:`freeze` under ``root`` (and their children) back in eval mode."""
    for m in root.modules():
        if is_frozen(m):
            m.eval()


class FrozenEvalMixin:
    """Mixin for ``nn.Module`` subclasses: ``train(True)`` leaves frozen sub-modules in eval mode."""

    def train(self, mode: bool = True):  # type: ignore[no-untyped-def]
        out = super().train(mode)  # type: ignore[misc]
        keep_frozen_eval(self)  # type: ignore[arg-type]
        return out


class EMA(nn.Module):
    """Shadow weights θ_ema ← d·θ_ema + (1-d)·θ after each optimizer step.

    Args:
        model: the trained module (its current weights initialise the shadow copy).
        decay: d (0.999 in the paper).
        warmup: use d_n = min(d, (1+n)/(10+n)) for the n-th update, so short runs are not dominated by
            the random initial weights (off for the paper preset).

    Buffers (e.g. norm statistics) are copied, not averaged. The shadow module is frozen and always in
    eval mode; use :attr:`module` for inference or :meth:`copy_to` to load it into another model. Copied
    running statistics describe the *trained* weights' activations: a shadow encoder with a CodeNorm needs
    :class:`EMACodeNorm` before it is used.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False) -> None:
        super().__init__()
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = freeze(copy.deepcopy(model))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards ``model``'s current weights."""
        d = self.current_decay()
        shadow = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            e = shadow[name]
            e.lerp_(p.detach().to(e.dtype), 1.0 - d)
        shadow_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            shadow_buffers[name].copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the shadow weights into ``model`` (same architecture)."""
        model.load_state_dict(self.module.state_dict(), strict=True)

    def train(self, mode: bool = True) -> EMA:
        """The shadow copy is never put in training mode."""
        return super().train(False)


def adam_from_config(params: Any, optim: dict, decoupled: bool = False) -> torch.optim.Optimizer:
    """Adam (AdamW with ``decoupled``) from a stage's ``optim`` section: ``lr``, ``betas``, ``weight_decay``."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=float(optim["lr"]), betas=tuple(float(b) for b in optim.get("betas", (0.9, 0.999))),
               weight_decay=float(optim.get("weight_decay", 0.0)))


class EMAStepMixin:
    """LightningModule mixin (first in the bases): after every optimiser step, each ``(ema, net)`` of
    :meth:`ema_pairs` is updated."""

    def ema_pairs(self) -> list[tuple[EMA, nn.Module]]:
        raise NotImplementedError

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)  # type: ignore[misc]
        for ema, net in self.ema_pairs():
            ema.update(net)


class EMACodeNorm:
    """Keeps the CodeNorm statistics of an EMA-averaged semantic encoder true to that encoder's own codes.

    :meth:`EMA.update` copies the trained encoder's running statistics into the shadow copy, whose averaged
    weights give other codes (see :func:`ldae.nets.semantic_encoder.calibrate_code_norm` for what that did
    to the demo). :meth:`calibrate` recomputes them on the training split, once per optimiser step at most;
    the owning LightningModule calls it before validation (``best.ckpt`` is written after a validation) and
    :meth:`on_save_checkpoint` at the last epoch (``last.ckpt``; the per-epoch resume points in between
    keep copied statistics, calibrated again at the next validation). Every process runs the whole
    split (no sampler), so all get the same statistics.

    Args:
        state_prefix: the shadow encoder's prefix in the module's ``state_dict`` (e.g. ``ema_encoder.module.``).
    """

    def __init__(self, state_prefix: str) -> None:
        self.state_prefix = state_prefix
        self._step = -1  # global step of the last calibration

    def calibrate(self, lm: Any, encoder: nn.Module) -> None:
        """Calibrate ``encoder`` (the shadow copy) on ``lm.trainer.datamodule``'s training split (nothing to
        do without a trainer and a datamodule with a ``loader``, e.g. a module saved by hand; nothing is run
        for an encoder without CodeNorm, see :func:`~ldae.nets.semantic_encoder.calibrate_code_norm`)."""
        trainer = getattr(lm, "_trainer", None)
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if self._step == lm.global_step or not hasattr(dm, "loader"):
            return
        calibrate_code_norm(encoder, (b["image"].to(lm.device) for b in dm.loader("train", False, dm.eval_batch_size)))
        self._step = lm.global_step

    def on_save_checkpoint(self, lm: Any, encoder: nn.Module, checkpoint: dict[str, Any]) -> None:
        """At the last epoch, calibrate if the statistics are stale and write them into ``checkpoint``."""
        trainer = getattr(lm, "_trainer", None)
        if trainer is None:
            return
        max_epochs = int(trainer.max_epochs or 0)
        if self._step == lm.global_step or (max_epochs > 0 and lm.current_epoch + 1 < max_epochs):
            return
        self.calibrate(lm, encoder)
        state = checkpoint.get("state_dict", {})
        for name, buf in encoder.named_buffers():
            if self.state_prefix + name in state:
                state[self.state_prefix + name] = buf.detach().clone()
