"""Baselines of the paper's tables 5 and 7: networks and inference (no Lightning). They are trained as
``ldae fit`` stages by :mod:`ldae.training.voxel_dae` and :mod:`ldae.training.supervised`.

- ``voxel_dae``: a DiffAE-style diffusion autoencoder in voxel space (the same 2.5D semantic encoder and
  a y-conditioned 3D UNet on the images themselves), the model LDAE is compared with for speed and
  reconstruction quality (:mod:`ldae.baselines.voxel_dae`).
- ``supervised``: the same 2.5D encoder trained *with* labels (AD vs CN, plus age), an upper reference for
  the linear probes (:mod:`ldae.baselines.supervised`).

Both expose a ``semantic(x)`` inference call so that the evaluation suite runs the same probes on them.
"""

from __future__ import annotations

__all__ = ["voxel_dae", "supervised"]
