"""Train a classifier on a dataset's real training split and save it as a TorchScript FID extractor.

Offline there are no Inception weights, so FID needs features learned here. This trains the small
clean CNN of `clean_classifier` (never shown noise) on the training split, measures its accuracy on
the held-out split, and saves its penultimate features as a TorchScript module that maps uint8
images (N, 3, H, W) to (N, D) features, the form `fid --feature-extractor` takes. Images of another
size are resized (bilinear, antialiased) to the resolution it was trained at. Figures computed with
it are "FID (CIFAR-10 classifier features)" (or the dataset named), never plain FID: they compare
models scored with the same file, not published Inception numbers.

  python -m diffusion.evaluate train-extractor --data-name imagefolder --data-root /tmp/cifar10-jpeg \\
      --resolution 16 --out extractors/cifar10_16.pt
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import CHOICES, DataConfig
from ..data import build_dataset
from ..errors import UserError
from ..io import atomic_write, atomic_write_text
from .clean_classifier import SmallConvNet, predict, train_classifier


class FeatureExtractor(nn.Module):
    """uint8 (N, 3, H, W) -> (N, D) penultimate features of a trained `SmallConvNet`; `logits` keeps
    its classification head, so class-conditional samples can be scored by the class they were asked for."""

    def __init__(self, net: SmallConvNet, resolution: int):
        super().__init__()
        self.body = net.body
        self.head = net.head
        self.resolution = resolution

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=[self.resolution, self.resolution], mode="bilinear", align_corners=False,
                              antialias=True)
        return self.body(x)

    @torch.jit.export
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> (N, classes): the trained head on the same features."""
        return self.head(self.forward(images))


def load_split(data: DataConfig, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, R, R) in [-1, 1], as the diffusion models see them, and their class labels."""
    dataset = build_dataset(data, split)
    n = len(dataset) if not limit else min(limit, len(dataset))
    if getattr(dataset, "num_classes", 0) < 2:
        raise UserError(f"{data.name} ({data.root}) has {getattr(dataset, 'num_classes', 0)} class(es): an extractor "
                        "is trained to tell classes apart, so it needs a dataset with at least 2")
    images, labels = [], []
    for i in tqdm(range(n), desc=f"reading {split}", leave=False):
        item = dataset[i]
        images.append(item["image"])
        labels.append(int(item["label"]))
    return torch.stack(images), torch.tensor(labels)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-name", default="imagefolder", choices=CHOICES["data.name"])
    parser.add_argument("--data-root", required=True, help="dataset root (imagefolder: the folder holding train/ and test/)")
    parser.add_argument("--resolution", type=int, required=True, help="the samples' resolution (images are resized to it)")
    parser.add_argument("--out", required=True, help="TorchScript file to write (a JSON report goes beside it)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--width", type=int, default=32, help="SmallConvNet width (features: 4 x width)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-limit", type=int, default=0, help="use the first N training images (0 = all)")
    parser.add_argument("--test-split", default="test", help="held-out split for the accuracy")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    if args.epochs < 1 or args.width < 1 or args.batch_size < 1 or args.resolution < 8:
        raise UserError("--epochs, --width and --batch-size must be positive and --resolution at least 8")
    data = DataConfig(name=args.data_name, root=args.data_root, resolution=args.resolution, download=False)
    train_x, train_y = load_split(data, "train", args.train_limit)
    test_x, test_y = load_split(data, args.test_split)
    net = train_classifier(train_x, train_y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           width=args.width, seed=args.seed)
    accuracy = float((predict(net, test_x).argmax(dim=1) == test_y).float().mean())
    train_accuracy = float((predict(net, train_x[:10000]).argmax(dim=1) == train_y[:10000]).float().mean())
    scripted = torch.jit.script(FeatureExtractor(net, args.resolution).eval())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: torch.jit.save(scripted, str(tmp)))
    report = {"extractor": str(out), "data": f"{args.data_name}:{args.data_root}", "resolution": args.resolution,
              "train_images": len(train_x), "test_images": len(test_x), "test_accuracy": accuracy,
              "train_accuracy_first_10k": train_accuracy, "epochs": args.epochs, "width": args.width,
              "feature_dim": 4 * args.width, "seed": args.seed,
              "figure_name": "FID (CIFAR-10 classifier features)" if "cifar" in args.data_root.lower()
              else f"FID ({args.data_name} classifier features)"}
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    print(f"test accuracy {accuracy:.4f} on {len(test_x)} {args.test_split} images (train, first 10k: {train_accuracy:.4f})")
    print(f"wrote {out} ({report['feature_dim']}-d features) and {out.with_suffix('.json')}; "
          f"use it as: python -m diffusion.evaluate fid --feature-extractor {out} ...")
    return report
