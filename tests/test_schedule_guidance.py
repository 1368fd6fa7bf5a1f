"""The noise schedule's closed form, parameterisation conversions and the CFG combination."""
import torch

from diffusion.config import DiffusionConfig, ModelConfig
from diffusion.guidance import ClassifierFreeGuidance, cfg_combine, gradient_term, posterior_mean_coefficient, StepInfo
from diffusion.models import build_denoiser
from diffusion.schedule import alpha_bar, build_sampler, build_train_scheduler, epsilon_to_x0, to_epsilon, training_target


def test_noising_matches_closed_form():
    for schedule in ("linear", "cosine"):
        sched = build_train_scheduler(DiffusionConfig(beta_schedule=schedule))
        betas = sched.betas.double()
        ab = torch.cumprod(1 - betas, 0)
        x0, noise = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
        t = torch.tensor([0, 10, 250, 700, 999])
        expected = ab[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().view(-1, 1, 1, 1) * noise
        torch.testing.assert_close(sched.add_noise(x0, noise, t), expected.float(), atol=1e-5, rtol=1e-5)


def test_v_prediction_converts_back_to_epsilon_and_x0():
    sched = build_train_scheduler(DiffusionConfig(prediction_type="v_prediction"))
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([5, 100, 500, 900])
    x_t = sched.add_noise(x0, noise, t)
    v = training_target(sched, x0, noise, t)
    ab = alpha_bar(sched, t)
    eps = to_epsilon(v, x_t, ab, "v_prediction")
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(epsilon_to_x0(eps, x_t, ab), x0, atol=1e-3, rtol=1e-3)


def _cfg_setup(scale):
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(condition="class", base_channels=16, channel_mult=[1, 2], layers_per_block=1,
                                       attention_resolutions=[], attention_head_dim=8), 8, num_classes=3).eval()
    sched = build_train_scheduler(DiffusionConfig(num_train_timesteps=100))
    cond = {"labels": torch.tensor([0, 2])}
    fn = ClassifierFreeGuidance(model, cond, model.null_condition(cond), scale, "epsilon", sched)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([50, 50])
    with torch.no_grad():
        eps_c = model(x, t, labels=cond["labels"])
        eps_u = model(x, t, labels=torch.tensor([3, 3]))
        return fn(x, t), eps_c, eps_u


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


def test_mean_form_shifts_ddpm_mean_by_sigma_times_gradient():
    """eps - c*g must move the DDPM posterior mean by exactly Sigma_t * g."""
    sched = build_sampler(build_train_scheduler(DiffusionConfig(num_train_timesteps=100)), "ddpm", 100)
    sched.config.clip_sample = False
    x, eps, g = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    t = 60
    info = StepInfo(x=x, t=torch.tensor([t]), alpha_bar=alpha_bar(sched, torch.tensor([t])), scheduler=sched,
                    index=0, next_t=t - 1)
    term = gradient_term(lambda x_, t_: (x_ * g).sum(dim=(1, 2, 3)), scale=1.0, form="mean")
    shifted_eps = term(eps, info)
    variance = sched._get_variance(t)
    gen = lambda: [torch.Generator().manual_seed(0)]
    mu = sched.step(eps, t, x, generator=gen()).prev_sample
    mu_shifted = sched.step(shifted_eps, t, x, generator=gen()).prev_sample
    torch.testing.assert_close(mu_shifted - mu, variance * g, atol=1e-5, rtol=1e-4)
    assert posterior_mean_coefficient(info).shape == (1, 1, 1, 1)


def test_every_sampler_recovers_the_data_point_under_the_oracle_denoiser():
    """For data that is one image x*, eps*(x_t) = (x_t - sqrt(ab) x*) / sqrt(1 - ab); sampling must return x*."""
    from diffusion.sampling import sample_loop, seeded_noise

    target = torch.rand(3, 8, 8) * 1.6 - 0.8
    train_sched = build_train_scheduler(DiffusionConfig())
    for name, steps in (("ddpm", 1000), ("ddpm", 50), ("ddim", 20), ("dpmsolver", 10)):
        sched = build_sampler(train_sched, name, steps)
        oracle = lambda x, t: (x - alpha_bar(sched, t).sqrt() * target) / (1 - alpha_bar(sched, t)).sqrt()
        noise, gens = seeded_noise((3, 8, 8), [0, 1])
        out = sample_loop(oracle, sched, noise, gens, progress=False)
        torch.testing.assert_close(out, target.expand_as(out), atol=2e-2, rtol=0, msg=f"{name} {steps}")
