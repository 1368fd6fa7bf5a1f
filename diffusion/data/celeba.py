"""Aligned CelebA from torchvision's or Kaggle's on-disk layout (full set or a subset).

torchvision's own CelebA class checks md5 sums of the full release and wants files we do not
use, so it refuses subsets; this reader needs only the images, attributes and partition.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms

from ..errors import UserError
from .common import check_text_file, load_rgb, sample_dict, unreadable
from .items import ItemRandom, random_hflip

SPLITS = {"train": 0, "valid": 1, "test": 2}


def attribute_caption(attrs: dict[str, bool]) -> str:
    """A short sentence from CelebA's binary attributes.

    "a smiling young woman with wavy blond hair, bangs and eyeglasses": adjectives, then hair
    (texture and colour), then accessories and facial hair, each only when its attribute is set.
    """
    words = ["a"] + [w for key, w in (("Smiling", "smiling"), ("Young", "young"), ("Bald", "bald")) if attrs.get(key)]
    words.append("man" if attrs.get("Male") else "woman")
    colour = next((w for key, w in (("Blond_Hair", "blond"), ("Black_Hair", "black"), ("Brown_Hair", "brown"),
                                    ("Gray_Hair", "gray")) if attrs.get(key)), None)
    texture = "wavy" if attrs.get("Wavy_Hair") else "straight" if attrs.get("Straight_Hair") else None
    hair = " ".join(w for w in (texture, colour) if w)
    extras = [f"{hair} hair"] if hair and not attrs.get("Bald") else []
    beard = attrs.get("No_Beard") is False and not attrs.get("Goatee")
    extras += [phrase for key, phrase in (
        ("Bangs", "bangs"), ("Eyeglasses", "eyeglasses"), ("Wearing_Hat", "a hat"), ("Mustache", "a mustache"),
        ("Goatee", "a goatee"), ("Wearing_Lipstick", "lipstick"),
    ) if attrs.get(key)]
    if beard:
        extras.append("a beard")
    if extras:
        words.append("with " + (", ".join(extras[:-1]) + " and " + extras[-1] if len(extras) > 1 else extras[0]))
    return " ".join(words)


def _find_layout(root: Path) -> tuple[Path, Path, Path]:
    """(image folder, attribute file, partition file) for torchvision's or Kaggle's layout."""
    for base in (root / "celeba", root):
        txt_attr, txt_part = base / "list_attr_celeba.txt", base / "list_eval_partition.txt"
        csv_attr, csv_part = base / "list_attr_celeba.csv", base / "list_eval_partition.csv"
        images = base / "img_align_celeba"
        if (images / "img_align_celeba").is_dir():  # Kaggle nests the folder
            images = images / "img_align_celeba"
        if txt_attr.exists() or txt_part.exists():
            return images, txt_attr, txt_part
        if csv_attr.exists() or csv_part.exists():
            return images, csv_attr, csv_part
    raise UserError(
        f"CelebA not found under {root}: put img_align_celeba/, list_attr_celeba.txt and "
        f"list_eval_partition.txt in {root / 'celeba'} (torchvision layout) or the Kaggle CSV files in {root}"
    )


def _read_attributes(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    check_text_file(path, "CelebA attribute file")
    try:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
            names, body = rows[0][1:], rows[1:]
        else:
            lines = path.read_text().splitlines()
            names, body = lines[1].split(), [line.split() for line in lines[2:] if line.strip()]
        table = {row[0]: [int(v) for v in row[1:]] for row in body}
    except (IndexError, ValueError) as err:
        raise UserError(f"{path} is not a CelebA attribute file ({err})") from None
    if any(len(v) != len(names) for v in table.values()):
        raise UserError(f"{path} is not a CelebA attribute file: rows and header differ in length")
    return names, table


def _read_partition(path: Path) -> dict[str, int]:
    check_text_file(path, "CelebA partition file")
    try:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = list(csv.reader(f))[1:]
        else:
            rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        return {row[0]: int(row[1]) for row in rows}
    except (IndexError, ValueError) as err:
        raise UserError(f"{path} is not a CelebA partition file ({err})") from None


class CelebA(torch.utils.data.Dataset):
    """Class label = the chosen attributes read as bits (first attribute = lowest bit)."""

    def __init__(self, root: str, resolution: int, split: str = "train", hflip: bool = False,
                 attributes: list[str] | None = None, captions: str = "all", cache: bool = False):
        if split not in SPLITS:
            raise UserError(f"celeba has splits {', '.join(SPLITS)}, not '{split}'")
        images, attr_path, part_path = _find_layout(Path(root))
        self.attr_names, table = _read_attributes(attr_path)
        partition = _read_partition(part_path)
        self.attributes = list(attributes or [])
        unknown = [a for a in self.attributes if a not in self.attr_names]
        if unknown:
            raise UserError(f"unknown CelebA attribute(s) {unknown}; valid: {', '.join(self.attr_names)}")
        self.files = sorted(f for f, p in partition.items() if p == SPLITS[split] and f in table)
        if not self.files:
            raise UserError(f"no CelebA images of split '{split}' listed in {part_path}")
        if images.is_dir() and not os.access(images, os.R_OK | os.X_OK):
            raise unreadable("CelebA image folder", images)
        if not (images / self.files[0]).is_file():
            raise UserError(f"CelebA image {images / self.files[0]} is missing: extract img_align_celeba into {images.parent}")
        self.images, self.table = images, table
        self.num_classes = 2 ** len(self.attributes)
        self.class_names = tuple(
            ",".join(f"{a}={bool(i >> b & 1)}" for b, a in enumerate(self.attributes)) or "face"
            for i in range(self.num_classes)
        )
        self.captions = captions  # "all" | "class" (config.CHOICES checks it)
        self.hflip = hflip  # drawn per item (items.random_hflip), after the crop and resize as before
        self.resize = transforms.Compose([
            transforms.CenterCrop(178),
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        ])
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
        self.cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.files)

    def attribute_dict(self, index: int) -> dict[str, bool]:
        return {n: v > 0 for n, v in zip(self.attr_names, self.table[self.files[index]])}

    def image(self, index: int) -> torch.Tensor:
        """Image `index` cropped, resized and in [-1, 1]; decoded once when the cache is on (the
        decode and resize of a 178x218 JPEG costs more than a small model's step on a CPU)."""
        if self.cache is None:
            return self.to_tensor(self.resize(load_rgb(self.images / self.files[index])))
        if index not in self.cache:
            self.cache[index] = np.array(self.resize(load_rgb(self.images / self.files[index])))
        return self.to_tensor(self.cache[index])

    def item(self, index: int, rng: ItemRandom) -> dict:
        """Item `index`, its flip drawn from `rng`."""
        attrs = self.attribute_dict(index)
        label = sum(1 << b for b, a in enumerate(self.attributes) if attrs[a])
        if self.captions == "class":  # only the attributes that make the class: "a photo of a smiling man"
            attrs = {a: attrs[a] for a in self.attributes}
            caption = "a photo of " + attribute_caption(attrs)
        else:
            caption = attribute_caption(attrs)
        return sample_dict(random_hflip(self.image(index), self.hflip, rng), label, caption)

    def __getitem__(self, index: int) -> dict:
        return self.item(index, ItemRandom.of(0, 0, index))
