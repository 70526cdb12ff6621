"""2.5D semantic encoder: a shared 2D backbone over axial slices -> soft attention -> cross attention -> y_sem.

Slice axis. Volumes are model-ready tensors ``(B, 1, D, H, W)`` in RAS orientation, so the three spatial
axes run left->right, posterior->anterior and inferior->superior. Axial slices are therefore the planes of
constant last index: slice ``k`` is ``x[..., k]``, an image of shape ``(D, H)`` (128x160 in the paper
preset, 128 slices).

Pipeline, for each volume:

1. every axial slice goes through ONE shared 2D backbone (ConvNeXt-Small in the paper, a small CNN in
   the tiny preset) giving one feature vector per slice, projected to ``emb_dim`` when the widths differ;
   the slices run in chunks of ``slice_chunk`` (optionally with activation checkpointing while training)
   so that 128 slices fit in memory; chunking does not change the result (the backbones have no
   batch-dependent layers such as BatchNorm);
2. a learned positional embedding per slice index is added, so the order of slices matters;
3. soft attention pooling: a small MLP scores each slice, a softmax over slices turns the scores into
   weights, the weighted sum of slice embeddings is a global query;
4. multi-head cross attention (query = pooled vector, keys/values = slice embeddings), residual +
   LayerNorm, then a linear projection gives ``y_sem`` in R^emb_dim;
5. optionally (``output_norm``) each dimension of y_sem is standardised over the cohort (batch statistics
   while training, running statistics after; no affine). Why: all brains share most of their content, so
   without it y_sem is a large common vector plus subject differences of a few percent of its norm, and
   the gradient estimator's AdaGN scale ``1 + W·y`` learns to use those differences only slowly; on the
   bundled cohort the standardised code tripled how much decoding depends on whose y_sem it gets.

1-channel input. ConvNeXt's stem is a 3-channel conv. With ImageNet weights available locally
(``pretrained_weights``: a torchvision ``state_dict`` file), the stem is replaced by a 1-channel conv whose
filter is the sum of the RGB filters, which gives exactly the response of the RGB model to a grey image
repeated on three channels. Without weights the backbone is randomly initialised (one logged notice).
Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldae.distributed import data_parallel, global_sum
from ldae.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

BACKBONES = ("convnext_small", "convnext_tiny", "small_cnn")
REQUIRED_KEYS = ("backbone", "emb_dim", "num_heads", "num_slices")
# Optional keys and the value used when a config leaves them out (presets should set them explicitly).
OPTIONAL_DEFAULTS: dict[str, Any] = {
    "slice_chunk": 0,  # slices per backbone call; 0 = all slices of the batch at once
    "checkpoint_slices": False,  # activation checkpointing of each chunk while training
    "pretrained_weights": None,  # local torchvision ConvNeXt state_dict (ImageNet), or null
    "widths": [16, 32, 64],  # small_cnn stage widths (each stage halves the slice size)
    "dropout": 0.0,  # dropout in cross attention and before the projection
    # standardise each y_sem dimension over the cohort (CodeNorm). With dropout > 0 the training statistics
    # include the dropout noise and eval-mode codes shrink towards the mean (seen: y_sem collapsed)
    "output_norm": False,
    "drop_path": 0.0,  # ConvNeXt stochastic depth
    "pool_hidden": 128,  # hidden width of the soft-attention scoring MLP
    "input_mean": 0.449,  # slices are standardised as (x - mean) / std before the backbone;
    "input_std": 0.226,  # defaults = mean of ImageNet's channel statistics (matches pretrained stems)
}


class EncoderAttention(NamedTuple):
    """Attention maps of one forward pass, each ``(B, S)`` over slices and summing to 1 per volume."""

    pool: torch.Tensor  # soft-attention pooling weights
    cross: torch.Tensor  # cross-attention weights of the pooled query, averaged over heads


class CodeNorm(nn.BatchNorm1d):
    """Per-dimension standardisation of y_sem (float32 out), no affine: batch statistics while training,
    running ones in eval mode (and for a training batch of one, which has no spread).

    Under data parallelism the batch statistics are those of the *global* batch (summed over processes
    with an autograd-aware all-reduce), so that N processes with B/N samples each train exactly like one
    with B; the mean is reduced first, then the centred squares (no E[x²] − E[x]² cancellation).
    """

    def __init__(self, dim: int) -> None:
        super().__init__(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 whatever the autocast dtype: the subject differences it standardises can be a few % of the
        # codes, below bfloat16's resolution once summed
        x = x.float()
        if self.training:
            n, sums = float(x.shape[0]), x.sum(dim=0)  # n from the shape: also works on the meta device
            if data_parallel():  # the global batch: counts and sums over all processes
                total = global_sum(torch.cat([torch.full((1,), n, dtype=x.dtype, device=x.device), sums]))
                n, sums = float(total[0].detach()), total[1:]
            if n >= 2:
                return self._batch_standardise(x, n, sums / n)
        return F.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)

    def _batch_standardise(self, x: torch.Tensor, n: float, mean: torch.Tensor) -> torch.Tensor:
        """``x`` standardised with the (global) batch mean and variance; the running statistics follow."""
        var = global_sum(((x - mean) ** 2).sum(dim=0)) / n
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
            self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var.dtype), m)
            self.num_batches_tracked += 1
        return (x - mean) / torch.sqrt(var + self.eps)


@torch.no_grad()
def calibrate_code_norm(encoder: nn.Module, volumes: Iterable[torch.Tensor]) -> int:
    """Set the running statistics of every :class:`CodeNorm` in ``encoder`` to the exact mean and unbiased
    variance of its inputs over ``volumes`` (batches of model-ready volumes, run in eval mode); return the
    number of volumes seen (0 when the encoder has no CodeNorm: nothing is run).

    Why: the EMA copy of a trained encoder averages the weights but takes its norm buffers from the trained
    encoder, whose running statistics describe *another* network's outputs. Measured on the demo's stage 3
    (16 epochs): the EMA encoder's pre-norm codes of the training scans sat on average 3.2 (at most 11)
    running standard deviations away from the stored running mean, so every y_sem at inference lay far
    outside what G_ψ was trained on and G_ψ *raised* the denoising error even on training scans. Batches
    are merged with Chan's update in float64: mean ``m = m_a + (m_b − m_a)·n_b/n``, sum of squared
    deviations ``M2 = M2_a + M2_b + (m_b − m_a)²·n_a·n_b/n``, variance ``M2/(n − 1)``.
    """
    norms = [m for m in encoder.modules() if isinstance(m, CodeNorm)]
    if not norms:
        return 0
    stats: dict[int, tuple[float, torch.Tensor, torch.Tensor]] = {}

    def collect(module: nn.Module, args: tuple) -> None:
        x = args[0].detach().double()
        n_b, m_b = float(x.shape[0]), x.mean(dim=0)
        m2_b = ((x - m_b) ** 2).sum(dim=0)
        if id(module) not in stats:
            stats[id(module)] = (n_b, m_b, m2_b)
            return
        n_a, m_a, m2_a = stats[id(module)]
        n = n_a + n_b
        delta = m_b - m_a
        stats[id(module)] = (n, m_a + delta * (n_b / n), m2_a + m2_b + delta**2 * (n_a * n_b / n))

    was_training = encoder.training
    encoder.eval()
    hooks = [m.register_forward_pre_hook(collect) for m in norms]
    seen = 0
    try:
        for x in volumes:
            encoder(x)
            seen += int(x.shape[0])
    finally:
        for h in hooks:
            h.remove()
        encoder.train(was_training)
    for m in norms:
        if id(m) not in stats:
            continue
        n, mean, m2 = stats[id(m)]
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        if n >= 2:
            m.running_var.copy_((m2 / (n - 1)).to(m.running_var.dtype))
    return seen


class SmallCNN(nn.Module):
    """Fast 2D CNN for CPU presets: per stage a stride-2 conv then a 3x3 conv, GroupNorm + SiLU, global mean."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for w in widths:
            layers += [
                nn.Conv2d(c_in, w, 3, stride=2, padding=1),
                nn.GroupNorm(_groups(w), w),
                nn.SiLU(),
                nn.Conv2d(w, w, 3, padding=1),
                nn.GroupNorm(_groups(w), w),
                nn.SiLU(),
            ]
            c_in = w
        self.body = nn.Sequential(*layers)
        self.out_dim = int(widths[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, h, w)`` slices -> ``(N, widths[-1])`` features."""
        return self.body(x).mean(dim=(-2, -1))


def _groups(channels: int) -> int:
    """Largest group count <= 8 dividing ``channels`` (GroupNorm keeps slices independent of each other)."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvNeXtFeatures(nn.Module):
    """torchvision ConvNeXt without its classification layer: stages, global mean, LayerNorm -> features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features = model.features
        self.avgpool = model.avgpool
        self.norm = model.classifier[0]
        self.out_dim = int(self.norm.normalized_shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, h, w)`` slices -> ``(N, 768)`` features."""
        return torch.flatten(self.norm(self.avgpool(self.features(x))), 1)


def _load_state_dict_file(path: Path, key: str) -> dict[str, torch.Tensor]:
    """Read a local torchvision state_dict (tensors only); ConfigError/CheckpointError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{key}: file {path} does not exist (a local torchvision ConvNeXt state_dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear message
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read pretrained weights ({first})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: pretrained weights must be a state_dict of tensors")
    return dict(state)


def _load_pretrained(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    """Load an RGB torchvision state_dict into ``model`` (the classifier's last Linear may be absent)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("classifier.2.")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise CheckpointError(f"{path}: not a torchvision {name} state_dict: " + ", ".join(parts))
    own.update({k: v for k, v in state.items() if k in own})
    model.load_state_dict(own)


def _one_channel_stem(conv: nn.Conv2d, pretrained: bool) -> nn.Conv2d:
    """1-channel copy of an RGB conv: filter = sum of the RGB filters when pretrained, else fresh init."""
    new = nn.Conv2d(
        1, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        if pretrained:
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        else:  # same init as torchvision's ConvNeXt convs
            nn.init.trunc_normal_(new.weight, std=0.02)
        if new.bias is not None:
            new.bias.copy_(conv.bias if pretrained else torch.zeros_like(new.bias))
    return new


def make_backbone(
    name: str,
    widths: Sequence[int] = (16, 32, 64),
    pretrained_weights: str | Path | None = None,
    drop_path: float = 0.0,
    key: str = "model.semantic_encoder",
) -> nn.Module:
    """A 1-channel 2D backbone ``(N, 1, h, w) -> (N, out_dim)``; ``out_dim`` is an attribute.

    Args:
        name: one of ``BACKBONES``.
        widths: stage widths of ``small_cnn``.
        pretrained_weights: local torchvision state_dict of the same ConvNeXt (ConvNeXt only).
        drop_path: ConvNeXt stochastic depth probability.
        key: config location used in error messages.
    """
    if name == "small_cnn":
        if pretrained_weights:
            raise ConfigError(f"{key}.pretrained_weights: only ConvNeXt backbones load pretrained weights, "
                              f"not {name!r}")
        return SmallCNN(widths)
    if name not in ("convnext_small", "convnext_tiny"):
        raise ConfigError(f"{key}.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    from torchvision.models import convnext_small, convnext_tiny

    state = None
    if pretrained_weights:  # read (and validate) the file before the slow model construction
        state = _load_state_dict_file(Path(pretrained_weights), f"{key}.pretrained_weights")
    factory = convnext_small if name == "convnext_small" else convnext_tiny
    model = factory(weights=None, stochastic_depth_prob=float(drop_path))  # weights=None: never downloads
    if state is not None:
        _load_pretrained(model, state, Path(pretrained_weights), name)
    model.features[0][0] = _one_channel_stem(model.features[0][0], pretrained=bool(pretrained_weights))
    return ConvNeXtFeatures(model)


def axial_slice_features(encoder: nn.Module, x: torch.Tensor,
                         prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The 2.5D step both semantic encoders share: every axial slice ``x[..., k]`` of ``(B, 1, X, Y, S)``
    volumes through ``encoder.backbone`` as a 2D image, ``encoder.slice_chunk`` slices at a time (all at
    once when 0), with activation checkpointing per chunk when ``encoder.checkpoint_slices`` and training
    with gradients; returns ``(B, S, features)``. ConfigError when S is not ``encoder.num_slices``."""
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"the semantic encoder expects (B, 1, X, Y, Z) volumes, got shape {tuple(x.shape)}")
    b, _, d, h, s = x.shape
    if s != encoder.num_slices:
        raise ConfigError(
            f"semantic encoder: volumes have {s} axial slices (last axis of shape {tuple(x.shape[2:])}) "
            f"but num_slices is {encoder.num_slices}; set model.semantic_encoder.num_slices to {s}"
        )
    slices = x.permute(0, 4, 1, 2, 3).reshape(b * s, 1, d, h)
    if prepare is not None:
        slices = prepare(slices)
    chunk = encoder.slice_chunk if encoder.slice_chunk > 0 else slices.shape[0]
    use_ckpt = encoder.checkpoint_slices and encoder.training and torch.is_grad_enabled()
    outs = [checkpoint(encoder.backbone, part, use_reentrant=False) if use_ckpt else encoder.backbone(part)
            for part in torch.split(slices, chunk)]
    return torch.cat(outs).reshape(b, s, -1)


class SemanticEncoder(nn.Module):
    """Volume ``(B, 1, D, H, W)`` in [0, 1] -> semantic code ``y_sem`` of shape ``(B, emb_dim)``.

    Axial slices are ``x[..., k]`` (RAS: the last axis runs inferior->superior); the number of slices
    ``W`` must equal ``num_slices``, the size of the positional table.
    """

    def __init__(
        self,
        backbone: nn.Module,
        emb_dim: int,
        num_heads: int,
        num_slices: int,
        slice_chunk: int = 0,
        checkpoint_slices: bool = False,
        dropout: float = 0.0,
        pool_hidden: int = 128,
        input_mean: float = 0.449,
        input_std: float = 0.226,
        output_norm: bool = False,
    ) -> None:
        super().__init__()
        feat_dim = int(backbone.out_dim)
        self.backbone = backbone
        self.emb_dim = int(emb_dim)
        self.num_slices = int(num_slices)
        self.slice_chunk = int(slice_chunk)
        self.checkpoint_slices = bool(checkpoint_slices)
        self.input_mean = float(input_mean)
        self.input_std = float(input_std)
        self.slice_proj = nn.Identity() if feat_dim == emb_dim else nn.Linear(feat_dim, emb_dim)
        self.pos_emb = nn.Parameter(torch.zeros(num_slices, emb_dim))
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        # The score's last layer has no bias: a constant shift is cancelled by the softmax (it would get no
        # gradient).
        self.pool_score = nn.Sequential(
            nn.Linear(emb_dim, pool_hidden), nn.Tanh(), nn.Linear(pool_hidden, 1, bias=False)
        )
        self.cross_attn = nn.MultiheadAttention(emb_dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(emb_dim)
        self.proj = nn.Linear(emb_dim, emb_dim)
        self.out_norm = CodeNorm(emb_dim) if output_norm else nn.Identity()

    def slice_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of every axial slice, ``(B, S, feat_dim)``, computed ``slice_chunk`` at a time
        on slices standardised by ``(input_mean, input_std)``."""
        return axial_slice_features(self, x, lambda s: (s - self.input_mean) / self.input_std)

    def slice_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Slice embeddings with positional information, ``(B, S, emb_dim)``."""
        return self.slice_proj(self.slice_features(x)) + self.pos_emb

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, EncoderAttention]:
        """``y_sem`` ``(B, emb_dim)``; with ``return_attention`` also the pooling/cross attention weights."""
        e = self.slice_embeddings(x)
        pool_w = F.softmax(self.pool_score(e).squeeze(-1), dim=-1)  # (B, S)
        query = torch.einsum("bs,bse->be", pool_w, e).unsqueeze(1)  # (B, 1, E)
        attended, cross_w = self.cross_attn(
            query, e, e, need_weights=return_attention, average_attn_weights=True
        )
        y = self.out_norm(self.proj(self.dropout(self.norm(query + self.dropout(attended)))).squeeze(1))
        if return_attention:
            return y, EncoderAttention(pool=pool_w, cross=cross_w.squeeze(1))
        return y


def _check_int(cfg: Mapping[str, Any], name: str, key: str, minimum: int) -> int:
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}.{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _check_bool(cfg: Mapping[str, Any], name: str, key: str) -> bool:
    value = cfg[name]
    if not isinstance(value, bool):
        raise ConfigError(f"{key}.{name}: expected true or false, got {value!r}")
    return value


def _check_float(cfg: Mapping[str, Any], name: str, key: str, low: float, high: float | None) -> float:
    value = cfg[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ConfigError(f"{key}.{name}: expected a number {bound}, got {value!r}")
    return float(value)


def encoder_section(cfg: Mapping[str, Any], key: str, required: Sequence[str], defaults: Mapping[str, Any],
                    backbones: Sequence[str], architecture: str | None = None) -> dict[str, Any]:
    """A ``semantic_encoder`` section with its defaults filled in; ConfigError naming ``key`` and the first
    unknown key (with the known ones), the first missing required key, an unknown backbone, or a bad
    ``emb_dim`` / ``num_heads`` (must divide it) / ``widths`` / ``pretrained_weights``."""
    unknown = sorted(set(cfg) - set(required) - set(defaults))
    if unknown:
        arch = f" for architecture {architecture!r}" if architecture else ""
        raise ConfigError(f"{key}: unknown key {unknown[0]!r}{arch}; known keys: "
                          f"{', '.join((*required, *defaults))}")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConfigError(f"{key}: missing required key {missing[0]!r}")
    c = {**defaults, **cfg}
    if c["backbone"] not in backbones:
        raise ConfigError(f"{key}.backbone: unknown backbone {c['backbone']!r}; choose one of {', '.join(backbones)}")
    emb_dim, heads = _check_int(c, "emb_dim", key, 1), _check_int(c, "num_heads", key, 1)
    if emb_dim % heads:
        raise ConfigError(f"{key}.num_heads: {heads} does not divide emb_dim {emb_dim}")
    widths = c["widths"]
    if (not isinstance(widths, (list, tuple)) or not widths
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)):
        raise ConfigError(f"{key}.widths: expected a non-empty list of positive integers, got {widths!r}")
    if c["pretrained_weights"] is not None and not isinstance(c["pretrained_weights"], (str, Path)):
        raise ConfigError(f"{key}.pretrained_weights: expected a file path or null, got {c['pretrained_weights']!r}")
    return c


def build_semantic_encoder(
    cfg: Mapping[str, Any], load_pretrained: bool = True, key: str = "model.semantic_encoder"
) -> SemanticEncoder:
    """Build the encoder from its config section (keys: ``REQUIRED_KEYS`` + ``OPTIONAL_DEFAULTS``, and
    ``architecture``: ``ldae``, the default, or ``official`` for the published LDAE's encoder,
    :class:`ldae.nets.official_encoder.OfficialSemanticEncoder`).

    Args:
        cfg: the ``semantic_encoder`` config section.
        load_pretrained: False when trained weights are loaded right after (e.g. from an LDAE checkpoint),
            so that a ``pretrained_weights`` file is neither needed nor read.
        key: config location used in error messages.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {type(cfg).__name__}")
    architecture = cfg.get("architecture", "ldae")
    if architecture == "official":  # the published LDAE's encoder, key for key (ldae.nets.official_encoder)
        from ldae.nets.official_encoder import build_official_encoder

        return build_official_encoder(cfg, load_pretrained=load_pretrained, key=key)
    if architecture != "ldae":
        raise ConfigError(f"{key}.architecture: expected 'ldae' or 'official', got {architecture!r}")
    cfg = {k: v for k, v in cfg.items() if k != "architecture"}
    c = encoder_section(cfg, key, REQUIRED_KEYS, OPTIONAL_DEFAULTS, BACKBONES)
    emb_dim, heads, widths = c["emb_dim"], c["num_heads"], c["widths"]
    if _check_float(c, "input_std", key, 0.0, None) == 0.0:
        raise ConfigError(f"{key}.input_std: must be > 0")
    weights = c["pretrained_weights"] if load_pretrained else None
    if load_pretrained and c["backbone"] != "small_cnn":
        if weights:
            log.info("semantic encoder: %s initialised from %s (1-channel stem = sum of RGB filters)",
                     c["backbone"], weights)
        else:
            log.info("semantic encoder: no pretrained_weights for %s (ImageNet), random initialisation",
                     c["backbone"])
    backbone = make_backbone(
        c["backbone"],
        widths=widths,
        pretrained_weights=weights,
        drop_path=_check_float(c, "drop_path", key, 0.0, 1.0),
        key=key,
    )
    return SemanticEncoder(
        backbone,
        emb_dim=emb_dim,
        num_heads=heads,
        num_slices=_check_int(c, "num_slices", key, 1),
        slice_chunk=_check_int(c, "slice_chunk", key, 0),
        checkpoint_slices=bool(c["checkpoint_slices"]),
        dropout=_check_float(c, "dropout", key, 0.0, 1.0),
        pool_hidden=_check_int(c, "pool_hidden", key, 1),
        input_mean=_check_float(c, "input_mean", key, float("-inf"), None),
        input_std=float(c["input_std"]),
        output_norm=_check_bool(c, "output_norm", key),
    )
