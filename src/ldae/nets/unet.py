"""Latent ε-prediction UNet (3D) with AdaGN residual blocks, split into an encoder and a decoder path.

Why our own UNet: the representation stage (PDAE/LDAE) adds a *second* decoder — the shift decoder
G_ψ — on the frozen UNet's encoder features, conditioned on the time step **and** a semantic vector
y_sem through AdaGN. MONAI's DiffusionModelUNet cannot take a vector condition that way, nor expose its
encoder features, hence this compact ADM-style network.

Layout (channels ``[c_0, ..., c_{L-1}]``, level i has downsampling factor 2**i)::

    encode(x, t) -> (h, skips, emb)
        emb   = MLP(sinusoid(t))                        time embedding, 4·c_0 wide
        skips = [conv_in(x), (res[+attn])×R per level, downsample between levels]
        h     = middle(skips[-1])                       res, attn, res at the deepest level
    decode(h, skips, emb) -> ε
        up path: (R+1) res[+attn] blocks per level, each eating one skip, upsampling between levels;
        out = conv(SiLU(GroupNorm(.))), zero-initialised

``skips[-1]`` is the input of the middle block, so a :class:`ShiftDecoder` (its own middle, up and out
blocks) can reuse one encoder pass: see :meth:`LatentUNet.forward_with_shift`.

AdaGN: ``GroupNorm(h)·(1 + s_t) + b_t`` with (s_t, b_t) a linear map of the time embedding; with a
condition y (shift decoder) the result is further scaled by ``(1 + W_y·y)`` (as in DiffAE / PDAE).
Odd spatial sizes are fine (upsampling targets the skip's exact size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldae.errors import ConfigError

Tensor = torch.Tensor

#: keys accepted by :meth:`LatentUNet.from_config` (the ``model`` section of the diffusion config)
CONFIG_KEYS = (
    "in_channels",
    "out_channels",
    "channels",
    "num_res_blocks",
    "attention_factors",
    "dropout",
    "num_heads",
    "norm_num_groups",
)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``(B, dim)`` of (possibly fractional) timesteps ``t`` of shape ``(B,)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to zero (output layers that start as the identity/zero map)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _expand(v: Tensor) -> Tensor:
    """``(B, C)`` -> ``(B, C, 1, 1, 1)``."""
    return v[:, :, None, None, None]


class ResBlock(nn.Module):
    """Residual block with AdaGN conditioning on the time embedding (and optionally a vector y)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float,
        groups: int,
        cond_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.in_norm = nn.GroupNorm(groups, in_ch)
        self.in_conv = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.cond_proj = nn.Linear(cond_dim, out_ch) if cond_dim else None
        self.out_norm = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv3d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.in_conv(F.silu(self.in_norm(x)))
        scale, shift = _expand(self.emb_proj(F.silu(emb))).chunk(2, dim=1)
        h = self.out_norm(h) * (1.0 + scale) + shift
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("this block is conditioned: pass y_sem")
            h = h * (1.0 + _expand(self.cond_proj(cond)))
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all voxels, residual, output projection zero-initialised."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(h).reshape(b, -1, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        h = self.proj(h.transpose(1, 2).reshape(b, -1, c))
        return x + h.transpose(1, 2).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Strided 3x3x3 convolution (halves each size, rounding up)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to the target (skip) size, then a 3x3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class Block(nn.ModuleList):
    """A sequence of layers; residual blocks get the embedding (and condition), upsampling the size."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, cond: Tensor | None = None, size: Sequence[int] | None = None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, cond)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def check_config(cfg: dict) -> dict:
    """Validate a ``model`` section; return it with defaults filled in (ConfigError naming the key).

    ``architecture: official`` selects the published LDAE's network (:mod:`ldae.nets.adm_unet`, validated
    there); ``ldae`` (the default) this module's UNet."""
    architecture = cfg.get("architecture", "ldae")
    if architecture == "official":
        from ldae.nets import adm_unet

        return adm_unet.check_config(cfg)
    if architecture != "ldae":
        raise ConfigError(f"config key 'model.architecture': expected 'ldae' or 'official', got {architecture!r}")
    cfg = {k: v for k, v in cfg.items() if k != "architecture"}
    unknown = set(cfg) - set(CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) in config section 'model': {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": None,
        "channels": [256, 512, 768],
        "num_res_blocks": 2,
        "attention_factors": [2, 4],
        "dropout": 0.1,
        "num_heads": 8,
        "norm_num_groups": 32,
    }
    out.update(cfg)
    out["channels"] = [int(c) for c in out["channels"]]
    out["attention_factors"] = [int(f) for f in (out["attention_factors"] or [])]
    if out["out_channels"] is None:
        out["out_channels"] = int(out["in_channels"])
    if not out["channels"]:
        raise ConfigError("config key 'model.channels' must list at least one level")
    for c in out["channels"]:
        if c % int(out["norm_num_groups"]):
            raise ConfigError(
                f"config key 'model.channels': {c} is not divisible by model.norm_num_groups={out['norm_num_groups']}"
            )
        if c % int(out["num_heads"]):
            raise ConfigError(f"config key 'model.channels': {c} is not divisible by model.num_heads={out['num_heads']}")
    factors = [2**i for i in range(len(out["channels"]))]
    bad = [f for f in out["attention_factors"] if f not in factors]
    if bad:
        raise ConfigError(
            f"config key 'model.attention_factors' has {bad}: downsampling factors of this UNet are {factors}"
        )
    if int(out["num_res_blocks"]) < 1:
        raise ConfigError(f"config key 'model.num_res_blocks' must be >= 1, got {out['num_res_blocks']}")
    if not 0.0 <= float(out["dropout"]) < 1.0:
        raise ConfigError(f"config key 'model.dropout' must be in [0, 1), got {out['dropout']}")
    return out


class TimeEmbedding(nn.Module):
    """Sinusoid of width c_0 -> Linear -> SiLU -> Linear, width 4·c_0."""

    def __init__(self, base: int) -> None:
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, 4 * base), nn.SiLU(), nn.Linear(4 * base, 4 * base))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.base))


def skip_channels(cfg: dict) -> list[int]:
    """Channels of the encoder's skip tensors, in the order they are produced (input conv, then per level
    ``num_res_blocks`` blocks and a downsampling one except at the last level)."""
    chans = cfg["channels"]
    skips = [chans[0]]
    for i, c in enumerate(chans):
        skips += [c] * int(cfg["num_res_blocks"])
        if i < len(chans) - 1:
            skips.append(c)
    return skips


def run_encoder(blocks: Sequence[nn.Module], x: Tensor, *args: Tensor | None) -> tuple[Tensor, list[Tensor]]:
    """Apply the input ``blocks`` in order (each called as ``block(h, *args)``: the time embedding, and a
    condition where the blocks take one); return the last output and every block's output (the skips)."""
    skips: list[Tensor] = []
    h = x
    for block in blocks:
        h = block(h, *args)
        skips.append(h)
    return h, skips


def encoder_blocks(cfg: dict, cond_dim: int | None = None) -> nn.ModuleList:
    """Input conv, then per level ``num_res_blocks`` residual blocks (self-attention after each at the
    ``attention_factors`` levels) and a downsampling block except at the last level; the residual blocks
    are conditioned on a ``cond_dim``-wide vector when given (the voxel DAE's encoder)."""
    chans, groups, heads = cfg["channels"], int(cfg["norm_num_groups"]), int(cfg["num_heads"])
    emb_dim, drop = 4 * chans[0], float(cfg["dropout"])
    blocks = nn.ModuleList([Block([nn.Conv3d(int(cfg["in_channels"]), chans[0], 3, padding=1)])])
    ch = chans[0]
    for i, out_ch in enumerate(chans):
        for _ in range(int(cfg["num_res_blocks"])):
            layers: list[nn.Module] = [ResBlock(ch, out_ch, emb_dim, drop, groups, cond_dim)]
            ch = out_ch
            if 2**i in cfg["attention_factors"]:
                layers.append(AttentionBlock(ch, heads, groups))
            blocks.append(Block(layers))
        if i < len(chans) - 1:
            blocks.append(Block([Downsample(ch)]))
    return blocks


class DecoderPath(nn.Module):
    """Middle + up + out blocks of the UNet configuration ``cfg`` (optionally conditioned on y)."""

    def __init__(self, cfg: dict, cond_dim: int | None = None) -> None:
        super().__init__()
        chans, groups, heads = cfg["channels"], int(cfg["norm_num_groups"]), int(cfg["num_heads"])
        emb_dim, nrb, drop = 4 * chans[0], int(cfg["num_res_blocks"]), float(cfg["dropout"])
        ch = chans[-1]
        self.middle = Block(
            [
                ResBlock(ch, ch, emb_dim, drop, groups, cond_dim),
                AttentionBlock(ch, heads, groups),
                ResBlock(ch, ch, emb_dim, drop, groups, cond_dim),
            ]
        )
        skip_chs = skip_channels(cfg)
        self.output_blocks = nn.ModuleList()
        for i in reversed(range(len(chans))):
            for j in range(nrb + 1):
                layers: list[nn.Module] = [ResBlock(ch + skip_chs.pop(), chans[i], emb_dim, drop, groups, cond_dim)]
                ch = chans[i]
                if 2**i in cfg["attention_factors"]:
                    layers.append(AttentionBlock(ch, heads, groups))
                if i > 0 and j == nrb:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch), nn.SiLU(), zero_init(nn.Conv3d(ch, int(cfg["out_channels"]), 3, padding=1))
        )

    def up(self, h: Tensor, skips: Sequence[Tensor], emb: Tensor, cond: Tensor | None = None) -> Tensor:
        """Up path + output layer; ``skips`` is not modified (several decoders may share it)."""
        if len(skips) != len(self.output_blocks):
            raise ValueError(f"expected {len(self.output_blocks)} skip tensors, got {len(skips)}")
        for k, block in enumerate(self.output_blocks):
            skip = skips[len(skips) - 1 - k]
            nxt = skips[len(skips) - 2 - k] if k + 1 < len(skips) else skip
            h = block(torch.cat([h, skip], dim=1), emb, cond, size=nxt.shape[2:])
        return self.out(h)


def condition_width(cond_dim: int, what: str) -> int:
    """``cond_dim`` as an int; ConfigError naming ``what`` unless it is >= 1."""
    if int(cond_dim) < 1:
        raise ConfigError(f"{what} condition width must be >= 1, got {cond_dim}")
    return int(cond_dim)


class EpsNetwork(nn.Module):
    """The interface both latent UNets (:class:`LatentUNet`, the official layout's
    :class:`ldae.nets.adm_unet.ADMUNet`) implement: ``encode(x, t) -> (h, skips, e_t)`` and
    ``decode(h, skips, e_t) -> ε``; ε_θ and the PDAE pair (ε_θ, G_ψ) follow from them."""

    config: dict

    def encode(self, x: Tensor, t: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        raise NotImplementedError

    def decode(self, h: Tensor, skips: Sequence[Tensor], emb: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """ε_θ(x, t); ``t`` is a ``(B,)`` tensor of timesteps."""
        return self.decode(*self.encode(x, t))

    def forward_with_shift(self, x: Tensor, t: Tensor, shift_decoder: nn.Module,
                           y_sem: Tensor) -> tuple[Tensor, Tensor]:
        """``(ε_θ(x, t), G_ψ(x, y_sem, t))`` from **one** encoder pass shared by both decoders."""
        h, skips, emb = self.encode(x, t)
        return self.decode(h, skips, emb), shift_decoder(skips, t, y_sem, emb)


class LatentUNet(EpsNetwork):
    """ε-prediction UNet on latents ``(B, C, D, H, W)``; see the module docstring for the layout.

    Args:
        in_channels: latent channels (3).
        channels: width per resolution level ([256, 512, 768] in the paper).
        num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
        attention_factors: downsampling factors (1, 2, 4, ...) whose levels get self-attention.
        dropout: dropout inside residual blocks.
        num_heads: attention heads.
        norm_num_groups: GroupNorm groups.
        out_channels: defaults to ``in_channels``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (256, 512, 768),
        num_res_blocks: int = 2,
        attention_factors: Sequence[int] = (2, 4),
        dropout: float = 0.1,
        num_heads: int = 8,
        norm_num_groups: int = 32,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        cfg = check_config(
            {
                "in_channels": in_channels,
                "out_channels": out_channels,
                "channels": list(channels),
                "num_res_blocks": num_res_blocks,
                "attention_factors": list(attention_factors),
                "dropout": dropout,
                "num_heads": num_heads,
                "norm_num_groups": norm_num_groups,
            }
        )
        self.config = cfg
        self.time_embed = TimeEmbedding(cfg["channels"][0])
        self.input_blocks = encoder_blocks(cfg)
        self.decoder = DecoderPath(cfg)

    @classmethod
    def from_config(cls, cfg: dict) -> LatentUNet:
        """Build from a config's ``model`` section; with ``architecture: official`` the published LDAE's
        UNet (:class:`ldae.nets.adm_unet.ADMUNet`, same interface) is returned instead."""
        return build_unet(cfg)

    def encode(self, x: Tensor, t: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Input blocks + middle: ``(h after the middle block, skips, time embedding)``.

        ``skips[-1]`` is the middle block's input (what a :class:`ShiftDecoder` starts from)."""
        emb = self.time_embed(t)
        h, skips = run_encoder(self.input_blocks, x, emb)
        return self.decoder.middle(h, emb), skips, emb

    def decode(self, h: Tensor, skips: Sequence[Tensor], emb: Tensor) -> Tensor:
        """Up + out blocks: the noise prediction ε."""
        return self.decoder.up(h, skips, emb)

    def make_shift_decoder(self, cond_dim: int) -> ShiftDecoder:
        """A fresh :class:`ShiftDecoder` with this UNet's configuration."""
        return ShiftDecoder(self.config, cond_dim)


class ShiftDecoder(nn.Module):
    """PDAE gradient estimator G_ψ: a new middle + up + out path on a frozen UNet's encoder skips,
    conditioned by AdaGN on its own time embedding and on y_sem. The output layer is zero-initialised,
    so G_ψ ≡ 0 at the start and the conditional model starts as the unconditional one.

    Args:
        unet_cfg: the ``LatentUNet.config`` of the UNet whose encoder feeds it.
        cond_dim: width of y_sem.
    """

    def __init__(self, unet_cfg: dict, cond_dim: int) -> None:
        super().__init__()
        cfg = check_config(dict(unet_cfg))
        self.config = cfg
        self.cond_dim = condition_width(cond_dim, "shift decoder")
        self.time_embed = TimeEmbedding(cfg["channels"][0])
        self.decoder = DecoderPath(cfg, cond_dim=self.cond_dim)

    def forward(self, skips: Sequence[Tensor], t: Tensor, y_sem: Tensor, emb: Tensor | None = None) -> Tensor:
        """G_ψ from the encoder's ``skips`` (``skips[-1]`` feeds the middle block), timesteps ``t`` and
        ``y_sem`` ``(B, cond_dim)``. ``emb`` (the UNet's time embedding) is accepted for the common
        interface and unused: this decoder embeds ``t`` itself."""
        emb = self.time_embed(t)
        h = self.decoder.middle(skips[-1], emb, y_sem)
        return self.decoder.up(h, skips, emb, y_sem)


def build_unet(cfg: dict) -> nn.Module:
    """The latent UNet of a ``model`` section: :class:`LatentUNet`, or with ``architecture: official``
    :class:`ldae.nets.adm_unet.ADMUNet`. Both offer ``encode(x, t) -> (h, skips, emb)``,
    ``decode(h, skips, emb)``, ``forward(x, t)``, ``make_shift_decoder(cond_dim)``, ``config``."""
    checked = check_config(dict(cfg))
    if checked.get("architecture") == "official":
        from ldae.nets.adm_unet import ADMUNet

        return ADMUNet(checked)
    return LatentUNet(**checked)


def build_shift_decoder(unet_cfg: dict, cond_dim: int) -> nn.Module:
    """The gradient estimator for a UNet of configuration ``unet_cfg`` (a ``config`` attribute):
    :class:`ShiftDecoder` or the official :class:`ldae.nets.adm_unet.ADMShiftDecoder`. Call it as
    ``shift(skips, t, y_sem, emb)`` with ``(_, skips, emb) = unet.encode(z_t, t)``."""
    if dict(unet_cfg).get("architecture") == "official":
        from ldae.nets.adm_unet import ADMShiftDecoder

        return ADMShiftDecoder(dict(unet_cfg), cond_dim)
    return ShiftDecoder(dict(unet_cfg), cond_dim)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device, no memory needed)."""
    return sum(p.numel() for p in module.parameters())
