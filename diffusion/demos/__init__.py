"""Demos that write one picture from a trained checkpoint: `python -m diffusion.demos.NAME --help`."""
