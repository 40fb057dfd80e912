"""diffusion-bunny."""
