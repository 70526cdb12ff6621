"""ldae: Latent Diffusion Autoencoders for 3D brain MRI."""

__version__ = "0.1.0"
