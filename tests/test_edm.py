"""EDM's formulation: preconditioning, Karras sigmas, the Heun/Euler core on both formulations."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion.config import DiffusionConfig
from diffusion.sampling.guidance import ClassifierFreeGuidance, StepInfo
from diffusion.sampling.loop import Guidance, Trajectory, sample_loop, seeded_noise
from diffusion.sampling.samplers import SAMPLERS, KarrasSampler, SigmaOptions, build_sampler
from diffusion.sampling.schedule import CLEAN, EDMSchedule, NoiseSchedule, epsilon_to_x0, karras_sigmas, x0_to_epsilon

EDM = EDMSchedule()
DDPM = NoiseSchedule.from_config(DiffusionConfig())  # linear, 1000 steps
SHAPE = (3, 4, 4)


class GaussianF(torch.nn.Module):
    """The network F whose preconditioned D(x; sigma) is the exact denoiser of data ~ N(0, std^2 I):
    D = std^2 / (std^2 + sigma^2) x. It reads what EDM's network reads (c_in x, c_noise) and undoes the
    preconditioning, so a sampling run exercises `network_input`, `to_epsilon` and the sampler."""

    def __init__(self, schedule: EDMSchedule, std: float):
        super().__init__()
        self.schedule, self.std = schedule, std

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        sigma = (4 * c_noise.double()).exp().view(-1, 1, 1, 1)
        c_skip, c_out, c_in = self.schedule.coefficients(sigma)
        x_sigma = x_in.double() / c_in
        denoised = self.std**2 / (self.std**2 + sigma**2) * x_sigma
        return ((denoised - c_skip * x_sigma) / c_out).float()


class GaussianEps(torch.nn.Module):
    """The exact eps of data ~ N(0, std^2 I) for a ddpm schedule, at any (fractional) timestep."""

    def __init__(self, schedule: NoiseSchedule, std: float):
        super().__init__()
        self.schedule, self.std = schedule, std

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.schedule.alpha_bar(t).double()
        x0 = self.std**2 * ab.sqrt() * x.double() / (ab * self.std**2 + 1 - ab)
        return ((x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()).float()


def exact_x0(noise: torch.Tensor, sigma_max: float, std: float) -> torch.Tensor:
    """The end of the probability-flow ODE from x_sigma = noise * sqrt(1 + sigma_max^2) (the VP start):
    dx/dsigma = (x - D) / sigma = sigma x / (std^2 + sigma^2), so x(0) = x(sigma_max) std / sqrt(std^2 + sigma_max^2)."""
    return noise.double() * math.sqrt(1 + sigma_max**2) * std / math.sqrt(std**2 + sigma_max**2)


def edm_algorithm_1(denoise, x_sigma: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Karras et al.'s Algorithm 1 (deterministic Heun) in sigma space, float64, as the paper writes it."""
    x = x_sigma.double()
    sigmas = [*sigmas, 0.0]
    for i in range(len(sigmas) - 1):
        a, b = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, a)) / a
        x_next = x + (b - a) * d
        if b > 0:
            x_next = x + (b - a) * (d + (x_next - denoise(x_next, b)) / b) / 2
        x = x_next
    return x


@pytest.mark.parametrize("schedule", [EDM, DDPM], ids=["edm", "ddpm-via-sigma"])
def test_heun_follows_the_deterministic_path_of_the_exact_gaussian_denoiser(schedule):
    """The exact denoiser of data ~ N(0, std^2 I), D = std^2 / (std^2 + sigma^2) x, has a closed-form
    ODE path. Heun's 18 steps (35 evaluations) on Karras' sigmas, through our VP-form loop (an edm
    model via the preconditioning, a ddpm model via sigma(t) at fractional timesteps), land within
    1e-5 of EDM's Algorithm 1 run in float64; Heun converges at second order to the exact end (within
    1e-3 of it at 200 steps), ahead of Euler at the same number of evaluations.

    At 35 evaluations Heun itself is about 5% off this path (the trajectory bends around sigma ~ std,
    where Karras' steps are about 1.8x apart), so the 1e-3 bound holds at 200 steps, not at 18."""
    std = 0.5
    net = GaussianF(schedule, std) if schedule is EDM else GaussianEps(schedule, std)
    model_fn = ClassifierFreeGuidance(net, {}, {}, 0.0)
    noise, generators = seeded_noise(SHAPE, range(16))

    def heun(steps: int, name: str = "heun") -> tuple[torch.Tensor, list[float], int]:
        calls = []
        counted = lambda x, info: calls.append(1) or model_fn(x, info)  # noqa: E731
        sampler = build_sampler(schedule, name, steps)
        with torch.no_grad():
            out = sample_loop(counted, Trajectory(schedule, sampler, generators, Guidance(x0=None)), noise)
        return out.double(), [float(schedule.sigma(s.t)) for s in sampler.steps], len(calls)

    out, sigmas, evaluations = heun(18)
    assert evaluations == 35
    reference = edm_algorithm_1(lambda x, s: std**2 / (std**2 + s**2) * x, noise * math.sqrt(1 + sigmas[0] ** 2), sigmas)
    assert float((out - reference).abs().max()) < 1e-5
    exact = exact_x0(noise, sigmas[0], std)
    errors = {n: float((heun(n)[0] - exact).abs().max()) for n in (18, 36, 200)}
    assert errors[200] < 1e-3
    assert errors[36] < errors[18] / 3  # second order: halving the step quarters the error
    euler = float((heun(35, "euler")[0] - exact).abs().max())
    assert euler > 1.3 * errors[18]


def test_preconditioning_returns_the_input_as_sigma_goes_to_zero():
    """c_skip -> 1 and c_out -> 0: whatever the network says, D(x; sigma) -> x. Checked on the sampler's
    path with an untrained U-Net: VP state -> network_input -> Denoiser -> to_epsilon -> x0."""
    from diffusion.config import ModelConfig
    from diffusion.models import build_denoiser

    sigma = torch.tensor([1e-1, 1e-3, 1e-6])
    c_skip, c_out, c_in = EDM.coefficients(sigma)
    assert float(1 - c_skip[2]) < 1e-10 and float(c_out[2]) < 1.01e-6
    torch.testing.assert_close(c_in[1:], torch.full((2,), 2.0), atol=1e-4, rtol=0)  # 1 / sigma_data
    net = build_denoiser(ModelConfig(base_channels=16, channel_mult=[1, 2], layers_per_block=1,
                                     attention_resolutions=[], attention_head_dim=8), 8, 0).eval()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    x_vp = x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
    with torch.no_grad():
        x_in, c_noise = EDM.network_input(x_vp, sigma)
        out = net(x_in, c_noise)
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    x0 = epsilon_to_x0(EDM.to_epsilon(out, x_vp, sigma), x_vp, EDM.alpha_bar(sigma))
    # float32 VP form: 1 - alpha_bar = sigma^2 / (1 + sigma^2) keeps ~1% at sigma = 1e-3, i.e. ~1e-5 in x0
    torch.testing.assert_close(x0, EDM.denoise(out, x, sigma), atol=1e-4, rtol=0)
    error = (x0 - x).flatten(1).abs().max(dim=1).values
    assert float(error[0]) > 1e-3 and float(error[2]) < 1e-5  # the network matters at 0.1, not at 1e-6
    assert float(error[2]) <= float(c_out[2] * out[2].abs().max()) * 1.01 + 1e-6


def test_edm_training_target_is_the_weighted_denoiser_loss():
    """||F - target||^2 equals EDM's lambda(sigma) ||D - x0||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2."""
    x0, noise = torch.rand(4, *SHAPE) * 2 - 1, torch.randn(4, *SHAPE)
    sigma = torch.tensor([0.01, 0.3, 2.0, 60.0])
    x_in, c_noise, target = EDM.training_example(x0, noise, sigma)
    out = torch.randn_like(target)
    denoised = EDM.denoise(out, x0 + sigma.view(-1, 1, 1, 1) * noise, sigma)
    weight = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2).view(-1, 1, 1, 1)
    torch.testing.assert_close((out - target) ** 2, weight * (denoised - x0) ** 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c_noise, sigma.log() / 4)


def test_fractional_timesteps_interpolate_log_sigma_and_invert():
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    torch.testing.assert_close(DDPM.alpha_bar(t).flatten(), DDPM.table[t.long()], rtol=1e-5, atol=1e-7)
    halfway = DDPM.sigma(torch.tensor([10.5])).flatten()
    expected = (DDPM.log_sigmas[10].exp() * DDPM.log_sigmas[11].exp()).sqrt()  # geometric mean
    torch.testing.assert_close(halfway, expected.view(1))
    for step in (0.0, 3.25, 417.5, 998.9):
        assert abs(DDPM.time_of(float(DDPM.sigma(step))) - step) < 1e-3
    assert DDPM.time_of(0.0) == CLEAN and float(DDPM.sigma(CLEAN)) == 0.0 and float(EDM.alpha_bar(CLEAN)) == 1.0


def test_karras_sigmas_are_diffusers_and_the_sampler_clamps_to_a_ddpm_models_range():
    from diffusers import EDMEulerScheduler

    reference = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    reference.set_timesteps(18)
    torch.testing.assert_close(torch.tensor(karras_sigmas(18, 0.002, 80.0), dtype=torch.float64), reference.sigmas[:-1].double(),
                               rtol=1e-6, atol=0)
    sampler = build_sampler(DDPM, "euler", 10)
    first, last = (float(DDPM.sigma(s.t)) for s in (sampler.steps[0], sampler.steps[-1]))
    assert abs(first - 80.0) < 1e-3 and abs(last - DDPM.sigma_limits()[0]) < 1e-6  # 0.002 is below sigma(0) = 0.01
    edm = build_sampler(EDM, "heun", 18, SigmaOptions(sigma_min=0.01, sigma_max=10.0))
    assert edm.steps[0].t == pytest.approx(10.0) and edm.steps[-1].t == pytest.approx(0.01)
    assert edm.steps[-1].t_next == CLEAN


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("schedule", [EDM, DDPM], ids=["edm", "ddpm"])
def test_every_sampler_ends_on_a_single_data_point(name, schedule):
    """Data that is one image x*: every sampler on either formulation must end on x* (Karras' sigmas
    for every sampler on edm, heun and euler on ddpm), with churn too."""
    target = torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    oracle = lambda x, info: x0_to_epsilon(target, x, info.alpha_bar)  # noqa: E731
    options = [SigmaOptions(), SigmaOptions(churn=20.0, churn_noise=1.003)] if name in ("heun", "euler") else [SigmaOptions()]
    for n in (1, 2, 7, 18, 50):
        for opts in options:
            noise, generators = seeded_noise(SHAPE, [n])
            trajectory = Trajectory(schedule, build_sampler(schedule, name, n, opts), generators)
            out = sample_loop(oracle, trajectory, noise)
            assert float((out - target).abs().max()) < 1e-4, f"{name} n={n} {opts}"


def test_euler_is_ddim_on_the_same_levels_and_churn_raises_them():
    target = torch.rand(2, *SHAPE) - 0.5
    model_fn = lambda x, info: x0_to_epsilon(target, x, info.alpha_bar) + 0.1 * x  # noqa: E731  (not an oracle)
    noise, generators = seeded_noise(SHAPE, [1, 2])
    outs = {}
    for name in ("euler", "ddim"):
        outs[name] = sample_loop(model_fn, Trajectory(EDM, build_sampler(EDM, name, 12), generators), noise)
    torch.testing.assert_close(outs["euler"], outs["ddim"], atol=1e-5, rtol=1e-5)
    plain = build_sampler(EDM, "euler", 12)
    churned = build_sampler(EDM, "euler", 12, SigmaOptions(churn=12.0, churn_min=0.05, churn_max=50.0))
    assert isinstance(churned, KarrasSampler)
    for a, b in zip(plain.steps, churned.steps):
        raised = 0.05 <= a.t <= 50.0
        assert b.t == pytest.approx(a.t * math.sqrt(2) if raised else a.t)  # gamma = min(12 / 12, sqrt 2 - 1)


def test_heuns_second_evaluation_is_guided_clipped_and_constrained():
    """Both evaluations of a Heun step run the whole prediction: guidance terms see the second point's
    own time and state, the x0 there is clipped after them, constraints run last, at both points."""
    seen = []

    def model_fn(x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return x0_to_epsilon(torch.full_like(x, 3.0), x, info.alpha_bar)  # raw x0 = 3: out of range

    def term(eps: torch.Tensor, info: StepInfo) -> torch.Tensor:
        seen.append(("term", info.step.t, float(epsilon_to_x0(eps, info.x, info.alpha_bar).max())))
        return eps

    def constraint(eps: torch.Tensor, info: StepInfo) -> torch.Tensor:
        seen.append(("constraint", info.step.t, float(epsilon_to_x0(eps, info.x, info.alpha_bar).max())))
        return eps

    sampler = build_sampler(EDM, "heun", 3)
    noise, generators = seeded_noise(SHAPE, [0])
    sample_loop(model_fn, Trajectory(EDM, sampler, generators, Guidance(terms=[term], constraints=[constraint])), noise)
    times = [s.t for s in sampler.steps]
    expected = [times[0], times[1], times[1], times[2], times[2]]  # step 0 and its second point, step 1 ..., step 2 (Euler)
    assert [t for kind, t, _ in seen if kind == "term"] == pytest.approx(expected)
    assert all(x0 == pytest.approx(3.0, rel=1e-3) for kind, _, x0 in seen if kind == "term")  # before the clip
    assert all(x0 <= 1.0 + 1e-5 for kind, _, x0 in seen if kind == "constraint")  # after it


def test_the_edm_dpm_solver_visits_diffusers_sigmas_and_ends_on_the_data_point():
    sampler = build_sampler(EDM, "dpmsolver", 10)
    torch.testing.assert_close(torch.tensor([s.t for s in sampler.steps]), sampler.scheduler.sigmas[:-1])
    target = torch.rand(1, *SHAPE) * 1.6 - 0.8
    noise, generators = seeded_noise(SHAPE, [0])
    out = sample_loop(lambda x, info: x0_to_epsilon(target, x, info.alpha_bar), Trajectory(EDM, sampler, generators), noise)
    assert float((out - target).abs().max()) < 1e-4


def test_guides_of_another_schedule_read_the_same_noise_level():
    """`time_map`: the identity for the same schedule; else the target's time of the same sigma."""
    from diffusion.sampling.schedule import time_map

    t = torch.tensor([0, 250, 999])
    assert time_map(DDPM, DDPM)(t) is t
    torch.testing.assert_close(time_map(DDPM, EDM)(t), DDPM.sigma(t).flatten())
    sigma = torch.tensor([0.05, 1.0, 60.0])
    back = time_map(EDM, DDPM)(sigma)
    torch.testing.assert_close(DDPM.sigma(back).flatten(), sigma, rtol=1e-4, atol=0)
    cosine = NoiseSchedule.from_config(DiffusionConfig(beta_schedule="cosine"))
    mapped = time_map(DDPM, cosine)(t.float())
    torch.testing.assert_close(cosine.sigma(mapped).flatten(), DDPM.sigma(t).flatten(), rtol=1e-4, atol=0)


def test_upsampler_augmentation_is_given_in_sigma_on_edm():
    from types import SimpleNamespace

    from diffusion.conditioning import upsample as up
    from diffusion.config import UpsampleConfig

    low = torch.rand(64, 3, 4, 4) * 2 - 1
    cfg = SimpleNamespace(upsample=UpsampleConfig(factor=2, aug_noise=[0.0, 0.5]), data=SimpleNamespace(resolution=8))
    cond = up.training_condition(low, cfg, EDM)
    sigma = (4 * cond["aug_level"]).exp()  # c_noise of sigma, floored at sigma_min
    assert float(sigma.min()) >= 0.002 - 1e-6 and float(sigma.max()) <= 0.5 + 1e-6
    noise = torch.randn(1, 3, 8, 8)
    channels = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(up.augment(channels, torch.tensor([0.3]), EDM, noise), channels + 0.3 * noise)
    assert torch.equal(up.augment(channels, torch.tensor([0.0]), EDM, noise), channels)
    assert up.aug_level(0.3, EDM) == 0.3 and up.aug_level(0.25, DDPM) == 250
    clean = up.sampling_condition(low[:1], cfg, EDM, 0.0, seed=0)["aug_level"]
    assert float(clean) == pytest.approx(math.log(0.002) / 4)
