"""An image folder: class sub-folders become labels, metadata.jsonl supplies captions."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UserError
from .common import image_transform, load_rgb, sample_dict, template_caption
from .items import ItemRandom, random_hflip


def _read_metadata(path: Path) -> dict[str, str]:
    captions = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[row["file_name"]] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number} must be a JSON object with 'file_name' and 'text'") from None
    return captions


class ImageFolder(torch.utils.data.Dataset):
    """Images under `root/split` if that folder exists, else under `root`.

    Sub-folders, in sorted order, are classes 0, 1, ...; images directly in the folder are one
    class. Captions come from `metadata.jsonl` (paths relative to the folder), else from the
    class name in a random template ("a blurry photo of a dog").
    """

    def __init__(self, root: str, resolution: int, split: str = "train", hflip: bool = False):
        base = Path(root)
        if (base / split).is_dir():
            base = base / split
        if not base.is_dir():
            raise UserError(f"image folder not found: {base}")
        self.class_names = tuple(sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")))
        folders = [base / c for c in self.class_names] or [base]
        self.samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(folders):
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
            self.samples += [(p, label) for p in files]
        if not self.samples:
            raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {base}")
        self.class_names = self.class_names or ("image",)
        self.num_classes = len(self.class_names)
        meta = base / "metadata.jsonl"
        self.captions = _read_metadata(meta) if meta.is_file() else {}
        self.base = base
        self.transform, self.hflip = image_transform(resolution), hflip

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, index: int, rng: ItemRandom | None = None) -> str:
        path, label = self.samples[index]
        text = self.captions.get(path.relative_to(self.base).as_posix())
        return text if text is not None else template_caption(self.class_names[label], rng.py if rng else None)

    def item(self, index: int, rng: ItemRandom) -> dict:
        """Item `index`, its flip and caption template drawn from `rng`."""
        path, label = self.samples[index]
        image = random_hflip(self.transform(load_rgb(path)), self.hflip, rng)
        return sample_dict(image, label, self.caption(index, rng))

    def __getitem__(self, index: int) -> dict:
        return self.item(index, ItemRandom.of(0, 0, index))
