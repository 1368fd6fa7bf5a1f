"""Per-item randomness is a function of (seed, epoch, index): any worker count gives the same items."""
import numpy as np
import torch
from PIL import Image

from diffusion.data import build_dataloader, build_dataset
from diffusion.training.batches import training_augment
from tests.conftest import tiny_config


def image_folder(root, count: int = 8):
    """Two classes of left-right asymmetric images (a flip shows) with template captions."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def epochs(cfg, workers: int, count: int = 2) -> list[list[dict]]:
    """Every batch of epochs 0..count-1 from one loader (persistent workers across epochs)."""
    cfg.data.num_workers = workers
    loader = build_dataloader(build_dataset(cfg.data), cfg.data, 4, seed=3, augment=training_augment(cfg))
    out = []
    for epoch in range(count):
        loader.sampler.set_epoch(epoch)
        out.append(list(loader))
    return out


def test_items_are_the_same_for_any_worker_count_and_differ_across_epochs(tmp_path):
    cfg = tiny_config(tmp_path / "run", "data.name=imagefolder", f"data.root={image_folder(tmp_path / 'images')}",
                      "data.hflip=true", "model.inpaint=true")
    inline, workers = epochs(cfg, 0), epochs(cfg, 2)
    for a_epoch, b_epoch in zip(inline, workers):
        for a, b in zip(a_epoch, b_epoch):
            assert a["caption"] == b["caption"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["keep"], b["keep"])
    # the same image in two epochs: its flip, caption template and mask are drawn again
    dataset = build_dataset(cfg.data)
    from diffusion.data.items import EpochItems

    items = EpochItems(dataset, 3, training_augment(cfg))
    firsts, seconds = [items[(0, i)] for i in range(8)], [items[(1, i)] for i in range(8)]
    assert any(a["caption"] != b["caption"] for a, b in zip(firsts, seconds))
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(firsts, seconds))
    assert any(not torch.equal(a["keep"], b["keep"]) for a, b in zip(firsts, seconds))
    assert all(torch.equal(a["keep"], items[(0, i)]["keep"]) for i, a in enumerate(firsts))  # a pure function
