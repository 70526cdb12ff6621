"""The published LDAE's latent UNet and shift branch (``model.architecture: official``), module for module.

The paper's code (GabrieleLozupone/LDAE, itself derived from PDAE and guided-diffusion's ADM) ships its
decoder as one state dict holding the frozen ε-UNet **and** the gradient estimator G_ψ. This module
builds the same networks as two ldae modules with ldae's UNet interface (``encode`` / ``decode`` /
``make_shift_decoder``, see :mod:`ldae.nets.unet`), whose ``state_dict`` keys are the official ones::

    ADMUNet         time_embed, input_blocks, middle_block, output_blocks, out
    ADMShiftDecoder label_emb, shift_middle_block, shift_output_blocks, shift_out

so ``unet.state_dict() ∪ shift.state_dict()`` is the official ``decoder.pth``, key for key and shape for
shape. What makes it the official network (all of it differs from ldae's own UNet):

* time embedding: sinusoid (cos half, then sin half) of width c_0 -> Linear -> SiLU -> Linear, 4·c_0
  wide; the shift branch **shares** it (it has no time embedding of its own) and embeds y_sem with one
  Linear, ``e_y = label_emb(y_sem)`` (no activation before the per-block SiLU);
* residual block (``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``)::

      h = Conv3(SiLU(GN(x)))                  (down/up blocks resample after the SiLU, before the conv,
      s, b = Linear(SiLU(e_t)).chunk(2)        and resample x the same way for the skip)
      h = GN(h)·(1 + s) + b
      G_ψ blocks only:  s', b' = Linear(SiLU(e_y)).chunk(2);  h = (1 + s')·h + b'     (``emb_z_layers``)
      out = skip(x) + Conv3(Dropout(SiLU(h)))   (last conv zero-initialised; skip = 1x1 conv if widths differ)

* resampling **by residual blocks** (ADM's ``resblock_updown``), parameter-free inside them: 2x2 average
  pooling / nearest-neighbour doubling over the **last two** spatial axes only — ADM's 3D convention,
  so the first latent axis keeps its size at every level (16x20x16 -> 16x10x8 -> 16x5x4);
* attention: GroupNorm, ``qkv`` and ``proj_out`` as kernel-1 Conv1d, ``num_heads`` heads (1 in the
  release), softmax(q·kᵀ/√d)·v over all voxels, residual; the "legacy" head split (heads first, then
  q/k/v) unless ``legacy_attention`` is false;
* GroupNorm with ``norm_num_groups`` (32 in the release) everywhere, ε = 1e-5;
* up path: ``num_res_blocks + 1`` blocks per level, attention where the level's factor is in
  ``attention_factors``, an up-sampling residual block closing every level but the first; output
  ``GN -> SiLU -> Conv3`` (zero-initialised) on c_0 channels.

Spatial sizes: the last two latent axes must be divisible by 2^(levels−1) (the official network would
fail on the concatenation otherwise; here a ValueError says so first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldae.errors import ConfigError
from ldae.nets.unet import (
    EpsNetwork,
    condition_width,
    run_encoder,
    skip_channels,
    timestep_embedding,
    zero_init,
)

Tensor = torch.Tensor

ARCHITECTURE = "official"
#: keys of a ``model`` section with ``architecture: official``
CONFIG_KEYS = (
    "architecture",
    "in_channels",
    "out_channels",
    "channels",
    "num_res_blocks",
    "attention_factors",
    "dropout",
    "num_heads",
    "num_head_channels",
    "legacy_attention",
    "norm_num_groups",
)
#: the published release's values (the official ``unet_args``), used where a section leaves a key out
DEFAULTS: dict[str, Any] = {
    "architecture": ARCHITECTURE,
    "in_channels": 3,
    "out_channels": None,
    "channels": [256, 512, 768],
    "num_res_blocks": 2,
    "attention_factors": [2, 4],
    "dropout": 0.1,
    "num_heads": 1,
    "num_head_channels": None,  # official head_channel = -1: the head count is num_heads
    "legacy_attention": True,  # official use_new_attention_order = False
    "norm_num_groups": 32,
}


def check_config(cfg: dict) -> dict:
    """Validate a ``model`` section of the official architecture; defaults filled in (ConfigError naming
    the key)."""
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) in config section 'model' (architecture {ARCHITECTURE}): "
                          f"{', '.join(unknown)}")
    out = {**DEFAULTS, **cfg}
    if out["architecture"] != ARCHITECTURE:
        raise ConfigError(f"config key 'model.architecture' is {out['architecture']!r}, expected {ARCHITECTURE!r}")
    out["channels"] = [int(c) for c in out["channels"]]
    out["attention_factors"] = [int(f) for f in (out["attention_factors"] or [])]
    if out["out_channels"] is None:
        out["out_channels"] = int(out["in_channels"])
    if not out["channels"]:
        raise ConfigError("config key 'model.channels' must list at least one level")
    groups = int(out["norm_num_groups"])
    for c in out["channels"]:
        if c % groups:
            raise ConfigError(f"config key 'model.channels': {c} is not divisible by model.norm_num_groups={groups}")
        _heads(c, out)
    factors = [2**i for i in range(len(out["channels"]))]
    bad = [f for f in out["attention_factors"] if f not in factors]
    if bad:
        raise ConfigError(f"config key 'model.attention_factors' has {bad}: downsampling factors of this UNet "
                          f"are {factors}")
    if int(out["num_res_blocks"]) < 1:
        raise ConfigError(f"config key 'model.num_res_blocks' must be >= 1, got {out['num_res_blocks']}")
    if not 0.0 <= float(out["dropout"]) < 1.0:
        raise ConfigError(f"config key 'model.dropout' must be in [0, 1), got {out['dropout']}")
    out["legacy_attention"] = bool(out["legacy_attention"])
    return out


def _heads(channels: int, cfg: dict) -> int:
    """Head count of an attention block on ``channels`` (ConfigError when the widths do not split)."""
    per_head = cfg.get("num_head_channels")
    if per_head not in (None, -1):
        if channels % int(per_head):
            raise ConfigError(f"config key 'model.num_head_channels': {per_head} does not divide {channels}")
        return channels // int(per_head)
    heads = int(cfg["num_heads"])
    if heads < 1 or channels % heads:
        raise ConfigError(f"config key 'model.num_heads': {heads} does not divide the width {channels}")
    return heads


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """``(B, C)`` -> ``(B, C, 1, ..., 1)`` broadcastable against ``like``."""
    return v.reshape(*v.shape, *([1] * (like.ndim - v.ndim)))


class InnerResample(nn.Module):
    """Parameter-free 2x resampling of the last two axes: ``down`` = 2x2 average pooling, else
    nearest-neighbour doubling (ADM's 3D convention: the first spatial axis is never resampled)."""

    def __init__(self, down: bool) -> None:
        super().__init__()
        self.down = down

    def forward(self, x: Tensor) -> Tensor:
        if self.down:
            return F.avg_pool3d(x, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        d, h, w = x.shape[-3:]
        return F.interpolate(x, size=(d, 2 * h, 2 * w), mode="nearest")


class ADMResBlock(nn.Module):
    """Residual block of the official network (see the module docstring); ``conditioned`` adds the
    y_sem modulation ``emb_z_layers`` of the shift branch; ``resample`` is None, "down" or "up"."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float,
        groups: int,
        conditioned: bool = False,
        resample: str | None = None,
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_ch), nn.SiLU(), nn.Conv3d(in_ch, out_ch, 3, padding=1))
        self.resample = InnerResample(resample == "down") if resample else None
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.emb_z_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch)) if conditioned else None
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Dropout(dropout),
            zero_init(nn.Conv3d(out_ch, out_ch, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv3d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor, emb_y: Tensor | None = None) -> Tensor:
        if self.resample is not None:
            h = self.in_layers[2](self.resample(self.in_layers[1](self.in_layers[0](x))))
            x = self.resample(x)
        else:
            h = self.in_layers(x)
        scale, shift = _bcast(self.emb_layers(emb), h).chunk(2, dim=1)
        h = self.out_layers[0](h) * (1.0 + scale) + shift
        if self.emb_z_layers is not None:
            if emb_y is None:
                raise ValueError("this block of the shift branch is conditioned: pass the y_sem embedding")
            y_scale, y_shift = _bcast(self.emb_z_layers(emb_y), h).chunk(2, dim=1)
            h = (1.0 + y_scale) * h + y_shift
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip_connection(x) + h


class ADMAttention(nn.Module):
    """Self-attention over all voxels: ``x + proj_out(attn(qkv(GN(x))))``, kernel-1 Conv1d projections,
    ``proj_out`` zero-initialised. Legacy head split: the 3C channels of qkv are read as
    ``heads × (q, k, v) × C/heads``; otherwise as ``(q, k, v) × heads × C/heads``."""

    def __init__(self, channels: int, num_heads: int, groups: int, legacy: bool = True) -> None:
        super().__init__()
        self.num_heads = int(num_heads)
        self.legacy = bool(legacy)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))  # (B, 3C, N)
        n, heads = qkv.shape[-1], self.num_heads
        ch = c // heads
        if self.legacy:
            q, k, v = qkv.reshape(b * heads, 3 * ch, n).split(ch, dim=1)
        else:
            q, k, v = (part.reshape(b * heads, ch, n) for part in qkv.chunk(3, dim=1))
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (BH, N, ch)
        h = self.proj_out(h.transpose(1, 2).reshape(b, c, n))
        return (flat + h).reshape(b, c, *spatial)


class ADMSequential(nn.Sequential):
    """Layers applied in order; residual blocks get the time embedding (and the y_sem embedding)."""

    def forward(self, x: Tensor, emb: Tensor, emb_y: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb, emb_y) if isinstance(layer, ADMResBlock) else layer(x)
        return x


def _middle(cfg: dict, conditioned: bool) -> ADMSequential:
    ch, emb_dim = cfg["channels"][-1], 4 * cfg["channels"][0]
    drop, groups = float(cfg["dropout"]), int(cfg["norm_num_groups"])
    return ADMSequential(
        ADMResBlock(ch, ch, emb_dim, drop, groups, conditioned),
        ADMAttention(ch, _heads(ch, cfg), groups, cfg["legacy_attention"]),
        ADMResBlock(ch, ch, emb_dim, drop, groups, conditioned),
    )


def _up_path(cfg: dict, conditioned: bool) -> nn.ModuleList:
    chans, nrb = cfg["channels"], int(cfg["num_res_blocks"])
    emb_dim, drop, groups = 4 * chans[0], float(cfg["dropout"]), int(cfg["norm_num_groups"])
    skips, ch = skip_channels(cfg), chans[-1]
    blocks = nn.ModuleList()
    for level in reversed(range(len(chans))):
        for j in range(nrb + 1):
            layers: list[nn.Module] = [ADMResBlock(ch + skips.pop(), chans[level], emb_dim, drop, groups, conditioned)]
            ch = chans[level]
            if 2**level in cfg["attention_factors"]:
                layers.append(ADMAttention(ch, _heads(ch, cfg), groups, cfg["legacy_attention"]))
            if level > 0 and j == nrb:
                layers.append(ADMResBlock(ch, ch, emb_dim, drop, groups, conditioned, resample="up"))
            blocks.append(ADMSequential(*layers))
    return blocks


def _out(cfg: dict) -> nn.Sequential:
    ch = cfg["channels"][0]
    return nn.Sequential(nn.GroupNorm(int(cfg["norm_num_groups"]), ch), nn.SiLU(),
                         zero_init(nn.Conv3d(ch, int(cfg["out_channels"]), 3, padding=1)))


def _run_up(blocks: nn.ModuleList, out: nn.Module, h: Tensor, skips: Sequence[Tensor], emb: Tensor,
            emb_y: Tensor | None = None) -> Tensor:
    """Up path: block k concatenates the k-th skip from the end; ``skips`` is left untouched."""
    if len(skips) != len(blocks):
        raise ValueError(f"expected {len(blocks)} skip tensors, got {len(skips)}")
    for k, block in enumerate(blocks):
        h = block(torch.cat([h, skips[len(skips) - 1 - k]], dim=1), emb, emb_y)
    return out(h)


class ADMUNet(EpsNetwork):
    """The official ε-UNet (``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``)
    with :class:`ldae.nets.unet.LatentUNet`'s interface. Build it from a config section with
    :meth:`from_config` (keys :data:`CONFIG_KEYS`, defaults = the release's values)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        cfg = check_config(dict(cfg))
        self.config = cfg
        chans, nrb = cfg["channels"], int(cfg["num_res_blocks"])
        emb_dim, drop, groups = 4 * chans[0], float(cfg["dropout"]), int(cfg["norm_num_groups"])
        self.levels = len(chans)
        self.time_embed = nn.Sequential(nn.Linear(chans[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([ADMSequential(nn.Conv3d(int(cfg["in_channels"]), chans[0], 3, padding=1))])
        ch = chans[0]
        for level, width in enumerate(chans):
            for _ in range(nrb):
                layers: list[nn.Module] = [ADMResBlock(ch, width, emb_dim, drop, groups)]
                ch = width
                if 2**level in cfg["attention_factors"]:
                    layers.append(ADMAttention(ch, _heads(ch, cfg), groups, cfg["legacy_attention"]))
                self.input_blocks.append(ADMSequential(*layers))
            if level < len(chans) - 1:
                self.input_blocks.append(ADMSequential(ADMResBlock(ch, ch, emb_dim, drop, groups, resample="down")))
        self.middle_block = _middle(cfg, conditioned=False)
        self.output_blocks = _up_path(cfg, conditioned=False)
        self.out = _out(cfg)

    @classmethod
    def from_config(cls, cfg: dict) -> ADMUNet:
        return cls(cfg)

    def time_embedding(self, t: Tensor) -> Tensor:
        """``e_t`` ``(B, 4·c_0)`` of timesteps ``t`` ``(B,)``."""
        return self.time_embed(timestep_embedding(t, self.config["channels"][0]))

    def encode(self, x: Tensor, t: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """``(h after the middle block, skips, e_t)``; ``skips[-1]`` is the middle block's input."""
        factor = 2 ** (self.levels - 1)
        if x.ndim != 5 or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"the official UNet halves the last two axes {self.levels - 1} times: latent shape "
                             f"{tuple(x.shape[1:])} needs them divisible by {factor}")
        emb = self.time_embedding(t)
        h, skips = run_encoder(self.input_blocks, x, emb)
        return self.middle_block(h, emb), skips, emb

    def decode(self, h: Tensor, skips: Sequence[Tensor], emb: Tensor) -> Tensor:
        """Up path + output: ε."""
        return _run_up(self.output_blocks, self.out, h, skips, emb)

    def make_shift_decoder(self, cond_dim: int) -> ADMShiftDecoder:
        """A fresh shift branch for this UNet's configuration."""
        return ADMShiftDecoder(self.config, cond_dim)


class ADMShiftDecoder(nn.Module):
    """The official gradient estimator G_ψ (``label_emb``, ``shift_middle_block``, ``shift_output_blocks``,
    ``shift_out``) on the frozen UNet's skips. It uses the UNet's time embedding ``e_t`` (pass ``emb``,
    as returned by :meth:`ADMUNet.encode`) and ``e_y = label_emb(y_sem)``; ``shift_out`` starts at zero."""

    def __init__(self, unet_cfg: dict, cond_dim: int) -> None:
        super().__init__()
        cfg = check_config(dict(unet_cfg))
        self.config = cfg
        self.cond_dim = condition_width(cond_dim, "shift decoder")
        self.label_emb = nn.Linear(self.cond_dim, 4 * cfg["channels"][0])
        self.shift_middle_block = _middle(cfg, conditioned=True)
        self.shift_output_blocks = _up_path(cfg, conditioned=True)
        out_cfg = dict(cfg, out_channels=cfg["in_channels"])  # official shift_out has input_channel outputs
        self.shift_out = _out(out_cfg)

    def forward(self, skips: Sequence[Tensor], t: Tensor, y_sem: Tensor, emb: Tensor | None = None) -> Tensor:
        """G_ψ(z_t, y_sem, t) from the encoder's ``skips`` and its time embedding ``emb``."""
        if emb is None:
            raise ValueError("the official shift branch shares the UNet's time embedding: pass emb "
                             "(the third value of unet.encode)")
        emb_y = self.label_emb(y_sem)
        h = self.shift_middle_block(skips[-1], emb, emb_y)
        return _run_up(self.shift_output_blocks, self.shift_out, h, skips, emb, emb_y)
