"""The names a command line offers as choices, in a module that imports nothing heavy, so that
`sample.py --help` and the documentation check can build the parsers without importing torch.
The modules that implement each choice import their list from here."""
from __future__ import annotations

SAMPLERS = ("ddpm", "ddim", "dpmsolver", "heun", "euler")  # diffusion.sampling.samplers
PRECISIONS = ("fp32", "bf16")  # the denoiser's precision when sampling (diffusion.device)
GUIDANCE_FORMS = ("eps", "mean")  # how a gradient enters a step (diffusion.conditioning.classifier)
INPAINT_METHODS = ("channels", "replace", "repaint")  # diffusion.conditioning.inpaint.methods
