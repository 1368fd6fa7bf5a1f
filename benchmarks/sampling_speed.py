"""Sampling speed against quality: ddpm(1000), ddim(10/20/50/100), dpmsolver(10/20) and heun(10/18) on one checkpoint.

Heun's n steps cost 2n - 1 network evaluations (heun:18 = 35, EDM's setting); the table's
"model evals/image" column counts them (times two under classifier-free guidance).

Speed is images/s and s/image over the whole set (same seeds and classes for every setting).
Quality is shapes accuracy (the pixel detector reads each sample's colour and shape; a
class-conditional shapes model), and/or FID/KID against the model's training data when a feature
extractor is given (--feature-extractor TORCHSCRIPT or --inception-weights FILE / --inception).

  python benchmarks/sampling_speed.py --checkpoint runs/shapes
  python benchmarks/sampling_speed.py --checkpoint runs/shapes --settings ddim:20,dpmsolver:20 --num-samples 24
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)


DEFAULT_SETTINGS = "ddpm:1000,ddim:10,ddim:20,ddim:50,ddim:100,dpmsolver:10,dpmsolver:20,heun:10,heun:18"


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/shapes", help="run directory or checkpoint")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated SAMPLER:STEPS")
    parser.add_argument("--num-samples", type=int, default=None, help="images per setting (default GPU 1200, CPU 48)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: all samples in one batch, at most 400")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the run's config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default GPU bf16 autocast, CPU fp32")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default on GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser (compiled once, warm-up untimed)")
    parser.add_argument("--feature-extractor", default=None, help="TorchScript features for FID/KID per setting")
    parser.add_argument("--inception-weights", default=None, help="FID Inception weights file for FID/KID per setting")
    parser.add_argument("--inception", action="store_true", help="FID/KID with the (downloaded) Inception weights")
    parser.add_argument("--reference-num", type=int, default=0, help="reference images for FID (0 = all)")
    parser.add_argument("--json", default=None)
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported (0.1 s, not 10-30 s)
    build_parser().parse_args()

import torch  # noqa: E402
from benchmarks.common import header, parse_list, set_threads, table, timed, write_json  # noqa: E402
from diffusion.checkpoints.load import load_model  # noqa: E402
from diffusion.device import compile_model, pick_device, use_fast_cuda_math  # noqa: E402
from diffusion.sampling.images import to_uint8  # noqa: E402
from diffusion.sampling.plan import SampleItem, SamplerSettings, SamplingPlan, run_plan, sigma_options  # noqa: E402
from diffusion.sampling.samplers import network_evaluations  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    gpu = pick_device(args.device).type == "cuda"
    args.num_samples = args.num_samples or (1200 if gpu else 48)
    args.batch_size = args.batch_size or min(args.num_samples, 400)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.channels_last = gpu if args.channels_last is None else args.channels_last
    settings = []
    for spec in parse_list(args.settings):
        sampler, _, steps = spec.partition(":")
        if not steps.isdigit():
            parser.error(f"--settings entries are SAMPLER:STEPS, got '{spec}'")
        settings.append((sampler, int(steps)))
    args.settings = settings
    return args


def plan_for(model: torch.nn.Module, n: int, seed: int) -> SamplingPlan:
    """Fixed seeds; classes cycle for a class-conditional model (preview_condition)."""
    items = []
    for i in range(n):
        cond = model.preview_condition(i) if hasattr(model, "preview_condition") else {}
        label = int(cond["labels"][0]) if "labels" in cond else None
        items.append(SampleItem(seed=seed + i, cond=cond, label=label))
    return SamplingPlan(items)


def shapes_accuracy(images: torch.Tensor, plan: SamplingPlan) -> float:
    from diffusion.data.shapes import detect_label

    return sum(detect_label(img) == item.label for img, item in zip(images, plan.items)) / len(images)


class FidScorer:
    """FID/KID of a batch of samples against the checkpoint's training data (cached statistics)."""

    def __init__(self, args: argparse.Namespace, loaded, device: torch.device):
        from diffusion.evaluate.extractors import build_extractor
        from diffusion.evaluate.reference import default_cache_dir, reference_config, reference_stats

        self.extractor = build_extractor(args.feature_extractor, args.inception_weights, "tf1", device)
        data = reference_config(None, None, None, loaded.cfg.data, loaded.cfg.data.resolution)
        self.reference, self.info = reference_stats(data, args.reference_num, self.extractor, default_cache_dir(),
                                                    batch_size=100, workers=0)

    def __call__(self, images: torch.Tensor) -> dict:
        from diffusion.evaluate.feature_stats import accumulate, scores

        uint8 = to_uint8(images)  # the values a PNG would hold
        batches = (self.extractor(uint8[i:i + 100]) for i in range(0, len(uint8), 100))
        result = scores(self.reference, accumulate(batches, len(uint8)), subsets=50)
        return {"FID": result["fid"], "KID": result["kid_mean"]}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    set_threads(args.threads)
    use_fast_cuda_math(device)
    loaded = load_model(args.checkpoint, device)
    model = loaded.model
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        loaded.model = compile_model(model)
    scale = loaded.cfg.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
    conditional = getattr(model, "condition", "none") != "none"
    use_accuracy = loaded.cfg.data.name == "shapes" and getattr(model, "condition", None) == "class"
    fid = FidScorer(args, loaded, device) if (args.feature_extractor or args.inception_weights or args.inception) else None
    plan = plan_for(model, args.num_samples, args.seed)
    print(f"# sampling speed: {loaded.path} (step {loaded.info.step}, {loaded.cfg.data.resolution}px), "
          f"{args.num_samples} images per setting, batch {args.batch_size}, guidance {scale}")
    print(f"# {header(device)}; {args.dtype}, channels_last {args.channels_last}, compile {args.compile}")

    def sample(sampler: str, steps: int, items_plan: SamplingPlan) -> torch.Tensor:
        settings = SamplerSettings(sampler, steps, scale, args.batch_size, args.dtype, sigma_options(loaded.cfg.sample))
        return run_plan(loaded, items_plan, settings, bar=False)

    warm = SamplingPlan(plan.items[:args.batch_size])
    timed(lambda: sample("ddim", 2, warm), device, 1)  # first-call costs (and compilation) stay out of the table
    rows = []
    for sampler, steps in args.settings:
        images = []
        seconds = timed(lambda: images.append(sample(sampler, steps, plan)), device, 1)[0]
        evals = network_evaluations(sampler, steps) * (2 if conditional and scale not in (0, 1) else 1)
        row = {"sampler": sampler, "steps": steps, "model evals/image": evals, "images/s": args.num_samples / seconds,
               "s/image": seconds / args.num_samples}
        if use_accuracy:
            row["accuracy"] = shapes_accuracy(images[0], plan)
        if fid:
            row.update(fid(images[0]))
        rows.append(row)
        print(f"  {sampler} {steps}: {row['images/s']:.2f} images/s"
              + (f", accuracy {row['accuracy']:.3f}" if "accuracy" in row else "")
              + (f", FID {row['FID']:.3f}" if "FID" in row else ""), flush=True)
    base = rows[0]
    for row in rows:
        row["speed-up"] = row["images/s"] / base["images/s"]
        if "accuracy" in row:
            row["accuracy - first"] = row["accuracy"] - base["accuracy"]
        if "FID" in row:
            row["FID / first"] = row["FID"] / base["FID"] if base["FID"] else None
    columns = ["sampler", "steps", "model evals/image", "images/s", "s/image", "speed-up", "accuracy",
               "accuracy - first", "FID", "FID / first", "KID"]
    columns = [c for c in columns if any(c in r for r in rows)]
    print()
    print(table(rows, columns))
    print(f"\nspeed-up and differences are against the first setting ({base['sampler']} {base['steps']}).")
    write_json(args.json, {"header": header(device), "checkpoint": str(loaded.path), "guidance_scale": scale,
                           "num_samples": args.num_samples, "rows": rows})
    return rows


if __name__ == "__main__":
    from diffusion.errors import exit_on_user_error

    exit_on_user_error(main)()  # bad input (a missing run, --steps out of range): one line, exit status 2
