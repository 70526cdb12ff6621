"""The checkpoint format (``ldae.checkpoints``): metadata round trips, format 1 compatibility, where
upstream stages are looked for, and a run folder written without Lightning (as an importer of released
weights writes one) loaded by ``LDAE.load`` with every fingerprint checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ldae.checkpoints import (
    AUTOENCODER_PREFIX,
    CHECKPOINT_KEY,
    DIFFUSION_EMA_PREFIX,
    FORMAT,
    REPRESENTATION_PREFIXES,
    StageMetadata,
    UpstreamNotFound,
    UpstreamRef,
    open_checkpoint,
    resolve_upstream,
    save_checkpoint,
    stage_metadata,
    upstream_candidates,
)
from ldae.config import load_preset
from ldae.errors import CheckpointError

FORMAT1_REPRESENTATION = {  # the dict the previous code wrote for stage 3 (keys as they were)
    "stage": "representation", "preset": "tiny", "config": {"preset": "tiny", "model": {}},
    "diffusion_checkpoint": "/runs/a/diffusion/checkpoints/best.ckpt", "diffusion_fingerprint": "ab" * 32,
    "autoencoder_checkpoint": "/runs/a/autoencoder/checkpoints/best.ckpt", "scale_factor": 0.7,
    "latent_shape": [3, 8, 10, 8], "emb_dim": 128, "unet_config": {"channels": [32, 64]},
}


def test_format1_dict_parses_and_the_layout_only_grew() -> None:
    meta = StageMetadata.from_dict(FORMAT1_REPRESENTATION, "old.ckpt")
    assert meta.format == 1 and meta.stage == "representation" and meta.preset == "tiny"
    assert meta.scale_factor == 0.7 and meta.latent_shape == [3, 8, 10, 8] and meta.emb_dim == 128
    assert meta.upstream["diffusion"] == UpstreamRef("/runs/a/diffusion/checkpoints/best.ckpt", None, "ab" * 32)
    assert meta.upstream["autoencoder"] == UpstreamRef("/runs/a/autoencoder/checkpoints/best.ckpt", None, None)
    assert meta.extra == {}
    # written again, every format-1 key keeps its name and value (only 'format' is added)
    again = meta.to_dict()
    assert {k: again[k] for k in FORMAT1_REPRESENTATION} == FORMAT1_REPRESENTATION
    assert set(again) - set(FORMAT1_REPRESENTATION) == {"format"}


def test_metadata_round_trip_keeps_unknown_keys() -> None:
    ref = UpstreamRef("/r/autoencoder/checkpoints/best.ckpt", "../../autoencoder/checkpoints/best.ckpt", "cd" * 32)
    meta = stage_metadata({"preset": "small", "x": 1}, "diffusion", scale_factor=0.5, latent_shape=[4, 2, 2, 2],
                          ema_prefix=DIFFUSION_EMA_PREFIX, upstream={"autoencoder": ref})
    stored = meta.to_dict()
    assert stored["format"] == FORMAT and stored["autoencoder_checkpoint_relative"] == ref.relative
    assert stored["autoencoder_fingerprint"] == ref.fingerprint and "unet_config" not in stored
    assert StageMetadata.from_dict(stored) == meta
    newer = dict(stored, some_future_key=[1, 2])
    parsed = StageMetadata.from_dict(newer)
    assert parsed.extra == {"some_future_key": [1, 2]} and parsed.to_dict() == newer


@pytest.mark.parametrize("bad,message", [
    (None, "not an ldae checkpoint"),
    ({"stage": "diffusion"}, "lacks its config"),
    ({"stage": "diffusion", "config": {}, "format": FORMAT + 1}, f"format {FORMAT + 1} is newer"),
])
def test_bad_metadata_is_one_line(bad, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as info:
        StageMetadata.from_dict(bad, "x.ckpt")
    assert str(info.value).startswith("x.ckpt: ") and "\n" not in str(info.value)


def test_upstream_ref_is_relative_to_the_naming_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ref = UpstreamRef.to(run / "autoencoder" / "checkpoints" / "best.ckpt", run / "diffusion" / "checkpoints", "f")
    assert ref.relative == os.path.join("..", "..", "autoencoder", "checkpoints", "best.ckpt")
    assert ref.path == os.path.realpath(run / "autoencoder" / "checkpoints" / "best.ckpt") and ref.fingerprint == "f"
    assert UpstreamRef.to(run / "a.ckpt", None).relative is None


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_resolution_order_and_never_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative to the naming checkpoint, then the run folder's own stage, then the absolute path as
    written; a relative path of format 1 is never tried against the current directory."""
    run = tmp_path / "copy"
    naming = _touch(run / "diffusion" / "checkpoints" / "best.ckpt")
    elsewhere = _touch(tmp_path / "elsewhere" / "ae.ckpt")
    own = run / "autoencoder" / "checkpoints" / "best.ckpt"
    beside = run / "diffusion" / "ae.ckpt"
    meta = StageMetadata("diffusion", {}, upstream={"autoencoder": UpstreamRef(str(elsewhere), "../ae.ckpt")})
    assert upstream_candidates(naming, meta, "autoencoder") == [beside, run / "autoencoder" / "checkpoints" / "ae.ckpt",
                                                                elsewhere]
    assert resolve_upstream(naming, meta, "autoencoder") == elsewhere  # only the last one exists
    _touch(beside)
    assert resolve_upstream(naming, meta, "autoencoder") == beside
    # format 1: the path as given at training time (relative: to a directory we cannot know)
    old = StageMetadata("diffusion", {}, format=1,
                        upstream={"autoencoder": UpstreamRef("run/autoencoder/checkpoints/best.ckpt")})
    monkeypatch.chdir(tmp_path)
    _touch(tmp_path / "run" / "autoencoder" / "checkpoints" / "best.ckpt")  # a decoy at CWD/run/...
    with pytest.raises(UpstreamNotFound, match=r"autoencoder checkpoint it was trained on \(recorded as "
                                               r"'run/autoencoder/checkpoints/best.ckpt'\) was not found"):
        resolve_upstream(naming, old, "autoencoder")
    _touch(own)
    assert resolve_upstream(naming, old, "autoencoder") == own


def test_a_run_written_without_lightning_loads(tmp_path: Path) -> None:
    """save_checkpoint + the documented prefixes make a run folder LDAE.load reads: what an importer of
    released weights does. A fingerprint that does not match the weights is refused."""
    from ldae.model import LDAE
    from ldae.nets.autoencoder import build_autoencoder, latent_shape
    from ldae.nets.semantic_encoder import build_semantic_encoder
    from ldae.nets.unet import LatentUNet, build_shift_decoder
    from ldae.nets.weights import weights_fingerprint

    torch.manual_seed(0)
    run = tmp_path / "imported"
    cfgs = {s: load_preset("tiny", s) for s in ("autoencoder", "diffusion", "representation")}
    ae = build_autoencoder(cfgs["autoencoder"]["model"])
    unet = LatentUNet.from_config(cfgs["diffusion"]["model"])
    encoder = build_semantic_encoder(cfgs["representation"]["model"]["semantic_encoder"], load_pretrained=False)
    shift = build_shift_decoder(dict(unet.config), encoder.emb_dim)
    ckpts = {s: run / s / "checkpoints" / "best.ckpt" for s in cfgs}
    lat = list(latent_shape(cfgs["autoencoder"]["model"], cfgs["autoencoder"]["data"]["shape"]))

    def ref(stage: str, to: str, fingerprint: str) -> UpstreamRef:
        return UpstreamRef.to(ckpts[stage], ckpts[to].parent, fingerprint)

    save_checkpoint(ckpts["autoencoder"], {AUTOENCODER_PREFIX + k: v for k, v in ae.state_dict().items()},
                    stage_metadata(cfgs["autoencoder"], "autoencoder", latent_shape=lat))
    ae_ref = ref("autoencoder", "diffusion", weights_fingerprint(ae))
    save_checkpoint(ckpts["diffusion"], {DIFFUSION_EMA_PREFIX + k: v for k, v in unet.state_dict().items()},
                    stage_metadata(cfgs["diffusion"], "diffusion", scale_factor=0.8, latent_shape=lat,
                                   ema_prefix=DIFFUSION_EMA_PREFIX, upstream={"autoencoder": ae_ref}))
    enc_prefix, shift_prefix = REPRESENTATION_PREFIXES[True]
    state = {**{enc_prefix + k: v for k, v in encoder.state_dict().items()},
             **{shift_prefix + k: v for k, v in shift.state_dict().items()}}
    rep_meta = stage_metadata(cfgs["representation"], "representation", scale_factor=0.8, latent_shape=lat,
                              emb_dim=encoder.emb_dim, unet_config=dict(unet.config),
                              upstream={"diffusion": ref("diffusion", "representation", weights_fingerprint(unet)),
                                        "autoencoder": ref("autoencoder", "representation", weights_fingerprint(ae))})
    save_checkpoint(ckpts["representation"], state, rep_meta)
    assert torch.load(ckpts["representation"], weights_only=True)[CHECKPOINT_KEY] == rep_meta.to_dict()

    model = LDAE.load(run)
    assert model.scale_factor == 0.8 and model.latent_shape == tuple(lat)
    assert model.fingerprints == {"autoencoder": weights_fingerprint(ae), "diffusion": weights_fingerprint(unet),
                                  "semantic_encoder": weights_fingerprint(encoder)}
    for a, b in zip(model.encoder.state_dict().values(), encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert open_checkpoint(ckpts["diffusion"], "diffusion").meta.upstream["autoencoder"] == ae_ref

    # the same run with a wrong recorded autoencoder fingerprint: refused, naming both files
    bad = StageMetadata.from_dict(open_checkpoint(ckpts["diffusion"], "diffusion").meta.to_dict())
    bad.upstream["autoencoder"].fingerprint = "0" * 64
    save_checkpoint(ckpts["diffusion"], torch.load(ckpts["diffusion"], weights_only=True)["state_dict"], bad)
    with pytest.raises(CheckpointError, match=rf"{ckpts['diffusion']}: was trained on other autoencoder weights "
                                              rf"than those in {ckpts['autoencoder']}"):
        LDAE.load(run)
