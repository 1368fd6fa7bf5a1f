"""An image folder: class sub-folders become labels, metadata.jsonl supplies captions."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UserError, preview
from ..structured import parse_json
from ..safe_text import safe_name
from .common import check_readable, image_transform, listdir, load_rgb, sample_dict, shown, template_caption
from .items import ItemRandom, random_hflip


def _read_metadata(path: Path) -> dict[str, str]:
    """{file_name: caption} from metadata.jsonl; a caption must be text ("text": null is no caption)."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    captions = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"{path}:{number}", "each line is a JSON object with 'file_name' and 'text'")
            name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{number} must be a JSON object with 'file_name' and 'text'") from None
        if not isinstance(name, str) or not isinstance(text, str):
            raise UserError(f"{path}:{number}: 'file_name' and 'text' must be strings, got {preview(name)} and "
                            f"{preview(text)}")
        captions[name] = text
    return captions


def image_files(folder: Path) -> list[Path]:
    """The image files below `folder`, by name: regular files only (a FIFO would block the loader);
    symlinked sub-folders are not followed (a link loop). A sub-folder or image that exists but cannot be
    read is a UserError naming it: skipped, it would silently train on less data."""
    found, stack = [], [folder]
    while stack:
        for entry in listdir(stack.pop(), "image folder"):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                stack.append(path)
            elif path.suffix.lower() in IMG_EXTENSIONS and entry.is_file():
                check_readable(path)
                found.append(path)
    return sorted(found)


class ImageFolder(torch.utils.data.Dataset):
    """Images under `root/split` if that folder exists, else under `root`.

    Sub-folders, in sorted order, are classes 0, 1, ...; images directly in the folder are one
    class. Captions come from `metadata.jsonl` (paths relative to the folder), else from the
    class name in a random template ("a blurry photo of a dog"). Images both at the top level and
    in class folders are refused (which class would the top-level ones be?); a class folder without
    images is not a class (a warning says so).
    """

    def __init__(self, root: str, resolution: int, split: str = "train", hflip: bool = False):
        base = Path(root)
        if (base / split).is_dir():
            base = base / split
        if not base.is_dir():
            raise UserError(f"image folder not found: {shown(base)}")
        entries = sorted(Path(e.path) for e in listdir(base, "image folder"))
        folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        found = {folder: image_files(folder) for folder in folders}
        for folder in [folder for folder, files in found.items() if not files]:
            print(f"warning: {shown(folder)} holds no images ({', '.join(IMG_EXTENSIONS)}): it is not a class",
                  file=sys.stderr)
            del found[folder]
        top = [p for p in entries if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()]
        if found and top:
            raise UserError(f"{shown(base)} holds {len(top)} images at its top level (e.g. {shown(top[0].name)}) beside "
                            f"class folders ({', '.join(shown(f.name) for f in list(found)[:3])}): move them into a "
                            "class folder, or the class folders' images up to make one class")
        # class names go into info.json, PNG metadata, captions and logs: printable text (safe_text.safe_name)
        names = [safe_name(folder.name) for folder in found]
        if len(set(names)) < len(names):
            twin = next(name for name in names if names.count(name) > 1)
            raise UserError(f"two class folders in {shown(base)} show as the same name {twin}: rename one")
        found = dict(zip(names, found.values()))
        self.class_names = tuple(found)
        self.samples: list[tuple[Path, int]] = [(p, label) for label, files in enumerate(found.values()) for p in files]
        if not found:
            self.samples = [(p, 0) for p in image_files(base)]
        if not self.samples:
            raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {shown(base)}")
        self.class_names = self.class_names or ("image",)
        self.num_classes = len(self.class_names)
        meta = base / "metadata.jsonl"
        if meta.is_file():
            check_readable(meta, "captions file")
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
