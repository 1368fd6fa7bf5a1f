"""Feature extractors for FID/KID: torchmetrics' Inception-v3 as it is, or a user's TorchScript module.

Both map uint8 images (N, 3, H, W) to features (N, D). Each carries a `key` that names the exact
weights and preprocessing, so cached reference statistics are never mixed across extractors.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserError, first_line
from ..io import sha256_file

# torch-fidelity's port of the TF FID Inception (pt_inception-2015-12-05), fetched by torch.hub. The
# same file is pytorch-fid's pt_inception-2015-12-05-6726825d.pth; the name carries its sha256's prefix.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_BYTES = 95_628_359
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
    has_head: bool = False  # a `logits(images)` method: the classifier's head, for class accuracy

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

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float (N, classes) on the CPU: the module's head; only when `has_head`."""
        with full_fp32():
            logits = self.module.logits(images.to(self.device))
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != images.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise UserError(f"feature extractor {self.name}'s logits() returned {shape} for {tuple(images.shape)} "
                            "images; it must return (N, classes)")
        return logits.detach().float().cpu()


def file_digest(path: Path, length: int = 16) -> str:
    """The first `length` hex digits of the file's sha256."""
    return sha256_file(path)[:length]


def check_inception_weights(path: Path) -> str:
    """The file's sha256 if it is the published FID Inception checkpoint; else a UserError, before
    anything loads it (torch-fidelity unpickles it with weights_only=False: any other pickle could run code)."""
    size = path.stat().st_size
    digest = file_digest(path, length=64) if size == INCEPTION_BYTES else None
    if digest != INCEPTION_SHA256:
        found = f"sha256 {digest[:16]}..." if digest else f"{size} bytes"
        raise UserError(f"--inception-weights {path} is not the FID Inception checkpoint {INCEPTION_FILE} "
                        f"({found}, expected {INCEPTION_BYTES} bytes with sha256 {INCEPTION_SHA256[:16]}...); "
                        f"refusing to load it: download {INCEPTION_URL}")
    return digest


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
    digest = check_inception_weights(Path(weights)) if weights is not None else None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a closed network fails fast instead of hanging
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's download chatter would bury the error
            module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                        feature_extractor_weights_path=weights, antialias=resize == "antialias")
    except Exception as err:  # download and unpickling errors come in many types
        reason = first_line(err)
        if weights is None:
            raise UserError(f"cannot get the FID Inception weights ({reason}); {offline_hint()}") from None
        raise UserError(f"--inception-weights {weights} is not the FID Inception checkpoint {INCEPTION_FILE} "
                        f"({reason})") from None
    finally:
        socket.setdefaulttimeout(previous)
    fingerprint = f"sha256:{digest[:16]}" if digest else INCEPTION_FILE
    return Extractor(module.to(device), f"inception-v3-compat pool3 (2048-d, torchmetrics/torch-fidelity, resize {resize})",
                     f"inception-v3-compat:2048:{resize}:{fingerprint}", device)


@contextlib.contextmanager
def held_log(name: str) -> Iterator[list[logging.LogRecord]]:
    """Hold back what logger `name` emits (torch.export logs a whole traceback before it raises);
    the records are handed over so the caller can report the cause in one line."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    saved = logger.handlers, logger.propagate  # torch gives its loggers their own stderr handlers
    logger.handlers, logger.propagate = [handler], False
    try:
        yield records
    finally:
        logger.handlers, logger.propagate = saved


def torchscript(path: str, device: torch.device) -> Extractor:
    """A TorchScript module (or a torch.export .pt2 program) mapping uint8 (N, 3, H, W) to (N, D) features."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--feature-extractor file not found: {path}")
    try:
        with warnings.catch_warnings(), held_log("torch.export") as records:
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export; both load
            if file.suffix == ".pt2":
                module = torch.export.load(str(file)).module().to(device)
            else:
                module = torch.jit.load(str(file), map_location=device).eval()
    except Exception as err:  # a foreign or damaged file fails in many ways (zip, pickle, schema errors)
        logged = [r.exc_info[1] for r in records if r.exc_info and r.exc_info[1] is not None]
        cause = logged[-1] if logged else err  # torch.export logs the real error, then raises "see warnings above"
        first = first_line(cause).split(". This is an internal miniz error")[0]  # the rest is advice for checkpoints
        raise UserError(f"--feature-extractor {path} is neither a TorchScript module (torch.jit.save) "
                        f"nor an exported program (.pt2, torch.export.save): {first}") from None
    return Extractor(module, f"torchscript {file.name}", f"torchscript:sha256:{file_digest(file)}", device,
                     has_head=callable(getattr(module, "logits", None)))


def build_extractor(feature_extractor: str | None, inception_weights: str | None, resize: str,
                    device: torch.device) -> Extractor:
    if feature_extractor and inception_weights:
        raise UserError("give --feature-extractor or --inception-weights, not both")
    if feature_extractor:
        return torchscript(feature_extractor, device)
    return inception(inception_weights, resize, device)
