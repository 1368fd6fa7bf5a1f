"""CIFAR-10 through torchvision, with a one-line error when it is missing offline."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import CIFAR10

from ..errors import UserError
from .common import image_transform, sample_dict

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_caption(name: str) -> str:
    return f"a photo of a {name}"


class Cifar10(torch.utils.data.Dataset):
    class_names = CLASS_NAMES
    num_classes = 10

    def __init__(self, root: str, resolution: int, split: str = "train", hflip: bool = False, download: bool = True):
        if split not in ("train", "test"):
            raise UserError(f"cifar10 has splits train and test, not '{split}'")
        self.transform = image_transform(resolution, hflip)
        train = split == "train"
        try:
            self.data = CIFAR10(root, train=train, download=False)
        except RuntimeError:
            if not download:
                raise self._missing(root, "downloads are off (data.download=false)") from None
            try:
                self.data = CIFAR10(root, train=train, download=True)
            except Exception as err:  # network errors come in many types
                raise self._missing(root, f"download failed: {str(err).splitlines()[0][:120]}") from None

    @staticmethod
    def _missing(root: str, why: str) -> UserError:
        where = Path(root) / "cifar-10-batches-py"
        return UserError(
            f"CIFAR-10 not found in {where} and {why}; extract cifar-10-python.tar.gz "
            f"(the 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html) into {root}"
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        image, label = self.data[index]
        return sample_dict(self.transform(image), int(label), class_caption(CLASS_NAMES[label]))
