"""Scaling laws for diffusion models: sweep model size, data and compute, fit power laws, predict.

`python -m diffusion.scaling sweep|fit|predict` (see `cli.py`); the fits live in `fit.py`,
FLOP counting in `flops.py`, the fixed validation loss in `valloss.py`, plots in `plots.py`.
"""
