"""2.5D ("fake-3D") perceptual loss that never downloads anything.

MONAI's ``PerceptualLoss`` compares 2D features of randomly chosen slices along each axis
(``fake_3d_ratio`` of the slices per axis). Its pretrained networks normally come from the internet
(torch.hub / lpips). Here they come only from local files:

* ``resnet50``: ``loss.perceptual_weights`` is a torchvision ResNet-50 state-dict file;
* ``alex`` / ``vgg`` / ``squeeze`` (LPIPS, needs the optional ``lpips`` package):
  ``loss.perceptual_weights`` is a pre-filled torch.hub cache folder (``<dir>/checkpoints/*.pth``).

The network is built inside :func:`no_network`, which makes every DNS lookup or socket connection
raise, so a missing cache entry can never turn into a download. When no weights are configured or the
build fails, the loss is disabled with a stated reason (logged once, saved in the run config).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ldae.errors import ConfigError

log = logging.getLogger(__name__)

LPIPS_NETWORKS = ("alex", "vgg", "squeeze")
NETWORKS = ("resnet50", *LPIPS_NETWORKS)


class NetworkAccessBlocked(RuntimeError):
    """Raised by :func:`no_network` when code tries to reach the network."""


@contextlib.contextmanager
def no_network() -> Iterator[None]:
    """Within this block any DNS lookup or socket connection raises NetworkAccessBlocked."""

    def _blocked(*args: object, **kwargs: object) -> None:
        raise NetworkAccessBlocked("network access attempted while building the perceptual network")

    saved = (socket.getaddrinfo, socket.create_connection, socket.socket.connect, socket.socket.connect_ex)
    socket.getaddrinfo = _blocked  # type: ignore[assignment]
    socket.create_connection = _blocked  # type: ignore[assignment]
    socket.socket.connect = _blocked  # type: ignore[method-assign]
    socket.socket.connect_ex = _blocked  # type: ignore[method-assign]
    try:
        yield
    finally:
        (socket.getaddrinfo, socket.create_connection, socket.socket.connect, socket.socket.connect_ex) = saved


@dataclass
class PerceptualSetup:
    """The built loss (``None`` when disabled) and a human-readable status for logs and configs."""

    loss: torch.nn.Module | None
    status: str

    @property
    def enabled(self) -> bool:
        return self.loss is not None


def _disabled(reason: str) -> PerceptualSetup:
    log.warning("perceptual loss disabled: %s", reason)
    return PerceptualSetup(None, f"disabled ({reason})")


def build_perceptual_loss(loss_cfg: dict) -> PerceptualSetup:
    """Build the 2.5D perceptual loss from the ``loss`` section, or explain why it is disabled.

    Keys: ``perceptual_weight`` (0 disables), ``perceptual_network`` (resnet50, alex, vgg, squeeze),
    ``perceptual_weights`` (local file/folder, see module docstring), ``perceptual_fake_3d_ratio``.
    A configured path that does not exist is a user error (ConfigError), not a silent fallback.
    """
    weight = float(loss_cfg.get("perceptual_weight", 0.0) or 0.0)
    if weight <= 0:
        return PerceptualSetup(None, "disabled (loss.perceptual_weight is 0)")
    network = str(loss_cfg.get("perceptual_network", "resnet50")).lower()
    if network not in NETWORKS:
        raise ConfigError(f"config key 'loss.perceptual_network' is '{network}' (choose from {', '.join(NETWORKS)})")
    ratio = float(loss_cfg.get("perceptual_fake_3d_ratio", 0.5))
    if not 0 < ratio <= 1:
        raise ConfigError(f"config key 'loss.perceptual_fake_3d_ratio' is {ratio} (must lie in (0, 1])")
    weights = loss_cfg.get("perceptual_weights")
    if not weights:
        return _disabled("no local weights: set loss.perceptual_weights")
    path = Path(str(weights)).expanduser()
    if network == "resnet50" and not path.is_file():
        raise ConfigError(f"config key 'loss.perceptual_weights': file not found: {path}")
    if network in LPIPS_NETWORKS and not path.is_dir():
        raise ConfigError(f"config key 'loss.perceptual_weights': torch.hub cache folder not found: {path}")
    try:
        with no_network():
            loss = _build(network, path, ratio)
    except NetworkAccessBlocked:
        return _disabled(f"{network} weights are not in the local cache {path}")
    except ImportError as exc:
        return _disabled(f"{network} needs the optional package '{exc.name or exc}'")
    except (RuntimeError, KeyError, OSError) as exc:
        raise ConfigError(
            f"config key 'loss.perceptual_weights' ({path}): cannot load {network} weights "
            f"({str(exc).splitlines()[0]})"
        ) from None
    loss.eval()
    for p in loss.parameters():
        p.requires_grad_(False)
    log.info("perceptual loss enabled: %s from %s (fake-3D ratio %g)", network, path, ratio)
    return PerceptualSetup(loss, f"enabled ({network} from {path})")


def _build(network: str, path: Path, ratio: float) -> torch.nn.Module:
    from monai.losses import PerceptualLoss

    if network == "resnet50":
        return PerceptualLoss(
            spatial_dims=3, network_type="resnet50", is_fake_3d=True, fake_3d_ratio=ratio,
            pretrained=True, pretrained_path=str(path),
        )
    import importlib

    importlib.import_module("lpips")  # ImportError -> disabled with the package named
    hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(path))  # MONAI's cache_dir would change it for good; restore below
    try:
        return PerceptualLoss(spatial_dims=3, network_type=network, is_fake_3d=True, fake_3d_ratio=ratio)
    finally:
        torch.hub.set_dir(hub_dir)
