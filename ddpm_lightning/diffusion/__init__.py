"""The mathematics of diffusion models, independent of Lightning and of any network: schedules (the forward
process), the denoiser (the parameterisation), losses, likelihood, guidance and samplers."""
