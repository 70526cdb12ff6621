"""FastConv3d: the forward-convolution weight gradient against autograd of the stock convolution (float64),
where it applies and where it must not, and the module switch (same state dict, same outputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldae.errors import ConfigError
from ldae.nets import fast_conv
from ldae.nets.fast_conv import FastConv3d, conv3d_weight_grad, use_fast_conv3d, weight_grad_mode


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CASES = [  # (in, out, kernel, stride, padding, dilation, spatial)
    (4, 5, 3, 1, 1, 1, (6, 7, 5)),
    (3, 2, 3, 1, 0, 1, (5, 6, 7)),
    (4, 5, 3, 2, 1, 1, (8, 10, 8)),
    (4, 5, 3, 2, 1, 1, (7, 9, 5)),       # odd sizes: the last input row is not used by any output
    (3, 2, 4, 2, 1, 1, (8, 8, 8)),       # the patch discriminator's layers
    (3, 2, 4, 1, 1, 1, (6, 6, 6)),
    (2, 3, 3, 1, 2, 2, (7, 6, 8)),       # dilation
    (2, 3, (3, 1, 3), (1, 1, 2), (1, 0, 1), 1, (6, 5, 8)),  # per-axis settings
]


@pytest.mark.parametrize("case", CASES)
def test_weight_grad_matches_autograd(case):
    cin, cout, k, s, p, d, spatial = case
    torch.manual_seed(0)
    ref = nn.Conv3d(cin, cout, k, s, p, d).double()
    x = torch.randn(3, cin, *spatial, dtype=torch.float64)
    y = ref(x)
    gy = torch.randn_like(y)
    gw_ref, gb_ref = torch.autograd.grad(y, (ref.weight, ref.bias), gy)
    gw = conv3d_weight_grad(x, gy, ref.kernel_size, ref.stride, ref.padding, ref.dilation)
    assert gw.shape == ref.weight.shape
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)
    # the whole layer through the autograd Function: input, weight and bias gradients
    fast = use_fast_conv3d(nn.Sequential(nn.Conv3d(cin, cout, k, s, p, d))).double()[0]
    fast.load_state_dict(ref.state_dict())
    xr = x.clone().requires_grad_()
    with weight_grad_mode("forward"):
        assert fast_conv.fast_weight_grad_applies(fast, xr, fast.weight) == all(
            2 * st <= kk for st, kk in zip(fast.stride, fast.kernel_size))
        out = fast(xr)
    torch.testing.assert_close(out, y)
    gx, gw2, gb2 = torch.autograd.grad(out, (xr, fast.weight, fast.bias), gy)
    xr2 = x.clone().requires_grad_()
    gx_ref = torch.autograd.grad(ref(xr2), xr2, gy)[0]
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw2, gw_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb2, gb_ref, rtol=1e-10, atol=1e-10)


def test_float32_training_step_matches_stock_conv():
    """A small 3D conv net: same loss, gradients within float32 rounding, whichever path runs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.SiLU(), nn.Conv3d(8, 8, 4, 2, 1), nn.SiLU(),
                        nn.Conv3d(8, 8, 1), nn.Conv3d(8, 2, 3, 2, 1))
    fast = use_fast_conv3d(__import__("copy").deepcopy(net))
    assert [type(m) for m in fast if isinstance(m, nn.Conv3d)] == [FastConv3d] * 4
    assert list(fast.state_dict()) == list(net.state_dict())
    x = torch.rand(2, 1, 12, 10, 8)
    for model, choice in ((net, "onednn"), (fast, "forward")):
        with weight_grad_mode(choice):
            model.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
        if model is net:
            ref_loss, ref_grads = loss.detach(), [p.grad.clone() for p in net.parameters()]
    assert float(loss.detach()) == float(ref_loss)
    for p, g in zip(fast.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_stock_path_where_it_does_not_apply():
    conv = use_fast_conv3d(nn.Sequential(nn.Conv3d(2, 3, 3, padding=1)))[0]
    x = torch.randn(1, 2, 4, 4, 4)
    with weight_grad_mode("forward"):
        assert fast_conv.fast_weight_grad_applies(conv, x, conv.weight)
        with torch.no_grad():
            assert not fast_conv.fast_weight_grad_applies(conv, x, conv.weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fast_conv.fast_weight_grad_applies(conv, x, conv.weight)
        assert not fast_conv.fast_weight_grad_applies(conv, x.half(), conv.weight.half())
        conv.weight.requires_grad_(False)
        assert not fast_conv.fast_weight_grad_applies(conv, x, conv.weight)
        conv.weight.requires_grad_(True)
        for other in (nn.Conv3d(2, 4, 3, padding=1, groups=2), nn.Conv3d(2, 3, 1), nn.Conv3d(2, 3, 3, 2, 1),
                      nn.Conv3d(2, 3, 3, padding="same"), nn.Conv3d(2, 3, 3, padding=1, padding_mode="reflect")):
            other = use_fast_conv3d(nn.Sequential(other))[0]
            assert not fast_conv.fast_weight_grad_applies(other, x, other.weight)
    with weight_grad_mode("onednn"):
        assert not fast_conv.fast_weight_grad_applies(conv, x, conv.weight)


def test_mode_from_cpu_and_environment(monkeypatch):
    monkeypatch.setenv(fast_conv.ENV, "forward")
    assert fast_conv.mode() == "forward"
    monkeypatch.setenv(fast_conv.ENV, "onednn")
    assert fast_conv.mode() == "onednn"
    monkeypatch.setenv(fast_conv.ENV, "bogus")
    with pytest.raises(ConfigError, match=fast_conv.ENV):
        fast_conv.mode()
    monkeypatch.setenv(fast_conv.ENV, "auto")
    lacks = fast_conv._cpu_lacks_avx512
    assert lacks("AVX2", "") and lacks("DEFAULT", "") and lacks("AVX512", "AVX2")
    assert not lacks("AVX512", "") and not lacks("AVX512", "AVX512_CORE_BF16") and not lacks("AVX512", "ALL")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert fast_conv.mode() == "forward"  # a capped oneDNN has no direct weight-gradient kernel either


def test_subclasses_are_left_alone():
    class Mine(nn.Conv3d):
        pass

    net = use_fast_conv3d(nn.Sequential(Mine(1, 1, 3), nn.Conv2d(1, 1, 3), nn.Conv3d(1, 1, 3)))
    assert [type(m) for m in net] == [Mine, nn.Conv2d, FastConv3d]
    x = torch.randn(1, 1, 5, 5, 5)
    torch.testing.assert_close(net[2](x), F.conv3d(x, net[2].weight, net[2].bias))


def _aten_ops(fn) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_single_volumes_run_through_onednn():
    """A batch of one volume: PyTorch's own rule picks ATen's slow_conv3d (N·C·D·H = 20480 is not above its
    threshold), FastConv3d oneDNN, with the same output."""
    torch.manual_seed(0)
    stock = nn.Conv3d(16, 16, 3, padding=1)
    fast = use_fast_conv3d(nn.Sequential(__import__("copy").deepcopy(stock)))[0]
    x = torch.randn(1, 16, 32, 40, 32)
    with torch.no_grad():
        assert "aten::slow_conv3d_forward" in _aten_ops(lambda: stock(x))
        ops = _aten_ops(lambda: fast(x))
        assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops
        torch.testing.assert_close(fast(x), stock(x), rtol=1e-4, atol=1e-5)
        assert fast_conv.single_volume_onednn_applies(fast, x, fast.weight)
        assert not fast_conv.single_volume_onednn_applies(fast, x.expand(2, -1, -1, -1, -1), fast.weight)
        one = use_fast_conv3d(nn.Sequential(nn.Conv3d(16, 4, 1)))[0]
        assert not fast_conv.single_volume_onednn_applies(one, x, one.weight)  # 1x1x1: PyTorch's rule stands
        mkldnn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            assert not fast_conv.single_volume_onednn_applies(fast, x, fast.weight)
        finally:
            torch.backends.mkldnn.enabled = mkldnn
    # with a gradient to compute, the stock (differentiable) path runs
    assert not fast_conv.single_volume_onednn_applies(fast, x, fast.weight)
    with weight_grad_mode("onednn"):
        assert "aten::slow_conv3d_forward" in _aten_ops(lambda: fast(x).sum().backward())
