"""Reading the published LDAE release's state dicts into ldae's networks, one to one.

The release (GabrieleLozupone/LDAE) is four plain ``torch.save`` state dicts plus two tensors:

========================  ==============================================  ==========================================
file                      network                                          ldae network
========================  ==============================================  ==========================================
``autoencoderkl.pth``     monai-generative 0.2 ``AutoencoderKL``           MONAI ``AutoencoderKL`` (keys converted by
                                                                           MONAI's own ``load_old_state_dict``)
``encoder.pth``           ``AttentionSemanticEncoder``                     :class:`~ldae.nets.official_encoder.OfficialSemanticEncoder`
``decoder.pth``           ``ShiftUNet`` (ε-UNet + gradient estimator)     :class:`~ldae.nets.adm_unet.ADMUNet` +
                                                                           :class:`~ldae.nets.adm_unet.ADMShiftDecoder`
``disease_classifier``    ``nn.Linear(768, 1)`` on standardised y_sem      weight/bias (``ldae predict``)
``semantic_mean/std.pt``  y_sem statistics (768,)                          ``ysem_stats.json``
========================  ==============================================  ==========================================

The architecture hyper-parameters are read from the tensors' shapes (:func:`unet_config`,
:func:`encoder_config`, :func:`autoencoder_config`); what shapes cannot tell (GroupNorm groups, attention
head counts, dropout) is the release's own configuration (:data:`RELEASE_CONSTANTS`). Every check is
strict: the networks built from the inferred configuration must have exactly the file's keys and shapes,
otherwise a :class:`~ldae.errors.CheckpointError` names the file and the first offending key. Everything
here works on meta tensors too (a layout check needs no memory).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldae.errors import CheckpointError, ConfigError

Tensor = torch.Tensor

ROLES = ("autoencoder", "encoder", "decoder", "classifier", "semantic_mean", "semantic_std")
ROLE_NAMES = {
    "autoencoder": "an AutoencoderKL",
    "encoder": "a semantic encoder",
    "decoder": "a decoder (UNet + shift branch)",
    "classifier": "a disease classifier (Linear)",
    "semantic_mean": "a y_sem statistics tensor",
    "semantic_std": "a y_sem statistics tensor",
}
#: facts of the published model that its tensors' shapes do not determine (official code and configs)
RELEASE_CONSTANTS: dict[str, Any] = {
    "unet_norm_num_groups": 32,  # the official normalization() is GroupNorm(32, ·)
    "unet_num_heads": 1,  # unet_args: num_heads 1, head_channel -1, use_new_attention_order False
    "unet_dropout": 0.1,
    "encoder_num_heads": 8,  # AttentionSemanticEncoder's default, not overridden by the release config
    "encoder_dropout": 0.1,  # attention dropout and positional-encoding dropout
    "autoencoder_norm_num_groups": 32,  # vae_args.norm_num_groups
    "autoencoder_norm_eps": 1e-6,  # monai-generative's default
}
ALIAS_PREFIX = "slice_distributed.module."  # the official encoder's second name of its backbone


# ----------------------------------------------------------------------------- reading files


def read_state_dict(path: str | os.PathLike, role: str) -> dict[str, Tensor] | Tensor:
    """The state dict (or, for the y_sem statistics, the tensor) stored in a release file, checked to be
    of ``role``. CheckpointError (one line naming the file) for a missing, truncated or non-PyTorch file,
    a training checkpoint instead of a state dict, or a file of another role."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (given as --{role.replace('_', '-')})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zips, pickles of other things, text files, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch file ({first[:200]})") from None
    if role in ("semantic_mean", "semantic_std"):
        if not torch.is_tensor(obj) or obj.ndim != 1:
            found = detect_role(obj) if isinstance(obj, Mapping) else None
            what = f"{ROLE_NAMES[found]} state dict" if found else f"a {type(obj).__name__}"
            raise CheckpointError(f"{path}: expected a 1-D y_sem statistics tensor (--{role.replace('_', '-')}), "
                                  f"found {what}")
        return obj.float()
    if isinstance(obj, Mapping) and "state_dict" in obj and not torch.is_tensor(obj.get("state_dict")):
        raise CheckpointError(f"{path}: a training checkpoint (key 'state_dict'), not a release state dict; "
                              "export the network's state dict first (the official scripts/save_model_weights.py)")
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: expected a state dict of tensors, found a {type(obj).__name__}")
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: expected a state dict of tensors; entry {bad!r} is a "
                              f"{type(obj[bad]).__name__}")
    found = detect_role(obj)
    if found != role:
        key = _role_key(obj, found) if found else next(iter(obj))
        what = f"{ROLE_NAMES[found]} state dict (key {key!r})" if found else f"no known release file (first key {key!r})"
        raise CheckpointError(f"{path}: given as --{role}, but this is {what}")
    return dict(obj)


_ROLE_KEYS = {
    "decoder": ("time_embed.0.weight", "label_emb.weight"),
    "encoder": ("positional_encoding.pe", "layer_norm_after_attention.weight"),
    "autoencoder": ("quant_conv_mu.conv.weight", "post_quant_conv.conv.weight"),
}


def _role_key(state: Mapping[str, Any], role: str) -> str:
    if role == "classifier":
        return "weight"
    return next(k for k in _ROLE_KEYS[role] if k in state)


def detect_role(state: Mapping[str, Any]) -> str | None:
    """Which release file a state dict is, from characteristic keys (None if none fits)."""
    for role, keys in _ROLE_KEYS.items():
        if any(k in state for k in keys):
            return role
    if set(state) == {"weight", "bias"} and getattr(state["weight"], "ndim", 0) == 2:
        return "classifier"
    return None


# ----------------------------------------------------------------------------- strict layouts


def check_layout(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], source: str,
                 what: str) -> None:
    """CheckpointError naming the first key of ``state`` that the network does not have, the first key it
    lacks, or the first shape that differs; nothing left over either way."""
    for key in state:
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected key {key!r} for {what}")
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r} of {what}")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, {what} needs "
                                  f"{tuple(value.shape)}")


def _need(state: Mapping[str, Tensor], key: str, source: str, what: str, ndim: int | None = None) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r} of {what}")
    value = state[key]
    if ndim is not None and value.ndim != ndim:
        raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)}, which fits no {what}")
    return value


def _indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state for m in [pattern.match(k)] if m})


def _no_architecture(source: str, key: str, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: shape of {key!r} fits no architecture ({why})")


# ----------------------------------------------------------------------------- decoder


def unet_config(state: Mapping[str, Tensor], source: str = "decoder.pth") -> tuple[dict, int]:
    """``(model section with architecture official, y_sem width)`` of a release ``decoder.pth``, read from
    its shapes: input/output channels, per-level widths, residual blocks per level, attention levels."""
    what = "the official decoder"
    te = _need(state, "time_embed.0.weight", source, what, 2)
    stem = _need(state, "input_blocks.0.0.weight", source, what, 5)
    label = _need(state, "label_emb.weight", source, what, 2)
    out = _need(state, "out.2.weight", source, what, 5)
    base = int(te.shape[1])
    if int(te.shape[0]) != 4 * base:
        raise _no_architecture(source, "time_embed.0.weight", f"width {te.shape[0]} is not 4 × {base}")
    if int(stem.shape[0]) != base:
        raise _no_architecture(source, "input_blocks.0.0.weight", f"{stem.shape[0]} channels, time embedding of "
                               f"{base}: ldae needs the first level's width to be the base width")
    n_in, n_out = len(_indices(state, "input_blocks")), len(_indices(state, "output_blocks"))
    ups = [j for j in _indices(state, "output_blocks")
           if any(f"output_blocks.{j}.{k}.in_layers.0.weight" in state for k in (1, 2))]
    nrb = ups[0] if ups else n_out - 1
    levels = len(ups) + 1
    if nrb < 1 or n_out != levels * (nrb + 1) or n_in != 1 + levels * nrb + levels - 1:
        raise _no_architecture(source, f"output_blocks.{n_out - 1}",
                               f"{n_in} input and {n_out} output blocks match no level/residual-block count")
    channels, attention = [], []
    for level in range(levels):
        first = 1 + level * (nrb + 1)
        channels.append(int(_need(state, f"input_blocks.{first}.0.out_layers.3.weight", source, what, 5).shape[0]))
        if f"input_blocks.{first}.1.qkv.weight" in state:
            attention.append(2**level)
    cfg = {
        "architecture": "official",
        "in_channels": int(stem.shape[1]),
        "out_channels": int(out.shape[0]),
        "channels": channels,
        "num_res_blocks": nrb,
        "attention_factors": attention,
        "dropout": RELEASE_CONSTANTS["unet_dropout"],
        "num_heads": RELEASE_CONSTANTS["unet_num_heads"],
        "num_head_channels": None,
        "legacy_attention": True,
        "norm_num_groups": RELEASE_CONSTANTS["unet_norm_num_groups"],
    }
    if cfg["out_channels"] != cfg["in_channels"]:
        raise _no_architecture(source, "out.2.weight", f"{cfg['out_channels']} outputs for {cfg['in_channels']} "
                               "latent channels (a learned-variance UNet; ldae predicts ε only)")
    return cfg, int(label.shape[1])


def build_decoder(state: Mapping[str, Tensor], source: str = "decoder.pth") -> tuple[nn.Module, nn.Module]:
    """``(ADMUNet, ADMShiftDecoder)`` built from the file's shapes and holding its weights (strict, one to
    one: the two modules' keys together are exactly the file's; the file's tensors are used in place, no
    copy). Meta tensors in, meta modules out (a layout check)."""
    from ldae.nets.adm_unet import ADMShiftDecoder, ADMUNet

    cfg, cond_dim = unet_config(state, source)
    try:
        with torch.device("meta"):  # no memory, no init: the file's tensors become the parameters
            unet, shift = ADMUNet(cfg), ADMShiftDecoder(cfg, cond_dim)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: the architecture read from its shapes is invalid ({exc})") from None
    expected = {**unet.state_dict(), **shift.state_dict()}
    check_layout(expected, state, source, "the official decoder inferred from its shapes")
    if not _is_meta(state):
        own = set(unet.state_dict())
        unet.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True, assign=True)
        shift.load_state_dict({k: v for k, v in state.items() if k not in own}, strict=True, assign=True)
    return unet, shift


# ----------------------------------------------------------------------------- encoder

_CONVNEXT_DEPTH = {"convnext_small": 27, "convnext_tiny": 9}  # blocks of the third stage (features.5)


def encoder_config(state: Mapping[str, Tensor], source: str = "encoder.pth") -> dict:
    """``semantic_encoder`` section (architecture official) of a release ``encoder.pth``: backbone
    (ConvNeXt-Small or -Tiny, from its depth), y_sem width, slice count (the positional table)."""
    what = "the official semantic encoder"
    norm = _need(state, "layer_norm_after_attention.weight", source, what, 1)
    pe = _need(state, "positional_encoding.pe", source, what, 3)
    stem = _need(state, "backbone.backbone.features.0.0.weight", source, what, 4)
    if int(stem.shape[1]) != 1:
        raise _no_architecture(source, "backbone.backbone.features.0.0.weight",
                               f"a {stem.shape[1]}-channel stem; the official encoder reads 1-channel slices")
    depth = len(_indices(state, "backbone.backbone.features.5"))
    backbone = next((name for name, d in _CONVNEXT_DEPTH.items() if d == depth), None)
    if backbone is None:
        raise _no_architecture(source, "backbone.backbone.features.5.0.block.0.weight",
                               f"{depth} blocks in ConvNeXt stage 3: neither ConvNeXt-Small (27) nor -Tiny (9)")
    if int(pe.shape[2]) != int(norm.shape[0]):
        raise _no_architecture(source, "positional_encoding.pe", f"width {pe.shape[2]} for y_sem of {norm.shape[0]}")
    return {
        "architecture": "official",
        "backbone": backbone,
        "emb_dim": int(norm.shape[0]),
        "num_heads": RELEASE_CONSTANTS["encoder_num_heads"],
        "num_slices": int(pe.shape[1]),
        "slice_chunk": 32,
        "checkpoint_slices": False,
        "pretrained_weights": None,
        "dropout": RELEASE_CONSTANTS["encoder_dropout"],
        "drop_path": 0.4 if backbone == "convnext_small" else 0.1,  # torchvision's defaults
    }


def encoder_weights(state: Mapping[str, Tensor], source: str = "encoder.pth") -> dict[str, Tensor]:
    """The encoder's state without the backbone's second names (``slice_distributed.module.backbone.*``,
    the same module registered twice): each must be the same tensor as its ``backbone.backbone.*`` twin."""
    out = {k: v for k, v in state.items() if not k.startswith(ALIAS_PREFIX)}
    for key, value in state.items():
        if not key.startswith(ALIAS_PREFIX):
            continue
        twin = "backbone." + key[len(ALIAS_PREFIX):]
        if twin not in out:
            raise CheckpointError(f"{source}: unexpected key {key!r} (no {twin!r} it would be the second name of)")
        if tuple(value.shape) != tuple(out[twin].shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)}, its twin {twin!r} "
                                  f"{tuple(out[twin].shape)}")
        if not value.is_meta and not torch.equal(value, out[twin]):
            raise CheckpointError(f"{source}: key {key!r} differs from {twin!r}; in the official encoder both "
                                  "name the same tensor")
    return out


def build_encoder(state: Mapping[str, Tensor], source: str = "encoder.pth") -> nn.Module:
    """The :class:`OfficialSemanticEncoder` of a release ``encoder.pth`` (strict, one to one)."""
    from ldae.nets.official_encoder import build_official_encoder

    cfg = encoder_config(state, source)
    weights = encoder_weights(state, source)
    with torch.device("meta"):  # the file's tensors become the parameters (assign below)
        encoder = build_official_encoder(cfg, load_pretrained=False)
    expected = encoder.state_dict()
    check_layout(expected, weights, source, "the official semantic encoder inferred from its shapes")
    aliases = [k for k in state if k.startswith(ALIAS_PREFIX)]
    twins = [k for k in expected if k.startswith("backbone.")]
    if aliases and len(aliases) != len(twins):  # every backbone tensor has its second name, or none has
        missing = next(k for k in twins if ALIAS_PREFIX + k[len("backbone."):] not in state)
        raise CheckpointError(f"{source}: missing key {ALIAS_PREFIX + missing[len('backbone.'):]!r} of the official "
                              "semantic encoder")
    if not _is_meta(state):
        encoder.load_state_dict(weights, strict=True, assign=True)
    return encoder


# ----------------------------------------------------------------------------- autoencoder


def autoencoder_config(state: Mapping[str, Tensor], source: str = "autoencoderkl.pth",
                       norm_num_groups: int | None = None) -> dict:
    """ldae's autoencoder ``model`` section for a monai-generative ``AutoencoderKL`` state dict: widths per
    level, residual blocks per level, latent channels (from the shapes); GroupNorm groups are not in the
    shapes: the release's 32 unless ``norm_num_groups`` is given."""
    what = "the official AutoencoderKL"
    groups = int(norm_num_groups or RELEASE_CONSTANTS["autoencoder_norm_num_groups"])
    stem = _need(state, "encoder.blocks.0.conv.weight", source, what, 5)
    mu = _need(state, "quant_conv_mu.conv.weight", source, what, 5)
    blocks = _indices(state, "encoder.blocks")
    if int(stem.shape[1]) != 1:
        raise _no_architecture(source, "encoder.blocks.0.conv.weight", f"{stem.shape[1]} input channels; ldae's "
                               "autoencoder reads single-channel volumes")
    channels, res_per_level, current, attention = [], [], 0, []
    for i in blocks[1:]:
        p = f"encoder.blocks.{i}."
        if p + "norm1.weight" in state:  # residual block
            if not channels:
                channels.append(int(state[p + "conv1.conv.weight"].shape[0]))
                res_per_level.append(0)
            current = int(state[p + "conv1.conv.weight"].shape[0])
            if current != channels[-1]:
                raise _no_architecture(source, p + "conv1.conv.weight", "width changes inside a level")
            res_per_level[-1] += 1
        elif p + "conv.conv.weight" in state:  # downsampling: the next residual block opens a level
            nxt = f"encoder.blocks.{i + 1}.conv1.conv.weight"
            if nxt not in state:
                raise _no_architecture(source, p + "conv.conv.weight", "downsampling not followed by a residual block")
            channels.append(int(state[nxt].shape[0]))
            res_per_level.append(0)
        elif any(k.startswith(p) and ("to_q" in k or ".attn." in k) for k in state):
            attention.append(len(channels) - 1)
        else:
            break  # final norm and convolution
    if not channels or len(set(res_per_level)) != 1:
        raise _no_architecture(source, "encoder.blocks.1.norm1.weight",
                               f"residual blocks per level {res_per_level} are not all equal")
    if attention:
        raise _no_architecture(source, f"encoder.blocks.{blocks[1]}", "attention blocks: the release has none and "
                               "ldae imports attention-free autoencoders only")
    bad = [c for c in channels if c % groups]
    if bad:
        raise CheckpointError(f"{source}: widths {channels} are not divisible by {groups} GroupNorm groups (not "
                              "stored in the file: pass the groups the model was trained with)")
    return {
        "channels": channels,
        "latent_channels": int(mu.shape[0]),
        "num_res_blocks": res_per_level[0],
        "norm_num_groups": groups,
        "norm_eps": RELEASE_CONSTANTS["autoencoder_norm_eps"],
        "attention_levels": None,
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
        "use_checkpoint": False,
        "init_weights": None,
    }


def build_autoencoder(state: Mapping[str, Tensor], source: str = "autoencoderkl.pth",
                      norm_num_groups: int | None = None) -> tuple[nn.Module, dict]:
    """``(MONAI AutoencoderKL holding the weights, its model section)``. Keys are converted from the
    monai-generative 0.2 names by MONAI's ``AutoencoderKL.load_old_state_dict``; it must consume every key
    of the file and fill every key of the network (it silently keeps initial values otherwise)."""
    from ldae.nets.autoencoder import build_autoencoder as build

    cfg = autoencoder_config(state, source, norm_num_groups)
    meta = _is_meta(state)
    with _device(meta):
        net = build(cfg)
    own = net.state_dict()
    if len(state) != len(own):  # one to one: the converter only renames
        first = next((k for k in state if k not in own and k.replace(".conv.conv.", ".postconv.conv.") not in own), None)
        if first is not None:
            raise CheckpointError(f"{source}: unexpected key {first!r} for the official AutoencoderKL")
        missing = next(k for k in own if k not in state and k.replace(".postconv.", ".conv.") not in state)
        raise CheckpointError(f"{source}: missing key {missing!r} of the official AutoencoderKL")
    remaining = dict(state)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints progress
            net.load_old_state_dict(remaining)
    except KeyError as exc:
        raise CheckpointError(f"{source}: missing key {exc.args[0]!r} of the official AutoencoderKL") from None
    except RuntimeError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln or "key" in ln.lower()),
                    str(exc).splitlines()[0])
        raise CheckpointError(f"{source}: does not fit the AutoencoderKL inferred from its shapes ({line[:300]})") from None
    if remaining:
        raise CheckpointError(f"{source}: unexpected key {next(iter(remaining))!r} for the official AutoencoderKL")
    return net, cfg


# ----------------------------------------------------------------------------- classifier


def classifier_weights(state: Mapping[str, Tensor], emb_dim: int,
                       source: str = "disease_classifier.ckpt") -> tuple[Tensor, Tensor]:
    """``(weight (1, d), bias (1,))`` of the release's ``nn.Linear(d, 1)`` on standardised y_sem."""
    w, b = _need(state, "weight", source, "the disease classifier", 2), _need(state, "bias", source,
                                                                             "the disease classifier", 1)
    if tuple(w.shape) != (1, int(emb_dim)) or tuple(b.shape) != (1,):
        raise CheckpointError(f"{source}: key 'weight' has shape {tuple(w.shape)}, the classifier on y_sem of "
                              f"{emb_dim} needs (1, {emb_dim}) (and bias (1,))")
    return w.float(), b.float()


# ----------------------------------------------------------------------------- helpers


def _is_meta(state: Mapping[str, Tensor]) -> bool:
    return any(v.is_meta for v in state.values())


def _device(meta: bool) -> Any:
    return torch.device("meta") if meta else contextlib.nullcontext()
