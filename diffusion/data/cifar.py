"""CIFAR-10 through torchvision, with a one-line error when it is missing offline."""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10, VisionDataset

from ..errors import UserError
from .common import image_transform, sample_dict, template_caption, unreadable
from .items import ItemRandom, random_hflip
from .safe_pickle import ForbiddenPickle, load_data_pickle

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_caption(name: str, rng: random.Random | None = None) -> str:
    """A varied caption: a random template per item ("a blurry photo of a cat", "an airplane")."""
    return template_caption(name, rng)


class _CIFAR10(CIFAR10):
    """torchvision's CIFAR10 (download, layout, items), reading the batch files with a restricted
    unpickler (plain data only: a hostile pickle in data.root cannot run code) and checking that
    they exist rather than their md5 sums (re-packed or test-written copies in the real format load).
    """

    def __init__(self, root: str, train: bool = True, download: bool = False):
        VisionDataset.__init__(self, root)
        self.train = train
        if download:
            self.download()
        if not self._check_integrity():
            raise RuntimeError("Dataset not found; use download=True to download it")
        data, self.targets = [], []
        for name, _ in self.train_list if train else self.test_list:
            entry = self._read(name)
            images, labels = entry["data"], entry.get("labels", entry.get("fine_labels"))
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
                    or images.shape[1] != 3 * 32 * 32 or not isinstance(labels, list) or len(labels) != len(images):
                raise ValueError(f"{name} does not hold uint8 (N, 3072) images and N labels")
            data.append(images)
            self.targets.extend(labels)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC
        self._load_meta()

    def _read(self, name: str) -> dict:
        entry = load_data_pickle(Path(self.root) / self.base_folder / name)
        if not isinstance(entry, dict):
            raise ValueError(f"{name} holds a {type(entry).__name__}, not a dict")
        return entry

    def _check_integrity(self) -> bool:
        base = Path(self.root) / self.base_folder
        files = self.train_list + self.test_list + [(self.meta["filename"], None)]
        return all((base / name).is_file() for name, _ in files)

    def _load_meta(self) -> None:
        self.classes = self._read(self.meta["filename"])[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class Cifar10(torch.utils.data.Dataset):
    class_names = CLASS_NAMES
    num_classes = 10

    def __init__(self, root: str, resolution: int, split: str = "train", hflip: bool = False, download: bool = True):
        if split not in ("train", "test"):
            raise UserError(f"cifar10 has splits train and test, not '{split}'")
        self.transform, self.hflip = image_transform(resolution), hflip
        train = split == "train"
        try:
            self.data = _CIFAR10(root, train=train, download=False)
        except PermissionError as err:  # a batch file that exists but cannot be read: not "missing"
            raise unreadable("CIFAR-10 file", err.filename or Path(root) / "cifar-10-batches-py") from None
        except ForbiddenPickle as err:
            raise UserError(f"refusing {err} (a pickle that runs code, not a CIFAR-10 batch)") from None
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

    def item(self, index: int, rng: ItemRandom) -> dict:
        """Item `index`, its flip and caption template drawn from `rng`."""
        image, label = self.data[index]
        image = random_hflip(self.transform(image), self.hflip, rng)
        return sample_dict(image, int(label), class_caption(CLASS_NAMES[label], rng.py))

    def __getitem__(self, index: int) -> dict:
        return self.item(index, ItemRandom.of(0, 0, index))
