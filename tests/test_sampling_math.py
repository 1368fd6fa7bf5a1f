"""The sampling math: schedule, samplers' steps, the order model -> guidance -> x0 clip -> update, CFG."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion.config import DiffusionConfig, ModelConfig
from diffusion.models import build_denoiser
from diffusion.sampling.guidance import (
    ClassifierFreeGuidance,
    StepInfo,
    cfg_combine,
    gradient_term,
    posterior_mean_coefficient,
)
from diffusion.sampling.loop import Guidance, Trajectory, sample_loop, seeded_noise
from diffusion.sampling.samplers import (
    SAMPLERS,
    SIGMA_SAMPLERS,
    DPMSolverSampler,
    SigmaOptions,
    build_sampler,
    make_steps,
    posterior_variance,
    trailing_timesteps,
)
from diffusion.sampling.schedule import (
    NoiseSchedule,
    build_train_scheduler,
    epsilon_to_x0,
    to_epsilon,
    training_target,
    x0_to_epsilon,
)

SCHEDULE = NoiseSchedule.from_config(DiffusionConfig())  # linear, 1000 steps, as the shipped configs


def oracle(target: torch.Tensor, schedule: NoiseSchedule, scale_x0: float = 1.0):
    """The denoiser of data that is one image: the true eps for x0 = scale_x0 * target."""

    def model_fn(x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return x0_to_epsilon(scale_x0 * target, x, info.alpha_bar)

    return model_fn


def test_noising_matches_closed_form():
    for schedule in ("linear", "cosine"):
        sched = build_train_scheduler(DiffusionConfig(beta_schedule=schedule))
        ab = torch.cumprod(1 - sched.betas.double(), 0)
        x0, noise = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
        t = torch.tensor([0, 10, 250, 700, 999])
        expected = ab[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().view(-1, 1, 1, 1) * noise
        torch.testing.assert_close(sched.add_noise(x0, noise, t), expected.float(), atol=1e-5, rtol=1e-5)
        table = NoiseSchedule.from_config(DiffusionConfig(beta_schedule=schedule))
        torch.testing.assert_close(table.alpha_bar(t).flatten(), ab[t].float())
        assert float(table.alpha_bar(-1)) == 1.0  # t = -1 is the clean image


def test_v_prediction_converts_back_to_epsilon_and_x0():
    cfg = DiffusionConfig(prediction_type="v_prediction")
    sched, table = build_train_scheduler(cfg), NoiseSchedule.from_config(cfg)
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([5, 100, 500, 900])
    x_t = sched.add_noise(x0, noise, t)
    ab = table.alpha_bar(t)
    eps = to_epsilon(training_target(sched, x0, noise, t), x_t, ab, "v_prediction")
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(epsilon_to_x0(eps, x_t, ab), x0, atol=1e-3, rtol=1e-3)


def test_steps_follow_diffusers_trailing_spacing_and_end_on_the_clean_image():
    from diffusers import DDIMScheduler

    reference = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    for n in range(1, 201):
        reference.set_timesteps(n)
        timesteps = trailing_timesteps(1000, n)
        assert len(timesteps) == n and len(set(timesteps)) == n
        if len(reference.timesteps) == n:  # diffusers' float round-off adds a step for n = 61, 103, 121, ...
            assert timesteps == reference.timesteps.tolist(), n
        steps = make_steps(timesteps)
        assert [s.t_next for s in steps[:-1]] == timesteps[1:] and steps[-1].t_next == -1 and steps[-1].is_last


def test_dpm_solver_visits_our_timesteps_at_every_step_count():
    for n in range(1, 201):
        sampler = build_sampler(SCHEDULE, "dpmsolver", n)  # raises if diffusers' timesteps differ from ours
        assert isinstance(sampler, DPMSolverSampler) and sampler.scheduler.timesteps.tolist() == [s.t for s in sampler.steps]
    torch.testing.assert_close(sampler.scheduler.alphas_cumprod.float(), SCHEDULE.table[:-1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", SAMPLERS)
def test_oracle_denoiser_ends_on_the_data_point_at_every_step_count(name):
    """For data that is one image x*, every sampler at every step count 1..200 must end on x* (the
    sigma samplers, whose levels have no rounding to trip on, at a sample of those counts)."""
    target = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    model_fn = oracle(target, SCHEDULE)
    worst = 0.0
    for n in range(1, 201) if name not in SIGMA_SAMPLERS else [*range(1, 21), 35, 61, 103, 200]:
        noise, generators = seeded_noise((3, 2, 2), [n])
        trajectory = Trajectory(SCHEDULE, build_sampler(SCHEDULE, name, n), generators)
        out = sample_loop(model_fn, trajectory, noise)
        worst = max(worst, float((out - target).abs().max()))
    assert worst < 1e-4, f"{name}: max error {worst:.2e}"


def run_steps(name: str, n: int, upto: int, model_fn, x: torch.Tensor, guided_term=None, form_seed: int = 7):
    """x after steps 0..upto of a fresh sampler; `guided_term` is applied at step `upto` only."""
    sampler = build_sampler(SCHEDULE, name, n)
    generators = [torch.Generator().manual_seed(form_seed)]
    plain = Trajectory(SCHEDULE, sampler, generators)
    for step in sampler.steps[:upto]:
        x = plain.step(model_fn, x, step)
    step = sampler.steps[upto]
    terms = [guided_term] if guided_term is not None else []
    guided = Trajectory(SCHEDULE, sampler, generators, Guidance(terms=terms))
    return x, guided.step(model_fn, x, step), step


def documented_shift(name: str, form: str, step, x_prev_steps, s: float, g: torch.Tensor, n: int) -> torch.Tensor:
    """The change in x_{t_next} that the docs promise for a gradient g of log p at scale s."""
    ab, ab_next = SCHEDULE.alpha_bar(step.t), SCHEDULE.alpha_bar(step.t_next)
    if form == "mean":  # DDPM: the posterior mean moves by s * Sigma * g
        return s * posterior_variance(ab, ab_next) * g
    d_eps = -s * (1 - ab).sqrt() * g  # the score moves by s * g
    d_x0 = -(1 - ab).sqrt() / ab.sqrt() * d_eps
    if name == "ddim":
        return ab_next.sqrt() * d_x0 + (1 - ab_next).sqrt() * d_eps
    if name == "ddpm":
        return ab_next.sqrt() * (1 - ab / ab_next) / (1 - ab) * d_x0
    # DPM-Solver++(2M): x_next = (s_n/s_c) x + a_n (1 - e^-h) (D0 + D1/2), D1 = (D0 - D_prev) / r0;
    # the first and the last step are first order.
    lam = lambda a: 0.5 * torch.log(a / (1 - a))  # noqa: E731
    if step.is_last:
        return d_x0
    h = lam(ab_next) - lam(ab)
    factor = ab_next.sqrt() * (1 - torch.exp(-h))
    if step.index > 0:
        t_prev = x_prev_steps[step.index - 1].t
        r0 = (lam(ab) - lam(SCHEDULE.alpha_bar(t_prev))) / h
        factor = factor * (1 + 0.5 / r0)
    return factor * d_x0


@pytest.mark.parametrize("name,form", [("ddpm", "eps"), ("ddim", "eps"), ("dpmsolver", "eps"), ("ddpm", "mean")])
def test_one_guided_step_moves_the_sample_by_the_documented_shift(name, form):
    """Across t, where the guided x0 stays in [-1, 1] (so the clip after the guidance terms does not
    bind), the guided step's change equals the documented shift within 1%. The gradient is sized per
    step so that the eps form moves x0 by about 0.05 per pixel."""
    n = 50
    target = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)) - 0.5
    model_fn = oracle(target, SCHEDULE)
    unit = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    steps = build_sampler(SCHEDULE, name, n).steps
    for index in [0, 1, 5, 10, 20, 30, 40, 48, 49]:
        ab = SCHEDULE.alpha_bar(steps[index].t)
        g = 0.05 * ab.sqrt() / (1 - ab) * unit
        term = gradient_term(lambda x, t, g=g: (x * g).sum(dim=(1, 2, 3)), scale=1.0, form=form)
        noise, _ = seeded_noise((3, 4, 4), [3])
        x, plain_next, step = run_steps(name, n, index, model_fn, noise)
        _, guided_next, _ = run_steps(name, n, index, model_fn, noise, term)
        achieved = (guided_next - plain_next).double()
        promised = documented_shift(name, form, step, steps, 1.0, g, n).double().expand_as(achieved)
        if float(promised.norm()) == 0:  # DDPM's last step has Sigma = 0: the mean form promises no shift
            assert float(achieved.abs().max()) < 1e-6
            continue
        ratio = float((achieved * promised).sum() / (promised * promised).sum())
        residual = float((achieved - promised).norm() / promised.norm())
        assert abs(ratio - 1) < 0.01 and residual < 0.01, f"{name} {form} t={step.t}: ratio {ratio:.4f}"


@pytest.mark.parametrize("name", SAMPLERS)
def test_guided_x0_is_clipped_after_the_guidance_terms(name):
    """The sampler receives clip(x0 + shift): a guided prediction of the clean image is an image too,
    so a guide's push at high noise (2e4 * g at t = 999 of the cosine schedule) stays bounded."""
    schedule = NoiseSchedule.from_config(DiffusionConfig(beta_schedule="cosine"))
    target = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    model_fn = oracle(target, schedule, scale_x0=1.5)  # raw x0 partly outside [-1, 1]
    g = 0.01 * torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    term = gradient_term(lambda x, t: (x * g).sum(dim=(1, 2, 3)), scale=1.0)
    sampler = build_sampler(schedule, name, 10, SigmaOptions(sigma_max=math.inf))  # Karras' from t = 999 too
    seen = []
    update = sampler.update
    sampler.update = lambda x, x0, *rest: seen.append(x0) or update(x, x0, *rest)
    trajectory = Trajectory(schedule, sampler, [torch.Generator().manual_seed(0)], Guidance(terms=[term]))
    x = seeded_noise((3, 4, 4), [0])[0]
    with torch.no_grad():
        for step in sampler.steps[:3]:
            ab = schedule.alpha_bar(step.t)
            expected = (1.5 * target + (1 - ab) / ab.sqrt() * g).clamp(-1, 1)
            x = trajectory.step(model_fn, x, step)
            torch.testing.assert_close(seen[-1], expected, atol=3e-3, rtol=0)  # fp32 x0 <-> eps at ab = 2.4e-9
    assert float((seen[0].abs() > 0.99).float().mean()) > 0.5  # at t = 999 the shift saturates: clipped, not kept


def test_mean_form_coefficient_gives_sigma_times_gradient():
    ab, ab_next = SCHEDULE.alpha_bar(600).view(1, 1, 1, 1), SCHEDULE.alpha_bar(580).view(1, 1, 1, 1)
    info = StepInfo(x=torch.zeros(1, 3, 1, 1), t=torch.tensor([600]), step=make_steps([600, 580])[0],
                    alpha_bar=ab, alpha_bar_next=ab_next, schedule=SCHEDULE)
    # mu depends on eps through x0 only: d mu / d eps = -sqrt(ab_next) beta / (1 - ab) * sqrt(1 - ab) / sqrt(ab)
    d_mu_d_eps = -ab_next.sqrt() * (1 - ab / ab_next) / (1 - ab) * (1 - ab).sqrt() / ab.sqrt()
    torch.testing.assert_close(-posterior_mean_coefficient(info) * d_mu_d_eps, posterior_variance(ab, ab_next))


def _cfg_setup(scale):
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(condition="class", base_channels=16, channel_mult=[1, 2], layers_per_block=1,
                                       attention_resolutions=[], attention_head_dim=8), 8, num_classes=3).eval()
    schedule = NoiseSchedule.from_config(DiffusionConfig(num_train_timesteps=100))
    cond = {"labels": torch.tensor([0, 2])}
    fn = ClassifierFreeGuidance(model, cond, model.null_condition(cond), scale)
    x = torch.randn(2, 3, 8, 8)
    sampler = build_sampler(schedule, "ddim", 2)
    info = Trajectory(schedule, sampler, []).info(x, sampler.steps[0])
    with torch.no_grad():
        eps_c = model(x, info.t, labels=cond["labels"])
        eps_u = model(x, info.t, labels=torch.tensor([3, 3]))
        return fn(x, info), eps_c, eps_u


def test_cfg_scale_zero_is_unconditional_and_one_is_conditional():
    out0, eps_c, eps_u = _cfg_setup(0.0)
    assert torch.equal(out0, eps_u)
    out1, eps_c, eps_u = _cfg_setup(1.0)
    assert torch.equal(out1, eps_c)
    assert not torch.allclose(eps_c, eps_u)


def test_cfg_above_one_extrapolates():
    out3, eps_c, eps_u = _cfg_setup(3.0)
    torch.testing.assert_close(out3, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cfg_combine(eps_u, eps_c, 3.0), eps_u + 3 * (eps_c - eps_u))


def tiny_loaded(tmp_path):
    """An untrained 8 px unconditional denoiser as run_plan's LoadedModel."""
    from diffusion.checkpoints.load import LoadedModel
    from diffusion.checkpoints.store import TrainState
    from diffusion.config import Config

    cfg = Config()
    cfg.data.resolution = 8
    model = build_denoiser(ModelConfig(base_channels=16, channel_mult=[1, 2], layers_per_block=1,
                                       attention_resolutions=[], attention_head_dim=8), 8, num_classes=0).eval()
    return LoadedModel(cfg, model, SCHEDULE, TrainState(), tmp_path)


def test_schedule_table_is_moved_once_per_run_not_per_step(monkeypatch, tmp_path):
    """The loop reads alpha_bar from one table on the sampling device: `to` runs once per run_plan
    (a no-op when the table is there), never once per step (a blocking host copy on a GPU)."""
    from diffusion.sampling.plan import SampleItem, SamplerSettings, SamplingPlan, run_plan

    loaded = tiny_loaded(tmp_path)
    calls = []
    original = NoiseSchedule.to
    monkeypatch.setattr(NoiseSchedule, "to", lambda self, device: calls.append(device) or original(self, device))
    items = [SampleItem(seed=i) for i in range(4)]
    with torch.no_grad():
        run_plan(loaded, SamplingPlan(items), SamplerSettings("ddpm", 5, 1.0, batch_size=2), bar=False)
    assert len(calls) == 1


def test_guidance_interval_limits_gradient_terms_to_its_timesteps(tmp_path):
    """`--guidance-interval LO HI` (plan.cfg.interval) applies classifier/CLIP gradient terms only at
    LO <= t <= HI, as it does CFG; every other step gets the eps the term would have shifted."""
    from diffusion.sampling.guidance import CFGOptions
    from diffusion.sampling.plan import SampleItem, SamplerSettings, SamplingPlan, run_plan

    loaded = tiny_loaded(tmp_path)
    applied = []

    def make(items):
        def term(eps, info):
            applied.append(info.step.t)
            return eps + 0.1
        return term

    plan = SamplingPlan([SampleItem(seed=0)], terms=[make], cfg=CFGOptions(interval=(0, 500)))
    with torch.no_grad():
        limited = run_plan(loaded, plan, SamplerSettings("ddim", 10, 1.0, batch_size=1), bar=False)
    assert applied == [499, 399, 299, 199, 99]
    plan.cfg = CFGOptions()
    with torch.no_grad():
        everywhere = run_plan(loaded, plan, SamplerSettings("ddim", 10, 1.0, batch_size=1), bar=False)
    assert len(applied) == 5 + 10 and not torch.equal(limited, everywhere)
