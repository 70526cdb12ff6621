"""TensorBoard event files beside every stage's ``logs/metrics.csv``, read back with tensorboard's own reader."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ldae.errors import ConfigError
from ldae.runs import stage_dir
from ldae.training.common import make_loggers, tensorboard_enabled

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(folder: Path):
    files = sorted((folder / "logs").glob("events.out.tfevents.*"))
    assert files, f"no event files in {folder / 'logs'}"
    acc = event_accumulator.EventAccumulator(str(folder / "logs"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("stage,val_key,figure", [
    ("autoencoder", "val/ssim", "figures/val"),
    ("diffusion", "val/loss", None),  # the tiny run draws no samples (sample_every_n_epochs 0)
    ("representation", "val/ssim_semantic", "figures/recon"),
])
def test_every_stage_writes_events_beside_metrics_csv(tiny_run: Path, stage: str, val_key: str, figure: str | None):
    out = stage_dir(tiny_run, stage)
    metrics = pd.read_csv(out / "logs" / "metrics.csv")
    acc = _events(out)
    scalars = set(acc.Tags()["scalars"])
    # the loss curve per epoch (the tiny run has fewer batches per epoch than log_every_n_steps)
    loss = "train/loss_g_epoch" if stage == "autoencoder" else "train/loss_epoch"
    assert {loss, val_key} <= scalars, scalars
    # the same numbers as the CSV log: the last validation value, to float32 precision
    logged = metrics[val_key].dropna().iloc[-1]
    assert acc.Scalars(val_key)[-1].value == pytest.approx(logged, rel=1e-6)
    assert len(acc.Scalars(loss)) == metrics[loss].notna().sum()
    if figure is not None:
        images = acc.Tags()["images"]
        assert figure in images, images
        img = acc.Images(figure)[-1]
        assert img.width > 32 and img.height > 32 and img.encoded_image_string[:4] == b"\x89PNG"
        n_png = len(list((out / "figures").glob(f"{figure.split('/')[1]}_epoch*.png")))
        assert len(acc.Images(figure)) == n_png  # one image per saved figure


def test_tensorboard_setting(tmp_path: Path, monkeypatch):
    import importlib.util

    assert tensorboard_enabled({}) is True  # auto, and the package is installed (a dependency)
    assert tensorboard_enabled({"logging": {"tensorboard": False}}) is False
    assert [type(lg).__name__ for lg in make_loggers({"logging": {"tensorboard": False}}, tmp_path)] == \
        ["AppendingCSVLogger"]
    assert [type(lg).__name__ for lg in make_loggers({}, tmp_path)] == ["AppendingCSVLogger", "TensorBoardLogger"]
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        tensorboard_enabled({"logging": {"tensorboard": "yes"}})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert tensorboard_enabled({}) is False  # auto without the package: CSV only
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        tensorboard_enabled({"logging": {"tensorboard": True}})
