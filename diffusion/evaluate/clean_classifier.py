"""A small clean (noise-free) CNN classifier trained on real images.

It is an independent judge of samples: it never sees noise and is never used for guidance, so a
guided sample cannot score well by exploiting the guide's own mistakes (benchmarks/guidance_realdata.py
judges CelebA attributes with it). Its penultimate layer also serves as a feature extractor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class SmallConvNet(nn.Module):
    """Three conv stages (width, 2 width, 4 width) with average pooling, then a linear head: small
    enough to train in minutes on a CPU at 16 to 32 px."""

    def __init__(self, outputs: int, width: int = 32, dropout: float = 0.2):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, outputs))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 4 width) features of images in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(images: torch.Tensor, targets: torch.Tensor, epochs: int = 40, batch_size: int = 64,
                     lr: float = 2e-3, width: int = 32, seed: int = 0, progress: bool = True) -> SmallConvNet:
    """A `SmallConvNet` fitted to images (N, 3, H, W) in [-1, 1] with horizontal flips.

    `targets` (N,) integer classes are fitted with cross-entropy; (N, K) 0/1 floats (attributes) with
    one sigmoid per column. AdamW with a one-cycle schedule; seeded, so a rerun gives the same net.
    """
    multilabel = targets.ndim == 2
    outputs = targets.shape[1] if multilabel else int(targets.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallConvNet(outputs, width)
    per_epoch = -(-len(images) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * per_epoch)
    loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    model.train()
    for _ in tqdm(range(epochs), desc="judge", leave=False, disable=not progress):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            index = order[start:start + batch_size]
            batch = images[index]
            flip = torch.rand(len(index), generator=generator) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            loss = loss_fn(model(batch), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits for images in [-1, 1], in batches."""
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
