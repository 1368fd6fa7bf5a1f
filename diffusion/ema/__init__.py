"""Post-hoc EMA (EDM2): reconstruct an EMA of any relative width from a run's power-function EMA
snapshots (`python -m diffusion.ema reconstruct RUN --sigma-rel 0.05,0.10`). The tracking during
training and the math live in diffusion.training.phema. Torch-free: config checks import `settings`."""
