"""A tiny edm run end to end: it trains, resumes bit for bit, samples with CFG and with classifier
guidance, in-paints, and exports a diffusers pipeline that samples it with diffusers' EDM schedulers."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusion.checkpoints import store as ckpt
from diffusion.checkpoints.load import load_model
from diffusion.cli.sample import main as sample_main
from diffusion.conditioning.inpaint.methods import run_inpainting
from diffusion.sampling.guidance import ClassifierFreeGuidance
from diffusion.sampling.loop import Guidance, Trajectory, sample_loop, seeded_noise
from diffusion.sampling.plan import SamplerSettings
from diffusion.sampling.samplers import build_sampler
from diffusion.sampling.schedule import EDMSchedule
from diffusion.training.trainer import train
from tests.conftest import tiny_config

EDM = ["diffusion.formulation=edm", "sample.sampler=heun", "sample.steps=3"]
CLASSIFIER = ["model.base_channels=8", "model.attention_resolutions=[4]", "model.pool=mean", "train.batch_size=16",
              "train.lr=0.003", "train.ema_decay=0.9", "train.checkpoint_every=1000", "train.max_steps=6"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A class-conditional edm denoiser (4 steps; checkpoints at 2 and 4) and an edm classifier (6 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("edm")
    train(tiny_config(root / "den", "train.max_steps=4", *EDM))
    train(tiny_config(root / "clf", *CLASSIFIER, "diffusion.formulation=edm", config="configs/classifier_shapes.yaml"))
    yield {"den": root / "den", "clf": root / "clf"}
    torch.set_num_threads(threads)


def test_the_checkpoint_records_the_formulation_and_resumes_bit_for_bit(runs, tmp_path):
    loaded = load_model(runs["den"])
    assert loaded.cfg.diffusion.formulation == "edm" and isinstance(loaded.schedule, EDMSchedule)
    losses = [float(row.split(",")[1]) for row in (runs["den"] / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and all(math.isfinite(v) and 0 < v < 10 for v in losses)
    split = tmp_path / "split"
    train(tiny_config(split, "train.max_steps=2", *EDM))
    train(tiny_config(split, "train.max_steps=4", *EDM), resume="auto")
    a, b = (load_file(str(run / "final" / ckpt.EMA_FILE)) for run in (runs["den"], split))
    assert all(torch.equal(a[name], b[name]) for name in a)


def pngs(out: Path) -> list[Image.Image]:
    return [Image.open(p) for p in sorted(out.glob("sample_*.png"))]


def test_sample_py_with_cfg_heun_and_dpm_solver(runs, tmp_path):
    base = ["--checkpoint", str(runs["den"]), "--class-label", "3", "--num-samples", "2", "--steps", "3"]
    sample_main([*base, "--guidance-scale", "3", "--out", str(tmp_path / "cfg")])
    sample_main([*base, "--guidance-scale", "1", "--out", str(tmp_path / "plain")])
    sample_main([*base, "--sampler", "dpmsolver", "--churn", "0", "--out", str(tmp_path / "dpm")])
    guided, plain = pngs(tmp_path / "cfg"), pngs(tmp_path / "plain")
    assert guided[0].text["sampler"] == "heun" and guided[0].text["sigma_max"] == "80" and guided[0].text["label"] == "3"
    assert guided[0].tobytes() != plain[0].tobytes()  # the scale is used
    assert pngs(tmp_path / "dpm")[0].text["sampler"] == "dpmsolver"


def test_classifier_guidance_reads_the_denoisers_noise_level_through_the_preconditioning(runs, tmp_path, monkeypatch):
    """The edm classifier sees c_noise = ln(sigma) / 4 of the very levels Heun visits (both evaluations
    of each step), and its gradient changes the samples."""
    from diffusion.models import NoisyClassifier

    assert load_model(runs["clf"]).cfg.diffusion.formulation == "edm"
    seen, forward = [], NoisyClassifier.forward
    monkeypatch.setattr(NoisyClassifier, "forward", lambda self, x, t: seen.append(float(t[0])) or forward(self, x, t))
    base = ["--checkpoint", str(runs["den"]), "--class-label", "1", "--num-samples", "1", "--steps", "3",
            "--guidance-scale", "1"]
    sample_main([*base, "--classifier", str(runs["clf"]), "--classifier-scale", "30", "--out", str(tmp_path / "g")])
    sample_main([*base, "--out", str(tmp_path / "u")])
    sigmas = [float(s.t) for s in build_sampler(load_model(runs["den"]).schedule, "heun", 3).steps]
    expected = [sigmas[0], sigmas[1], sigmas[1], sigmas[2], sigmas[2]]  # Heun's second points included
    assert seen == pytest.approx([math.log(s) / 4 for s in expected], rel=1e-5)
    assert pngs(tmp_path / "g")[0].tobytes() != pngs(tmp_path / "u")[0].tobytes()
    assert pngs(tmp_path / "g")[0].text["classifier_scale"] == "30"


@pytest.mark.parametrize("method,sampler", [("replace", "heun"), ("repaint", "euler")])
def test_inpainting_keeps_the_known_pixels(runs, method, sampler):
    loaded = load_model(runs["den"])
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    keeps = torch.zeros(2, 1, 8, 8)
    keeps[:, :, :, :4] = 1
    conds = [{"labels": torch.tensor([i])} for i in range(2)]
    out = run_inpainting(loaded, images, keeps, method, SamplerSettings(sampler, 3, 1.0, batch_size=2), conds=conds,
                         jump_length=1, jump_n_sample=2)
    assert torch.equal(out[:, :, :, :4], images[:, :, :, :4]) and torch.isfinite(out).all()
    assert not torch.equal(out[:, :, :, 4:], images[:, :, :, 4:])


def test_the_export_loads_with_diffusers_edm_schedulers(runs):
    """`final/` loads as a pipeline whose scheduler is EDMDPMSolverMultistepScheduler and which samples
    the edm run as sample.py does (Heun by default); and the U-Net with EDMEulerScheduler in a plain
    diffusers loop draws, from the same noise, what our Euler sampler draws on the same sigmas (no x0 clip)."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    from diffusion.pipeline import GuidedDiffusionPipeline

    pipe = GuidedDiffusionPipeline.from_pretrained(runs["den"] / "final")
    assert isinstance(pipe.scheduler, EDMDPMSolverMultistepScheduler) and pipe.scheduler.config.sigma_data == 0.5
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[2], guidance_scale=1.0, num_inference_steps=3, seed=5, output_type="pt").images
    loaded = load_model(runs["den"] / "final")
    noise, generators = seeded_noise((3, 8, 8), [5])
    model_fn = ClassifierFreeGuidance(loaded.model, {"labels": torch.tensor([2])}, {"labels": torch.tensor([12])}, 1.0)
    with torch.no_grad():
        ours = sample_loop(model_fn, Trajectory(loaded.schedule, build_sampler(loaded.schedule, "heun", 3), generators), noise)
    torch.testing.assert_close(images, (ours.clamp(-1, 1) / 2 + 0.5), atol=1e-5, rtol=0)

    scheduler = EDMEulerScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = pipe.unet(scheduler.scale_model_input(x, t), t, class_labels=torch.tensor([2])).sample
            x = scheduler.step(out, t, x).prev_sample
    trajectory = Trajectory(loaded.schedule, build_sampler(loaded.schedule, "euler", 4), generators, Guidance(x0=None))
    with torch.no_grad():
        ours = sample_loop(model_fn, trajectory, noise)
    torch.testing.assert_close(ours, x, atol=2e-4, rtol=0)
