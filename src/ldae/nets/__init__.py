"""Network factories: the 3D AutoencoderKL and its patch discriminator, the perceptual loss, and (in
later modules) the latent UNet and the semantic encoder."""
