"""Weights bookkeeping shared by every network: strict state-dict loading with a readable error, a
fingerprint naming exact weights, and freezing a network for inference (pure torch; used by the
checkpoint format, the training stages and the nets' own loaders).

Frozen modules: a pretrained network used inside a trainable model must keep dropout off and norm
statistics fixed. ``requires_grad_(False)`` is not enough: anything calling ``.train()`` on the parent
(older Lightning versions at fit start, user code, some callbacks) recursively switches the frozen
child back to training mode. :func:`freeze` therefore also marks the module, so that
:class:`ldae.training.ema.FrozenEvalMixin` can put marked modules back in eval mode after ``train()``.
"""

from __future__ import annotations

import torch

from ldae.errors import CheckpointError

FROZEN_ATTR = "_ldae_frozen"


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """No gradients, eval mode, and marked (see the module docstring); returns ``module``."""
    module.requires_grad_(False)
    module.eval()
    setattr(module, FROZEN_ATTR, True)
    return module


def is_frozen(module: torch.nn.Module) -> bool:
    """True for a module marked by :func:`freeze`."""
    return bool(getattr(module, FROZEN_ATTR, False))


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (names, shapes, dtypes, bytes): names the exact weights that a
    later stage was trained on, so that loading it on other weights can be refused."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_state_dict_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a message listing missing/unexpected keys
    and shape mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:

        def _head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_head(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_head(mismatched)}")
        raise CheckpointError(f"{source}: weights do not match the model ({'; '.join(parts)})")
    module.load_state_dict(state, strict=True)
