"""The demo's per-stage step benchmark (issue 19): variant parsing, settings applied and restored, and one
real interleaved measurement of the tiny latent DDPM step and of an evaluation-style reconstruction."""

from __future__ import annotations

import pytest
import torch

from ldae.errors import ConfigError
from ldae.jobs.bench import demo_steps
from ldae.nets import fast_conv


def test_parse_variant():
    assert demo_steps.parse_variant("after:wgrad=forward,threads=2") == ("after", {"wgrad": "forward", "threads": 2})
    assert demo_steps.parse_variant("x:mkldnn=False,single=true") == ("x", {"mkldnn": False, "single": True})
    for bad in ("after", ":wgrad=forward", "a:wgrad=fast", "a:threads=0", "a:colour=red", "a:mkldnn=maybe",
                "a:single=1"):
        with pytest.raises(ConfigError, match="variant"):
            demo_steps.parse_variant(bad)


def test_settings_applied_and_restored():
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    conv = fast_conv.use_fast_conv3d(torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3)))[0]
    x = torch.zeros(1, 1, 4, 4, 4)
    with torch.no_grad():
        assert fast_conv.single_volume_onednn_applies(conv, x, conv.weight)
        with demo_steps.applied({"wgrad": "onednn", "threads": 1, "mkldnn": False}):
            assert fast_conv.mode() == "onednn" and torch.get_num_threads() == 1
            assert torch.backends.mkldnn.enabled is False
        with demo_steps.applied({"single": False}):
            assert not fast_conv.single_volume_onednn_applies(conv, x, conv.weight)
        assert fast_conv.single_volume_onednn_applies(conv, x, conv.weight)
    assert torch.get_num_threads() == threads and torch.backends.mkldnn.enabled == mkldnn
    with demo_steps.applied({"wgrad": "forward"}):
        assert fast_conv.mode() == "forward"


def test_measure_errors():
    with pytest.raises(ConfigError, match="unknown part"):
        demo_steps.measure(parts=["decoder"])
    with pytest.raises(ConfigError, match="differ"):
        demo_steps.measure(variants=[("a", {}), ("a", {"threads": 1})], parts=["recon"])


@pytest.mark.slow
def test_measure_interleaves_variants_on_real_steps():
    res = demo_steps.measure("tiny", [("before", {"wgrad": "onednn", "single": False, "threads": 1}),
                                      ("after", {"wgrad": "forward", "threads": 1})],
                             parts=["diffusion", "recon1"], rounds=1, steps=1, ddim_steps=1)
    assert set(res["parts"]) == {"diffusion", "recon1"} and res["variants"]["after"] == {"wgrad": "forward",
                                                                                        "threads": 1}
    for part in res["parts"].values():
        assert part["before"]["speedup"] == 1.0 and part["before"]["speedup_cpu"] == 1.0
        for e in part.values():
            assert 0 < e["min_s"] <= e["s"] and e["cpu_min_s"] > 0 and e["speedup"] > 0
    assert res["environment"]["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    table = demo_steps.format_table(res).splitlines()
    assert len(table) == 1 + 4 and table[1].split()[:2] == ["diffusion", "before"]
