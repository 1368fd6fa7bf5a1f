"""The noise-aware CLIP of GLIDE: open_clip towers whose image side sees x_t and t, and its training task.

`task: clip` trains it contrastively (open_clip's ClipLoss) on (x_t, caption) pairs from any
captioned dataset, in the shared accelerate loop with EMA and checkpoints. Its gradient
d/dx_t [f(x_t, t) . g(c)] then means something at every noise level, which is what CLIP-guided
sampling (diffusion/features/clip.py) needs. Previews write image->text retrieval accuracy per
timestep bucket on held-out data (CSV + PNG).
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from .config import Config
from .errors import UserError
from .models.text import tokenize
from .schedule import build_train_scheduler
from .training.tasks import register_task

DIAGNOSTICS_DIR = "diagnostics"
REPORT_NAME = "clip_retrieval"


class NoisyCLIP(nn.Module):
    """An open_clip CLIP (small ViT image tower, transformer text tower) conditioned on the timestep.

    Timestep embedding: an added bias on the patch tokens. The sinusoidal embedding of t goes
    through an MLP to the ViT width and is added to every patch token right after the patch
    convolution, before the class token and positional embeddings are attached. Why a bias and
    not an extra token: every token carries the noise level from the first layer on (like the
    per-block time bias of a U-Net), rather than learning it only through attention to one token;
    and the open_clip tower is left as it is (same sequence length, positional table and
    state-dict keys), so it is built and loaded by open_clip unchanged. The bias enters through a
    forward hook on `visual.conv1` that reads the embedding set by `encode_image`.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        res, vision, text = cfg.data.resolution, cfg.model.vision, cfg.model.text
        if res % vision.patch_size:
            raise UserError(f"model.vision.patch_size={vision.patch_size} must divide data.resolution={res}")
        if vision.width % vision.head_width:
            raise UserError(f"model.vision.width={vision.width} must be a multiple of "
                            f"model.vision.head_width={vision.head_width}")
        self.context_length = text.context_length
        self.clip = open_clip.CLIP(
            embed_dim=cfg.model.embed_dim,
            vision_cfg=CLIPVisionCfg(layers=vision.layers, width=vision.width, head_width=vision.head_width,
                                     patch_size=vision.patch_size, image_size=res),
            text_cfg=CLIPTextCfg(context_length=text.context_length, width=text.width, heads=text.heads,
                                 layers=text.layers),
        )
        self.time_proj = Timesteps(vision.width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(vision.width, vision.width)
        self._time_bias: torch.Tensor | None = None
        self.clip.visual.conv1.register_forward_hook(self._add_time_bias)

    def _add_time_bias(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._time_bias is None:
            raise RuntimeError("NoisyCLIP's image tower needs the timestep: call encode_image(x_t, t)")
        return output + self._time_bias[:, :, None, None].to(output.dtype)

    def encode_image(self, x: torch.Tensor, t: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings (B, embed_dim) of noisy images x_t at integer timesteps t (B,)."""
        emb = self.time_proj(t.reshape(-1).expand(x.shape[0]))
        self._time_bias = self.time_embed(emb.to(self.time_embed.linear_1.weight.dtype))
        try:
            return self.clip.encode_image(x, normalize=normalize)
        finally:
            self._time_bias = None

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        device = self.clip.logit_scale.device
        return tokenize(texts, self.context_length).to(device)

    def encode_prompts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(texts))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def similarity(self, x: torch.Tensor, t: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """logit_scale * cos(f(x_t, t), g(c)) per sample (B,): the contrastive logit, used as log p(c | x_t)."""
        return self.logit_scale * (self.encode_image(x, t) * text_features).sum(-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features, logit scale), as open_clip's CLIP returns them."""
        return self.encode_image(x, t), self.encode_text(tokens), self.logit_scale


def drop_words(captions: list[str], prob: float) -> list[str]:
    """Caption augmentation (train.caption_word_drop): each word but the first dropped with probability
    `prob`, so long captions (CelebA's attribute lists) also teach their partial descriptions."""
    if prob <= 0:
        return list(captions)
    out = []
    for caption in captions:
        words = caption.split()
        keep = torch.rand(len(words)) >= prob
        keep[0] = True
        out.append(" ".join(w for w, k in zip(words, keep.tolist()) if k))
    return out


def retrieval_hits(logits: torch.Tensor, candidates: list[str], right: list[set[str]]) -> torch.Tensor:
    """Whether each row's top-scoring candidate caption is one of its right captions."""
    return torch.tensor([candidates[j] in ok for j, ok in zip(logits.argmax(dim=1).tolist(), right)])


def right_captions(captions: list[str], labels: list[int], by_label: bool) -> list[set[str]]:
    """The captions that count as a right retrieval for each image: any caption of an image of its
    class when classes exist (template captions vary in wording, not content), else its own."""
    if not by_label:
        return [{c} for c in captions]
    of_label: dict[int, set[str]] = {}
    for caption, label in zip(captions, labels):
        of_label.setdefault(label, set()).add(caption)
    return [of_label[label] for label in labels]


class ClipTask:
    """Contrastive training of NoisyCLIP on (x_t, caption) pairs with t uniform over the schedule.

    In-batch negatives are per device (ClipLoss without feature gathering). Captions that repeat
    inside a batch count as negatives of each other, as in open_clip's own training: on a dataset
    of few distinct captions this only raises the loss's floor.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.scheduler = build_train_scheduler(cfg.diffusion)
        self.loss_fn = open_clip.ClipLoss()

    def build_model(self) -> NoisyCLIP:
        return NoisyCLIP(self.cfg)

    def loss(self, model, core, batch):
        x0 = batch["image"]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.scheduler.add_noise(x0, torch.randn_like(x0), t)
        captions = drop_words(batch["caption"], self.cfg.train.caption_word_drop)
        image, text, scale = model(x_t, t, core.tokenize(captions))
        return self.loss_fn(image.float(), text.float(), scale.float()), {}

    def preview(self, core, step, run_dir):
        rows, chance = retrieval_buckets(core, self.cfg)
        write_report(rows, chance, Path(run_dir) / DIAGNOSTICS_DIR, f"{REPORT_NAME}_step-{step:06d}")

    def export(self, core, out_dir):
        """Nothing beyond the checkpoint: the towers are not usable without the timestep embedding."""


@torch.no_grad()
def retrieval_buckets(model: NoisyCLIP, cfg: Config, num_samples: int = 1000, buckets: int = 10, seed: int = 0,
                      batch_size: int = 250, split: str = "test") -> tuple[list[dict], float]:
    """Image->text retrieval accuracy of held-out x_t per timestep bucket, and the chance level.

    Each image is noised at a t stratified over the buckets and retrieves among the distinct
    captions of the evaluated images. It is right when the best caption is one of an image of its
    class (for datasets with classes; "a red circle" and "a small red circle" both describe a red
    circle), else when it is its own caption. Chance: the expected accuracy of a random caption.
    """
    from .data import build_dataset
    from .evaluate.buckets import bucket_accuracy

    dataset = build_dataset(cfg.data, split)
    gen = torch.Generator().manual_seed(seed)
    n = min(num_samples, len(dataset))
    indices = torch.randperm(len(dataset), generator=gen)[:n].tolist()
    total = cfg.diffusion.num_train_timesteps
    width = total / buckets
    t = ((torch.arange(n) % buckets) * width + torch.rand(n, generator=gen) * width).long().clamp(max=total - 1)
    scheduler = build_train_scheduler(cfg.diffusion)
    items = [dataset[i] for i in indices]
    captions = [item["caption"] for item in items]
    candidates = sorted(set(captions))
    right = right_captions(captions, [int(item["label"]) for item in items], getattr(dataset, "num_classes", 0) > 1)
    device = model.logit_scale.device
    was_training = model.training
    model.eval()
    try:
        text = model.encode_prompts(candidates)
        correct = []
        for start in range(0, n, batch_size):
            x0 = torch.stack([item["image"] for item in items[start:start + batch_size]])
            tb = t[start:start + batch_size]
            x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), tb)
            image = model.encode_image(x_t.to(device), tb.to(device))
            correct.append(retrieval_hits(image @ text.T, candidates, right[start:start + batch_size]))
    finally:
        model.train(was_training)
    chance = sum(len(ok) for ok in right) / (n * len(candidates))
    return bucket_accuracy(torch.cat(correct), t, total, buckets), chance


def write_report(rows: list[dict], chance: float, out_dir: Path, name: str) -> tuple[Path, Path]:
    from .evaluate.buckets import write_bucket_report

    title = f"CLIP image->text retrieval (chance {chance:.3f})"
    return write_bucket_report(rows, out_dir, name, title)


register_task("clip", ClipTask)
