"""Interpolation of latents and embeddings (LDAE's interpolation: LERP of y_sem, SLERP of z_T).

``lerp(a, b, t) = (1 - t) a + t b``; ``slerp`` follows the great circle between ``a`` and ``b`` per batch
row, which keeps Gaussian noise (``z_T``) at its typical norm where LERP would shrink it. Both accept numpy
arrays or torch tensors, a scalar ``t`` or one value per batch row, and return the endpoints exactly at
``t = 0`` / ``t = 1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ldae.errors import LDAEError


def to_torch(x: Any) -> tuple[torch.Tensor, bool]:
    """``x`` as a torch tensor, and whether it came as numpy (so results can be returned the same way)."""
    if isinstance(x, torch.Tensor):
        return x, False
    return torch.as_tensor(np.asarray(x)), True


def _t_like(t: Any, ref: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor broadcastable against ``ref`` (scalar, or one value per row of a batch)."""
    tt = torch.as_tensor(t, dtype=ref.dtype, device=ref.device)
    if tt.ndim == 0:
        return tt
    if tt.ndim != 1 or ref.ndim < 2 or tt.shape[0] != ref.shape[0]:
        raise LDAEError(
            f"interpolation: t has shape {tuple(tt.shape)}, expected a scalar or ({ref.shape[0]},)"
        )
    return tt.reshape(-1, *([1] * (ref.ndim - 1)))


def check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    """LDAEError unless the two endpoints of an interpolation have one shape."""
    if a.shape != b.shape:
        raise LDAEError(f"interpolation: endpoints differ in shape, {tuple(a.shape)} vs {tuple(b.shape)}")


def lerp(a: Any, b: Any, t: Any) -> Any:
    """``(1 - t) a + t b``; ``t`` scalar or one value per batch row; numpy in -> numpy out."""
    ta, was_np = to_torch(a)
    tb, _ = to_torch(b)
    check_same_shape(ta, tb)
    tt = _t_like(t, ta)
    out = torch.where(tt == 0, ta, torch.where(tt == 1, tb, (1 - tt) * ta + tt * tb))
    return out.numpy() if was_np else out


def slerp(a: Any, b: Any, t: Any, eps: float = 1e-6) -> Any:
    """Spherical interpolation, batch-correct: the angle is computed per sample.

    ``a``/``b`` are a single vector (1-D) or a batch (B, ...) whose non-batch axes are flattened for the
    angle; ``t`` is a scalar or (B,). ``slerp = sin((1-t)θ)/sinθ · a + sin(tθ)/sinθ · b``, so vectors of
    equal norm stay on their sphere. Where ``sin θ < eps`` (near-parallel or anti-parallel vectors) it
    falls back to :func:`lerp`; ``t = 0`` and ``t = 1`` return the endpoints exactly. numpy in -> numpy out.
    """
    ta, was_np = to_torch(a)
    tb, _ = to_torch(b)
    check_same_shape(ta, tb)
    if not ta.is_floating_point():
        ta, tb = ta.double(), tb.double()
    single = ta.ndim == 1
    A = ta.reshape(1, -1) if single else ta.reshape(ta.shape[0], -1)
    B = tb.reshape(A.shape)
    tt = torch.as_tensor(t, dtype=A.dtype, device=A.device)
    if tt.ndim > 1 or (tt.ndim == 1 and tt.shape[0] != A.shape[0]):
        raise LDAEError(f"slerp: t has shape {tuple(tt.shape)}, expected a scalar or ({A.shape[0]},)")
    tt = tt.reshape(-1, 1).expand(A.shape[0], 1)
    na, nb = A.norm(dim=1, keepdim=True), B.norm(dim=1, keepdim=True)
    cos = ((A * B).sum(dim=1, keepdim=True) / (na * nb).clamp_min(torch.finfo(A.dtype).tiny)).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    safe = sin >= eps
    sin_safe = torch.where(safe, sin, torch.ones_like(sin))
    sph = (torch.sin((1 - tt) * theta) / sin_safe) * A + (torch.sin(tt * theta) / sin_safe) * B
    lin = (1 - tt) * A + tt * B
    out = torch.where(safe, sph, lin)
    out = torch.where(tt == 0, A, torch.where(tt == 1, B, out))
    out = out.reshape(ta.shape)
    return out.numpy() if was_np else out
