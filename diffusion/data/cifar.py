"""CIFAR-10 through torchvision, with a one-line error when it is missing offline."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torchvision.datasets import CIFAR10

from ..errors import UserError
from .common import image_transform, sample_dict, template_caption

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_caption(name: str) -> str:
    """A varied caption: a random template per access ("a blurry photo of a cat", "an airplane")."""
    return template_caption(name)


class _CIFAR10(CIFAR10):
    """torchvision's CIFAR10, checking that the batch files exist rather than their md5 sums.

    Corrupt files still fail loudly when unpickled; this lets re-packed or test-written copies
    in the real on-disk format load.
    """

    def _check_integrity(self) -> bool:
        base = Path(self.root) / self.base_folder
        files = self.train_list + self.test_list + [(self.meta["filename"], None)]
        return all((base / name).is_file() for name, _ in files)

    def _load_meta(self) -> None:
        with (Path(self.root) / self.base_folder / self.meta["filename"]).open("rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class Cifar10(torch.utils.data.Dataset):
    class_names = CLASS_NAMES
    num_classes = 10

    def __init__(self, root: str, resolution: int, split: str = "train", hflip: bool = False, download: bool = True):
        if split not in ("train", "test"):
            raise UserError(f"cifar10 has splits train and test, not '{split}'")
        self.transform = image_transform(resolution, hflip)
        train = split == "train"
        try:
            self.data = _CIFAR10(root, train=train, download=False)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise UserError(f"CIFAR-10 files in {Path(root) / 'cifar-10-batches-py'} are broken ({err}): extract them again") from None
        except RuntimeError:
            if not download:
                raise self._missing(root, "downloads are off (data.download=false)") from None
            try:
                self.data = _CIFAR10(root, train=train, download=True)
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
