"""Evaluation: image metrics (SSIM/PSNR/MSE) and, in later modules, probes, interpolation and manipulation."""
