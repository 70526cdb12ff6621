"""Weights bookkeeping shared by every network: strict state-dict loading with a readable error, and a
fingerprint naming exact weights (pure torch; used by the checkpoint format and by the nets' own loaders)."""

from __future__ import annotations

import torch

from ldae.errors import CheckpointError


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
