"""The checkpoint format of ldae, and the loaders of the three LDAE stages.

**Format.** A stage checkpoint is a torch file (a Lightning checkpoint when training wrote it) whose
``state_dict`` holds the stage's weights and whose ``checkpoint[CHECKPOINT_KEY]`` holds its
:class:`StageMetadata` as a plain dict (:meth:`StageMetadata.to_dict`): the stage, the preset and the
fully resolved config, plus the facts later code needs without rebuilding the training setup (latent
shape and scale factor, the EMA prefix, the image grid of the baselines, ...). Files are read with
``weights_only=True`` (no pickled code runs) and the stage is checked, so a checkpoint of another stage
or a corrupt file fails with one line naming it.

**Upstream stages.** A later stage names the checkpoints it was trained on — the diffusion stage its
autoencoder, the representation stage its diffusion model and that model's autoencoder — by an
:class:`UpstreamRef`: the absolute path when it was written, the same path *relative to the folder of the
checkpoint that names it*, and the weights fingerprint (:func:`ldae.nets.weights.weights_fingerprint`)
of the network loaded from it. :func:`resolve_upstream` looks, in this order, for

1. the relative path, from the naming checkpoint's own folder (a copied or moved run folder finds its
   own stages, not the original's);
2. the run folder's own checkpoint of that stage, when the naming checkpoint lies in the standard layout
   ``RUN/<stage>/checkpoints/`` (:mod:`ldae.runs`);
3. the absolute path as written (a stage trained in another folder),

and never relative to the current directory. The network loaded from it must have the recorded
fingerprint (:func:`check_fingerprint`), otherwise loading stops with one line: a replaced or retrained
upstream stage is never used silently.

**Versions.** Checkpoints without a ``format`` key (format 1, written before relative paths and the
autoencoder fingerprint existed) still load: they have no relative path (step 1 is skipped) and are
checked against whatever fingerprint they recorded (stage 3 recorded its diffusion model's). The dict
layout only grew: every key of format 1 keeps its name and meaning.

**Writing.** LightningModules call :func:`attach_metadata` in ``on_save_checkpoint``; code that writes
a stage checkpoint without Lightning (e.g. an importer of released weights) builds the same metadata
and calls :func:`save_checkpoint`, with the ``state_dict`` keys the loaders below expect (prefixes
:data:`AUTOENCODER_PREFIX`, :data:`DIFFUSION_EMA_PREFIX`, :data:`REPRESENTATION_PREFIXES`)::

    ae = UpstreamRef.to(run / "autoencoder/checkpoints/best.ckpt", run / "diffusion/checkpoints",
                        weights_fingerprint(autoencoder))
    meta = stage_metadata(cfg, "diffusion", scale_factor=s, latent_shape=[4, 20, 24, 20],
                          ema_prefix=DIFFUSION_EMA_PREFIX, upstream={"autoencoder": ae})
    save_checkpoint(run / "diffusion/checkpoints/best.ckpt",
                    {DIFFUSION_EMA_PREFIX + k: v for k, v in unet.state_dict().items()}, meta)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldae.diffusion.ddim import ddim_sample
from ldae.diffusion.schedule import NoiseSchedule
from ldae.errors import CheckpointError
from ldae.nets.weights import freeze, load_state_dict_strict, weights_fingerprint

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "ldae"
#: 2: upstream paths also stored relative to the checkpoint's folder, autoencoder fingerprints recorded.
FORMAT = 2
#: the stages a later stage may name as the ones it was trained on
UPSTREAM_STAGES = ("autoencoder", "diffusion")

#: ``state_dict`` prefixes of the weights each loader reads (the attribute names of the training modules)
AUTOENCODER_PREFIX = "autoencoder."
DIFFUSION_EMA_PREFIX = "ema.module."
#: ``(semantic encoder, gradient estimator)`` prefixes, EMA weights and raw weights
REPRESENTATION_PREFIXES = {True: ("ema_encoder.module.", "ema_shift.module."), False: ("encoder.", "shift.")}
#: mean/std of y_sem over the training split, beside the representation checkpoint (for manipulation)
YSEM_STATS = "ysem_stats.json"


# ---------------------------------------------------------------------------------------- metadata
@dataclass
class UpstreamRef:
    """A checkpoint of an earlier stage that a checkpoint was trained on.

    Attributes:
        path: its absolute path when the naming checkpoint was written (format 1: the path as given).
        relative: the same path relative to the naming checkpoint's folder (format 2).
        fingerprint: weights fingerprint of the network loaded from it (None: not recorded).
    """

    path: str | None = None
    relative: str | None = None
    fingerprint: str | None = None

    @classmethod
    def to(cls, upstream: str | os.PathLike, checkpoint_dir: str | os.PathLike | None,
           fingerprint: str | None = None) -> UpstreamRef:
        """A reference to the checkpoint ``upstream`` from a checkpoint that will be written into
        ``checkpoint_dir`` (None: unknown, no relative path). Both are resolved (symlinks followed) before
        the relative path is taken, so that it holds whichever way the run folder is reached later."""
        absolute = os.path.realpath(os.fspath(upstream))
        relative = None
        if checkpoint_dir is not None:
            try:
                relative = os.path.relpath(absolute, os.path.realpath(os.fspath(checkpoint_dir)))
            except ValueError:  # another drive (Windows): no relative path exists
                relative = None
        return cls(path=absolute, relative=relative, fingerprint=fingerprint)


#: metadata fields that are plain optional values, written only when set
_OPTIONAL = ("latent_shape", "scale_factor", "ema_prefix", "emb_dim", "unet_config", "spacing", "shape",
             "age_mean", "age_std", "positive", "negative")


@dataclass
class StageMetadata:
    """What a stage checkpoint says about itself (``checkpoint[CHECKPOINT_KEY]``).

    Every stage: ``stage``, ``preset``, ``config`` (the fully resolved config it was trained with).
    Stage-specific (None where they do not apply):

    - ``latent_shape`` ``[C, d, h, w]``: autoencoder, diffusion, representation;
    - ``scale_factor`` (latents are multiplied by it), ``ema_prefix``: diffusion (and representation);
    - ``emb_dim``, ``unet_config`` (of the frozen UNet the gradient estimator plugs into): representation;
    - ``spacing``, ``shape`` (image grid): voxel_dae, supervised;
    - ``age_mean``, ``age_std``, ``positive``, ``negative`` (heads' targets): supervised;
    - ``upstream``: ``{'autoencoder' | 'diffusion': UpstreamRef}`` — diffusion names its autoencoder,
      representation names its diffusion model and autoencoder.

    ``extra`` keeps keys this version does not know (written by a newer ldae), so that they survive a
    read/write round trip.
    """

    stage: str
    config: dict
    preset: str | None = None
    format: int = FORMAT
    latent_shape: list[int] | None = None
    scale_factor: float | None = None
    ema_prefix: str | None = None
    emb_dim: int | None = None
    unet_config: dict | None = None
    spacing: Any = None
    shape: list[int] | None = None
    age_mean: float | None = None
    age_std: float | None = None
    positive: str | None = None
    negative: str | None = None
    upstream: dict[str, UpstreamRef] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict stored in checkpoints. Upstream references are flat keys
        ``<stage>_checkpoint`` (absolute path), ``<stage>_checkpoint_relative`` and ``<stage>_fingerprint``,
        the names format 1 used for the path and the diffusion fingerprint."""
        out: dict[str, Any] = {"format": int(self.format), "stage": self.stage, "preset": self.preset,
                               "config": self.config}
        for key in _OPTIONAL:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        for stage, ref in self.upstream.items():
            if stage not in UPSTREAM_STAGES:
                raise ValueError(f"upstream stage must be one of {UPSTREAM_STAGES}, got {stage!r}")
            out[f"{stage}_checkpoint"] = ref.path
            if ref.relative is not None:
                out[f"{stage}_checkpoint_relative"] = ref.relative
            if ref.fingerprint is not None:
                out[f"{stage}_fingerprint"] = ref.fingerprint
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, meta: Any, source: str | os.PathLike = "checkpoint") -> StageMetadata:
        """Parse a stored dict (format 1 or 2); CheckpointError naming ``source`` when it is not one."""
        if not isinstance(meta, dict) or not isinstance(meta.get("stage"), str):
            raise CheckpointError(f"{source}: not an ldae checkpoint (no '{CHECKPOINT_KEY}' metadata with a stage)")
        if not isinstance(meta.get("config"), dict):
            raise CheckpointError(f"{source}: checkpoint lacks its config")
        fmt = meta.get("format", 1)
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt > FORMAT:
            raise CheckpointError(f"{source}: checkpoint format {fmt!r} is newer than this ldae reads "
                                  f"(format {FORMAT}): upgrade ldae")
        known = {"format", "stage", "preset", "config", *_OPTIONAL}
        upstream: dict[str, UpstreamRef] = {}
        for stage in UPSTREAM_STAGES:
            keys = (f"{stage}_checkpoint", f"{stage}_checkpoint_relative", f"{stage}_fingerprint")
            known.update(keys)
            path, relative, fingerprint = (meta.get(k) for k in keys)
            if path or relative or fingerprint:
                upstream[stage] = UpstreamRef(path=str(path) if path else None,
                                              relative=str(relative) if relative else None,
                                              fingerprint=str(fingerprint) if fingerprint else None)
        return cls(stage=meta["stage"], config=meta["config"], preset=meta.get("preset"), format=fmt,
                   **{k: meta.get(k) for k in _OPTIONAL}, upstream=upstream,
                   extra={k: v for k, v in meta.items() if k not in known})

    def require(self, *keys: str, source: str | os.PathLike = "checkpoint") -> None:
        """CheckpointError naming ``source`` unless every field in ``keys`` is set."""
        missing = [k for k in keys if getattr(self, k) is None]
        if missing:
            raise CheckpointError(f"{source}: checkpoint of stage '{self.stage}' lacks {', '.join(missing)}")


def stage_metadata(cfg: dict, stage: str, **fields: Any) -> StageMetadata:
    """The metadata of a checkpoint of ``stage`` trained with the resolved config ``cfg``; ``fields`` are
    the stage-specific :class:`StageMetadata` fields."""
    return StageMetadata(stage=stage, config=cfg, preset=cfg.get("preset"), **fields)


def checkpoint_dir(cfg: dict) -> Path | None:
    """Where a training stage writes its checkpoints (``cfg['out']/checkpoints``; None without ``out``):
    the folder upstream paths are made relative to."""
    return Path(cfg["out"]) / "checkpoints" if cfg.get("out") else None


def attach_metadata(checkpoint: dict[str, Any], meta: StageMetadata) -> None:
    """Store ``meta`` in a checkpoint dict being saved (a LightningModule's ``on_save_checkpoint``)."""
    checkpoint[CHECKPOINT_KEY] = meta.to_dict()


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: StageMetadata) -> Path:
    """Write a stage checkpoint without Lightning (atomically): ``{'state_dict': ..., CHECKPOINT_KEY: ...}``.
    The loaders read it like a trained one."""
    from ldae.io import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save({"state_dict": dict(state_dict), CHECKPOINT_KEY: meta.to_dict()}, tmp)
    return path


# ---------------------------------------------------------------------------------------- reading
def _reason(exc: BaseException) -> str:
    """First non-empty line of an exception's message, or its type name (an empty message)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def load_checkpoint(path: str | os.PathLike, stage: str | None = None) -> dict:
    """The raw checkpoint dict, loaded safely (``weights_only=True``) and checked to belong to ``stage``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip failure is a corrupt checkpoint
        raise CheckpointError(f"{path}: cannot load checkpoint ({_reason(exc)})") from None
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if stage is not None:
        found = meta.get("stage") if isinstance(meta, dict) else None
        if found != stage:
            raise CheckpointError(
                f"{path}: this is a checkpoint of stage '{found or 'unknown'}', expected stage '{stage}'"
            )
    return ckpt


@dataclass
class StageCheckpoint:
    """A checkpoint read once: its path, parsed metadata and weights."""

    path: Path
    meta: StageMetadata
    state_dict: dict[str, torch.Tensor]

    @property
    def config(self) -> dict:
        return self.meta.config

    def weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """The entries under ``prefix`` (e.g. a LightningModule attribute, ``ema.module.``), prefix removed."""
        return {k[len(prefix):]: v for k, v in self.state_dict.items() if k.startswith(prefix)}


def open_checkpoint(ckpt: str | os.PathLike | StageCheckpoint, stage: str) -> StageCheckpoint:
    """Read a checkpoint of ``stage`` (a path, or an already opened one, returned as is after the stage
    check); CheckpointError for a missing/corrupt file, another stage, or no config/weights."""
    if isinstance(ckpt, StageCheckpoint):
        if ckpt.meta.stage != stage:
            raise CheckpointError(f"{ckpt.path}: this is a checkpoint of stage '{ckpt.meta.stage}', "
                                  f"expected stage '{stage}'")
        return ckpt
    raw = load_checkpoint(ckpt, stage)
    meta = StageMetadata.from_dict(raw.get(CHECKPOINT_KEY), ckpt)
    state = raw.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt}: checkpoint lacks its state_dict")
    return StageCheckpoint(Path(ckpt), meta, state)


def load_frozen(module: torch.nn.Module, ckpt: StageCheckpoint, prefix: str, device: str | torch.device = "cpu",
                what: str | None = None) -> torch.nn.Module:
    """The one load sequence of every stage: the weights under ``prefix`` (Lightning attribute or EMA
    copy), strictly loaded into ``module`` (CheckpointError listing missing/unexpected keys), moved to
    ``device``, frozen (no gradients, eval mode). Returns ``module``."""
    load_state_dict_strict(module, ckpt.weights(prefix), f"{ckpt.path} ({what})" if what else str(ckpt.path))
    return freeze(module.to(device))


# ---------------------------------------------------------------------------------------- upstream
class UpstreamNotFound(CheckpointError):
    """No checkpoint of the upstream stage exists where :func:`resolve_upstream` looks."""


def _standard_run_root(ckpt_path: Path, stage: str) -> Path | None:
    """``RUN`` when ``ckpt_path`` is ``RUN/<stage dir>/checkpoints/<name>.ckpt``, else None."""
    from ldae.runs import STAGE_DIRS

    parent = Path(os.path.abspath(ckpt_path)).parent
    if parent.name == "checkpoints" and parent.parent.name == STAGE_DIRS.get(stage):
        return parent.parent.parent
    return None


def upstream_candidates(ckpt_path: str | os.PathLike, meta: StageMetadata, stage: str) -> list[Path]:
    """Where :func:`resolve_upstream` looks for the ``stage`` checkpoint named by ``ckpt_path``, in order
    (see the module docstring); paths relative to the current directory are never among them."""
    from ldae.runs import STAGE_DIRS

    ckpt_path = Path(ckpt_path)
    ref = meta.upstream.get(stage)
    out: list[Path] = []
    if ref is not None and ref.relative:
        out.append(Path(os.path.normpath(Path(os.path.abspath(ckpt_path)).parent / ref.relative)))
    root = _standard_run_root(ckpt_path, meta.stage)
    if root is not None:
        name = Path(ref.path).name if ref is not None and ref.path else "best.ckpt"
        out.append(root / STAGE_DIRS[stage] / "checkpoints" / name)
    if ref is not None and ref.path and Path(ref.path).is_absolute():
        out.append(Path(ref.path))
    unique: list[Path] = []
    for p in out:
        if p not in unique:
            unique.append(p)
    return unique


def resolve_upstream(ckpt_path: str | os.PathLike, meta: StageMetadata, stage: str) -> Path:
    """The ``stage`` checkpoint that the checkpoint at ``ckpt_path`` (metadata ``meta``) was trained on;
    CheckpointError saying where it looked when none exists."""
    candidates = upstream_candidates(ckpt_path, meta, stage)
    ref = meta.upstream.get(stage)
    for i, path in enumerate(candidates):
        if path.is_file():
            if i > 0 and ref is not None and ref.path and path == Path(ref.path):
                log.info("%s: using the %s checkpoint %s recorded at training time (none beside it)",
                         ckpt_path, stage, path)
            return path
    recorded = f" (recorded as {ref.path!r})" if ref is not None and ref.path else ""
    looked = ", ".join(map(str, candidates)) or "no path recorded"
    raise UpstreamNotFound(f"{ckpt_path}: the {stage} checkpoint it was trained on{recorded} was not found "
                           f"(looked for {looked})")


def check_fingerprint(module: torch.nn.Module, expected: str | None, stage: str, loaded_from: str | os.PathLike,
                      named_by: str | os.PathLike) -> str:
    """Return the weights fingerprint of ``module`` (loaded from ``loaded_from``); CheckpointError when
    ``named_by`` recorded another one for its ``stage``."""
    found = weights_fingerprint(module)
    if expected and found != expected:
        raise CheckpointError(f"{named_by}: was trained on other {stage} weights than those in {loaded_from} "
                              f"(weights fingerprint differs): restore the original {stage} checkpoint or "
                              "retrain the later stages on this one")
    return found


# ---------------------------------------------------------------------------------------- stage 1
def load_autoencoder(ckpt: str | os.PathLike | StageCheckpoint,
                     device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The trained AutoencoderKL of a stage-1 checkpoint (strict load, frozen, eval mode) and the run's
    resolved config. CheckpointError for another stage's checkpoint or a weight mismatch."""
    from ldae.nets.autoencoder import build_autoencoder

    ckpt = open_checkpoint(ckpt, "autoencoder")
    net = build_autoencoder(dict(ckpt.config["model"], init_weights=None))  # trained weights replace any init
    return load_frozen(net, ckpt, AUTOENCODER_PREFIX, device), ckpt.config


@dataclass
class UpstreamAutoencoder:
    """The autoencoder a later stage was trained on, as loaded by :func:`autoencoder_of`."""

    net: torch.nn.Module
    meta: StageMetadata
    path: Path
    fingerprint: str

    @property
    def config(self) -> dict:
        return self.meta.config


def autoencoder_of(named_by: str | os.PathLike, meta: StageMetadata, device: str | torch.device = "cpu",
                   path: str | os.PathLike | None = None, expected: str | None = None) -> UpstreamAutoencoder:
    """The autoencoder that the checkpoint ``named_by`` (metadata ``meta``) was trained on: found by
    :func:`resolve_upstream` (or the given ``path``), refused unless its weights fingerprint is the one
    recorded in ``meta`` (or ``expected``, when given)."""
    ae = open_checkpoint(Path(path) if path is not None else resolve_upstream(named_by, meta, "autoencoder"),
                         "autoencoder")
    net, _ = load_autoencoder(ae, device)
    ref = meta.upstream.get("autoencoder")
    want = expected or (ref.fingerprint if ref else None)
    return UpstreamAutoencoder(net, ae.meta, ae.path, check_fingerprint(net, want, "autoencoder", ae.path, named_by))


# ---------------------------------------------------------------------------------------- stage 2
@dataclass
class LatentDiffusion:
    """A trained latent DDPM for inference: EMA UNet (frozen, eval), schedule, latent scale, and the
    metadata of its checkpoint (which names the autoencoder it was trained on)."""

    unet: torch.nn.Module
    schedule: NoiseSchedule
    scale_factor: float
    latent_shape: tuple[int, ...]
    cfg: dict
    checkpoint: Path
    meta: StageMetadata
    #: weights fingerprint of the UNet, once computed (by :func:`diffusion_of`)
    fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def autoencoder_fingerprint(self) -> str | None:
        """Weights fingerprint of the autoencoder whose latents this model was trained on (if recorded)."""
        ref = self.meta.upstream.get("autoencoder")
        return ref.fingerprint if ref else None

    def find_autoencoder(self) -> Path:
        """The autoencoder checkpoint this model was trained on (:func:`resolve_upstream`)."""
        return resolve_upstream(self.checkpoint, self.meta, "autoencoder")

    def load_autoencoder(self, device: str | torch.device | None = None, path: str | os.PathLike | None = None,
                         expected: str | None = None) -> UpstreamAutoencoder:
        """:func:`autoencoder_of` this model: the autoencoder whose latents it was trained on, fingerprint
        checked (``path`` replaces the recorded checkpoint, e.g. a user's choice)."""
        return autoencoder_of(self.checkpoint, self.meta, self.device if device is None else device, path,
                              expected)

    @torch.no_grad()
    def sample(self, n: int, steps: int = 50, eta: float = 0.0, generator: torch.Generator | None = None,
               progress: bool = False) -> torch.Tensor:
        """``n`` unconditional latents in the autoencoder's (unscaled) latent space, ``(n, C, D, H, W)``.
        ``generator`` (CPU) draws the starting noise and the η noise."""
        z_T = torch.randn((int(n), *self.latent_shape), generator=generator).to(self.device)
        noise_gen = None
        if eta > 0:
            noise_gen = torch.Generator(device=self.device).manual_seed(
                int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            )
        z = ddim_sample(self.unet, z_T, self.schedule, steps, eta=eta, generator=noise_gen, progress=progress)
        return z / self.scale_factor


def load_latent_diffusion(ckpt: str | os.PathLike | StageCheckpoint,
                          device: str | torch.device = "cpu") -> LatentDiffusion:
    """The EMA UNet of a stage-2 checkpoint (strict load, frozen, eval) with its schedule and scale
    factor. CheckpointError for another stage's checkpoint or mismatching weights."""
    from ldae.nets.unet import LatentUNet

    ckpt = open_checkpoint(ckpt, "diffusion")
    ckpt.meta.require("scale_factor", "latent_shape", source=ckpt.path)
    unet = LatentUNet.from_config(ckpt.config["model"])
    load_frozen(unet, ckpt, ckpt.meta.ema_prefix or DIFFUSION_EMA_PREFIX, device, "EMA weights")
    return LatentDiffusion(unet=unet, schedule=NoiseSchedule.from_config(ckpt.config["diffusion"]),
                           scale_factor=float(ckpt.meta.scale_factor),
                           latent_shape=tuple(int(s) for s in ckpt.meta.latent_shape),
                           cfg=ckpt.config, checkpoint=ckpt.path, meta=ckpt.meta)


def diffusion_of(named_by: str | os.PathLike, meta: StageMetadata,
                 device: str | torch.device = "cpu") -> LatentDiffusion:
    """The latent DDPM that the representation checkpoint ``named_by`` (metadata ``meta``) was trained
    on: found by :func:`resolve_upstream`, refused when its UNet configuration or weights fingerprint
    differ from the recorded ones."""
    ldm_path = resolve_upstream(named_by, meta, "diffusion")
    ldm = load_latent_diffusion(ldm_path, device)
    if meta.unet_config is not None and dict(meta.unet_config) != dict(ldm.unet.config):
        raise CheckpointError(f"{named_by}: was trained on a diffusion UNet of another configuration (preset "
                              f"'{meta.preset}') than the one in {ldm_path} (preset '{ldm.cfg.get('preset')}')")
    ref = meta.upstream.get("diffusion")
    ldm.fingerprint = check_fingerprint(ldm.unet, ref.fingerprint if ref else None, "diffusion", ldm_path, named_by)
    return ldm


# ---------------------------------------------------------------------------------------- stage 3
def load_representation(ckpt: str | os.PathLike | StageCheckpoint, device: str | torch.device = "cpu",
                        ema: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(semantic encoder, gradient estimator)`` of a stage-3 checkpoint (EMA weights by default), strict
    load, frozen, eval mode. The frozen UNet they work with is the diffusion checkpoint's
    (:func:`diffusion_of`)."""
    from ldae.nets.semantic_encoder import build_semantic_encoder
    from ldae.nets.unet import build_shift_decoder

    ckpt = open_checkpoint(ckpt, "representation")
    ckpt.meta.require("unet_config", "emb_dim", source=ckpt.path)
    encoder = build_semantic_encoder(ckpt.config["model"]["semantic_encoder"], load_pretrained=False)
    shift = build_shift_decoder(dict(ckpt.meta.unet_config), int(ckpt.meta.emb_dim))  # ldae's or the official
    enc_prefix, shift_prefix = REPRESENTATION_PREFIXES[bool(ema)]
    return (load_frozen(encoder, ckpt, enc_prefix, device, "semantic encoder"),
            load_frozen(shift, ckpt, shift_prefix, device, "gradient estimator"))


def ysem_stats_path(representation_ckpt: str | os.PathLike) -> Path:
    """``ysem_stats.json`` beside a representation checkpoint."""
    return Path(representation_ckpt).parent / YSEM_STATS


def read_ysem_stats(representation_ckpt: str | os.PathLike, emb_dim: int | None = None,
                    encoder_fingerprint: str | None = None) -> dict[str, Any] | None:
    """``{'mean', 'std'}`` (lists) of y_sem over the training split, stored beside a representation
    checkpoint; None when there is no such file. CheckpointError (one line, naming the file) for an
    unreadable or malformed file, one of another width than ``emb_dim``, or one computed with another
    encoder than ``encoder_fingerprint`` (when both record one)."""
    path = ysem_stats_path(representation_ckpt)
    if not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the y_sem statistics ({_reason(exc)}); rerun stage 3's "
                              "post-training step or delete the file") from None
    ok = isinstance(stats, dict) and all(
        isinstance(stats.get(k), list) and stats[k] and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in stats[k]) for k in ("mean", "std"))
    if not ok or len(stats["mean"]) != len(stats["std"]) or min(stats["std"]) <= 0:
        raise CheckpointError(f"{path}: malformed y_sem statistics (expected lists 'mean' and 'std' of equal "
                              "length, std > 0)")
    if emb_dim is not None and len(stats["mean"]) != int(emb_dim):
        raise CheckpointError(f"{path}: y_sem statistics of width {len(stats['mean'])}, the encoder's y_sem has "
                              f"{emb_dim}: they belong to another representation checkpoint")
    recorded = stats.get("encoder_fingerprint")
    if recorded and encoder_fingerprint and recorded != encoder_fingerprint:
        raise CheckpointError(f"{path}: y_sem statistics were computed with another semantic encoder than "
                              f"the one in {representation_ckpt} (weights fingerprint differs)")
    return stats

