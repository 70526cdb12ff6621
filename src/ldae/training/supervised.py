"""Training of the supervised-encoder baseline (``ldae fit --stage supervised``); the network and
inference live in :mod:`ldae.baselines.supervised`.

Two linear heads on the encoder's embedding e = Enc(x):

- AD vs CN: one logit (positive class ``loss.positive``, AD), binary cross-entropy on the rows whose
  diagnosis is ``loss.positive`` or ``loss.negative``; **MCI rows are ignored by this head**;
- age: standardised age (mean/std of the training split, stored in the checkpoint) with an MSE weighted
  by ``loss.age_weight`` on **all** rows, MCI included (0 switches the head off).

Validation logs ``val/loss`` (selects ``best.ckpt``: the val split of small cohorts may hold one class
only, where AUC is undefined), ``val/loss_cls``, ``val/loss_age``, ``val/accuracy``, ``val/age_mae``
(years) and ``val/auc`` when both classes are present.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from ldae.baselines.supervised import STAGE, build_network
from ldae.checkpoints import attach_metadata, stage_metadata
from ldae.config import get_dotted
from ldae.errors import ConfigError
from ldae.training.common import prepare_run, require_sections, train
from ldae.training.ema import adam_from_config

Tensor = torch.Tensor
MONITOR = "val/loss"
SECTIONS = ("data", "model", "loss", "optim", "trainer")


def _check_loss_config(cfg: dict) -> None:
    loss = cfg["loss"]
    labels = list(get_dotted(cfg, "data.labels", ["CN", "MCI", "AD"]))
    for key in ("positive", "negative"):
        if loss.get(key) not in labels:
            raise ConfigError(f"config key 'loss.{key}' is {loss.get(key)!r}: must be one of data.labels {labels}")
    if loss["positive"] == loss["negative"]:
        raise ConfigError("config keys 'loss.positive' and 'loss.negative' must differ")
    w = loss.get("age_weight")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ConfigError(f"config key 'loss.age_weight' must be a number >= 0, got {w!r}")
    d = get_dotted(cfg, "model.head_dropout", 0.0)
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
        raise ConfigError(f"config key 'model.head_dropout' must be in [0, 1), got {d!r}")



def supervised_loss(
    logit: Tensor, age_pred: Tensor, is_pos: Tensor, labelled: Tensor, age_std: Tensor, age_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, classification, age)`` losses of one batch.

    Args:
        logit: AD logits ``(B,)``.
        age_pred: predicted standardised ages ``(B,)``.
        is_pos: 1.0 for the positive class (AD), 0.0 otherwise.
        labelled: True for rows of the positive or negative class (MCI rows: False, no class loss).
        age_std: standardised true ages ``(B,)``.
        age_weight: weight of the age MSE.
    """
    if bool(labelled.any()):
        cls = F.binary_cross_entropy_with_logits(logit[labelled].float(), is_pos[labelled].float())
    else:
        cls = logit.sum() * 0.0  # keeps the graph (and DDP) happy on an all-MCI batch
    age = F.mse_loss(age_pred.float(), age_std.float())
    return cls + float(age_weight) * age, cls, age



class SupervisedModule(pl.LightningModule):
    """Trains :class:`SupervisedNet`; ``age_mean``/``age_std`` standardise the age target."""

    def __init__(self, cfg: dict, age_mean: float, age_std: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = build_network(cfg)
        self.age_mean, self.age_std = float(age_mean), float(age_std)
        self.positive, self.negative = str(cfg["loss"]["positive"]), str(cfg["loss"]["negative"])
        self.age_weight = float(cfg["loss"]["age_weight"])
        self._val: dict[str, list[Tensor]] = {}

    def targets(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """``(is_pos, labelled, standardised age)`` tensors of a batch on the module's device."""
        diagnosis = list(batch["diagnosis"])
        is_pos = torch.tensor([d == self.positive for d in diagnosis], device=self.device)
        labelled = torch.tensor([d in (self.positive, self.negative) for d in diagnosis], device=self.device)
        age = torch.as_tensor(batch["age"], dtype=torch.float32, device=self.device)
        return is_pos.float(), labelled, (age - self.age_mean) / self.age_std

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        _, logit, age_pred = self.net(batch["image"])
        is_pos, labelled, age = self.targets(batch)
        loss, cls, age_loss = supervised_loss(logit, age_pred, is_pos, labelled, age, self.age_weight)
        b = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=b)
        self.log_dict({"train/loss_cls": cls, "train/loss_age": age_loss}, on_step=False, on_epoch=True, batch_size=b)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return adam_from_config(self.net.parameters(), self.cfg["optim"], decoupled=True)

    def on_validation_epoch_start(self) -> None:
        self._val = {"logit": [], "age_pred": [], "is_pos": [], "labelled": [], "age": []}

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, logit, age_pred = self.net(batch["image"])
        is_pos, labelled, age = self.targets(batch)
        for key, value in zip(self._val, (logit, age_pred, is_pos, labelled, age)):
            self._val[key].append(value.detach().float().cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val["logit"]:
            return
        v = {k: torch.cat(vals) for k, vals in self._val.items()}
        labelled = v["labelled"].bool()
        loss, cls, age = supervised_loss(v["logit"], v["age_pred"], v["is_pos"], labelled, v["age"], self.age_weight)
        metrics = {"val/loss_cls": cls, "val/loss_age": age,
                   "val/age_mae": (v["age_pred"] - v["age"]).abs().mean() * self.age_std}
        if labelled.any():
            pred = (v["logit"][labelled] > 0).float()
            metrics["val/accuracy"] = (pred == v["is_pos"][labelled]).float().mean()
            pos = v["is_pos"][labelled].bool()
            if pos.any() and (~pos).any():
                from sklearn.metrics import roc_auc_score

                metrics["val/auc"] = torch.tensor(float(roc_auc_score(pos.numpy(), v["logit"][labelled].numpy())))
        self.log_dict(metrics, prog_bar=False)
        self.log(MONITOR, loss, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        attach_metadata(checkpoint, stage_metadata(
            self.cfg, STAGE, age_mean=self.age_mean, age_std=self.age_std, positive=self.positive,
            negative=self.negative, spacing=self.cfg["data"]["spacing"],
            shape=[int(s) for s in self.cfg["data"]["shape"]]))



# ---------------------------------------------------------------------- entry points


def _validate(cfg: dict) -> None:
    require_sections(cfg, SECTIONS, STAGE)
    _check_loss_config(cfg)


def age_statistics(ages: Any) -> tuple[float, float]:
    """Mean and (population) std of the training ages; std 1 when it is 0 (a single age)."""
    a = np.asarray(ages, dtype=np.float64)
    std = float(a.std())
    return float(a.mean()), (std if std > 1e-6 else 1.0)


def fit(cfg: dict, resume: bool = False) -> Path:
    """Train the supervised encoder; return ``out/checkpoints/best.ckpt`` (lowest ``val/loss``)."""
    from ldae.training.common import resolve_precision
    from ldae.training.voxel_dae import make_datamodule

    cfg = copy.deepcopy(cfg)
    _validate(cfg)
    cfg["trainer"]["precision"] = resolve_precision(cfg["trainer"])
    datamodule = make_datamodule(cfg)
    train_rows = datamodule.rows("train")
    n_labelled = int(train_rows["diagnosis"].isin([cfg["loss"]["positive"], cfg["loss"]["negative"]]).sum())
    if n_labelled == 0:
        raise ConfigError(f"{cfg['data']['csv']}: the train split has no {cfg['loss']['negative']} or "
                          f"{cfg['loss']['positive']} rows to learn from")
    age_mean, age_std = age_statistics(train_rows["age"])
    out, resume_ckpt = prepare_run(cfg, resume)
    pl.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    module = SupervisedModule(cfg, age_mean, age_std)
    return train(module, datamodule, cfg, out, resume_ckpt, MONITOR, "min")
