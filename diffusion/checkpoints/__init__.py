"""Checkpoints: their files (`store`), loading a model to sample from (`load`), and starting a run
from another run's weights (`init_from`)."""
