"""The noise-aware classifier p(y | x_t, t) of classifier guidance (Dhariwal & Nichol), and its task.

The network is ADM's half U-Net, assembled from diffusers blocks: the denoiser's down blocks
(ResNet blocks with timestep embedding, attention where the denoiser has it, downsampling), its
middle block, then attention or mean pooling to class logits. It is trained on x_t = q_sample(x_0, t)
with t uniform over the schedule of the denoiser it will guide (`diffusion:` in its config), by the
same loop as the denoiser (`task: classifier`), so it gets EMA, checkpoints and resume for free.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import AttentionPooling, TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn

from .config import Config, DataConfig, ModelConfig
from .errors import UserError
from .schedule import build_train_scheduler
from .training.tasks import register_task

PREVIEW_SAMPLES = 600  # held-out images per training-time accuracy report (60 per timestep bucket)
REPORT_NAME = "classifier_accuracy"


class NoisyClassifier(nn.Module):
    """Logits (B, num_classes) of the class of x_0 from a noisy image x_t at timestep t."""

    def __init__(self, cfg: ModelConfig, resolution: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        from .models.denoiser import unet_kwargs

        layout = unet_kwargs(cfg, resolution)
        channels = layout["block_out_channels"]
        groups, head_dim = layout["norm_num_groups"], layout["attention_head_dim"]
        time_dim = channels[0] * 4
        self.num_classes = num_classes
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim)
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        previous = channels[0]
        for i, (block_type, width) in enumerate(zip(layout["down_block_types"], channels)):
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layout["layers_per_block"], in_channels=previous, out_channels=width,
                temb_channels=time_dim, add_downsample=i < len(channels) - 1, resnet_eps=1e-5, resnet_act_fn="silu",
                resnet_groups=groups, attention_head_dim=head_dim, downsample_padding=1,
                resnet_time_scale_shift=layout["resnet_time_scale_shift"], dropout=layout["dropout"],
            ))
            previous = width
        self.mid_block = UNetMidBlock2D(
            in_channels=previous, temb_channels=time_dim, dropout=layout["dropout"], resnet_eps=1e-5,
            resnet_act_fn="silu", resnet_time_scale_shift=layout["resnet_time_scale_shift"],
            attention_head_dim=head_dim, resnet_groups=groups,
        )
        self.norm_out = nn.GroupNorm(groups, previous)
        self.pool = AttentionPooling(max(1, previous // head_dim), previous) if cfg.pool == "attention" else None
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h, temb)
        h = F.silu(self.norm_out(self.mid_block(h, temb)))
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        pooled = self.pool(tokens) if self.pool is not None else tokens.mean(dim=1)
        return self.head(pooled)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(labels | x_t, t), shape (B,)."""
        logits = self(x, t).float()
        return logits.log_softmax(dim=-1).gather(1, labels.view(-1, 1).to(logits.device)).squeeze(1)


def build_classifier(cfg: Config) -> NoisyClassifier:
    if cfg.model.num_classes < 2:
        raise UserError(
            f"a classifier needs at least 2 classes; the data has {cfg.model.num_classes} "
            "(for CelebA choose attributes, e.g. data.celeba_attributes=[Smiling])"
        )
    return NoisyClassifier(cfg.model, cfg.data.resolution, cfg.model.num_classes)


def held_out_split(data: DataConfig) -> str:
    """The split reserved for evaluation (image folders without a test/ folder reuse their images)."""
    if data.name == "imagefolder" and not (Path(data.root) / "test").is_dir():
        print(f"note: {data.root} has no test/ folder; accuracy is measured on training images")
    return "test"


@torch.no_grad()
def held_out_accuracy(model: NoisyClassifier, cfg: Config, num_samples: int, seed: int = 0,
                      batch_size: int = 256) -> list[dict]:
    """Accuracy on noised held-out images in 10 timestep buckets (`bucket_accuracy` rows).

    Images are a seeded random subset of the held-out split; timesteps are stratified so every
    bucket gets the same number of images; the noise is seeded, so reports are comparable across steps.
    """
    from .data import build_dataset
    from .evaluate.buckets import bucket_accuracy

    dataset = build_dataset(cfg.data, held_out_split(cfg.data))
    scheduler = build_train_scheduler(cfg.diffusion)
    total = scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    n = min(num_samples, len(dataset))
    indices = torch.randperm(len(dataset), generator=generator)[:n].tolist()
    timesteps = ((torch.arange(n) + 0.5) * total / n).long()[torch.randperm(n, generator=generator)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = []
    try:
        for start in range(0, n, batch_size):
            x0 = torch.stack([dataset[i]["image"] for i in indices[start:start + batch_size]])
            labels = torch.tensor([dataset[i]["label"] for i in indices[start:start + batch_size]])
            t = timesteps[start:start + len(x0)]
            x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
            logits = model(x_t.to(device), t.to(device))
            correct.append(logits.argmax(dim=-1).cpu() == labels)
    finally:
        model.train(was_training)
    return bucket_accuracy(torch.cat(correct), timesteps, total)


def summary_line(rows: list[dict]) -> str:
    """'acc by t: 0-99 0.98 | ... | mean 0.71' for logs and the training bar."""
    cells = " ".join(f"{r['accuracy']:.2f}" for r in rows)
    valid = [r["accuracy"] for r in rows if r["n"]]
    return f"held-out accuracy per t bucket (low t first): {cells} | mean {sum(valid) / max(1, len(valid)):.3f}"


class ClassifierTask:
    """Cross-entropy on x_t = q_sample(x_0, t), t uniform over the denoiser's schedule."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.scheduler = build_train_scheduler(cfg.diffusion)

    def build_model(self) -> NoisyClassifier:
        return build_classifier(self.cfg)

    def loss(self, model, core, batch):
        x0, labels = batch["image"], batch["label"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        if self.cfg.train.channels_last and x0.is_cuda:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        logits = model(x_t, t).float()
        loss = F.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(dim=-1) == labels).float().mean().detach()}

    def report(self, core: NoisyClassifier, out_dir: Path, name: str, title: str) -> list[dict]:
        from .evaluate.buckets import write_bucket_report

        rows = held_out_accuracy(core, self.cfg, PREVIEW_SAMPLES)
        write_bucket_report(rows, out_dir, name, title, chance=1 / self.cfg.model.num_classes)
        return rows

    def preview(self, core, step, run_dir):
        """Held-out accuracy per timestep bucket: RUN/diagnostics/classifier_accuracy-step-N.{csv,png}."""
        from tqdm.auto import tqdm

        rows = self.report(core, run_dir / "diagnostics", f"{REPORT_NAME}-step-{step:06d}",
                           f"noisy classifier, step {step}")
        tqdm.write(f"step {step}: {summary_line(rows)}")

    def export(self, core, out_dir):
        """`classifier.safetensors` (load with NoisyClassifier + config.yaml) and the final accuracy report."""
        from safetensors.torch import save_file

        from .training.checkpoint import named_weights

        save_file(named_weights(core), str(out_dir / "classifier.safetensors"))
        self.report(core, out_dir, REPORT_NAME, "noisy classifier, final")


register_task("classifier", ClassifierTask)
