"""Training with Lightning: the LightningModules (diffusion model, noise-aware classifier) and their callbacks
(EMA, sample grids, FID)."""
