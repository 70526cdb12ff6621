"""ldae's networks are the published LDAE's networks: same state-dict layouts, same numbers.

The fixture (tests/fixtures/official_conformance, see its README) was made by running the official code:
the state-dict layouts of every release file at the paper's configuration, and the outputs of reduced
configurations on weights that :mod:`official_release` regenerates by the fixture's rule. Tolerance: the
fixture's, max |ldae − official| ≤ 1e-4 · max |official| (float32).
"""

from __future__ import annotations

import time

import pytest
import torch

import official_release as R
from ldae.errors import CheckpointError
from ldae.nets import official_weights as W

TOL = 1e-4


def assert_close_to_official(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> float:
    diff = float((ours.float() - theirs.float()).abs().max())
    bound = TOL * float(theirs.abs().max())
    assert tuple(ours.shape) == tuple(theirs.shape), name
    assert diff <= bound, f"{name}: max |diff| {diff:.3g} > {bound:.3g}"
    return diff


# ----------------------------------------------------------------------------- layouts (meta device)


@pytest.mark.parametrize("entry", ["decoder_paper", "decoder_small"])
def test_decoder_layout_maps_one_to_one(entry: str) -> None:
    state = R.meta_state_dict(entry)
    unet, shift = W.build_decoder(state, entry)
    ours = {**unet.state_dict(), **shift.state_dict()}
    assert len(ours) == len(state) == 530  # the two modules' trees have the official names, nothing else
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in state.items()}
    cfg = R.manifest()[entry]["config"]
    assert unet.config["channels"] == [cfg["base_channel"] * m for m in cfg["channel_multiplier"]]
    assert unet.config["num_res_blocks"] == cfg["num_residual_blocks_of_a_block"]
    assert unet.config["attention_factors"] == cfg["attention_resolutions"]
    assert unet.config["num_heads"] == cfg["num_heads"] and shift.cond_dim == cfg["latent_dim"]


def test_encoder_layout_maps_one_to_one() -> None:
    state = R.meta_state_dict("encoder_paper")
    encoder = W.build_encoder(state, "encoder.pth")
    ours = encoder.state_dict()
    aliases = [k for k in state if k.startswith(W.ALIAS_PREFIX)]
    assert len(aliases) == len([k for k in ours if k.startswith("backbone.")]) == 342
    assert list(ours) == [k for k in state if k not in aliases]  # same names, same order
    assert all(tuple(ours[k].shape) == tuple(state[k].shape) for k in ours)
    cfg = R.manifest()["encoder_paper"]["config"]
    assert (encoder.emb_dim, encoder.num_slices) == (cfg["emb_chans"], cfg["seq_len"])
    assert encoder.cross_attention.num_heads == 8


@pytest.mark.parametrize("entry", ["autoencoder_paper", "autoencoder_small"])
def test_autoencoder_layout_maps_one_to_one(entry: str) -> None:
    cfg = R.manifest()[entry]["config"]
    net, model_cfg = W.build_autoencoder(R.meta_state_dict(entry), entry, norm_num_groups=cfg["norm_num_groups"])
    assert model_cfg["channels"] == cfg["num_channels"]
    assert model_cfg["num_res_blocks"] == cfg["num_res_blocks"]
    assert model_cfg["latent_channels"] == cfg["latent_channels"]
    assert len(net.state_dict()) == len(R.manifest()[entry]["state_dict"])


def test_paper_presets_build_the_official_layouts() -> None:
    """A model trained by ldae at the paper preset has the release's layout (keys and shapes)."""
    from ldae.config import load_preset
    from ldae.nets.autoencoder import build_autoencoder
    from ldae.nets.semantic_encoder import build_semantic_encoder
    from ldae.nets.unet import LatentUNet

    with torch.device("meta"):
        unet = LatentUNet.from_config(load_preset("paper", "diffusion")["model"])
        enc_cfg = load_preset("paper", "representation")["model"]["semantic_encoder"]
        encoder = build_semantic_encoder(enc_cfg, load_pretrained=False)
        shift = unet.make_shift_decoder(encoder.emb_dim)
        ae = build_autoencoder(dict(load_preset("paper", "autoencoder")["model"], init_weights=None))
    ref = R.meta_state_dict("decoder_paper")
    ours = {**unet.state_dict(), **shift.state_dict()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    ref = {k: v for k, v in R.meta_state_dict("encoder_paper").items() if not k.startswith(W.ALIAS_PREFIX)}
    ours = encoder.state_dict()
    assert list(ours) == list(ref) and all(ours[k].shape == ref[k].shape for k in ref)
    converted, _ = W.build_autoencoder(R.meta_state_dict("autoencoder_paper"), "autoencoder_paper")
    assert {k: tuple(v.shape) for k, v in ae.state_dict().items()} == {
        k: tuple(v.shape) for k, v in converted.state_dict().items()}


# ----------------------------------------------------------------------------- numbers


def test_decoder_eps_and_shift_equal_official() -> None:
    unet, shift = W.build_decoder(R.state_dict("decoder_small"), "decoder.pth")
    unet.eval(), shift.eval()
    e = R.expected()["decoder_small"]
    with torch.no_grad():
        eps, g = unet.forward_with_shift(e["z"], e["t"], shift, e["y"])
    assert_close_to_official(eps, e["eps"], "eps")
    assert_close_to_official(g, e["shift"], "shift")
    assert float(g.abs().max()) > 0.1 and float(eps.abs().max()) > 0.1  # not trivially zero


def test_autoencoder_equals_official() -> None:
    net, _ = W.build_autoencoder(R.state_dict("autoencoder_small"), "autoencoderkl.pth", norm_num_groups=8)
    e = R.expected()["autoencoder_small"]
    x = R.rule_input(e["input_seed"], e["input_shape"], "rand")
    with torch.no_grad():
        mu, sigma = net.eval().encode(x)
        decoded = net.decode(mu)
    assert_close_to_official(mu, e["z_mu"], "z_mu")
    assert_close_to_official(sigma, e["z_sigma"], "z_sigma")
    assert_close_to_official(decoded, e["decoded"], "decoded")


# ----------------------------------------------------------------------------- strictness


def test_one_wrong_key_is_named() -> None:
    state = R.meta_state_dict("decoder_small")
    state["shift_out.2.weightx"] = state.pop("shift_out.2.weight")
    with pytest.raises(CheckpointError, match=r"decoder.pth: unexpected key 'shift_out.2.weightx'"):
        W.build_decoder(state, "decoder.pth")
    state = R.meta_state_dict("decoder_small")
    del state["output_blocks.3.1.qkv.bias"]
    with pytest.raises(CheckpointError, match=r"missing key 'output_blocks.3.1.qkv.bias'"):
        W.build_decoder(state, "decoder.pth")
    state = R.meta_state_dict("encoder_paper")
    state["query_projection.weight"] = torch.empty(768, 767, device="meta")
    with pytest.raises(CheckpointError, match=r"'query_projection.weight' has shape \(768, 767\)"):
        W.build_encoder(state, "encoder.pth")
    state = R.meta_state_dict("autoencoder_small")
    state["decoder.blocks.1.conv1.conv.weight"] = torch.empty(16, 16, 3, 3, 2, device="meta")
    with pytest.raises(CheckpointError, match=r"autoencoderkl.pth: .*decoder.blocks.1.conv1.conv.weight"):
        W.build_autoencoder(state, "autoencoderkl.pth", norm_num_groups=8)


# ----------------------------------------------------------------------------- the official DDIM


def _reference_official_ddim(eps_fn, z, steps: int, encode: bool) -> torch.Tensor:
    """The official "ddimN" written from its description, independently of ldae.diffusion.ddim: respaced
    betas 1 − ᾱ[m_k]/ᾱ[m_{k−1}] over the kept timesteps m, their own ᾱ' / ᾱ'_prev / ᾱ'_next tables, the
    model called at m[i] for index i, ẑ_0 clamped to [−1, 1] and ε recomputed from it."""
    import numpy as np

    acp = np.cumprod(1.0 - np.linspace(1e-4, 2e-2, 1000))
    keep = sorted({int(s) for s in np.linspace(0, 999, steps + 1)})
    betas, last = [], 1.0
    for i in keep:
        betas.append(1.0 - acp[i] / last)
        last = acp[i]
    a = np.cumprod(1.0 - np.array(betas))
    prev, nxt = np.append(1.0, a[:-1]), np.append(a[1:], 0.0)
    n = len(betas) - 1
    order = range(n) if encode else reversed(range(1, n + 1))
    for i in order:
        eps = eps_fn(z, torch.full((z.shape[0],), keep[i], dtype=torch.long))
        x0 = (np.sqrt(1.0 / a[i]) * z - np.sqrt(1.0 / a[i] - 1.0) * eps).clamp(-1, 1)
        eps = (np.sqrt(1.0 / a[i]) * z - x0) / np.sqrt(1.0 / a[i] - 1.0)
        target = nxt[i] if encode else prev[i]
        z = x0 * np.sqrt(target) + np.sqrt(1.0 - target) * eps
    return z


@pytest.mark.parametrize("steps", [10, 50, 100])
def test_official_sampler_reproduces_official_ddim(steps: int) -> None:
    from ldae.diffusion.ddim import official_ddim_invert, official_ddim_sample, official_timesteps
    from ldae.diffusion.schedule import NoiseSchedule

    ts = official_timesteps(steps)
    assert len(ts) == steps + 1 and int(ts[0]) == 0 and int(ts[-1]) == 999
    if steps == 100:
        assert ts[:3].tolist() == [0, 9, 19] and ts[-2:].tolist() == [989, 999]
    calls: list[int] = []

    def eps_fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a smooth stand-in for ε_θ
        calls.append(int(t[0]))
        return torch.tanh(0.7 * z + 1e-3 * t.double().reshape(-1, 1, 1) - 0.2)

    z = 1.5 * torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    schedule = NoiseSchedule(1000, 1e-4, 2e-2)
    ours = official_ddim_sample(eps_fn, z, schedule, steps)
    assert len(calls) == steps and calls[0] == 999 and calls[-1] == int(ts[1])
    ref = _reference_official_ddim(eps_fn, z, steps, encode=False)
    assert float((ours - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
    calls.clear()
    ours = official_ddim_invert(eps_fn, z, schedule, steps)
    assert len(calls) == steps and calls[0] == 0 and calls[-1] == int(ts[-2])
    ref = _reference_official_ddim(eps_fn, z, steps, encode=True)
    assert float((ours - ref).abs().max()) <= 1e-10 * float(ref.abs().max())


# ----------------------------------------------------------------------------- the common interface

SMALL_OFFICIAL = {"architecture": "official", "in_channels": 3, "channels": [16, 32], "num_res_blocks": 1,
                  "attention_factors": [2], "dropout": 0.0, "num_heads": 2, "norm_num_groups": 8}


def test_official_unet_trains_and_samples_through_ldae_interfaces() -> None:
    """Training (PDAE loss), the shared-encoder guided ε and the shift-decoder factories work on the
    official architecture exactly as on ldae's."""
    from ldae.diffusion.pdae import guided_eps_fn, pdae_loss
    from ldae.diffusion.schedule import NoiseSchedule
    from ldae.nets.adm_unet import ADMShiftDecoder, ADMUNet
    from ldae.nets.unet import LatentUNet, build_shift_decoder, check_config

    unet = LatentUNet.from_config(SMALL_OFFICIAL)
    assert isinstance(unet, ADMUNet) and check_config(SMALL_OFFICIAL) == unet.config
    shift = unet.make_shift_decoder(12)
    twin = build_shift_decoder(unet.config, 12)  # what loading a stage-3 checkpoint builds
    assert isinstance(twin, ADMShiftDecoder) and twin.state_dict().keys() == shift.state_dict().keys()
    schedule = NoiseSchedule(1000, 1e-4, 2e-2)
    g = torch.Generator().manual_seed(0)
    z0, y = torch.randn(2, 3, 4, 6, 4, generator=g), torch.randn(2, 12, generator=g)
    loss = pdae_loss(unet, shift, schedule, z0, y, generator=g)
    loss.backward()
    assert all(p.grad is None for p in unet.parameters())  # the frozen UNet gets nothing
    assert float(shift.shift_out[2].weight.grad.abs().sum()) > 0
    with torch.no_grad():
        for p in shift.shift_out.parameters():
            p.normal_(0, 0.1)  # G ≠ 0
    t = torch.tensor([10, 900])
    with torch.no_grad():
        eps, gs = unet.eval().forward_with_shift(z0, t, shift.eval(), y)
    scale = (1 - schedule.alphas_cumprod[t]).sqrt().float().reshape(-1, 1, 1, 1, 1)
    guided = guided_eps_fn(unet, shift, schedule, y)(z0, t)
    assert float((guided - (eps - scale * gs)).abs().max()) < 1e-6 and float(gs.abs().max()) > 1e-3
    with pytest.raises(ValueError, match="shares the UNet's time embedding"):
        shift(unet.encode(z0, t)[1], t, y)
    with pytest.raises(ValueError, match="divisible by 2"):
        unet(torch.randn(1, 3, 4, 5, 4), t[:1])


def test_official_encoder_interface() -> None:
    from ldae.nets.official_encoder import OfficialSemanticEncoder
    from ldae.nets.semantic_encoder import build_semantic_encoder

    cfg = {"architecture": "official", "backbone": "small_cnn", "widths": [8, 16], "emb_dim": 16,
           "num_heads": 4, "num_slices": 6, "slice_chunk": 4}
    enc = build_semantic_encoder(cfg).eval()
    assert isinstance(enc, OfficialSemanticEncoder) and enc.emb_dim == 16 and enc.num_slices == 6
    x = torch.rand(2, 1, 8, 10, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, att = enc(x, return_attention=True)
        assert y.shape == (2, 16) and att.pool.shape == att.cross.shape == (2, 6)
        assert torch.allclose(att.pool.sum(1), torch.ones(2)) and torch.allclose(enc(x), y, atol=1e-5)
        # LayerNorm output (weight 1, bias 0 at init), no standardisation over the batch: mean 0, var 1 per code
        assert torch.allclose(y.mean(1), torch.zeros(2), atol=1e-5)
        assert torch.allclose(y.var(1, unbiased=False), torch.ones(2), atol=1e-3)
        # the slice order matters (sinusoidal positions): reversing the axial slices changes y
        assert not torch.allclose(enc(x.flip(-1)), y, atol=1e-4)
    with pytest.raises(Exception, match="unknown key 'output_norm'"):
        build_semantic_encoder({**cfg, "output_norm": True})


# ----------------------------------------------------------------------------- ldae import-official


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The regenerated release (paper encoder, reduced decoder and autoencoder) with y_sem statistics
    0 / 1, so that the release classifier's logit on standardised y_sem is the fixture's logit."""
    folder = tmp_path_factory.mktemp("release")
    paths = R.write_release(folder)
    paths["semantic_mean"], paths["semantic_std"] = folder / "semantic_mean.pt", folder / "semantic_std.pt"
    torch.save(torch.zeros(768), paths["semantic_mean"])
    torch.save(torch.ones(768), paths["semantic_std"])
    return paths


def _import_args(paths: dict, out, **replace) -> list[str]:
    files = {**paths, **replace}
    args = ["import-official", "--autoencoder", str(files["autoencoder"]), "--encoder", str(files["encoder"]),
            "--decoder", str(files["decoder"]), "--autoencoder-norm-groups", "8", "--out", str(out)]
    for role in ("classifier", "semantic_mean", "semantic_std"):
        if files.get(role) is not None:
            args += [f"--{role.replace('_', '-')}", str(files[role])]
    return args


@pytest.fixture(scope="module")
def official_run(release: dict, tmp_path_factory: pytest.TempPathFactory):
    from ldae.cli import main

    out = tmp_path_factory.mktemp("imported") / "run"
    assert main(_import_args(release, out)) == 0
    return out


@pytest.fixture(scope="module")
def model(official_run):
    from ldae.model import LDAE

    return LDAE.load(official_run)


def test_import_writes_an_ldae_run_with_the_release_facts(official_run, release) -> None:
    import json

    from ldae.checkpoints import open_checkpoint

    for stage in ("autoencoder", "diffusion", "representation"):
        ckpt = open_checkpoint(official_run / stage / "checkpoints" / "best.ckpt", stage)
        assert ckpt.meta.extra["imported_from"].startswith("LDAE, official release")
    assert open_checkpoint(official_run / "diffusion/checkpoints/best.ckpt", "diffusion").meta.scale_factor == 0.873
    facts = json.loads((official_run / "release" / "release.json").read_text())
    assert facts["scale_factor"] == 0.873 and facts["spacing"] == 1.5 and facts["shape"] == [128, 160, 128]
    assert "sampled" in facts["training_latents"] and "ScaleIntensityd" in facts["preprocessing"]
    assert facts["architectures"]["unet"]["channels"] == [32, 64, 96]  # read from the decoder's shapes
    assert facts["architectures"]["semantic_encoder"]["backbone"] == "convnext_small"
    assert facts["files"]["decoder"]["bytes"] == release["decoder"].stat().st_size
    assert [p.name for p in official_run.parent.iterdir()] == ["run"]  # no temporary folder left


def test_imported_decoder_equals_official(model) -> None:
    from ldae.diffusion.pdae import unet_and_shift
    from ldae.nets.adm_unet import ADMShiftDecoder, ADMUNet

    assert isinstance(model.unet, ADMUNet) and isinstance(model.shift, ADMShiftDecoder)
    assert model.scale_factor == pytest.approx(0.873) and model.latent_shape == (3, 16, 20, 16)
    e = R.expected()["decoder_small"]
    with torch.no_grad():
        eps, g = unet_and_shift(model.unet, model.shift, e["z"], e["t"], e["y"])  # the shift pass of sampling
    print(f"decoder max |diff|: eps {assert_close_to_official(eps, e['eps'], 'eps'):.2e}, "
          f"shift {assert_close_to_official(g, e['shift'], 'shift'):.2e}")
    assert torch.equal(model.unet(e["z"], e["t"]), eps)


def test_imported_autoencoder_equals_official(model) -> None:
    e = R.expected()["autoencoder_small"]
    x = R.rule_input(e["input_seed"], e["input_shape"], "rand")
    with torch.no_grad():
        mu, sigma = model.autoencoder.encode(x)
    d_mu = assert_close_to_official(mu, e["z_mu"], "z_mu")
    d_sigma = assert_close_to_official(sigma, e["z_sigma"], "z_sigma")
    decoded = model.decompress(e["z_mu"] * model.scale_factor)  # ldae's volumes are clamped to [0, 1]
    d_dec = assert_close_to_official(decoded, e["decoded"].clamp(0, 1), "decoded")
    with torch.no_grad():
        assert_close_to_official(model.autoencoder.decode(e["z_mu"]), e["decoded"], "decoded (raw)")
    print(f"autoencoder max |diff|: z_mu {d_mu:.2e}, z_sigma {d_sigma:.2e}, decoded {d_dec:.2e}")
    big = torch.rand(1, 1, *model.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model.compress(big), model.autoencoder.encode(big)[0] * 0.873)


@pytest.mark.slow
def test_imported_encoder_and_classifier_equal_official(model, official_run) -> None:
    """model.semantic on the model-ready input and the release classifier's P(AD): ConvNeXt-Small over
    2 × 128 slices of 128×160 on the CPU, ~100 s on 2 busy cores (measured), hence slow."""
    from ldae.jobs.import_official import load_release_classifier, release_classifier_path, release_p_ad

    e = R.expected()
    x = R.rule_input(e["encoder_paper"]["input_seed"], e["encoder_paper"]["input_shape"], "rand")
    probes = load_release_classifier(release_classifier_path(official_run))
    start = time.perf_counter()
    with torch.no_grad():
        y = model.semantic(x)
    print(f"paper encoder on {tuple(x.shape)}: {time.perf_counter() - start:.1f} s")
    d_y = assert_close_to_official(y, e["encoder_paper"]["y_sem"], "y_sem")
    logit_cn = torch.from_numpy(-(((y.double().numpy() - probes["ad_vs_cn"]["mean"]) / probes["ad_vs_cn"]["scale"])
                                  @ probes["ad_vs_cn"]["coef"] + probes["ad_vs_cn"]["intercept"]))
    d_logit = assert_close_to_official(logit_cn.reshape(-1, 1), e["classifier"]["logit"], "classifier logit")
    print(f"encoder max |diff| y_sem {d_y:.2e}; classifier logit {d_logit:.2e}")
    p_ad = release_p_ad(probes, y.double().numpy())  # ldae predict's P(AD) from the release classifier
    assert torch.allclose(torch.from_numpy(p_ad), torch.sigmoid(-e["classifier"]["logit"].double()).reshape(-1),
                          atol=1e-5)


def test_predict_uses_the_release_classifier(official_run) -> None:
    """``ldae predict`` on an imported run: P(AD) from the release classifier, σ(−(w·(y−μ)/σ + b)) (its
    positive logit is CN), no age probe."""
    import numpy as np

    from ldae.jobs.import_official import release_classifier_path
    from ldae.jobs.predict import _check_probe_size, load_run_probes, predict_volumes

    probes, path = load_run_probes(official_run)
    assert path == release_classifier_path(official_run) and probes["ad_vs_cn"]["positive_class"] == "AD"
    model = _Stub(torch.randn(3, 768, generator=torch.Generator().manual_seed(5)))
    _check_probe_size(probes, model, path)
    p_ad, age, _ = predict_volumes(model, probes, None)
    w = R.state_dict("classifier")
    logit_cn = (model.y.double() @ w["weight"].double().T + w["bias"].double()).reshape(-1)  # μ = 0, σ = 1 here
    assert np.allclose(p_ad, torch.sigmoid(-logit_cn).numpy(), atol=1e-12) and np.isnan(age).all()


class _Stub:
    """A model whose y_sem is given (predict's step after the encoder)."""

    def __init__(self, y: torch.Tensor) -> None:
        self.y = y
        self.encoder = type("E", (), {"emb_dim": y.shape[1]})()

    def semantic(self, x: object) -> torch.Tensor:
        return self.y


def test_official_sampler_option(official_run, model) -> None:
    """``LDAE.sampler = "official"`` routes encode/decode through the official DDIM (small latents: the
    UNet takes any size whose last two axes halve twice)."""
    from ldae.diffusion.ddim import official_ddim_invert, official_ddim_sample
    from ldae.diffusion.pdae import guided_eps_fn
    from ldae.errors import LDAEError
    from ldae.model import LDAE

    official = LDAE(**{**model.__dict__, "sampler": "official"})  # what LDAE.load(run, sampler="official") sets
    g = torch.Generator().manual_seed(3)
    z_T, y = torch.randn(1, 3, 4, 8, 8, generator=g), torch.randn(1, 768, generator=g)
    ours = official.decode_latent(y, z_T, steps=2)
    assert torch.equal(ours, official_ddim_sample(guided_eps_fn(model.unet, model.shift, model.schedule, y), z_T,
                                                  model.schedule, 2))
    assert model.sampler == "ldae" and not torch.allclose(ours, model.decode_latent(y, z_T, steps=2))
    official.compress = lambda x: z_T  # encode's inversion only (no autoencoder pass at 128x160x128)
    _, z = official.encode(None, steps=2, semantic=False)
    plain = guided_eps_fn(model.unet, None, model.schedule, None)
    assert torch.equal(z, official_ddim_invert(plain, z_T, model.schedule, 2))
    with pytest.raises(LDAEError, match="deterministic"):
        official.decode_latent(y, z_T, steps=2, eta=0.5)
    with pytest.raises(Exception, match="unknown DDIM sampler 'ddim'"):
        LDAE.load(official_run, sampler="ddim")


def _bad_decoder(tmp_path, edit) -> object:
    state = R.state_dict("decoder_small")
    edit(state)
    path = tmp_path / "decoder_bad.pth"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("case", ["wrong_role", "truncated", "not_pytorch", "missing", "unexpected", "shape"])
def test_bad_release_files_are_one_line_errors(case: str, release: dict, tmp_path, capsys) -> None:
    from ldae.cli import main

    if case == "wrong_role":
        bad, where = release["encoder"], "positional_encoding.pe"
    elif case == "truncated":
        bad, where = tmp_path / "decoder.pth", "not a readable PyTorch file"
        bad.write_bytes(release["decoder"].read_bytes()[: release["decoder"].stat().st_size // 2])
    elif case == "not_pytorch":
        bad, where = tmp_path / "decoder.pth", "not a readable PyTorch file"
        bad.write_text("this is a README, not weights\n")
    elif case == "missing":
        bad, where = _bad_decoder(tmp_path, lambda s: s.pop("shift_out.2.bias")), "missing key 'shift_out.2.bias'"
    elif case == "unexpected":
        bad = _bad_decoder(tmp_path, lambda s: s.update({"shift_out.3.weight": torch.zeros(3)}))
        where = "unexpected key 'shift_out.3.weight'"
    else:
        bad = _bad_decoder(tmp_path, lambda s: s.update({"time_embed.0.weight": torch.zeros(100, 32)}))
        where = "'time_embed.0.weight' fits no architecture"
    out = tmp_path / "imported"
    assert main(_import_args(release, out, decoder=bad)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ldae import-official: error: ")
    assert str(bad) in err and where in err, err
    assert not out.exists() and not any(p.name.startswith(".imported") for p in tmp_path.iterdir())


def test_import_refuses_a_used_folder_and_half_statistics(release: dict, tmp_path, capsys) -> None:
    from ldae.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(_import_args(release, tmp_path / "run")) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert main(_import_args(release, tmp_path / "new", semantic_std=None)) == 2
    assert "go together" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_inference_commands_take_the_sampler_option() -> None:
    from ldae.cli import build_parser

    parser, _ = build_parser()
    for command in ("encode", "reconstruct", "variations", "manipulate"):
        assert parser.parse_args([command, "--model", "RUN", "s.nii.gz", "--sampler", "official"]).sampler == "official"
        assert parser.parse_args([command, "--model", "RUN", "s.nii.gz"]).sampler == "ldae"


def test_manipulate_defaults_to_the_release_direction(official_run) -> None:
    """``ldae manipulate`` on an imported run moves along the release classifier's AD direction (standardised
    y_sem, sign turned to AD), not along evaluation probes the run does not have; ``--direction`` still wins."""
    import argparse

    import numpy as np

    from ldae.commands import manipulate
    from ldae.jobs.import_official import load_release_classifier, release_classifier_path

    args = argparse.Namespace(model=str(official_run), direction=None)
    path = manipulate._direction_path(args)
    assert path == release_classifier_path(official_run)
    expected = np.asarray(load_release_classifier(path)["ad_vs_cn"]["coef"], dtype=np.float64).reshape(-1)
    w = R.state_dict("classifier")["weight"].double().reshape(-1).numpy()
    np.testing.assert_allclose(manipulate._direction(args), expected)
    np.testing.assert_allclose(expected, -w, rtol=1e-6, atol=1e-9)  # σ = 1 in this fixture: AD = −(CN logit)
    assert manipulate._direction_path(argparse.Namespace(model=str(official_run), direction="d.npy")).name == "d.npy"
