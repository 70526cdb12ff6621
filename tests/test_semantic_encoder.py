"""Tests of the 2.5D semantic encoder against hand-written references (per-slice loop, manual attention)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldae.errors import CheckpointError, ConfigError
from ldae.nets.semantic_encoder import (
    EncoderAttention,
    SemanticEncoder,
    build_semantic_encoder,
    calibrate_code_norm,
)

TINY = {"backbone": "small_cnn", "emb_dim": 32, "num_heads": 4, "num_slices": 8, "widths": [8, 16]}


def tiny_encoder(**kw) -> SemanticEncoder:
    torch.manual_seed(0)
    return build_semantic_encoder({**TINY, **kw})


def volume(b: int = 2, shape: tuple[int, int, int] = (24, 30, 8), seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 1, *shape, generator=torch.Generator().manual_seed(seed))


def reference_forward(m: SemanticEncoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The encoder written out by hand: one backbone call per axial slice x[..., k], explicit attention."""
    b, _, _, _, s = x.shape
    e = torch.stack([
        torch.stack([m.slice_proj(m.backbone((x[i:i + 1, :, :, :, k] - m.input_mean) / m.input_std))[0]
                     for k in range(s)])
        for i in range(b)
    ]) + m.pos_emb
    lin1, _, lin2 = m.pool_score
    scores = (torch.tanh(e @ lin1.weight.T + lin1.bias) @ lin2.weight.T)[..., 0]
    pool = torch.exp(scores - scores.amax(1, keepdim=True))
    pool = pool / pool.sum(1, keepdim=True)
    q = (pool[..., None] * e).sum(1)
    att = m.cross_attn
    wq, wk, wv = att.in_proj_weight.chunk(3)
    bq, bk, bv = att.in_proj_bias.chunk(3)
    nh, hd = att.num_heads, m.emb_dim // att.num_heads
    qh = (q @ wq.T + bq).view(b, nh, hd)
    kh = (e @ wk.T + bk).view(b, s, nh, hd)
    vh = (e @ wv.T + bv).view(b, s, nh, hd)
    a = torch.softmax(torch.einsum("bhd,bshd->bhs", qh, kh) / math.sqrt(hd), dim=-1)
    out = torch.einsum("bhs,bshd->bhd", a, vh).reshape(b, -1) @ att.out_proj.weight.T + att.out_proj.bias
    h = q + out
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + m.norm.eps)
    h = h * m.norm.weight + m.norm.bias
    return h @ m.proj.weight.T + m.proj.bias, pool, a.mean(1)


def test_shape_determinism_and_batch_independence() -> None:
    m = tiny_encoder().eval()
    x = volume()
    with torch.no_grad():
        y1, y2 = m(x), m(x)
        y_single = torch.cat([m(x[:1]), m(x[1:])])
    assert y1.shape == (2, 32)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, y_single, atol=1e-5, rtol=0)
    assert (y1[0] - y1[1]).abs().max() > 1e-3  # different volumes, different codes


def test_matches_hand_written_reference() -> None:
    m = tiny_encoder().eval()
    x = volume()
    with torch.no_grad():
        y, att = m(x, return_attention=True)
        y_ref, pool_ref, cross_ref = reference_forward(m, x)
    assert isinstance(att, EncoderAttention)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att.pool, pool_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(att.cross, cross_ref, atol=1e-6, rtol=1e-5)


def test_output_norm_standardises_each_dimension_over_the_batch_then_uses_running_statistics() -> None:
    plain, normed = tiny_encoder().train(), tiny_encoder(output_norm=True).train()
    normed.out_norm.momentum = 1.0  # running statistics = the last batch's, for an exact check below
    x = volume(6)
    y_plain, y = plain(x), normed(x)  # same seed: identical weights up to the norm
    ref = (y_plain - y_plain.mean(0)) / torch.sqrt(y_plain.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    # eval: the running statistics of that batch (its variance stored unbiased, as BatchNorm does), one
    # volume at a time
    expected = ((y_plain - y_plain.mean(0)) / torch.sqrt(y_plain.var(0, unbiased=True) + 1e-5)).detach()
    with torch.no_grad():
        normed.eval()
        torch.testing.assert_close(torch.cat([normed(x[i:i + 1]) for i in range(6)]), expected, atol=1e-4, rtol=1e-4)
        normed.train()
        y_one = normed(x[:1])  # a training batch of one has no spread: running statistics, no error
    torch.testing.assert_close(y_one, expected[:1], atol=1e-4, rtol=1e-4)
    # bfloat16 codes (mixed precision) are standardised in float32: a common offset of 8 with differences of
    # 0.03-0.3 would lose them in bfloat16 sums
    codes = (8.0 + 0.1 * torch.randn(64, 32, generator=torch.Generator().manual_seed(0))).bfloat16()
    out = normed.out_norm(codes)
    ref = codes.float()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (ref - ref.mean(0)) / torch.sqrt(ref.var(0, unbiased=False) + 1e-5), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="output_norm: expected true or false"):
        tiny_encoder(output_norm="yes")


def test_calibrate_code_norm_sets_the_exact_statistics_of_the_pre_norm_codes() -> None:
    """Brute force: the running mean/variance after calibration are those of all pre-norm codes at once
    (batches of unequal size merged), and the calibrated encoder's eval codes are standardised."""
    plain, normed = tiny_encoder().eval(), tiny_encoder(output_norm=True).eval()  # same weights up to the norm
    batches = [volume(3, seed=1), volume(5, seed=2), volume(1, seed=3)]
    with torch.no_grad():
        pre = torch.cat([plain(x) for x in batches]).double()
        assert calibrate_code_norm(normed, iter(batches)) == 9
        y = torch.cat([normed(x) for x in batches]).double()
    assert not normed.training
    torch.testing.assert_close(normed.out_norm.running_mean.double(), pre.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(normed.out_norm.running_var.double(), pre.var(0, unbiased=True), atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(y.mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-5, rtol=0)
    var = pre.var(0, unbiased=True)
    torch.testing.assert_close(y.std(0, unbiased=True), torch.sqrt(var / (var + normed.out_norm.eps)), atol=1e-5, rtol=1e-4)

    def never():  # an encoder without CodeNorm runs nothing
        raise AssertionError("iterated")
        yield

    assert calibrate_code_norm(plain, never()) == 0


def test_ema_encoder_codes_are_off_until_calibrated() -> None:
    """The failure the calibration removes: an EMA copy takes the trained encoder's norm buffers, which
    describe the trained weights' codes, not its own; after calibration its codes are standardised."""
    from ldae.training.ema import EMA

    enc = tiny_encoder(output_norm=True).train()
    ema = EMA(enc, decay=0.99)  # the tiny preset's decay; BatchNorm's running statistics follow with momentum 0.1
    for step in range(20):  # training drifts the weights (here: the projection's bias) faster than the EMA follows
        with torch.no_grad():
            enc.proj.bias += 0.5
            enc(volume(4, seed=10 + step))  # train mode: the running statistics follow the trained weights
        ema.update(enc)
    xs = [volume(8, seed=100), volume(8, seed=101)]
    with torch.no_grad():
        before = torch.cat([ema.module(x) for x in xs])
        calibrate_code_norm(ema.module, xs)
        after = torch.cat([ema.module(x) for x in xs])
    assert before.mean(0).abs().mean() > 1.0  # copied statistics: codes far off zero mean
    assert after.mean(0).abs().max() < 1e-4


def test_attention_weights_are_distributions() -> None:
    m = tiny_encoder().eval()
    with torch.no_grad():
        _, att = m(volume(3), return_attention=True)
    for w in (att.pool, att.cross):
        assert w.shape == (3, 8)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(3), atol=1e-6, rtol=0)


def test_slice_order_matters_only_through_position() -> None:
    m = tiny_encoder().eval()
    x = volume()
    perm = torch.tensor([3, 0, 7, 5, 1, 6, 2, 4])
    xp = x[..., perm]
    with torch.no_grad():
        m.pos_emb.normal_(0.0, 0.5)  # a "trained" table (at init, std 0.02, the effect is tiny but non-zero)
        y, att = m(x, return_attention=True)
        yp, attp = m(xp, return_attention=True)
        assert (y - yp).abs().max() > 1e-3  # learned positions: order changes y_sem
        # Moving the positional rows with the slices gives back exactly the same code.
        pos = m.pos_emb.detach().clone()
        m.pos_emb.copy_(pos[perm])
        torch.testing.assert_close(m(xp), y, atol=1e-5, rtol=1e-5)
        # Without positions the encoder is a set function of the slices.
        m.pos_emb.zero_()
        y0, att0 = m(x, return_attention=True)
        yp0, attp0 = m(xp, return_attention=True)
    torch.testing.assert_close(yp0, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attp0.pool, att0.pool[:, perm], atol=1e-6, rtol=1e-5)


def test_chunked_equals_unchunked_including_checkpointed_gradients() -> None:
    x = volume()
    m = tiny_encoder()
    w = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    outs, grads = [], []
    for chunk, ckpt in ((0, False), (3, True)):  # same weights, only the chunking changes
        m.slice_chunk, m.checkpoint_slices = chunk, ckpt
        with torch.no_grad():
            outs.append(m.eval()(x))
        m.train().zero_grad()
        (m(x) * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_chunked_equals_unchunked_convnext() -> None:
    torch.manual_seed(0)
    m = build_semantic_encoder({"backbone": "convnext_tiny", "emb_dim": 64, "num_heads": 8, "num_slices": 4})
    x = volume(2, (32, 40, 4))
    with torch.no_grad():
        full = m.eval()(x)
        m.slice_chunk = 3
        torch.testing.assert_close(m(x), full, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    m = tiny_encoder(dropout=0.1).train()
    y = m(volume())
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    """A randomly perturbed RGB torchvision ConvNeXt-Tiny saved as a local "ImageNet" state dict (+ headless)."""
    from torchvision.models import convnext_tiny

    torch.manual_seed(123)
    rgb = convnext_tiny(weights=None).eval()
    with torch.no_grad():
        for p in rgb.parameters():  # make every tensor distinctive (biases/norms are not all 0/1)
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("weights")
    state = rgb.state_dict()
    torch.save(state, folder / "convnext_tiny_imagenet.pt")
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier.2.")}, folder / "headless.pt")
    return rgb, folder / "convnext_tiny_imagenet.pt", folder / "headless.pt"


CONVNEXT = {"backbone": "convnext_tiny", "emb_dim": 768, "num_heads": 8, "num_slices": 2}


def test_pretrained_stem_is_sum_of_rgb_filters(fake_imagenet: tuple[torch.nn.Module, Path, Path]) -> None:
    rgb, path, headless = fake_imagenet
    state = rgb.state_dict()
    m = build_semantic_encoder({**CONVNEXT, "pretrained_weights": str(path)}).eval()
    stem = m.backbone.features[0][0]
    assert stem.in_channels == 1
    w = state["features.0.0.weight"]
    torch.testing.assert_close(stem.weight, w[:, 0:1] + w[:, 1:2] + w[:, 2:3], atol=1e-6, rtol=0)
    assert torch.equal(stem.bias, state["features.0.0.bias"])
    assert torch.equal(m.backbone.features[5][3].block[0].weight, state["features.5.3.block.0.weight"])
    assert torch.equal(m.backbone.norm.weight, state["classifier.0.weight"])
    # Functional check: the 1-channel backbone sees a grey slice as the RGB model sees it on 3 channels.
    s = torch.randn(3, 1, 32, 40, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = rgb.classifier[:2](rgb.avgpool(rgb.features(s.expand(-1, 3, -1, -1))))
        torch.testing.assert_close(m.backbone(s), ref, atol=1e-4, rtol=1e-4)
    # A headless state dict (classifier Linear removed) gives the same backbone.
    m2 = build_semantic_encoder({**CONVNEXT, "pretrained_weights": str(headless)})
    assert all(torch.equal(a, b) for a, b in zip(m.backbone.state_dict().values(), m2.backbone.state_dict().values()))


def test_bad_pretrained_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pretrained_weights: file .*missing.pt does not exist"):
        build_semantic_encoder({**CONVNEXT, "pretrained_weights": str(tmp_path / "missing.pt")})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: cannot read pretrained weights"):
        build_semantic_encoder({**CONVNEXT, "pretrained_weights": str(junk)})
    bad = tmp_path / "small.pt"
    torch.save({"features.0.0.weight": torch.zeros(96, 3, 4, 4)}, bad)
    with pytest.raises(CheckpointError, match=r"small.pt: not a torchvision convnext_tiny state_dict: \d+ missing"):
        build_semantic_encoder({**CONVNEXT, "pretrained_weights": str(bad)})


def test_random_init_logs_one_notice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ldae.nets.semantic_encoder"), torch.device("meta"):
        m = build_semantic_encoder(CONVNEXT)
    notices = [r for r in caplog.records if "random initialisation" in r.getMessage()]
    assert len(notices) == 1
    assert m.backbone.features[0][0].in_channels == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ldae.nets.semantic_encoder"), torch.device("meta"):
        build_semantic_encoder({**CONVNEXT, "pretrained_weights": "/nonexistent.pt"}, load_pretrained=False)
    assert not caplog.records  # weights are about to be loaded from a trained checkpoint: no notice


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"backbone": "resnet50"}, "backbone: unknown backbone 'resnet50'"),
        ({"num_heads": 5}, "num_heads: 5 does not divide emb_dim 32"),
        ({"widths": []}, "widths: expected a non-empty list"),
        ({"slice_chunk": -1}, "slice_chunk: expected an integer >= 0"),
        ({"dropout": 1.5}, r"dropout: expected a number in \[0.0, 1.0\)"),
        ({"emb_dimm": 3}, "unknown key 'emb_dimm'"),
        ({"pretrained_weights": "x.pt"}, "pretrained_weights: only ConvNeXt backbones"),
    ],
)
def test_config_errors_name_the_key(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_semantic_encoder({**TINY, **override})


def test_missing_key_and_slice_count_mismatch() -> None:
    with pytest.raises(ConfigError, match="missing required key 'num_slices'"):
        build_semantic_encoder({k: v for k, v in TINY.items() if k != "num_slices"})
    with pytest.raises(ConfigError, match="volumes have 6 axial slices .* set model.semantic_encoder.num_slices to 6"):
        tiny_encoder()(volume(1, (24, 30, 6)))


PAPER = {"backbone": "convnext_small", "emb_dim": 768, "num_heads": 8, "num_slices": 128, "slice_chunk": 16,
         "pool_hidden": 128}


def test_paper_config_parameter_count() -> None:
    """ConvNeXt-Small without its 1000-way head, 1-channel stem, plus the attention head (closed form).

    Built on the meta device (no memory, no init time); the CPU build is the slow test below.
    """
    from torchvision.models import convnext_small

    e, s, hidden = 768, 128, 128
    with torch.device("meta"):
        m = build_semantic_encoder(PAPER)
        tv = sum(p.numel() for p in convnext_small(weights=None).parameters())
    backbone = tv - (e * 1000 + 1000) - 96 * 3 * 4 * 4 + 96 * 1 * 4 * 4
    head = s * e + (e * hidden + hidden + hidden) + (4 * e * e + 4 * e) + 2 * e + (e * e + e)
    assert sum(p.numel() for p in m.backbone.parameters()) == backbone
    assert sum(p.numel() for p in m.parameters()) == backbone + head == 52_602_976
    assert m.cross_attn.num_heads == 8 and isinstance(m.slice_proj, torch.nn.Identity)


def test_y_sem_can_be_fitted() -> None:
    """A few Adam steps move y_sem towards per-volume targets (the encoder is trainable end to end)."""
    m = tiny_encoder().train()
    x = volume(4)
    target = torch.randn(4, 32, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_paper_config_on_a_full_volume() -> None:
    """The paper encoder on one 128x160x128 volume, 16 slices per backbone call (~6 s fp32 on 2 cores)."""
    m = build_semantic_encoder(PAPER).eval()
    with torch.no_grad():
        y, att = m(torch.rand(1, 1, 128, 160, 128), return_attention=True)
    assert y.shape == (1, 768) and torch.isfinite(y).all()
    torch.testing.assert_close(att.pool.sum(-1), torch.ones(1), atol=1e-5, rtol=0)
