"""Diffusion core: the noise schedule (:mod:`.schedule`) and DDIM sampling / inversion (:mod:`.ddim`)."""

from ldae.diffusion.ddim import ddim_invert, ddim_sample, ddim_step, ddim_timesteps
from ldae.diffusion.schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "ddim_invert", "ddim_sample", "ddim_step", "ddim_timesteps"]
