"""Latent UNet: shapes, encoder/decoder split, AdaGN and attention against references, shift decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldae.errors import ConfigError
from ldae.nets.unet import AttentionBlock, LatentUNet, ResBlock, ShiftDecoder, count_parameters

TINY = dict(in_channels=3, channels=[16, 32], num_res_blocks=1, attention_factors=[2], dropout=0.1,
            num_heads=4, norm_num_groups=8)
PAPER = dict(in_channels=3, channels=[256, 512, 768], num_res_blocks=2, attention_factors=[2, 4], dropout=0.1,
             num_heads=8, norm_num_groups=32)
PAPER_PARAMS = 450_868_227


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast, and avoids OpenMP contention when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def unet() -> LatentUNet:
    torch.manual_seed(0)
    return LatentUNet(**TINY).eval()


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Give zero-initialised layers random weights so that outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("shape", [(8, 10, 8), (12, 15, 12), (5, 7, 9)])
def test_shapes_including_odd_sizes(unet, shape):
    x = torch.randn(2, 3, *shape)
    out = unet(x, torch.tensor([0, 999]))
    assert out.shape == x.shape


def test_encode_decode_equals_forward_and_skips_feed_middle():
    torch.manual_seed(1)
    net = LatentUNet(**TINY).eval()
    _randomise(net)
    x, t = torch.randn(2, 3, 8, 10, 8), torch.tensor([5, 700])
    seen = {}
    handle = net.decoder.middle.register_forward_pre_hook(lambda m, args: seen.update(inp=args[0]))
    h, skips, emb = net.encode(x, t)
    handle.remove()
    assert torch.equal(seen["inp"], skips[-1])
    assert len(skips) == len(net.decoder.output_blocks) == 1 + 2 * 1 + 1
    torch.testing.assert_close(net.decode(h, skips, emb), net(x, t))
    assert net(x, t).abs().max() > 0


def test_output_layer_zero_init_and_dropout_only_in_train():
    torch.manual_seed(2)
    net = LatentUNet(**TINY)
    x, t = torch.randn(1, 3, 8, 10, 8), torch.tensor([10])
    assert torch.count_nonzero(net.eval()(x, t)) == 0  # ADM-style zero output layer
    _randomise(net)
    a, b = net.eval()(x, t), net(x, t)
    torch.testing.assert_close(a, b)  # eval: deterministic
    net.train()
    assert not torch.allclose(net(x, t), net(x, t))  # train: dropout active


def test_resblock_adagn_matches_manual_formula():
    torch.manual_seed(3)
    blk = ResBlock(8, 16, emb_dim=12, dropout=0.0, groups=4, cond_dim=5).eval()
    _randomise(blk)
    x, emb, y = torch.randn(2, 8, 3, 4, 5), torch.randn(2, 12), torch.randn(2, 5)
    h = F.conv3d(F.silu(F.group_norm(x, 4, blk.in_norm.weight, blk.in_norm.bias)), blk.in_conv.weight,
                 blk.in_conv.bias, padding=1)
    ss = F.linear(F.silu(emb), blk.emb_proj.weight, blk.emb_proj.bias)
    scale, shift = ss[:, :16, None, None, None], ss[:, 16:, None, None, None]
    cond = F.linear(y, blk.cond_proj.weight, blk.cond_proj.bias)[:, :, None, None, None]
    h = (F.group_norm(h, 4, blk.out_norm.weight, blk.out_norm.bias) * (1 + scale) + shift) * (1 + cond)
    h = F.conv3d(F.silu(h), blk.out_conv.weight, blk.out_conv.bias, padding=1)
    ref = F.conv3d(x, blk.skip.weight, blk.skip.bias) + h
    torch.testing.assert_close(blk(x, emb, y), ref, rtol=1e-5, atol=1e-5)


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(4)
    blk = AttentionBlock(16, num_heads=4, groups=4).eval()
    _randomise(blk)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(blk.qkv.weight)
        mha.in_proj_bias.copy_(blk.qkv.bias)
        mha.out_proj.weight.copy_(blk.proj.weight)
        mha.out_proj.bias.copy_(blk.proj.bias)
    x = torch.randn(2, 16, 3, 2, 4)
    seq = blk.norm(x).flatten(2).transpose(1, 2)
    ref = x + mha(seq, seq, seq, need_weights=False)[0].transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_shift_decoder_zero_at_init_and_shares_one_encoder_pass():
    torch.manual_seed(5)
    net = LatentUNet(**TINY).eval()
    _randomise(net)
    shift = net.make_shift_decoder(cond_dim=6).eval()
    assert isinstance(shift, ShiftDecoder)
    x, t, y = torch.randn(3, 3, 8, 10, 8), torch.tensor([1, 400, 999]), torch.randn(3, 6)
    calls = []
    handle = net.input_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    eps, g = net.forward_with_shift(x, t, shift, y)
    handle.remove()
    assert len(calls) == 1  # the frozen encoder ran once for both decoders
    torch.testing.assert_close(eps, net(x, t))
    assert g.shape == x.shape and torch.count_nonzero(g) == 0  # exactly zero at init
    # ... but not trivially: the final layer receives gradient, and after it moves y_sem matters
    g.sum().backward()
    assert shift.decoder.out[-1].weight.grad.abs().sum() > 0
    _randomise(shift, seed=1)
    _, skips, _ = net.encode(x, t)
    y.requires_grad_(True)
    g1 = shift(skips, t, y)
    g2 = shift(skips, t, y + 1.0)
    assert (g1 - g2).abs().max() > 1e-4
    (grad,) = torch.autograd.grad(g1.pow(2).sum(), y)
    assert grad.abs().sum() > 0


def test_small_config_parameter_count_by_hand():
    net = LatentUNet(in_channels=3, channels=[8], num_res_blocks=1, attention_factors=[], dropout=0.0,
                     num_heads=1, norm_num_groups=4)
    time_embed = (8 * 32 + 32) + (32 * 32 + 32)
    conv_in = 3 * 8 * 27 + 8
    res_8_8 = 16 + (8 * 8 * 27 + 8) + (32 * 16 + 16) + 16 + (8 * 8 * 27 + 8)
    attn = 16 + (8 * 24 + 24) + (8 * 8 + 8)
    res_16_8 = 32 + (16 * 8 * 27 + 8) + (32 * 16 + 16) + 16 + (8 * 8 * 27 + 8) + (16 * 8 + 8)
    out = 16 + (8 * 3 * 27 + 3)
    expected = time_embed + conv_in + res_8_8 + (2 * res_8_8 + attn) + 2 * res_16_8 + out
    assert count_parameters(net) == expected


def test_paper_preset_parameter_count():
    with torch.device("meta"):
        net = LatentUNet(**PAPER)
        shift = net.make_shift_decoder(768)
    assert count_parameters(net) == PAPER_PARAMS
    assert count_parameters(shift) > 0.5 * PAPER_PARAMS  # middle + up path is most of the network


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        LatentUNet(**{**TINY, "channels": [12, 32]})
    with pytest.raises(ConfigError, match="attention_factors"):
        LatentUNet(**{**TINY, "attention_factors": [8]})
    with pytest.raises(ConfigError, match="unknown key"):
        LatentUNet.from_config({**TINY, "chanels": [16]})
