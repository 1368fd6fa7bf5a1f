"""Autoguidance (Karras et al. 2024): eps = eps_guide + w (eps_main - eps_guide), both models given the
same condition; known answers on exact Gaussian denoisers, on tiny runs, through sample.py, the
pipeline and the demo; and the one-line refusals of guides that cannot pair."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.cli.sample import main as sample_main
from diffusion.config import DiffusionConfig
from diffusion.sampling.autoguide import autoguided
from diffusion.sampling.guidance import CFGOptions
from diffusion.sampling.loop import Guidance, Trajectory, sample_loop, seeded_noise
from diffusion.sampling.samplers import build_sampler
from diffusion.sampling.schedule import EDMSchedule, NoiseSchedule
from benchmarks.hostile_autoguide import fresh_checkpoint
from tests.conftest import cli_result

SHAPE = (3, 4, 4)


def exact_x0(x: torch.Tensor, ab: torch.Tensor, mu: float, std: float) -> torch.Tensor:
    """E[x0 | x_t] for data ~ N(mu, std^2 I), x_t = sqrt(ab) x0 + sqrt(1 - ab) n (VP form), in float64."""
    x, ab = x.double(), ab.double()
    return mu + std**2 * ab.sqrt() * (x - ab.sqrt() * mu) / (ab * std**2 + 1 - ab)


def exact_eps(x: torch.Tensor, ab: torch.Tensor, mu: float, std: float) -> torch.Tensor:
    x, ab = x.double(), ab.double()
    return (x - ab.sqrt() * exact_x0(x, ab, mu, std)) / (1 - ab).sqrt()


class GaussianDDPM(torch.nn.Module):
    """The exact network output (eps or v, the schedule's prediction type) of N(mu, std^2 I) data."""

    def __init__(self, schedule: NoiseSchedule, mu: float, std: float):
        super().__init__()
        self.schedule, self.mu, self.std = schedule, mu, std

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        ab = self.schedule.alpha_bar(t).double()
        eps = exact_eps(x, ab, self.mu, self.std)
        if self.schedule.prediction_type == "v_prediction":
            return (ab.sqrt() * eps - (1 - ab).sqrt() * exact_x0(x, ab, self.mu, self.std)).float()
        return eps.float()


class GaussianEDM(torch.nn.Module):
    """EDM's network F for N(mu, std^2 I) data under its schedule's sigma_data: it reads (c_in x_sigma,
    c_noise) and undoes the preconditioning, so each model's own `network_input`/`to_epsilon` matter."""

    def __init__(self, schedule: EDMSchedule, mu: float, std: float):
        super().__init__()
        self.schedule, self.mu, self.std = schedule, mu, std

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, **cond) -> torch.Tensor:
        sigma = (4 * c_noise.double()).exp().view(-1, 1, 1, 1)
        c_skip, c_out, c_in = self.schedule.coefficients(sigma)
        x_sigma = x_in.double() / c_in
        denoised = self.mu + self.std**2 / (self.std**2 + sigma**2) * (x_sigma - self.mu)
        return ((denoised - c_skip * x_sigma) / c_out).float()


DDPM = NoiseSchedule.from_config(DiffusionConfig(beta_schedule="cosine"))
DDPM_V = NoiseSchedule(DDPM.table[:-1], "v_prediction")  # the same noise levels, another parameterisation
EDM, EDM_GUIDE = EDMSchedule(sigma_data=0.5), EDMSchedule(sigma_data=0.8)  # sigma_data may differ


def gaussian_pair(formulation: str):
    """(main schedule, main net, guide schedule, guide net, (mu, std) of each): two different Gaussians."""
    main, guide = (0.3, 0.5), (-0.2, 0.9)
    if formulation == "edm":
        return EDM, GaussianEDM(EDM, *main), EDM_GUIDE, GaussianEDM(EDM_GUIDE, *guide), main, guide
    return DDPM, GaussianDDPM(DDPM, *main), DDPM_V, GaussianDDPM(DDPM_V, *guide), main, guide


@pytest.mark.parametrize("formulation", ["ddpm", "edm"])
@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmsolver"])
def test_the_loop_applies_guide_plus_w_times_main_minus_guide_on_exact_gaussians(formulation, sampler):
    """Every prediction the loop uses (Heun's second point included) is eps_guide + w (eps_main - eps_guide)
    of the two closed-form denoisers at that x and noise level; x0 clipping off so nothing else moves it."""
    schedule, main_net, guide_schedule, guide_net, main, guide = gaussian_pair(formulation)
    steps, w = 4, 2.5
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def record(eps, info):
        seen.append((info.x.clone(), info.alpha_bar.clone(), eps.clone()))
        return eps

    noise, generators = seeded_noise(SHAPE, [0, 1])
    sampler_obj = build_sampler(schedule, sampler, steps)
    trajectory = Trajectory(schedule, sampler_obj, generators, Guidance(x0=None, terms=[record]))
    model_fn = autoguided(main_net, guide_net, guide_schedule, {}, {}, w)
    sample_loop(model_fn, trajectory, noise)
    assert len(seen) == (2 * steps - 1 if sampler == "heun" else steps)  # Heun's second evaluations are guided too
    for x, ab, eps in seen:
        want = exact_eps(x, ab, *guide) + w * (exact_eps(x, ab, *main) - exact_eps(x, ab, *guide))
        # in eps, or in D = x0 where sigma < 1: float32 eps is only good to ~1e-7 / sigma near sigma_min
        sigma = ((1 - ab.double()) / ab.double()).sqrt()
        error = ((eps.double() - want).abs() * sigma.clamp(max=1)).max()
        assert error < 5e-6, error


def test_scale_1_runs_only_the_main_model_0_only_the_guide_and_the_interval_limits_it():
    calls = {"main": 0, "guide": 0}
    schedule, main_net, guide_schedule, guide_net, main, guide = gaussian_pair("ddpm")

    def counted(name, net):
        def forward(x, t, **cond):
            calls[name] += 1
            return net(x, t)
        return forward

    noise, generators = seeded_noise(SHAPE, [3])
    for w, interval, expect in ((1.0, None, (3, 0)), (0.0, None, (0, 3)), (2.0, None, (3, 3)),
                                (2.0, (0, 500), (3, 1))):  # 3 trailing steps of 1000: t = 999, 666, 332
        calls.update(main=0, guide=0)
        trajectory = Trajectory(schedule, build_sampler(schedule, "ddim", 3), generators)
        fn = autoguided(counted("main", main_net), counted("guide", guide_net), guide_schedule, {}, {}, w,
                        CFGOptions(interval=interval))
        sample_loop(fn, trajectory, noise)
        assert (calls["main"], calls["guide"]) == expect, (w, interval, calls)


# -- tiny runs, sample.py, pipeline, demo -----------------------------------------------------------------------

def pngs(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("sample_*.png"))]


def sample(run: Path, out: Path, *argv: str) -> Path:
    return sample_main.__wrapped__(["--checkpoint", str(run), "--out", str(out), "--num-samples", "2", *argv])


@pytest.fixture(scope="module")
def guides(tiny_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("guides")
    made = {"weak": fresh_checkpoint(root / "weak", "model.base_channels=8"),
            "edm": fresh_checkpoint(root / "edm", "diffusion.formulation=edm"),
            "edm_weak": fresh_checkpoint(root / "edm_weak", "diffusion.formulation=edm", "model.base_channels=8",
                                         "diffusion.sigma_data=0.7")}
    shutil.copytree(tiny_run, root / "copy")  # the same weights as another run folder
    made["copy"] = root / "copy"
    return made


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver", "heun", "euler"])
def test_guide_equal_to_main_gives_the_unguided_images_at_every_scale(tiny_run, guides, tmp_path, sampler):
    common = ["--class-label", "3", "--sampler", sampler, "--steps", "3"]
    plain = pngs(sample(tiny_run, tmp_path / "plain", *common, "--guidance-scale", "1"))
    for scale in ("0", "0.5", "3"):
        got = pngs(sample(tiny_run, tmp_path / scale, *common, "--guidance-scale", scale, "--autoguide",
                          str(guides["copy"])))
        assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, plain)), (sampler, scale)


def test_guide_equal_to_main_on_an_edm_model(guides, tmp_path):
    edm = guides["edm"]
    for sampler in ("heun", "dpmsolver"):
        common = ["--class-label", "1", "--sampler", sampler, "--steps", "3"]
        plain = pngs(sample(edm, tmp_path / f"{sampler}-plain", *common, "--guidance-scale", "1"))
        got = pngs(sample(edm, tmp_path / f"{sampler}-ag", *common, "--guidance-scale", "2.5", "--autoguide", str(edm)))
        assert all(np.array_equal(a, b) for a, b in zip(got, plain)), sampler


@pytest.mark.parametrize("main,guide", [("tiny", "weak"), ("edm", "edm_weak")])
def test_scale_1_is_the_main_model_alone_seed_for_seed_and_records_the_guide(tiny_run, guides, tmp_path, main, guide):
    run = tiny_run if main == "tiny" else guides[main]
    common = ["--class-label", "4", "--steps", "3", "--seed", "7"]
    alone = pngs(sample(run, tmp_path / "alone", *common, "--guidance-scale", "1"))
    out = sample(run, tmp_path / "w1", *common, "--guidance-scale", "1", "--autoguide", str(guides[guide]))
    assert all(np.array_equal(a, b) for a, b in zip(pngs(out), alone))
    meta = Image.open(out / "sample_0000.png").text
    assert meta["autoguide"].endswith(guides[guide].name) and meta["autoguide_scale"] == "1"
    guided = pngs(sample(run, tmp_path / "w3", *common, "--guidance-scale", "3", "--autoguide", str(guides[guide])))
    assert not all(np.array_equal(a, b) for a, b in zip(guided, alone))  # a different guide does change w != 1


MISMATCHES = [  # (overrides of the guide's tiny config, config, words of the one line)
    (["data.resolution=16"], "configs/shapes.yaml", "data.resolution is 16 there but 8 here"),
    (["diffusion.formulation=edm"], "configs/shapes.yaml", "diffusion.formulation is edm there but ddpm here"),
    (["diffusion.num_train_timesteps=50"], "configs/shapes.yaml", "diffusion.num_train_timesteps is 50 there"),
    (["diffusion.beta_schedule=linear"], "configs/shapes.yaml", "diffusion.beta_schedule is linear there"),
    (["model.condition=none", "model.num_classes=0"], "configs/shapes_uncond.yaml", "model.condition is none there"),
    (["classes=5"], "configs/shapes.yaml", "the number of classes is 5 there but 12 here"),
    (["model.inpaint=true", "init_from=null"], "configs/inpaint_shapes.yaml", "model.inpaint (mask input channels) is True there"),
    ([], "configs/classifier_shapes.yaml", "is a classifier checkpoint"),
]


@pytest.mark.parametrize("overrides,config,words", MISMATCHES, ids=lambda v: str(v)[:30])
def test_a_guide_that_cannot_pair_is_refused_in_one_line(tiny_run, tmp_path, capsys, overrides, config, words):
    classes = [int(o.split("=")[1]) for o in overrides if o.startswith("classes=")]
    overrides = [o for o in overrides if not o.startswith("classes=")]
    guide = fresh_checkpoint(tmp_path / "guide", *overrides, config=config, classes=(classes or [12])[0])
    status, err, _ = cli_result(sample_main, ["--checkpoint", str(tiny_run), "--out", str(tmp_path / "s"),
                                              "--steps", "2", "--autoguide", str(guide)], capsys)
    assert status == 2 and len(err) == 1 and words in err[0] and err[0].startswith("error: --autoguide"), err
    assert not (tmp_path / "s").exists()


def test_missing_guide_and_negative_prompt_are_refused(tiny_run, tmp_path, capsys):
    status, err, _ = cli_result(sample_main, ["--checkpoint", str(tiny_run), "--out", str(tmp_path / "s"),
                                              "--autoguide", str(tmp_path / "nowhere")], capsys)
    assert status == 2 and len(err) == 1 and "not found" in err[0]


def test_unconditional_samples_the_null_class_as_cfg_scale_0_does(tiny_run, guides, tmp_path, capsys):
    common = ["--steps", "3", "--seed", "2"]
    null = pngs(sample(tiny_run, tmp_path / "cfg0", *common, "--class-label", "0", "--guidance-scale", "0"))
    out = sample(tiny_run, tmp_path / "uncond", *common, "--unconditional")
    assert len(pngs(out)) == 2  # one group, not one per class
    assert all(np.array_equal(a, b) for a, b in zip(pngs(out), null))
    meta = Image.open(out / "sample_0000.png").text
    assert meta["unconditional"] == "true" and "label" not in meta
    same = pngs(sample(tiny_run, tmp_path / "ag", *common, "--unconditional", "--guidance-scale", "3",
                       "--autoguide", str(guides["copy"])))
    assert all(np.array_equal(a, b) for a, b in zip(same, null))  # the guide got the null class too
    for extra, words in ((["--class-label", "2"], "leave out --class-label"),
                         (["--checkpoint", str(fresh_checkpoint(tmp_path / "u", "model.condition=none", "model.num_classes=0",
                                                                config="configs/shapes_uncond.yaml"))],
                          "unconditional already"),
                         (["--checkpoint", str(fresh_checkpoint(tmp_path / "nodrop", "model.cond_drop_prob=0", "sample.guidance_scale=1"))],
                          "without condition dropout")):
        status, err, _ = cli_result(sample_main, ["--checkpoint", str(tiny_run), "--out", str(tmp_path / "x"),
                                                  "--unconditional", *extra], capsys)
        assert status == 2 and len(err) == 1 and words in err[0], err


def test_pipeline_autoguide_argument(tiny_run, tmp_path):
    from diffusion.cli.args import BadType, BadValue
    from diffusion.pipeline import GuidedDiffusionPipeline

    pipe = GuidedDiffusionPipeline.from_pretrained(tiny_run / "final")
    pipe.set_progress_bar_config(disable=True)
    draw = dict(class_labels=[2, 2], num_inference_steps=3, seed=1, output_type="pt")
    plain = pipe(guidance_scale=1.0, **draw).images
    for guide in (str(tiny_run / "final"), pipe):
        assert torch.equal(pipe(guidance_scale=3.0, autoguide=guide, **draw).images, plain)
    sample_png = pngs(sample(tiny_run, tmp_path / "s", "--class-label", "2", "--steps", "3", "--seed", "1",
                             "--guidance-scale", "3", "--autoguide", str(tiny_run)))
    assert np.array_equal(np.asarray(pipe(guidance_scale=3.0, autoguide=pipe, **{**draw, "output_type": "pil"}).images[0]),
                          sample_png[0])
    other = GuidedDiffusionPipeline.from_pretrained(tiny_run / "final")
    other.unet.register_to_config(sample_size=16)
    with pytest.raises(BadValue, match="autoguide does not pair with the main model: data.resolution is 16 there but 8 here"):
        pipe(guidance_scale=3.0, autoguide=other, **draw)
    with pytest.raises(BadValue, match="not an exported pipeline folder"):
        pipe(guidance_scale=3.0, autoguide=str(tmp_path), **draw)
    with pytest.raises(BadType):
        pipe(guidance_scale=3.0, autoguide=5, **draw)


def test_demo_picker_offers_only_the_guides_given_on_the_command_line(tiny_run, guides, tmp_path):
    from diffusion.demos import app, backend

    models = backend.load_models(backend.DemoPaths(str(tiny_run), autoguides=[str(guides["weak"])]))
    info = models.info("base")
    args = (info, 2, None, None, 1.0, "ddim", 2, 0, 1, None, None, 0, None, None, None)
    request = app.request_from(*args, autoguide=str(guides["weak"]), guides=models.paths.autoguides)
    results = backend.generate(models, request)
    assert results[0].metadata["autoguide"].endswith("weak") and "--autoguide" in results[0].command
    backend.release(results[0].path.parent)
    for name in (str(guides["copy"]), "/etc/passwd", 5):
        with pytest.raises(backend.UserError, match="the guide must be one of"):
            app.request_from(*args, autoguide=name, guides=models.paths.autoguides)
    with pytest.raises(backend.UserError, match="not one of the guides"):  # the backend checks again
        backend.generate(models, backend.GenerateRequest(class_label=2, steps=2, autoguide=str(guides["copy"])))


def test_each_xs_config_is_a_guide_for_its_source_config():
    """configs/NAME_xs.yaml: NAME's data, condition and diffusion, half its base channels, 1/16 of its steps;
    the 16 px ones built and checked with `check_pair` as sample.py checks a guide."""
    from diffusion.checkpoints.load import LoadedModel
    from diffusion.checkpoints.store import TrainState
    from diffusion.config import load_config
    from diffusion.models import build_model
    from diffusion.sampling.autoguide import check_pair
    from diffusion.sampling.schedule import build_schedule
    from tests.conftest import ROOT

    pairs = sorted((ROOT / "configs").glob("*_xs.yaml"))
    assert {p.name for p in pairs} >= {"cifar10_16_edm_xs.yaml", "cifar10_16_ddpm_xs.yaml", "celeba16_xs.yaml", "cifar10_xs.yaml"}
    for path in pairs:
        guide, main = load_config(path), load_config(path.with_name(path.name.replace("_xs", "")))
        assert guide.data == main.data and guide.diffusion == main.diffusion, path.name
        assert (guide.model.condition, guide.model.num_classes) == (main.model.condition, main.model.num_classes)
        assert guide.model.base_channels * 2 == main.model.base_channels, path.name
        assert guide.train.max_steps == main.train.max_steps // 16, path.name
        assert guide.output_dir != main.output_dir
        if main.data.resolution <= 16:
            loaded = []
            for cfg in (main, guide):
                cfg.model.num_classes = cfg.model.num_classes or 10
                loaded.append(LoadedModel(cfg, build_model(cfg), build_schedule(cfg.diffusion), TrainState(), path))
            check_pair(*loaded, str(path))
