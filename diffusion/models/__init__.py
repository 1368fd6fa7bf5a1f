"""Networks: the denoiser (a diffusers U-Net behind one conditioning interface)."""
from .denoiser import Denoiser, build_denoiser

__all__ = ["Denoiser", "build_denoiser"]
