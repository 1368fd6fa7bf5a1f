"""Feature extractors for FID/KID: torchmetrics' Inception-v3 as it is, or a user's TorchScript module.

Both map uint8 images (N, 3, H, W) to features (N, D). Each carries a `key` that names the exact
weights and preprocessing, so cached reference statistics are never mixed across extractors.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

# torch-fidelity's port of the TF FID Inception (pt_inception-2015-12-05), fetched by torch.hub.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
RESIZES = ("tf1", "antialias")  # tf1: the original FID's bilinear resize to 299 (published numbers)
DOWNLOAD_TIMEOUT_S = 30.0


@contextlib.contextmanager
def full_fp32():
    """No TF32 inside: features (and cached reference statistics) do not depend on the GPU's settings."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class Extractor:
    module: torch.nn.Module
    name: str  # for people: what produced the features
    key: str  # for the cache: weights fingerprint and preprocessing
    device: torch.device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float64 (N, D) on the CPU."""
        if images.dtype != torch.uint8:
            raise TypeError("feature extractors score uint8 images")
        with full_fp32():
            features = self.module(images.to(self.device))
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != images.shape[0]:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise UserError(f"feature extractor {self.name} returned {shape} for {tuple(images.shape)} images; "
                            "it must return (N, D) features")
        return features.detach().double().cpu()


def file_digest(path: Path, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def offline_hint() -> str:
    return (f"pass --inception-weights FILE (download {INCEPTION_URL} elsewhere) "
            "or --feature-extractor TORCHSCRIPT")


def inception(weights: str | None, resize: str, device: torch.device) -> Extractor:
    """torchmetrics' NoTrainInceptionV3 (the TF FID network as torch-fidelity ports it), pool3 features."""
    if importlib.util.find_spec("torch_fidelity") is None:  # torchmetrics' Inception comes from it
        raise UserError("the Inception feature extractor needs torch-fidelity: pip install torch-fidelity "
                        "(or pass --feature-extractor TORCHSCRIPT)")
    from torchmetrics.image.fid import NoTrainInceptionV3

    if resize not in RESIZES:
        raise UserError(f"--inception-resize must be one of {', '.join(RESIZES)}, got '{resize}'")
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"--inception-weights file not found: {weights}")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a closed network fails fast instead of hanging
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's download chatter would bury the error
            module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                        feature_extractor_weights_path=weights, antialias=resize == "antialias")
    except Exception as err:  # download and unpickling errors come in many types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        if weights is None:
            raise UserError(f"cannot get the FID Inception weights ({reason}); {offline_hint()}") from None
        raise UserError(f"--inception-weights {weights} is not the FID Inception checkpoint {INCEPTION_FILE} "
                        f"({reason})") from None
    finally:
        socket.setdefaulttimeout(previous)
    fingerprint = f"sha256:{file_digest(Path(weights))}" if weights else INCEPTION_FILE
    return Extractor(module.to(device), f"inception-v3-compat pool3 (2048-d, torchmetrics/torch-fidelity, resize {resize})",
                     f"inception-v3-compat:2048:{resize}:{fingerprint}", device)


def torchscript(path: str, device: torch.device) -> Extractor:
    """A TorchScript module (or a torch.export .pt2 program) mapping uint8 (N, 3, H, W) to (N, D) features."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--feature-extractor file not found: {path}")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export; both load
            warnings.simplefilter("ignore", FutureWarning)
            if file.suffix == ".pt2":
                module = torch.export.load(str(file)).module().to(device)
            else:
                module = torch.jit.load(str(file), map_location=device).eval()
    except (RuntimeError, ValueError) as err:
        first = (str(err).strip().splitlines() or ["unreadable"])[0][:160]
        raise UserError(f"--feature-extractor {path} is neither a TorchScript module (torch.jit.save) "
                        f"nor an exported program (.pt2, torch.export.save): {first}") from None
    return Extractor(module, f"torchscript {file.name}", f"torchscript:sha256:{file_digest(file)}", device)


def build_extractor(feature_extractor: str | None, inception_weights: str | None, resize: str,
                    device: torch.device) -> Extractor:
    if feature_extractor and inception_weights:
        raise UserError("give --feature-extractor or --inception-weights, not both")
    if feature_extractor:
        return torchscript(feature_extractor, device)
    return inception(inception_weights, resize, device)
