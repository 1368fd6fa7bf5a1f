"""Datasets read from files written in their real on-disk formats."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.config import DataConfig
from diffusion.data import build_dataset
from diffusion.data.shapes import ShapesDataset, detect_label
from diffusion.errors import UserError


def _check_item(item, resolution):
    assert item["image"].shape == (3, resolution, resolution)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert isinstance(item["label"], int) and isinstance(item["caption"], str)


def test_shapes_is_deterministic_and_readable_by_the_detector():
    a, b = ShapesDataset(32, 100, seed=3), ShapesDataset(32, 100, seed=3)
    assert torch.equal(a[7]["image"], b[7]["image"])
    assert not torch.equal(a[7]["image"], ShapesDataset(32, 100, seed=4)[7]["image"])
    _check_item(a[0], 32)
    assert a[0]["caption"].split()[-1] in ("circle", "square", "triangle")
    assert sum(detect_label(a[i]["image"]) == a[i]["label"] for i in range(100)) >= 98


def _write_cifar(root):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 3, 9, 1], "batch_label": "x"}
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                                      "frog", "horse", "ship", "truck"]}))


def test_cifar10_from_python_pickles(tmp_path):
    _write_cifar(tmp_path)
    ds = build_dataset(DataConfig(name="cifar10", root=str(tmp_path), resolution=32, download=False))
    assert len(ds) == 20 and ds.num_classes == 10
    item = ds[1]
    _check_item(item, 32)
    assert item["label"] == 3 and "cat" in item["caption"]
    assert len(build_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False), split="test")) == 4


def test_cifar10_missing_offline_names_the_path(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path / "none"), download=False))


ATTRS = ["Eyeglasses", "Male", "Smiling"]


def _write_celeba(root, kaggle=False):
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    images = root / ("img_align_celeba/img_align_celeba" if kaggle else "celeba/img_align_celeba")
    images.mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((218, 178, 3), 40 * i, np.uint8)).save(images / name)
    values = [[1 if (i >> b) & 1 else -1 for b in range(3)] for i in range(6)]
    parts = [0, 0, 0, 0, 1, 2]
    if kaggle:
        (root / "list_attr_celeba.csv").write_text("image_id," + ",".join(ATTRS) + "\n" + "".join(
            f"{n}," + ",".join(map(str, v)) + "\n" for n, v in zip(names, values)))
        (root / "list_eval_partition.csv").write_text("image_id,partition\n" + "".join(f"{n},{p}\n" for n, p in zip(names, parts)))
    else:
        base = root / "celeba"
        (base / "list_attr_celeba.txt").write_text(f"{len(names)}\n" + " ".join(ATTRS) + "\n" + "".join(
            f"{n} " + " ".join(f"{x:2d}" for x in v) + "\n" for n, v in zip(names, values)))
        (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, parts)))


@pytest.mark.parametrize("kaggle", [False, True])
def test_celeba_layouts(tmp_path, kaggle):
    _write_celeba(tmp_path, kaggle)
    cfg = DataConfig(name="celeba", root=str(tmp_path), resolution=16, celeba_attributes=["Smiling", "Male"])
    ds = build_dataset(cfg)
    assert len(ds) == 4 and ds.num_classes == 4
    _check_item(ds[3], 16)
    assert ds[3]["label"] == 0b10  # image 4: Eyeglasses=1, Male=1, Smiling=0 -> Smiling is bit 0, Male bit 1
    assert "man" in ds[3]["caption"] and "eyeglasses" in ds[3]["caption"]
    assert len(build_dataset(cfg, split="test")) == 1


def test_celeba_html_page_instead_of_file_is_named(tmp_path):
    _write_celeba(tmp_path)
    (tmp_path / "celeba/list_attr_celeba.txt").write_text("<!DOCTYPE html><html><body>Google Drive quota</body></html>")
    with pytest.raises(UserError, match="HTML page"):
        build_dataset(DataConfig(name="celeba", root=str(tmp_path)))


def test_celeba_missing_folder(tmp_path):
    with pytest.raises(UserError, match="CelebA not found"):
        build_dataset(DataConfig(name="celeba", root=str(tmp_path)))


def test_imagefolder_classes_and_metadata_captions(tmp_path):
    for cls in ("dogs", "cats"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "cats/1.png", "text": "a sleepy cat"}) + "\n")
    ds = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), resolution=16))
    assert ds.class_names == ("cats", "dogs") and len(ds) == 4
    labels = [ds[i]["label"] for i in range(4)]
    assert labels == [0, 0, 1, 1]
    _check_item(ds[0], 16)
    assert ds[1]["caption"] == "a sleepy cat"
    assert "cats" in ds[0]["caption"]


def test_unreadable_cifar_batch_and_celeba_files_are_named(tmp_path, monkeypatch):
    """A dataset file that exists but cannot be read is a UserError naming it, not "missing" or a traceback
    (tests run as root, where chmod 000 does not block reads: `deny` fakes what it does for a user)."""
    from tests.test_properties_images import deny

    _write_cifar(tmp_path / "cifar")
    batch = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_1"
    deny(monkeypatch, batch)
    with pytest.raises(UserError, match="data_batch_1 exists but cannot be read"):
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path / "cifar"), download=False))
    monkeypatch.undo()
    _write_celeba(tmp_path / "c")
    cfg = DataConfig(name="celeba", root=str(tmp_path / "c"), resolution=16)
    for locked in ("celeba/list_attr_celeba.txt", "celeba/img_align_celeba", "celeba/img_align_celeba/000002.jpg"):
        deny(monkeypatch, tmp_path / "c" / locked)
        with pytest.raises(UserError, match=f"{locked} exists but cannot be read"):
            build_dataset(cfg)[1]
        monkeypatch.undo()


def test_celeba_images_are_read_upright(tmp_path):
    """A CelebA JPEG with an EXIF orientation tag is read as displayed (the one reader, read_image)."""
    _write_celeba(tmp_path)
    path = tmp_path / "celeba/img_align_celeba/000002.jpg"
    sideways = np.zeros((178, 218, 3), np.uint8)
    sideways[:, :109] = 255  # stored: left half white; orientation 6 shows it as the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sideways).save(path, exif=exif)
    image = build_dataset(DataConfig(name="celeba", root=str(tmp_path), resolution=16))[1]["image"]
    assert image.shape == (3, 16, 16) and image[:, :6].mean() > 0.9 and image[:, -6:].mean() < -0.9
