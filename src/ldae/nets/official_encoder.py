"""The published LDAE's 2.5D semantic encoder (``semantic_encoder.architecture: official``).

Same module tree as the official ``AttentionSemanticEncoder``, so its ``state_dict`` keys are the ones of
the release's ``encoder.pth`` (which lists the backbone a second time under
``slice_distributed.module.backbone.*``: one module registered under two names; the importer checks
those copies equal and drops them). For a volume ``x`` ``(B, 1, X, Y, Z)`` in [0, 1]:

1. axial slices ``x[..., k]`` (``x.permute(0, 4, 1, 2, 3)``, the official ``x.permute(0, 1, 4, 2, 3)``
   of a single-channel volume), **not** standardised, each through ``backbone.backbone``: a torchvision
   ConvNeXt with a 1-channel stem and its classifier's Linear removed (LayerNorm2d and Flatten kept), so
   ``e_k ∈ R^768``;
2. ``e_k += pe[k]``, the fixed sinusoidal table ``pe[k, 2i] = sin(k·10000^(−2i/d))``,
   ``pe[k, 2i+1] = cos(k·10000^(−2i/d))`` (buffer ``positional_encoding.pe``, then dropout);
3. soft attention: ``w = softmax_k(a·e_k + c)`` (``soft_attention.linear``), ``g = Σ_k w_k e_k``;
4. ``q = W_q g``, ``K = W_k E``, ``V = W_v E`` (``query/key/value_projection``), then an 8-head
   ``nn.MultiheadAttention(q, K, V)`` (its own in/out projections, attention dropout);
5. ``y_sem = LayerNorm(attended)`` — no residual, no output projection, no standardisation.

Training from scratch (no ``pretrained_weights``) initialises the backbone like the official code
(Kaiming normal: fan-out for convolutions, fan-in for linear layers, zero biases, unit/zero norms);
with a local torchvision ImageNet state dict the stem is the sum of the RGB filters (both as official).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldae.errors import ConfigError

ARCHITECTURE = "official"
BACKBONES = ("convnext_small", "convnext_tiny", "small_cnn")
REQUIRED_KEYS = ("architecture", "backbone", "emb_dim", "num_heads", "num_slices")
#: optional keys and their values in the published release (torchvision's ConvNeXt-Small stochastic depth)
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "slice_chunk": 0,  # slices per backbone call; 0 = all at once (chunking does not change the result)
    "checkpoint_slices": False,  # activation checkpointing of each chunk while training
    "pretrained_weights": None,  # local torchvision ConvNeXt ImageNet state dict, or null
    "widths": [16, 32, 64],  # small_cnn stage widths (the last must equal emb_dim)
    "dropout": 0.1,  # positional-encoding dropout and attention dropout (both 0.1 officially)
    "drop_path": 0.4,  # ConvNeXt stochastic depth (torchvision's default for ConvNeXt-Small)
}


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """``(1, length, dim)`` table: sin on even, cos on odd channels, frequencies 10000^(−2i/dim)."""
    k = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(k * freq)
    pe[:, 1::2] = torch.cos(k * freq[: dim // 2])
    return pe[None]


class PositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table (persistent buffer ``pe``) to ``(B, S, d)``, then dropout."""

    def __init__(self, dim: int, length: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoid_table(length, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x + self.pe[:, : x.shape[1]])


class SoftAttention(nn.Module):
    """Softmax over slices of a linear score; returns ``(Σ_k w_k e_k, w)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = F.softmax(self.linear(e).squeeze(-1), dim=1)  # (B, S)
        return torch.bmm(w.unsqueeze(1), e).squeeze(1), w


class SliceBackbone(nn.Module):
    """Holds the 2D network as ``.backbone`` (the official nesting: keys ``backbone.backbone.*``)."""

    def __init__(self, net: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.backbone = net
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def official_init(module: nn.Module) -> None:
    """The official backbone initialisation without pretrained weights: Kaiming normal (fan-out for
    convolutions, fan-in for linear layers), zero biases, unit/zero LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
        else:
            continue
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


def make_official_backbone(name: str, widths: Sequence[int], pretrained_weights: str | Path | None,
                           drop_path: float, key: str) -> SliceBackbone:
    """The 1-channel 2D backbone ``(N, 1, h, w) -> (N, out_dim)`` in the official module layout."""
    from ldae.nets.semantic_encoder import (
        SmallCNN,
        _load_pretrained,
        _load_state_dict_file,
        _one_channel_stem,
    )

    if name == "small_cnn":
        if pretrained_weights:
            raise ConfigError(f"{key}.pretrained_weights: only ConvNeXt backbones load pretrained weights")
        net = SmallCNN(widths)
        return SliceBackbone(net, net.out_dim)
    from torchvision.models import convnext_small, convnext_tiny

    state = _load_state_dict_file(Path(pretrained_weights), f"{key}.pretrained_weights") if pretrained_weights else None
    factory = convnext_small if name == "convnext_small" else convnext_tiny
    net = factory(weights=None, stochastic_depth_prob=float(drop_path))  # weights=None: never downloads
    if state is not None:
        _load_pretrained(net, state, Path(pretrained_weights), name)
    net.features[0][0] = _one_channel_stem(net.features[0][0], pretrained=state is not None)
    net.classifier[2] = nn.Identity()
    if state is None:
        official_init(net)
    return SliceBackbone(net, int(net.classifier[0].normalized_shape[0]))


class OfficialSemanticEncoder(nn.Module):
    """Volume ``(B, 1, X, Y, Z)`` in [0, 1] -> ``y_sem`` ``(B, emb_dim)``, the official network (module
    docstring). Same interface as :class:`ldae.nets.semantic_encoder.SemanticEncoder`."""

    def __init__(self, backbone: SliceBackbone, emb_dim: int, num_heads: int, num_slices: int,
                 slice_chunk: int = 0, checkpoint_slices: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        if backbone.out_dim != int(emb_dim):
            raise ConfigError(f"model.semantic_encoder.emb_dim is {emb_dim} but the official encoder has no slice "
                              f"projection: the backbone gives {backbone.out_dim} features per slice")
        self.emb_dim = int(emb_dim)
        self.num_slices = int(num_slices)
        self.slice_chunk = int(slice_chunk)
        self.checkpoint_slices = bool(checkpoint_slices)
        self.backbone = backbone
        self.positional_encoding = PositionalEncoding(self.emb_dim, self.num_slices, dropout)
        self.query_projection = nn.Linear(self.emb_dim, self.emb_dim)
        self.key_projection = nn.Linear(self.emb_dim, self.emb_dim)
        self.value_projection = nn.Linear(self.emb_dim, self.emb_dim)
        self.soft_attention = SoftAttention(self.emb_dim)
        self.cross_attention = nn.MultiheadAttention(self.emb_dim, int(num_heads), dropout=dropout, batch_first=True)
        self.layer_norm_after_attention = nn.LayerNorm(self.emb_dim)

    def slice_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of every axial slice ``x[..., k]``, ``(B, S, emb_dim)`` (no input scaling)."""
        from ldae.nets.semantic_encoder import axial_slice_features

        return axial_slice_features(self, x)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> Any:
        """``y_sem``; with ``return_attention`` also the soft-attention and cross-attention weights."""
        from ldae.nets.semantic_encoder import EncoderAttention

        e = self.positional_encoding(self.slice_features(x))
        g, pool_w = self.soft_attention(e)
        q = self.query_projection(g.unsqueeze(1))
        attended, cross_w = self.cross_attention(q, self.key_projection(e), self.value_projection(e),
                                                 need_weights=return_attention)
        y = self.layer_norm_after_attention(attended).squeeze(1)
        if return_attention:
            return y, EncoderAttention(pool=pool_w, cross=cross_w.squeeze(1))
        return y


def build_official_encoder(cfg: Mapping[str, Any], load_pretrained: bool = True,
                           key: str = "model.semantic_encoder") -> OfficialSemanticEncoder:
    """Build the official encoder from a ``semantic_encoder`` section (``architecture: official``)."""
    from ldae.nets.semantic_encoder import _check_bool, _check_float, _check_int, encoder_section

    c = encoder_section(cfg, key, REQUIRED_KEYS, OPTIONAL_DEFAULTS, BACKBONES, ARCHITECTURE)
    emb_dim, heads, widths = c["emb_dim"], c["num_heads"], c["widths"]
    backbone = make_official_backbone(
        c["backbone"], widths, c["pretrained_weights"] if load_pretrained else None,
        _check_float(c, "drop_path", key, 0.0, 1.0), key,
    )
    return OfficialSemanticEncoder(
        backbone, emb_dim=emb_dim, num_heads=heads,
        num_slices=_check_int(c, "num_slices", key, 1),
        slice_chunk=_check_int(c, "slice_chunk", key, 0),
        checkpoint_slices=_check_bool(c, "checkpoint_slices", key),
        dropout=_check_float(c, "dropout", key, 0.0, 1.0),
    )
