"""The physics diffusion models grow from (random walk, diffusion equation, Fokker-Planck, Ornstein-Uhlenbeck), and
the tutorial's figures (`python -m ddpm_lightning.physics.figures`)."""
