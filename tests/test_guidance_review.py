"""The guidance review's small items (issue 31): sampling without the x0 clip reproduces NVlabs'
edm_sampler; a classifier trained on either formulation guides a denoiser of the other through the
noise-level map; churn raises no level above what the active gradient guides were trained at; the
"mean" guidance form is guided-diffusion's `condition_mean` step.

The networks are untrained, seeded and written as checkpoints directly (no training loop): each
check here is an identity or a first-order property that holds for any weights.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusion.checkpoints.load import LoadedModel, load_model
from diffusion.checkpoints.store import EMA_FILE, TrainState, finish_checkpoint, named_weights, write_weights
from diffusion.cli import clip as clip_cli
from diffusion.cli.args import BadType
from diffusion.cli.sample import build_parser, features, make_plan, sampler_settings
from diffusion.cli.sample import main as sample_main
from diffusion.conditioning.clip import NoiseAwareGuide
from diffusion.models import build_model
from diffusion.pipeline import GuidedDiffusionPipeline, export_scheduler
from diffusion.sampling.guidance import (ClassifierFreeGuidance, gradient_term, guide_sigma_range, guide_time_map)
from diffusion.sampling.loop import Guidance, Trajectory
from diffusion.sampling.plan import SamplingPlan, run_plan
from diffusion.sampling.samplers import SigmaOptions, build_sampler, noise_from
from diffusion.sampling.schedule import EDMSchedule, NoiseSchedule, build_train_scheduler, x0_to_epsilon
from tests.conftest import cli_result, tiny_config

CLASSIFIER = ["model.base_channels=8", "model.attention_resolutions=[4]", "model.pool=mean"]
EDM = ["diffusion.formulation=edm", "sample.sampler=heun", "sample.steps=3"]


def write_run(folder: Path, seed: int, *overrides: str, config: str = "configs/shapes.yaml") -> Path:
    """A checkpoint of the untrained network of a tiny config, its weights drawn with `seed`."""
    cfg = tiny_config(folder, "model.num_classes=12", *overrides, config=config)  # the shapes classes, as training sets
    torch.manual_seed(seed)
    model = build_model(cfg)
    tmp = folder / "tmp"
    tmp.mkdir(parents=True)
    write_weights(tmp / EMA_FILE, named_weights(model))
    finish_checkpoint(tmp, folder / "ckpt", cfg, TrainState(step=1), keep=0)
    return folder / "ckpt"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("guidance_review")
    return {"edm": write_run(root / "edm", 0, *EDM), "ddpm": write_run(root / "ddpm", 1),
            "clf_ddpm": write_run(root / "clf_ddpm", 2, *CLASSIFIER, config="configs/classifier_shapes.yaml"),
            "clf_edm": write_run(root / "clf_edm", 3, *CLASSIFIER, "diffusion.formulation=edm",
                                 config="configs/classifier_shapes.yaml")}


def cli_plan(argv: list[str], loaded: LoadedModel) -> tuple[SamplingPlan, object]:
    """sample.py's plan and sampler settings for `argv`, built in-process."""
    feature_list = features()
    args = build_parser(feature_list).parse_args(["--checkpoint", "unused", *argv])
    settings = sampler_settings(args, loaded)
    return make_plan(args, loaded, feature_list, settings), settings


# -- 1. no x0 clip: NVlabs' edm_sampler, exactly ---------------------------------------------------------------

def nvlabs_edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                       sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):
    """Algorithm 2 as NVlabs/edm generate.py `edm_sampler` writes it (float64 state; `net(x, sigma, labels)`
    is the denoiser D), restated here as the reference."""
    steps = torch.arange(num_steps, dtype=torch.float64)
    levels = (sigma_max ** (1 / rho) + steps / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    levels = torch.cat([levels, torch.zeros_like(levels[:1])])
    x_next = latents.to(torch.float64) * levels[0]
    for i, (t_cur, t_next) in enumerate(zip(levels[:-1], levels[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def edm_denoiser(model: torch.nn.Module, sigma_data: float):
    """EDM's D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma) / 4) around our network F, in fp32 as EDMPrecond."""

    def net(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, s = x.float(), torch.as_tensor(sigma).float().reshape(-1, 1, 1, 1)
        c_skip, c_out = sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s * sigma_data / (s ** 2 + sigma_data ** 2).sqrt()
        c_in = 1 / (sigma_data ** 2 + s ** 2).sqrt()
        out = model(c_in * x, (s.log() / 4).flatten().expand(len(x)), labels=labels)
        return c_skip * x + c_out * out.float()

    return net


def reference(loaded: LoadedModel, seeds: list[int], labels: list[int], steps: int, **churn) -> torch.Tensor:
    """NVlabs' sampler from our starting noise and, for churn, our later noise draws: the loop's VP state at
    sigma_max, n, is x_sigma = n sqrt(1 + sigma_max^2); steps without churn draw nothing in our sampler."""
    shape = (3, loaded.cfg.data.resolution, loaded.cfg.data.resolution)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    noise = noise_from(generators, shape)
    sigma_max = 80.0
    lo, hi = churn.get("S_min", 0), churn.get("S_max", math.inf)
    levels = iter(build_sampler(loaded.schedule, "heun", steps, SigmaOptions()).steps)

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        churned = churn and lo <= next(levels).t <= hi
        return noise_from(generators, shape).double() if churned else torch.zeros_like(x)

    latents = noise.double() * math.sqrt(1 + sigma_max ** 2) / sigma_max
    with torch.no_grad():
        return nvlabs_edm_sampler(edm_denoiser(loaded.model, loaded.cfg.diffusion.sigma_data), latents,
                                  torch.tensor(labels), randn_like, num_steps=steps, sigma_max=sigma_max, **churn)


CHURN = {"S_churn": 40, "S_min": 0.05, "S_max": 50, "S_noise": 1.003}  # EDM's ImageNet-64 settings


@pytest.mark.parametrize("churn", [{}, CHURN], ids=["deterministic", "churn"])
def test_no_x0_clip_reproduces_nvlabs_edm_sampler(runs, churn):
    """`--no-x0-clip` on an edm model with Heun: sample.py's plan draws what NVlabs' edm_sampler draws from
    the same network and noise, deterministic and with churn (the same noise draws); the default, which
    clips x0, does not."""
    loaded = load_model(runs["edm"])
    steps = 6
    argv = ["--class-label", "2", "--num-samples", "2", "--seed", "5", "--sampler", "heun", "--steps", str(steps),
            "--guidance-scale", "1"]
    if churn:
        argv += ["--churn", "40", "--churn-range", "0.05", "50", "--churn-noise", "1.003"]
    plan, settings = cli_plan([*argv, "--no-x0-clip"], loaded)
    assert plan.cfg.x0_processor() is None and plan.items[0].meta["x0_clip"] == "off"
    with torch.no_grad():
        ours = run_plan(loaded, plan, settings, bar=False)
        clipped = run_plan(loaded, cli_plan(argv, loaded)[0], settings, bar=False)
    expected = reference(loaded, [5, 6], [2, 2], steps, **churn).float()
    inside = (expected.abs() < 1).float().mean()
    assert inside > 0.3, "the reference should not be all saturated, or the comparison says little"
    torch.testing.assert_close(ours, expected.clamp(-1, 1), atol=2e-4, rtol=0)
    assert (clipped - expected.clamp(-1, 1)).abs().max() > 1e-2  # the default clips: not edm_sampler


def test_pipeline_x0_clip_false_reproduces_nvlabs_edm_sampler(runs):
    loaded = load_model(runs["edm"])
    pipe = GuidedDiffusionPipeline(unet=loaded.model.unet, scheduler=export_scheduler(
        loaded.cfg.diffusion, build_train_scheduler(loaded.cfg.diffusion)))
    pipe.set_progress_bar_config(disable=True)
    call = dict(class_labels=[2, 2], guidance_scale=1.0, num_inference_steps=5, seed=5, sampler="heun", output_type="pt")
    unclipped = pipe(**call, x0_clip=False).images
    expected = reference(loaded, [5, 6], [2, 2], 5).float().clamp(-1, 1) / 2 + 0.5
    torch.testing.assert_close(unclipped, expected, atol=2e-4, rtol=0)
    assert (pipe(**call).images - expected).abs().max() > 1e-2
    with pytest.raises(BadType, match="x0_clip must be true or false"):
        pipe(**call, x0_clip="no")


def test_no_x0_clip_with_dynamic_threshold_is_one_line(runs, tmp_path, capsys):
    status, err, _ = cli_result(sample_main, ["--checkpoint", str(runs["edm"]), "--no-x0-clip", "--dynamic-threshold",
                                              "99", "--out", str(tmp_path / "out")], capsys)
    assert status == 2 and len(err) == 1 and "--no-x0-clip and --dynamic-threshold" in err[0] and "give one" in err[0]
    assert not (tmp_path / "out").exists()


# -- 2. a classifier of either formulation on a denoiser of the other -------------------------------------------

def test_time_map_reads_the_guide_at_the_same_noise_level():
    """edm denoiser -> ddpm guide: the guide's fractional timestep has the denoiser's alpha_bar; ddpm denoiser
    -> edm guide: the guide's sigma has it. Outside a guide's trained levels the map holds it at their edge."""
    from diffusion.config import DiffusionConfig

    ddpm = NoiseSchedule.from_config(DiffusionConfig(num_train_timesteps=100, beta_schedule="cosine"))
    edm = EDMSchedule(sigma_min=0.002, sigma_max=80.0)
    lo, hi = guide_sigma_range(ddpm)
    sigmas = torch.tensor([lo * 1.01, 0.05, 0.3, 1.0, 3.7, 20.0, 80.0])
    t = guide_time_map(edm, ddpm)(sigmas)
    assert t.is_floating_point() and float(t.min()) >= 0 and float(t.max()) <= 99
    torch.testing.assert_close(ddpm.alpha_bar(t).flatten(), 1 / (1 + sigmas ** 2), rtol=5e-5, atol=0)  # fp32 times
    steps = torch.tensor([0, 3, 20, 50, 70, 90])
    within = ddpm.sigma(steps).flatten() <= 80
    sigma = guide_time_map(ddpm, edm)(steps)
    torch.testing.assert_close(edm.alpha_bar(sigma[within]).flatten(), ddpm.alpha_bar(steps[within]).flatten(),
                               rtol=1e-5, atol=0)
    assert torch.equal(sigma[~within], torch.full_like(sigma[~within], 80.0))  # held at the edm guide's top
    assert float(guide_time_map(edm, ddpm)(torch.tensor([1e4]))) == pytest.approx(99)
    same = guide_time_map(ddpm, ddpm)(steps)
    assert torch.equal(same, steps)


@pytest.mark.parametrize("denoiser,classifier", [("edm", "clf_ddpm"), ("ddpm", "clf_edm")])
def test_a_classifier_of_the_other_formulation_guides(runs, denoiser, classifier):
    """The pairing is no longer refused; one guided step from the same x_t and noise ends where the classifier,
    read at its own time of the new noise level, gives the target class more probability."""
    loaded, clf = load_model(runs[denoiser]), load_model(runs[classifier])
    assert loaded.cfg.diffusion.formulation != clf.cfg.diffusion.formulation
    plan, settings = cli_plan(["--classifier", str(runs[classifier]), "--classifier-scale", "3", "--class-label", "4",
                               "--num-samples", "4", "--sampler", "ddim", "--steps", "8"], loaded)
    assert all(item.label == 4 for item in plan.items)
    t_map = guide_time_map(loaded.schedule, clf.schedule)
    labels = torch.full((4,), 4)

    def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return clf.model.log_prob(*clf.schedule.network_input(x, t_map(t)), labels)

    sampler = build_sampler(loaded.schedule, "ddim", 8)
    step = sampler.steps[3]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 3 - 1.5  # out of range: the clip after the term binds
    ab = loaded.schedule.alpha_bar(step.t)
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=gen)
    oracle = lambda x_, info: x0_to_epsilon(x0, x_, info.alpha_bar)  # noqa: E731
    term = plan.terms[0](plan.items[:4])
    with torch.no_grad():
        plain = Trajectory(loaded.schedule, sampler, []).step(oracle, x, step)
        guided = Trajectory(loaded.schedule, sampler, [], Guidance(terms=[term])).step(oracle, x, step)
        t_next = torch.full((4,), step.t_next)
        before, after = log_prob(plain, t_next), log_prob(guided, t_next)
    assert not torch.equal(plain, guided)
    assert after.mean() > before.mean() and float((after > before).float().mean()) >= 0.75
    with torch.no_grad():
        images = run_plan(loaded, plan, settings, bar=False)  # the whole plan samples
    assert images.shape == (4, 3, 8, 8) and bool(torch.isfinite(images).all())


# -- 3. churn stays inside the guides' trained levels -----------------------------------------------------------

def test_churn_ceiling_caps_raised_levels_and_never_lowers_one():
    schedule = EDMSchedule()
    free = build_sampler(schedule, "heun", 8, SigmaOptions(churn=40))
    capped = build_sampler(schedule, "heun", 8, SigmaOptions(churn=40, churn_ceiling=50.0))
    plain = build_sampler(schedule, "heun", 8, SigmaOptions())
    assert max(s.t for s in free.steps) > 80  # churn raises 80 by sqrt(2)
    for c, f, p in zip(capped.steps, free.steps, plain.steps):
        assert c.t == (f.t if f.t <= 50 else max(50.0, p.t))
    assert capped.steps[0].t == pytest.approx(80.0)  # above the ceiling already: kept, not lowered


def seen_sigmas(loaded: LoadedModel, monkeypatch) -> list[float]:
    """The sigmas the edm denoiser is evaluated at (from c_noise = ln(sigma) / 4)."""
    seen = []
    forward = loaded.model.forward
    monkeypatch.setattr(loaded.model, "forward", lambda x, t, **kw: seen.append(float(t.max().exp() ** 4))
                        or forward(x, t, **kw))
    return seen


def test_gradient_guides_set_the_churn_ceiling(runs, monkeypatch, tmp_path):
    """With --churn, an edm classifier trained up to sigma 80 keeps every level the denoiser sees at <= 80; a
    noise-aware CLIP sets its own top; scale 0 (no guidance) leaves churn alone."""
    loaded = load_model(runs["edm"])
    seen = seen_sigmas(loaded, monkeypatch)
    base = ["--class-label", "1", "--num-samples", "1", "--sampler", "heun", "--steps", "4", "--churn", "40"]
    with torch.no_grad():
        run_plan(loaded, *cli_plan(base, loaded), bar=False)
        assert max(seen) > 100
        seen.clear()
        plan, settings = cli_plan([*base, "--classifier", str(runs["clf_edm"]), "--classifier-scale", "2"], loaded)
        assert plan.churn_ceiling == pytest.approx(80.0)
        run_plan(loaded, plan, settings, bar=False)
        assert max(seen) == pytest.approx(80.0, rel=1e-4)
    assert cli_plan([*base, "--classifier", str(runs["clf_edm"]), "--classifier-scale", "0"], loaded)[0].churn_ceiling is None
    assert cli_plan([*base, "--classifier", str(runs["clf_ddpm"])], loaded)[0].churn_ceiling == pytest.approx(
        guide_sigma_range(load_model(runs["clf_ddpm"]).schedule)[1])

    fake = SimpleNamespace(model=SimpleNamespace(encode_prompts=lambda prompts: torch.zeros(len(prompts), 4)),
                           schedule=EDMSchedule(sigma_max=20.0))
    guide = NoiseAwareGuide(fake, loaded.schedule)
    monkeypatch.setattr(clip_cli.ClipGuidance, "guide", lambda self, args, loaded_: guide)
    clip_plan = cli_plan([*base, "--clip", "somewhere", "--prompt", "a red circle"], loaded)[0]
    assert clip_plan.churn_ceiling == pytest.approx(20.0)
    both = cli_plan([*base, "--clip", "x", "--prompt", "a", "--classifier", str(runs["clf_edm"])], loaded)[0]
    assert both.churn_ceiling == pytest.approx(20.0)  # the lowest of the guides' tops


# -- 4. the "mean" form is guided-diffusion's condition_mean ------------------------------------------------------

def test_mean_form_is_guided_diffusions_condition_mean(runs):
    """One DDPM step with --guidance-form mean equals guided-diffusion's p_sample with cond_fn, written out:
    mu from the clipped x0, mu + Sigma * s * grad log p(y | x_t), then + sqrt(Sigma) * noise."""
    loaded, clf = load_model(runs["ddpm"]), load_model(runs["clf_ddpm"])
    scale = 4.0
    plan, _ = cli_plan(["--classifier", str(runs["clf_ddpm"]), "--classifier-scale", str(scale), "--class-label", "3",
                        "--num-samples", "2", "--sampler", "ddpm", "--steps", "10", "--guidance-form", "mean"], loaded)
    items = plan.items[:2]
    cond = {"labels": torch.tensor([3, 3])}
    model_fn = ClassifierFreeGuidance(loaded.model, cond, loaded.model.null_condition(cond), 1.0)
    schedule = loaded.schedule
    sampler = build_sampler(schedule, "ddpm", 10)
    labels = torch.tensor([3, 3])
    for index in (1, 4, 8):
        step = sampler.steps[index]
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(index)) * 1.2
        generators = [torch.Generator().manual_seed(10 + i) for i in range(2)]
        with torch.no_grad():
            ours = Trajectory(schedule, sampler, generators, Guidance(terms=[plan.terms[0](items)])).step(model_fn, x, step)

        # guided-diffusion, gaussian_diffusion.py p_sample with cond_fn (fixed small variance, respaced betas)
        ab, ab_prev = schedule.alpha_bar(step.t).double(), schedule.alpha_bar(step.t_next).double()
        beta = 1 - ab / ab_prev
        t = torch.full((2,), step.t)
        with torch.no_grad():
            v = loaded.model(x, t, labels=labels).double()  # a v-prediction model (configs/shapes.yaml)
        eps = ab.sqrt() * v + (1 - ab).sqrt() * x
        pred_xstart = ((1 / ab).sqrt() * x - (1 / ab - 1).sqrt() * eps).clamp(-1, 1)
        mean = beta * ab_prev.sqrt() / (1 - ab) * pred_xstart + (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab) * x
        variance = beta * (1 - ab_prev) / (1 - ab)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            grad = torch.autograd.grad(clf.model.log_prob(x_in, t, labels).sum(), x_in)[0] * scale  # cond_fn
        new_mean = mean + variance * grad.double()
        noise = noise_from([torch.Generator().manual_seed(10 + i) for i in range(2)], (3, 8, 8)).double()
        expected = new_mean + variance.sqrt() * noise
        assert float(((1 / ab).sqrt() * x - (1 / ab - 1).sqrt() * eps).abs().max()) > 1.05, "the clip should bind"
        torch.testing.assert_close(ours.double(), expected, atol=1e-4, rtol=0)
