"""ldae: Latent Diffusion Autoencoders for 3D brain MRI.

``from ldae import LDAE`` gives the inference model (:class:`ldae.model.LDAE`); it is imported on first
use so that ``import ldae`` (and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LDAE", "__version__"]

if TYPE_CHECKING:
    from ldae.model import LDAE


def __getattr__(name: str) -> Any:
    if name == "LDAE":
        from ldae.model import LDAE

        return LDAE
    raise AttributeError(f"module 'ldae' has no attribute {name!r}")
