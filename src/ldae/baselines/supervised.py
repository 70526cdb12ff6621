"""Baseline: the LDAE 2.5D semantic encoder trained *with* labels (paper table 5's supervised reference) —
network and inference (training: :mod:`ldae.training.supervised`).

Same architecture as LDAE's encoder (:func:`ldae.nets.semantic_encoder.build_semantic_encoder`, same
config section), with two linear heads on its output embedding e = Enc(x): AD vs CN (one logit, positive
class ``loss.positive``) and standardised age (mean/std of the training split, stored in the checkpoint).

The embedding e — not the head outputs — is what :meth:`SupervisedEncoder.semantic` returns, so the
evaluation suite runs the very same linear probes on it as on LDAE's y_sem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldae.checkpoints import load_frozen, open_checkpoint
from ldae.config import get_dotted
from ldae.data.transforms import ModelReadyInput
from ldae.errors import ConfigError
from ldae.nets.semantic_encoder import SemanticEncoder, build_semantic_encoder

Tensor = torch.Tensor
STAGE = "supervised"
WEIGHTS_PREFIX = "net."


class SupervisedNet(nn.Module):
    """Semantic encoder + AD-vs-CN logit head + standardised-age head."""

    def __init__(self, encoder: SemanticEncoder, head_dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(float(head_dropout))
        self.cls_head = nn.Linear(encoder.emb_dim, 1)
        self.age_head = nn.Linear(encoder.emb_dim, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(embedding (B, E), AD logit (B,), standardised age (B,))`` of volumes in [0, 1]."""
        e = self.encoder(x)
        h = self.dropout(e)
        return e, self.cls_head(h).squeeze(-1), self.age_head(h).squeeze(-1)



def build_network(cfg: dict, load_pretrained: bool = True) -> SupervisedNet:
    """The (untrained) encoder + heads of a supervised config."""
    if not isinstance(get_dotted(cfg, "model.semantic_encoder"), dict):
        raise ConfigError(f"config section 'model.semantic_encoder' is missing (stage '{STAGE}')")
    shape = get_dotted(cfg, "data.shape")
    n_slices = get_dotted(cfg, "model.semantic_encoder.num_slices")
    if isinstance(shape, list) and len(shape) == 3 and n_slices != shape[-1]:
        raise ConfigError(f"config key 'model.semantic_encoder.num_slices' is {n_slices} but data.shape "
                          f"{shape} has {shape[-1]} axial slices")
    encoder = build_semantic_encoder(cfg["model"]["semantic_encoder"], load_pretrained=load_pretrained)
    return SupervisedNet(encoder, float(get_dotted(cfg, "model.head_dropout", 0.0)))



# ---------------------------------------------------------------------- inference


@dataclass
class SupervisedEncoder(ModelReadyInput):
    """A trained supervised encoder: ``semantic(x)`` gives the embedding the probes are run on."""

    net: SupervisedNet
    age_mean: float
    age_std: float
    positive: str
    negative: str
    spacing: Any
    shape: tuple[int, ...]
    cfg: dict
    checkpoint: Path | None = field(default=None)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def semantic(self, x: Tensor) -> Tensor:
        """Encoder embedding ``(B, emb_dim)`` of volumes in [0, 1] (the heads are not applied)."""
        return self.net.encoder(self._check(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(P(positive class), age in years)`` from the trained heads."""
        _, logit, age = self.net(self._check(x))
        return torch.sigmoid(logit), age * self.age_std + self.age_mean


def load_supervised(ckpt_path: str | Path, device: str | torch.device = "cpu") -> SupervisedEncoder:
    """The encoder + heads of a supervised checkpoint (strict load, frozen, eval mode). CheckpointError for
    another stage's checkpoint or mismatching weights."""
    ckpt = open_checkpoint(ckpt_path, STAGE)
    meta, cfg = ckpt.meta, ckpt.config
    meta.require("age_mean", "age_std", "positive", "negative", source=ckpt_path)
    net = load_frozen(build_network(cfg, load_pretrained=False), ckpt, WEIGHTS_PREFIX, device)
    return SupervisedEncoder(net=net, age_mean=float(meta.age_mean), age_std=float(meta.age_std),
                             positive=str(meta.positive), negative=str(meta.negative),
                             spacing=cfg["data"]["spacing"], shape=tuple(int(s) for s in cfg["data"]["shape"]),
                             cfg=cfg, checkpoint=Path(ckpt_path))
