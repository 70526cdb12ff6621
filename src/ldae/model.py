"""``LDAE``: the trained three-stage model for inference.

    model = LDAE.load("runs/x")                 # finds autoencoder, diffusion and representation stages
    x, affine = model.load_volume("scan.nii.gz")  # model-ready (1, 1, D, H, W)
    y_sem, z_T = model.encode(x)                # semantic vector + conditional DDIM-inverted noise
    recon = model.decode(y_sem, z_T)            # volumes in [0, 1]

All volume inputs/outputs are ``(B, 1, D, H, W)`` tensors at the autoencoder's spacing and shape;
latents are the autoencoder's posterior means multiplied by the stored scale factor. Per DDIM step the
frozen UNet's encoder runs once and both decoders (ε_θ and G_ψ) reuse its features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldae.checkpoints import (
    StageCheckpoint,
    StageMetadata,
    diffusion_of,
    load_representation,
    open_checkpoint,
    read_ysem_stats,
)
from ldae.data.transforms import ModelReadyInput
from ldae.diffusion.ddim import ddim_sample, sampler_functions
from ldae.diffusion.interpolation import slerp
from ldae.diffusion.pdae import check_guidance_scale, guided_eps_fn, run_guidance_scale
from ldae.errors import CheckpointError, LDAEError
from ldae.nets.fast_conv import use_fast_conv3d
from ldae.nets.weights import weights_fingerprint

log = logging.getLogger(__name__)
Tensor = torch.Tensor


@dataclass
class LDAE(ModelReadyInput):
    """A trained LDAE (all networks frozen, eval mode) with its inference operations."""

    autoencoder: torch.nn.Module
    unet: torch.nn.Module
    encoder: torch.nn.Module
    shift: torch.nn.Module
    schedule: Any
    scale_factor: float
    spacing: Any
    shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    ysem_mean: Tensor | None = None
    ysem_std: Tensor | None = None
    steps: int = 50
    run: Path | None = None
    checkpoints: dict[str, str] = field(default_factory=dict)
    #: each stage's checkpoint metadata (:class:`ldae.checkpoints.StageMetadata`), read once at load
    metadata: dict[str, StageMetadata] = field(default_factory=dict)
    #: weights fingerprints of the loaded networks: autoencoder, diffusion (UNet), semantic_encoder
    fingerprints: dict[str, str] = field(default_factory=dict)
    #: why the y_sem statistics could not be used (None: absent or fine)
    ysem_problem: str | None = None
    #: DDIM of encode/decode: "ldae" (default: reaches T−1 and the clean level, no clamp) or "official" (the
    #: published LDAE code's "ddimN", clamping ẑ_0 to [−1, 1]: :func:`ldae.diffusion.ddim.official_ddim_sample`)
    sampler: str = "ldae"
    #: s in ε̂ = ε_θ − s √(1−ᾱ_t) G_ψ (:func:`guided_eps_fn`) for decodings that start from a *random* z_T
    #: (:meth:`semantic_only`, :meth:`variations`): there y_sem alone must carry the scan, and an L2-trained
    #: G_ψ under-states its shift. Decodings of an *inverted* z_T (:meth:`encode` / :meth:`decode`,
    #: reconstruction, interpolation, manipulation) keep the paper's s = 1: z_T already holds the scan, and a
    #: larger s only stiffens the ODE (measured: lower SSIM at 10–20 steps; README "Stage-3 levers").
    #: The run's ``decoding.guidance_scale`` unless given to :meth:`load`; 1 = the paper's
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        # single scans (interpolation, manipulation, the CLI) through oneDNN, not ATen's slow_conv3d (issue 19)
        for net in (self.autoencoder, self.unet, self.shift):
            if net is not None:
                use_fast_conv3d(net)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, run: str | Path, device: str | torch.device = "cpu", steps: int | None = None,
             representation: StageCheckpoint | None = None, sampler: str = "ldae",
             guidance_scale: float | None = None) -> LDAE:
        """Load a trained LDAE from a full run folder (``RUN/{autoencoder,diffusion,representation}``), the
        representation stage folder (``RUN/representation``) or a representation checkpoint.

        The representation checkpoint names the diffusion checkpoint it was trained on, which names its
        autoencoder; each is looked for beside the checkpoint naming it first (a copied run folder loads
        its own stages), and its weights must have the fingerprint recorded at training time
        (:mod:`ldae.checkpoints`), otherwise CheckpointError says which stage differs. ``representation``:
        the already opened representation checkpoint (read once by callers that need its metadata first).
        ``sampler``: the DDIM of :meth:`encode` / :meth:`decode_latent` (see the ``sampler`` attribute).
        ``guidance_scale``: s of the conditional DDIM; None = the run's ``decoding.guidance_scale`` (1 in
        runs written before it existed, and in imported official weights).
        """
        sampler_functions(sampler)  # a bad name fails before the (slow) load
        if guidance_scale is not None:
            check_guidance_scale(guidance_scale, "guidance_scale")
        from ldae.runs import find_checkpoint

        rep = representation or open_checkpoint(find_checkpoint(run, "representation"), "representation")
        encoder, shift = load_representation(rep, device)
        ldm = diffusion_of(rep.path, rep.meta, device)
        # the autoencoder the diffusion model names, with the fingerprint recorded by stage 2 (or stage 3)
        ae = ldm.load_autoencoder(device, expected=ldm.autoencoder_fingerprint or _recorded(rep.meta, "autoencoder"))
        fingerprints = {"autoencoder": ae.fingerprint, "diffusion": str(ldm.fingerprint),
                        "semantic_encoder": weights_fingerprint(encoder)}
        mean = std = None
        ysem_problem = None
        try:
            stats = read_ysem_stats(rep.path, encoder.emb_dim, fingerprints["semantic_encoder"])
        except CheckpointError as exc:  # only manipulation needs them: every other operation still works
            stats, ysem_problem = None, str(exc)
            log.warning("%s", exc)
        if stats is not None:
            mean = torch.tensor(stats["mean"], dtype=torch.float32, device=device)
            std = torch.tensor(stats["std"], dtype=torch.float32, device=device)
        default_steps = int(rep.config.get("validation", {}).get("ddim_steps", 50))
        if guidance_scale is None:
            guidance_scale = run_guidance_scale(rep.config, str(rep.path))
        return cls(
            autoencoder=ae.net,
            unet=ldm.unet,
            encoder=encoder,
            shift=shift,
            schedule=ldm.schedule,
            scale_factor=ldm.scale_factor,
            spacing=ae.config["data"]["spacing"],
            shape=tuple(int(s) for s in ae.config["data"]["shape"]),
            latent_shape=tuple(ldm.latent_shape),
            ysem_mean=mean,
            ysem_std=std,
            steps=int(steps or default_steps),
            run=Path(run),
            checkpoints={"autoencoder": str(ae.path), "diffusion": str(ldm.checkpoint), "representation": str(rep.path)},
            metadata={"autoencoder": ae.meta, "diffusion": ldm.meta, "representation": rep.meta},
            fingerprints=fingerprints,
            ysem_problem=ysem_problem,
            sampler=sampler,
            guidance_scale=float(guidance_scale),
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------ building blocks
    @torch.no_grad()
    def compress(self, x: Tensor) -> Tensor:
        """Scaled latents (posterior means × scale factor) of volumes ``x``."""
        z_mu, _ = self.autoencoder.encode(self._check(x))
        return z_mu * self.scale_factor

    @torch.no_grad()
    def decompress(self, z: Tensor) -> Tensor:
        """Volumes in [0, 1] from scaled latents."""
        return self.autoencoder.decode(z / self.scale_factor).clamp(0.0, 1.0)

    @torch.no_grad()
    def semantic(self, x: Tensor) -> Tensor:
        """y_sem of volumes ``x`` ``(B, emb_dim)``."""
        return self.encoder(self._check(x))

    def _steps(self, steps: int | None) -> int:
        return int(steps or self.steps)

    # ------------------------------------------------------------------ LDAE operations
    @torch.no_grad()
    def encode(self, x: Tensor, steps: int | None = None, semantic: bool = True) -> tuple[Tensor | None, Tensor]:
        """``(y_sem, z_T)``: the semantic vector and the conditional DDIM inversion of the latent.
        ``semantic=False`` inverts with the unconditional model (LDDIM) and returns ``(None, z_T)``."""
        z0 = self.compress(x)
        y = self.semantic(x) if semantic else None
        eps_fn = guided_eps_fn(self.unet, self.shift if semantic else None, self.schedule, y)
        invert = sampler_functions(self.sampler)[1]
        return y, invert(eps_fn, z0, self.schedule, self._steps(steps))

    @torch.no_grad()
    def decode_latent(self, y_sem: Tensor | None, z_T: Tensor, steps: int | None = None, eta: float = 0.0,
                      generator: torch.Generator | None = None, guidance_scale: float = 1.0) -> Tensor:
        """Scaled clean latents by conditional DDIM sampling from ``z_T`` (unconditional when ``y_sem`` is None),
        the shift scaled by ``guidance_scale`` (1: the paper's; see the ``guidance_scale`` attribute)."""
        eps_fn = guided_eps_fn(self.unet, self.shift if y_sem is not None else None, self.schedule, y_sem,
                               guidance_scale)
        if self.sampler == "official":
            if eta:
                raise LDAEError(f"the official DDIM sampler is deterministic: eta must be 0, got {eta}")
            return sampler_functions("official")[0](eps_fn, z_T.to(self.device), self.schedule, self._steps(steps))
        return ddim_sample(eps_fn, z_T.to(self.device), self.schedule, self._steps(steps), eta=eta, generator=generator)

    @torch.no_grad()
    def decode(self, y_sem: Tensor | None, z_T: Tensor, steps: int | None = None, eta: float = 0.0,
               guidance_scale: float = 1.0) -> Tensor:
        """Volumes in [0, 1] decoded from ``(y_sem, z_T)`` (``guidance_scale``: see :meth:`decode_latent`)."""
        return self.decompress(self.decode_latent(y_sem, z_T, steps, eta, guidance_scale=guidance_scale))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, steps: int | None = None) -> Tensor:
        """Encode then decode (LDAE reconstruction)."""
        y, z_T = self.encode(x, steps)
        return self.decode(y, z_T, steps)

    def _noise(self, like_batch: int, generator: torch.Generator | None) -> Tensor:
        shape = (like_batch, *self.latent_shape)
        return torch.randn(shape, generator=generator).to(self.device)

    @torch.no_grad()
    def semantic_only(self, x: Tensor, steps: int | None = None, seed: int = 0, y_sem: Tensor | None = None) -> Tensor:
        """Decode y_sem of ``x`` from random z_T (what the semantic vector alone determines), at the model's
        ``guidance_scale``. With ``y_sem`` given, decode that instead from the same z_T (e.g. another subject's
        code, as a control)."""
        y = self.semantic(x) if y_sem is None else y_sem.to(self.device)
        gen = torch.Generator().manual_seed(int(seed))
        return self.decode(y, self._noise(x.shape[0], gen), steps, guidance_scale=self.guidance_scale)

    @torch.no_grad()
    def variations(self, x: Tensor, n: int, steps: int | None = None, seed: int = 0) -> Tensor:
        """``n`` stochastic variations per input: fixed y_sem, new z_T, at the model's ``guidance_scale``.
        Returns ``(n, B, 1, D, H, W)``."""
        y = self.semantic(x)
        gen = torch.Generator().manual_seed(int(seed))
        return torch.stack([self.decode(y, self._noise(x.shape[0], gen), steps, guidance_scale=self.guidance_scale)
                            for _ in range(int(n))])

    @torch.no_grad()
    def interpolate(self, x1: Tensor, x2: Tensor, ts: Sequence[float], steps: int | None = None) -> Tensor:
        """Volumes between ``x1`` (t=0) and ``x2`` (t=1): LERP of y_sem, SLERP of z_T per sample.
        Returns ``(len(ts), B, 1, D, H, W)``; at t=0/1 these are the LDAE reconstructions of the inputs."""
        y1, z1 = self.encode(x1, steps)
        y2, z2 = self.encode(x2, steps)
        outs = []
        for t in ts:
            t = float(t)
            outs.append(self.decode(torch.lerp(y1, y2, t), slerp(z1, z2, t), steps))
        return torch.stack(outs)

    def _direction(self, direction: Tensor | np.ndarray | Sequence[float]) -> Tensor:
        d = torch.as_tensor(np.asarray(direction, dtype=np.float32), device=self.device).reshape(-1)
        if d.numel() != self.encoder.emb_dim:
            raise LDAEError(f"direction has {d.numel()} entries, y_sem has {self.encoder.emb_dim}")
        norm = d.norm()
        if float(norm) == 0.0:
            raise LDAEError("direction is the zero vector")
        return d / norm

    @torch.no_grad()
    def manipulate(self, x: Tensor, direction: Tensor | np.ndarray | Sequence[float], alphas: Sequence[float],
                   steps: int | None = None) -> Tensor:
        """Move y_sem along a unit ``direction`` (in the space of y_sem normalised by the training-set
        mean/std) by each α, keep z_T; returns ``(len(alphas), B, 1, D, H, W)``."""
        if self.ysem_problem:
            raise CheckpointError(self.ysem_problem)
        if self.ysem_mean is None or self.ysem_std is None:
            raise CheckpointError("this run has no y_sem statistics (ysem_stats.json beside the representation "
                                  "checkpoint): rerun stage 3 or its post-training step")
        d = self._direction(direction)
        y, z_T = self.encode(x, steps)
        y_norm = (y - self.ysem_mean) / self.ysem_std
        outs = [self.decode((y_norm + float(a) * d) * self.ysem_std + self.ysem_mean, z_T, steps) for a in alphas]
        return torch.stack(outs)

    @torch.no_grad()
    def generate(self, n: int, steps: int | None = None, seed: int = 0, y_sem: Tensor | None = None) -> Tensor:
        """``n`` volumes from random z_T: unconditional (the latent DDPM) or, with ``y_sem`` ``(1|n, d)``,
        conditioned on it at the model's ``guidance_scale``."""
        gen = torch.Generator().manual_seed(int(seed))
        z_T = self._noise(int(n), gen)
        if y_sem is not None:
            y_sem = y_sem.to(self.device).expand(int(n), -1)
        return self.decode(y_sem, z_T, steps, guidance_scale=self.guidance_scale)



def _recorded(meta: StageMetadata, stage: str) -> str | None:
    """The weights fingerprint that ``meta`` recorded for its upstream ``stage`` (None: not recorded)."""
    ref = meta.upstream.get(stage)
    return ref.fingerprint if ref else None

