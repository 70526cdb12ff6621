"""3D convolutions for CPUs: the weight gradient as a *forward* convolution on CPUs without AVX-512, and
oneDNN (not ATen's im2col loop) for single-volume batches.

Why. PyTorch's CPU convolutions are oneDNN's. On an x86 CPU without AVX-512 (most laptops, many cloud and
cluster nodes) oneDNN has fast direct kernels for the forward pass and the input gradient of a 3D
convolution (``jit:avx2``, ``brg_conv_fwd:avx2``), but its weight gradient falls back to im2col + GEMM
(``x64:gemm:jit`` in ``ONEDNN_VERBOSE=1`` output), which at the ``tiny`` preset's sizes runs 2-5x slower
than the forward pass of the same convolution: measured on a 2-core AVX2 EPYC, the weight gradients were
55-75 % of a training step of every 3D stage (issue 19).

The weight gradient is itself a correlation. For ``y = conv3d(x, W)`` with stride s, padding p and
dilation d, and x_pad the zero-padded input,

    ∂L/∂W[o, c, k] = Σ_{n, q} ∂L/∂y[n, o, q] · x_pad[n, c, s·q + d·k]      (per spatial axis)

which is a forward convolution of x with its batch and channel axes swapped (xᵀ: ``(C, N, D, H, W)``) by
the output gradient as the kernel (∂L/∂yᵀ: ``(O, N, D', H', W')``), with the kernel dilated by s, stride
d and the same padding p: output ``[c, o, k]`` for k = 0, 1, ...; the first ``kernel_size`` positions per
axis are ∂L/∂Wᵀ (any further ones belong to offsets past the kernel and are dropped). oneDNN runs that with
its direct forward kernels. The input gradient (oneDNN's direct kernel) and the bias gradient (a sum) are
computed as before; only the summation order of the weight gradient changes (float rounding, ~1e-6
relative in float32).

Where it applies (:func:`fast_weight_grad_applies`): CPU tensors of float32/float64 outside autocast,
``groups=1``, zero padding given as numbers, a weight that needs its gradient, and kernels at least twice
the stride on every axis (3x3x3 stride 1, 4x4x4 stride 2). Measured per layer of the demo's networks (AVX2,
one thread, weight gradient alone): 1.4-4.8x faster for those; 1x1x1 convolutions (oneDNN's ``jit_1x1``
is direct) and 3x3x3 stride-2 ones (0.8x) keep oneDNN's. Everything else — forward values, CUDA, autocast,
CPUs with AVX-512, whose oneDNN has direct weight-gradient kernels — runs the stock ``nn.Conv3d`` code.

Batches of one volume. PyTorch picks oneDNN for a CPU float32 convolution only if the batch has more than
one sample, or N·C·D·H (the first four sizes) exceeds 20480, or the kernel is larger than 3 (a rule made
for 2D images); otherwise it runs ATen's own im2col convolution (``slow_conv3d``). Single 3D volumes at the
demo's sizes (1x16x32x40x32 in the autoencoder, 1x32x8x10x8 in the latent UNet) fall on the slow side:
measured on the AVX2 EPYC (one thread), the autoencoder's encode of one scan took 7x, its decode 3.7x and
a guided ε evaluation 1.7x as long as through oneDNN, which the evaluation's interpolation and manipulation
(one scan at a time) pay at every DDIM step. :class:`FastConv3d` therefore calls oneDNN
(``torch.mkldnn_convolution``) for batch-1 CPU float32 convolutions with a kernel larger than 1x1x1 when no
gradient is needed (outputs agree to float rounding, ~1e-6 relative); ``torch.backends.mkldnn.enabled =
False`` turns it off like every other oneDNN use.

Use :func:`use_fast_conv3d` on a module (the training stages and :class:`ldae.model.LDAE` do) to switch its
``nn.Conv3d`` layers to :class:`FastConv3d`: same parameters, same state dict, same forward values.
``LDAE_CONV3D_WGRAD`` overrides the weight-gradient choice: ``auto`` (default: on when the CPU, or a cap such
as ``ATEN_CPU_CAPABILITY=avx2`` / ``ONEDNN_MAX_CPU_ISA=AVX2``, leaves no AVX-512), ``forward`` (always,
where it applies) or ``onednn`` (never).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldae.errors import ConfigError

Tensor = torch.Tensor

ENV = "LDAE_CONV3D_WGRAD"
MODES = ("auto", "forward", "onednn")
_override: list[str] = []  # set by :func:`weight_grad_mode` (benchmarks, tests)
_single_volume: list[bool] = []  # set by :func:`single_volume_mode` (benchmarks)


def _cpu_lacks_avx512(capability: str, onednn_isa: str) -> bool:
    """True when neither ATen nor oneDNN may use AVX-512 here (capped or absent)."""
    wide = ("AVX512", "AVX10", "AMX")
    if onednn_isa not in ("", "ALL", "DEFAULT") and not any(w in onednn_isa for w in wide):
        return True
    return "AVX512" not in capability


def mode() -> str:
    """The weight-gradient choice in force: ``forward`` or ``onednn`` (``auto`` resolved for this CPU)."""
    choice = _override[-1] if _override else os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in MODES:
        raise ConfigError(f"environment variable {ENV}={choice!r}: choose one of {', '.join(MODES)}")
    if choice == "auto":
        lacks = _cpu_lacks_avx512(torch.backends.cpu.get_cpu_capability().upper(),
                                  os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper())
        return "forward" if lacks else "onednn"
    return choice


@contextlib.contextmanager
def weight_grad_mode(choice: str) -> Iterator[None]:
    """Within the block, use ``choice`` (one of :data:`MODES`) whatever ``LDAE_CONV3D_WGRAD`` says."""
    if choice not in MODES:
        raise ValueError(f"weight-gradient mode {choice!r}: choose one of {', '.join(MODES)}")
    _override.append(choice)
    try:
        yield
    finally:
        _override.pop()


@contextlib.contextmanager
def single_volume_mode(enabled: bool) -> Iterator[None]:
    """Within the block, send single-volume batches to oneDNN (True, the default) or leave them to PyTorch's
    rule (False: what ``nn.Conv3d`` does; for before/after measurements)."""
    _single_volume.append(bool(enabled))
    try:
        yield
    finally:
        _single_volume.pop()


def conv3d_weight_grad(x: Tensor, grad_out: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                       padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """∂L/∂W ``(O, C, *kernel_size)`` of ``conv3d(x, W, stride, padding, dilation)`` (groups 1) from the
    input ``x`` ``(N, C, D, H, W)`` and the output gradient ``grad_out`` ``(N, O, D', H', W')``, as the
    forward convolution derived in the module docstring."""
    xt = x.transpose(0, 1).contiguous()
    gt = grad_out.transpose(0, 1).contiguous()
    g = F.conv3d(xt, gt, None, stride=tuple(dilation), padding=tuple(padding), dilation=tuple(stride))
    kd, kh, kw = (int(k) for k in kernel_size)
    return g[:, :, :kd, :kh, :kw].transpose(0, 1).contiguous()


class _Conv3dForwardWeightGrad(torch.autograd.Function):
    """``conv3d`` whose backward takes the input gradient from oneDNN and the weight gradient from
    :func:`conv3d_weight_grad` (not twice differentiable)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...],  # type: ignore[override]
                padding: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, bias is not None)
        return F.conv3d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = conv3d_weight_grad(x, grad_out, weight.shape[2:], stride, padding, dilation)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None, None, None


def fast_weight_grad_applies(conv: nn.Conv3d, x: Tensor, weight: Tensor) -> bool:
    """Whether :class:`FastConv3d` takes its own weight-gradient path for this call (see the module
    docstring); the stock convolution runs otherwise."""
    if not (weight.requires_grad and torch.is_grad_enabled()):
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        return False
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if torch.is_autocast_enabled("cpu") or x.dim() != 5:
        return False
    if not all(2 * s <= k for s, k in zip(conv.stride, conv.kernel_size)):
        return False
    return mode() == "forward"


def single_volume_onednn_applies(conv: nn.Conv3d, x: Tensor, weight: Tensor) -> bool:
    """Whether :class:`FastConv3d` sends this call to oneDNN although PyTorch would run ``slow_conv3d``: a
    CPU float32 batch of one volume, a kernel larger than 1x1x1, no gradient needed, oneDNN enabled."""
    if x.dim() != 5 or x.shape[0] != 1 or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if weight.dtype != torch.float32 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if all(k == 1 for k in conv.kernel_size) or torch.is_autocast_enabled("cpu"):
        return False
    if _single_volume and not _single_volume[-1]:
        return False
    return bool(torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available())


class FastConv3d(nn.Conv3d):
    """``nn.Conv3d`` with the forward-convolution weight gradient and oneDNN for single volumes where they
    apply (module docstring)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # noqa: A002
        if fast_weight_grad_applies(self, input, weight):
            return _Conv3dForwardWeightGrad.apply(input, weight, bias, tuple(self.stride), tuple(self.padding),
                                                  tuple(self.dilation))
        if single_volume_onednn_applies(self, input, weight):
            return torch.mkldnn_convolution(input.contiguous(), weight.contiguous(), bias, self.padding,
                                            self.stride, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def use_fast_conv3d(module: nn.Module) -> nn.Module:
    """Switch every plain ``nn.Conv3d`` inside ``module`` to :class:`FastConv3d` in place (its parameters,
    state dict and forward are unchanged; subclasses of ``nn.Conv3d`` are left alone); return ``module``."""
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = FastConv3d
    return module
