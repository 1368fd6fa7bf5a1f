"""RUN/final loads as a diffusers DiffusionPipeline that samples with class or caption CFG, exactly as
sample.py does (same code, same per-sample seeds), also from runs exported before that was so."""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffusion.pipeline import GuidedDiffusionPipeline
from diffusion.cli.sample import main as sample_main
from tests.conftest import tiny_config


def sample_py(run, out, *argv: str) -> list[np.ndarray]:
    """The PNGs `sample.py` writes for `argv`, as uint8 arrays."""
    folder = sample_main.__wrapped__(["--checkpoint", str(run), "--out", str(out), *argv])
    return [np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("sample_*.png"))]


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def test_pipeline_draws_what_sample_py_draws(tiny_run, tmp_path):
    """Pixel for pixel (uint8, CPU, fp32): the pipeline runs sample.py's own loop (x0 clipped and eps
    re-derived from it, trailing timesteps) on the same EMA weights with the same per-sample noise, so
    no tolerance is needed. 3 steps of a 100-step schedule: t = 99, 66, 32, which diffusers' DDIM step
    (t - T // n) would not visit in that order; and x0 leaves [-1, 1] at t = 99, so clipping matters."""
    pipe = GuidedDiffusionPipeline.from_pretrained(tiny_run / "final")
    pipe.set_progress_bar_config(disable=True)
    for scale in (3.0, 0.0):
        expected = sample_py(tiny_run, tmp_path / f"s{scale}", "--class-label", "2", "--guidance-scale", str(scale),
                             "--sampler", "ddim", "--steps", "3", "--num-samples", "4", "--seed", "5")
        got = pixels(pipe(class_labels=[2] * 4, guidance_scale=scale, num_inference_steps=3, seed=5).images)
        assert len(got) == 4 and all(np.array_equal(a, b) for a, b in zip(got, expected)), scale
    # one generator per sample, seeded as sample.py seeds them, is the same as seed=
    generators = [torch.Generator().manual_seed(5 + i) for i in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(
        pixels(pipe(class_labels=[2] * 4, guidance_scale=0.0, num_inference_steps=3, generator=generators).images),
        expected))
    dpm = sample_py(tiny_run, tmp_path / "dpm", "--class-label", "7", "--guidance-scale", "2", "--sampler", "dpmsolver",
                    "--steps", "4", "--num-samples", "2", "--seed", "0")
    assert all(np.array_equal(a, b) for a, b in zip(pixels(pipe(
        class_labels=[7, 7], guidance_scale=2.0, num_inference_steps=4, seed=0, sampler="dpmsolver").images), dpm))


def test_runs_exported_before_the_fix_sample_the_same(tiny_run, tmp_path):
    """Old exports saved the DDPM training scheduler as it was: clip_sample true, "leading" spacing, and
    no `_sampling_rules` in model_index.json. The pipeline then reads only the schedule from it, so those
    settings change nothing."""
    old = tmp_path / "final"
    shutil.copytree(tiny_run / "final", old)
    index = json.loads((old / "model_index.json").read_text())
    assert index.pop("_sampling_rules") == "scheduler"  # what exports write now
    (old / "model_index.json").write_text(json.dumps(index))
    config_file = old / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    assert config["timestep_spacing"] == "trailing"  # the run's own spacing
    config.update(clip_sample=True, timestep_spacing="leading")
    config_file.write_text(json.dumps(config))
    draw = dict(class_labels=[2, 2], guidance_scale=3.0, num_inference_steps=3, seed=1, output_type="pt")
    new_images = GuidedDiffusionPipeline.from_pretrained(tiny_run / "final")(**draw).images
    old_images = GuidedDiffusionPipeline.from_pretrained(old)(**draw).images
    assert torch.equal(new_images, old_images)


def test_export_carries_the_runs_sampling_rules(tmp_path):
    """A run with its own rules (leading timesteps + offset, no x0 clipping, beta_t variance) exports them,
    so the pipeline (DDIM and DDPM) draws what sample.py draws, pixel for pixel; a wrong reading of any of
    the three rules would move the images."""
    from diffusion.training.trainer import train

    run = tmp_path / "run"
    train(tiny_config(run, "train.max_steps=2", "diffusion.timestep_spacing=leading", "diffusion.steps_offset=1",
                      "diffusion.clip_sample=false", "diffusion.variance_type=fixed_large"))
    config = json.loads((run / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert (config["timestep_spacing"], config["steps_offset"], config["clip_sample"]) == ("leading", 1, False)
    pipe = GuidedDiffusionPipeline.from_pretrained(run / "final")
    pipe.set_progress_bar_config(disable=True)
    for sampler in ("ddim", "ddpm"):
        expected = sample_py(run, tmp_path / sampler, "--class-label", "2", "--guidance-scale", "3", "--sampler",
                             sampler, "--steps", "3", "--num-samples", "2", "--seed", "4")
        got = pixels(pipe(class_labels=[2, 2], guidance_scale=3.0, num_inference_steps=3, seed=4, sampler=sampler).images)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), sampler


def test_class_run_final_is_a_pipeline(tiny_run):
    pipe = GuidedDiffusionPipeline.from_pretrained(tiny_run / "final")
    assert isinstance(pipe, DiffusionPipeline) and pipe.text_encoder is None
    pipe.set_progress_bar_config(disable=True)

    def draw(**kwargs):
        return pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(0), **kwargs).images

    images = draw(class_labels=[2, 5], guidance_scale=3.0)
    assert len(images) == 2 and images[0].size == (8, 8)
    again = draw(class_labels=[2, 5], guidance_scale=3.0)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))  # seeded
    guided = draw(class_labels=[2, 5], guidance_scale=3.0, output_type="pt")
    plain = draw(class_labels=[2, 5], guidance_scale=1.0, output_type="pt")
    unconditional = draw(class_labels=[2, 5], guidance_scale=0.0, output_type="pt")
    null = draw(batch_size=2, output_type="pt")  # no labels: the learned null class
    assert guided.shape == (2, 3, 8, 8) and not torch.equal(guided, plain)
    torch.testing.assert_close(unconditional, null)
    with pytest.raises(ValueError, match=r"class_labels\[0\] 12 is out of range: this model has classes 0..11"):
        pipe(class_labels=[12], num_inference_steps=2)


def test_caption_run_final_is_a_pipeline(tmp_path):
    from diffusion.training.trainer import train

    text = ["model.text.width=16", "model.text.layers=1", "model.text.context_length=8", "train.max_steps=2"]
    train(tiny_config(tmp_path, *text, config="configs/shapes_text.yaml"))
    pipe = GuidedDiffusionPipeline.from_pretrained(tmp_path / "final")
    assert pipe.text_encoder is not None
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["a red circle", "a blue square"], guidance_scale=3.0, num_inference_steps=2,
               generator=torch.Generator().manual_seed(1), output_type="np").images
    assert out.shape == (2, 8, 8, 3) and np.isfinite(out).all()
    expected = sample_py(tmp_path, tmp_path / "s", "--prompt", "a red circle", "--guidance-scale", "3", "--sampler", "ddim",
                         "--steps", "3", "--num-samples", "2", "--seed", "4")
    got = pixels(pipe(prompt=["a red circle"] * 2, guidance_scale=3.0, num_inference_steps=3, seed=4).images)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
