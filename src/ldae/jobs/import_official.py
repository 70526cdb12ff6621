"""``ldae import-official``: the published LDAE release as an ordinary ldae run folder.

    run = import_official("runs/official", autoencoder="autoencoderkl.pth", encoder="encoder.pth",
                          decoder="decoder.pth", classifier="disease_classifier.ckpt",
                          semantic_mean="semantic_mean.pt", semantic_std="semantic_std.pt")
    model = LDAE.load(run)          # reconstruct, variations, interpolate, manipulate, encode, generate ...

What it writes (the layout ``ldae pipeline`` writes, :mod:`ldae.runs`)::

    RUN/autoencoder/checkpoints/best.ckpt      the AutoencoderKL (keys converted by MONAI's loader)
    RUN/diffusion/checkpoints/best.ckpt        the ε-UNet (official architecture), scale factor 0.8730
    RUN/representation/checkpoints/best.ckpt   semantic encoder + gradient estimator (official architectures)
    RUN/representation/checkpoints/ysem_stats.json   y_sem mean/std of the release (when given)
    RUN/release/classifier.json                the release's AD-vs-CN classifier (when given; ``ldae predict``)
    RUN/release/release.json                   where it all came from and the release's constants

Every input is read and checked before anything is written (:mod:`ldae.nets.official_weights`: roles,
hyper-parameters from the shapes, strict one-to-one keys), and the folder is assembled under a temporary
name and renamed at the end, so a bad input leaves no run folder behind. The release's constants
(:data:`RELEASE`) are facts of that model, recorded in its metadata; they are never defaults of ldae's
own training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldae.errors import CheckpointError, LDAEError

log = logging.getLogger(__name__)

RELEASE_DIR = "release"
RELEASE_FILE = "release.json"
CLASSIFIER_FILE = "classifier.json"
CLASSIFIER_FORMAT = "ldae-release-classifier/1"
#: facts of the published model (official code, configs and tutorial)
RELEASE: dict[str, Any] = {
    "name": "LDAE, official release (GabrieleLozupone/LDAE)",
    "scale_factor": 0.8730,  # the official code's hard-coded latent scale
    "spacing": 1.5,
    "shape": [128, 160, 128],
    "preprocessing": "MONAI: Spacingd(pixdim=1.5) -> ResizeWithPadOrCropd((128, 160, 128), mode='minimum') -> "
                     "ScaleIntensityd(minv=0, maxv=1); no reorientation step (ADNI T1s, skull-stripped, "
                     "registered to a template in the paper)",
    "training_latents": "sampled: z = mu + sigma * eps (the official encode_stage_2_inputs); ldae compresses "
                        "with the posterior mean mu (deterministic)",
    "encoder_input": "model-ready (B, 1, X, Y, Z); axial slices x[..., k] (the official code feeds "
                     "x.permute(0, 1, 4, 2, 3))",
    "sampler": "official DDIM 'ddimN': levels int(linspace(0, T-1, N+1)), clean = level 0, predicted latents "
               "clamped to [-1, 1] (ldae's --sampler official); ldae's own DDIM stays the default",
    "classifier": "nn.Linear(768, 1) on (y_sem - mean) / std; classes sorted ['AD', 'CN', 'MCI'] -> AD 0, CN 1, "
                  "trained on label > 0: a positive logit means CN, P(AD) = sigmoid(-logit)",
    "manipulation": "official: y_norm + scale * sqrt(d) * w / |w|; ldae manipulate moves alpha along the unit "
                    "direction, so alpha = scale * sqrt(768) (27.7 x scale)",
}
ROLE_FILES = ("autoencoder", "encoder", "decoder", "classifier", "semantic_mean", "semantic_std")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _scale(value: float | None) -> float:
    scale = RELEASE["scale_factor"] if value is None else value
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise LDAEError(f"--scale-factor must be a positive number, got {value!r}")
    return float(scale)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LDAEError(f"{out}: already exists and is not an empty folder; choose a new run folder for the import")
    if not out.parent.exists():
        raise LDAEError(f"{out.parent}: folder does not exist (parent of --out)")


# ----------------------------------------------------------------------------- reading the release


def read_release(autoencoder: str | os.PathLike, encoder: str | os.PathLike, decoder: str | os.PathLike,
                 classifier: str | os.PathLike | None = None, semantic_mean: str | os.PathLike | None = None,
                 semantic_std: str | os.PathLike | None = None,
                 autoencoder_norm_groups: int | None = None) -> dict[str, Any]:
    """All release files read, built into ldae's networks (strict) and checked against each other.
    Returns ``{'autoencoder', 'autoencoder_model', 'unet', 'shift', 'encoder', 'classifier', 'mean', 'std',
    'paths'}``. CheckpointError/LDAEError (one line naming the file and the first offending key) otherwise."""
    from ldae.nets import official_weights as W

    if (semantic_mean is None) != (semantic_std is None):
        raise LDAEError("--semantic-mean and --semantic-std go together (the y_sem statistics of the release)")
    if classifier is not None and semantic_mean is None:
        raise LDAEError(f"{classifier}: the release classifier reads standardised y_sem; also pass "
                        "--semantic-mean and --semantic-std")
    paths = {"autoencoder": Path(autoencoder), "encoder": Path(encoder), "decoder": Path(decoder)}
    for role, value in (("classifier", classifier), ("semantic_mean", semantic_mean), ("semantic_std", semantic_std)):
        if value is not None:
            paths[role] = Path(value)
    states = {role: W.read_state_dict(path, role) for role, path in paths.items()}  # roles first: cheap checks
    ae, ae_model = W.build_autoencoder(states["autoencoder"], str(paths["autoencoder"]), autoencoder_norm_groups)
    unet, shift = W.build_decoder(states["decoder"], str(paths["decoder"]))
    enc = W.build_encoder(states["encoder"], str(paths["encoder"]))
    enc_cfg = W.encoder_config(states["encoder"], str(paths["encoder"]))
    latent_channels = int(ae_model["latent_channels"])
    if int(unet.config["in_channels"]) != latent_channels:
        raise CheckpointError(f"{paths['decoder']}: key 'input_blocks.0.0.weight' reads {unet.config['in_channels']} "
                              f"latent channels, the autoencoder {paths['autoencoder']} makes {latent_channels}")
    if int(shift.cond_dim) != int(enc.emb_dim):
        raise CheckpointError(f"{paths['decoder']}: key 'label_emb.weight' takes y_sem of {shift.cond_dim}, the "
                              f"encoder {paths['encoder']} gives {enc.emb_dim}")
    shape = list(RELEASE["shape"])
    if int(enc.num_slices) != shape[-1]:
        raise CheckpointError(f"{paths['encoder']}: key 'positional_encoding.pe' has {enc.num_slices} slices, the "
                              f"release's model-ready volumes {shape} have {shape[-1]} axial slices")
    out: dict[str, Any] = {"autoencoder": ae, "autoencoder_model": ae_model, "unet": unet, "shift": shift,
                           "encoder": enc, "encoder_config": enc_cfg, "classifier": None, "mean": None,
                           "std": None, "paths": paths}
    if semantic_mean is not None:
        for role in ("semantic_mean", "semantic_std"):
            value = states[role]
            if value.numel() != enc.emb_dim:
                raise CheckpointError(f"{paths[role]}: {value.numel()} values, y_sem has {enc.emb_dim}")
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{paths[role]}: contains non-finite values")
        if float(states["semantic_std"].min()) <= 0:
            raise CheckpointError(f"{paths['semantic_std']}: y_sem std must be > 0")
        out["mean"], out["std"] = states["semantic_mean"], states["semantic_std"]
    if classifier is not None:
        out["classifier"] = W.classifier_weights(states["classifier"], enc.emb_dim, str(paths["classifier"]))
    return out


# ----------------------------------------------------------------------------- writing the run


def _configs(release: Mapping[str, Any], run: Path) -> dict[str, dict]:
    """The stages' resolved configs: the paper presets with the release's networks and image grid."""
    from ldae.config import load_preset

    cfgs = {stage: load_preset("paper", stage) for stage in ("autoencoder", "diffusion", "representation")}
    for stage, cfg in cfgs.items():
        cfg["out"] = str(run / stage)
    cfgs["autoencoder"]["model"] = dict(release["autoencoder_model"])
    cfgs["autoencoder"]["data"].update(spacing=RELEASE["spacing"], shape=list(RELEASE["shape"]))
    cfgs["diffusion"]["model"] = dict(release["unet"].config)
    cfgs["representation"]["model"]["semantic_encoder"] = dict(release["encoder_config"])
    return cfgs


def write_run(release: Mapping[str, Any], out: str | os.PathLike, scale_factor: float | None = None) -> Path:
    """Write the run folder of a :func:`read_release` result to ``out`` (a new or empty folder), assembled
    under a temporary name beside it and renamed at the end (nothing is left behind on failure)."""
    from ldae.checkpoints import (
        AUTOENCODER_PREFIX,
        DIFFUSION_EMA_PREFIX,
        REPRESENTATION_PREFIXES,
        UpstreamRef,
        save_checkpoint,
        stage_metadata,
        ysem_stats_path,
    )
    from ldae.io import write_json
    from ldae.nets.autoencoder import latent_shape
    from ldae.nets.weights import weights_fingerprint
    from ldae.runs import stage_dir

    out = Path(out).absolute()
    _check_out(out)
    scale = _scale(scale_factor)
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        cfgs = _configs(release, out)  # paths inside the configs are the final ones
        ckpts = {stage: stage_dir(tmp, stage) / "checkpoints" / "best.ckpt"
                 for stage in ("autoencoder", "diffusion", "representation")}
        lat = list(latent_shape(cfgs["autoencoder"]["model"], RELEASE["shape"]))
        ae, unet, shift, enc = release["autoencoder"], release["unet"], release["shift"], release["encoder"]
        prints = {"autoencoder": weights_fingerprint(ae), "diffusion": weights_fingerprint(unet),
                  "semantic_encoder": weights_fingerprint(enc)}
        # upstream references: relative paths hold after the rename, absolute ones are the final locations
        final = {stage: out / p.relative_to(tmp) for stage, p in ckpts.items()}
        origin = {"imported_from": RELEASE["name"], "release_file": str(out / RELEASE_DIR / RELEASE_FILE)}

        def ref(stage: str, named_by: str) -> UpstreamRef:
            return UpstreamRef(path=str(final[stage]), relative=os.path.relpath(final[stage], final[named_by].parent),
                               fingerprint=prints[stage])

        save_checkpoint(ckpts["autoencoder"], {AUTOENCODER_PREFIX + k: v for k, v in ae.state_dict().items()},
                        stage_metadata(cfgs["autoencoder"], "autoencoder", latent_shape=lat, extra=dict(origin)))
        save_checkpoint(ckpts["diffusion"], {DIFFUSION_EMA_PREFIX + k: v for k, v in unet.state_dict().items()},
                        stage_metadata(cfgs["diffusion"], "diffusion", latent_shape=lat, scale_factor=scale,
                                       ema_prefix=DIFFUSION_EMA_PREFIX, extra=dict(origin),
                                       upstream={"autoencoder": ref("autoencoder", "diffusion")}))
        enc_prefix, shift_prefix = REPRESENTATION_PREFIXES[True]  # the release's weights are its EMA weights
        state = {enc_prefix + k: v for k, v in enc.state_dict().items()}
        state.update({shift_prefix + k: v for k, v in shift.state_dict().items()})
        save_checkpoint(ckpts["representation"], state,
                        stage_metadata(cfgs["representation"], "representation", latent_shape=lat,
                                       scale_factor=scale, emb_dim=int(enc.emb_dim),
                                       unet_config=dict(unet.config), extra=dict(origin),
                                       upstream={"diffusion": ref("diffusion", "representation"),
                                                 "autoencoder": ref("autoencoder", "representation")}))
        for stage, cfg in cfgs.items():
            from ldae.config import save_config

            save_config(cfg, stage_dir(tmp, stage) / "config.yaml")
        paths = release["paths"]
        if release.get("mean") is not None:
            write_json(ysem_stats_path(ckpts["representation"]), {
                "mean": release["mean"].double().tolist(), "std": release["std"].double().tolist(), "n": None,
                "checkpoint": str(final["representation"]), "encoder_fingerprint": prints["semantic_encoder"],
                "source": [str(paths["semantic_mean"]), str(paths["semantic_std"])]})
        if release.get("classifier") is not None:
            w, b = release["classifier"]
            write_json(tmp / RELEASE_DIR / CLASSIFIER_FILE, {
                "format": CLASSIFIER_FORMAT, "source": str(paths["classifier"]),
                "weight": w.reshape(-1).double().tolist(), "bias": float(b.reshape(-1)[0]),
                "mean": release["mean"].double().tolist(), "std": release["std"].double().tolist(),
                "positive_logit_class": "CN", "note": RELEASE["classifier"],
                "encoder_fingerprint": prints["semantic_encoder"], "representation_checkpoint": str(final["representation"])})
        write_json(tmp / RELEASE_DIR / RELEASE_FILE, {
            **RELEASE, "scale_factor": scale, "scale_factor_release": RELEASE["scale_factor"],
            "files": {role: {"path": str(p.absolute()), "sha256": _sha256(p), "bytes": p.stat().st_size}
                      for role, p in paths.items()},
            "architectures": {"autoencoder": cfgs["autoencoder"]["model"], "unet": dict(unet.config),
                              "shift_cond_dim": int(shift.cond_dim),
                              "semantic_encoder": cfgs["representation"]["model"]["semantic_encoder"]},
            "fingerprints": prints,
        })
        if out.exists():
            out.rmdir()  # the empty folder the user made for it
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def import_official(out: str | os.PathLike, autoencoder: str | os.PathLike, encoder: str | os.PathLike,
                    decoder: str | os.PathLike, classifier: str | os.PathLike | None = None,
                    semantic_mean: str | os.PathLike | None = None, semantic_std: str | os.PathLike | None = None,
                    scale_factor: float | None = None, autoencoder_norm_groups: int | None = None) -> Path:
    """Import the release files into the new run folder ``out`` (see the module docstring); returns it.

    Args:
        out: the run folder to create (must not exist, or be empty).
        autoencoder, encoder, decoder: ``autoencoderkl.pth``, ``encoder.pth``, ``decoder.pth``.
        classifier: ``disease_classifier.ckpt`` (needs the y_sem statistics).
        semantic_mean, semantic_std: ``semantic_mean.pt`` / ``semantic_std.pt``.
        scale_factor: latent scale; None = the release's 0.8730.
        autoencoder_norm_groups: GroupNorm groups of the autoencoder (not in its tensors); None = 32.
    """
    _check_out(Path(out).absolute())
    scale = _scale(scale_factor)
    release = read_release(autoencoder, encoder, decoder, classifier, semantic_mean, semantic_std,
                           autoencoder_norm_groups)
    run = write_run(release, out, scale)
    log.info("imported the official release into %s", run)
    return run


# ----------------------------------------------------------------------------- using the run


def release_classifier_path(run: str | os.PathLike) -> Path:
    """``RUN/release/classifier.json`` (written when the release's classifier was imported)."""
    return Path(run) / RELEASE_DIR / CLASSIFIER_FILE


def load_release_classifier(path: str | os.PathLike) -> dict[str, Any]:
    """The release classifier as an AD-vs-CN probe in ldae's probe form (``coef``, ``intercept``, ``mean``,
    ``scale`` on standardised y_sem, positive class AD): ``logit_AD = −(w·(y − μ)/σ + b)``."""
    import json

    import numpy as np

    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LDAEError(f"{path}: cannot read the release classifier ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != CLASSIFIER_FORMAT:
        raise LDAEError(f"{path}: not a release classifier file (expected format '{CLASSIFIER_FORMAT}')")
    sign = -1.0 if obj.get("positive_logit_class", "CN") == "CN" else 1.0
    return {"ad_vs_cn": {"coef": sign * np.asarray(obj["weight"], dtype=np.float64),
                         "intercept": sign * float(obj["bias"]),
                         "mean": np.asarray(obj["mean"], dtype=np.float64),
                         "scale": np.asarray(obj["std"], dtype=np.float64),
                         "classes": ["CN", "AD"], "positive_class": "AD", "threshold": 0.5,
                         "metrics": {}, "source": "official release classifier"},
            "encoder_fingerprint": obj.get("encoder_fingerprint"),
            "representation_checkpoint": obj.get("representation_checkpoint")}


def release_p_ad(probes: Mapping[str, Any], y_sem: Any) -> Any:
    """P(AD) of y_sem ``(n, d)`` under the release classifier in the form :func:`load_release_classifier`
    returns: ``sigmoid(coef·(y − mean)/scale + intercept)`` (float64 numpy)."""
    import numpy as np

    p = probes["ad_vs_cn"]
    logit = ((np.asarray(y_sem, dtype=np.float64) - p["mean"]) / p["scale"]) @ p["coef"] + p["intercept"]
    return 1.0 / (1.0 + np.exp(-logit))
