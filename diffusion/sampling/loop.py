"""The sampling loop, with per-sample seeds.

Sample i of a run uses its own generator seeded with `seed + i` for both its starting noise and every
later noise draw, so any sample can be regenerated alone, in any batch. One step is, in order:
model function -> guidance terms -> x0 clipped or thresholded -> constraints -> sampler update ->
post-step hooks (see `guidance.py`). Guidance terms and hooks are passed in, so features never edit the loop.
The first four are `Trajectory.predict`; a second-order sampler (Heun) calls it again at its second
point, so the prediction there is guided, clipped and constrained the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .guidance import GuidanceTerm, ModelFn, StepInfo, X0Processor, clip_x0, process_x0
from .samplers import Sampler, Step, noise_from
from .schedule import Schedule, epsilon_to_x0

PostStep = Callable[[torch.Tensor, StepInfo], torch.Tensor]
Progress = Callable[[int, int], None]  # (steps done, steps in all), e.g. a web page's progress bar


def seeded_noise(shape: tuple[int, ...], seeds: Sequence[int], device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Starting noise (len(seeds), *shape) and the per-sample generators that drew it."""
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    return noise_from(generators, shape, device), generators


@dataclass
class Guidance:
    """Everything a step applies around the model, in this order: guidance terms, x0 processing,
    constraints (terms that must hold exactly, e.g. an upsampler's low-res consistency), post-step hooks."""

    x0: X0Processor | None = clip_x0
    terms: Sequence[GuidanceTerm] = ()
    constraints: Sequence[GuidanceTerm] = ()
    hooks: Sequence[PostStep] = ()


@dataclass
class Trajectory:
    """The state a loop needs: schedule on the sampling device, sampler and per-sample generators."""

    schedule: Schedule
    sampler: Sampler
    generators: list[torch.Generator]
    guidance: Guidance = field(default_factory=Guidance)

    def info(self, x: torch.Tensor, step: Step) -> StepInfo:
        batch = x.shape[0]
        dtype = torch.long if isinstance(step.t, int) else torch.float32  # fractional timesteps, sigmas
        return StepInfo(
            x=x, t=torch.full((batch,), step.t, device=x.device, dtype=dtype), step=step,
            alpha_bar=self.schedule.alpha_bar(step.t).expand(batch).view(-1, 1, 1, 1),
            alpha_bar_next=self.schedule.alpha_bar(step.t_next).expand(batch).view(-1, 1, 1, 1),
            schedule=self.schedule, generators=self.generators,
        )

    def predict(self, model_fn: ModelFn, x: torch.Tensor, step: Step) -> tuple[StepInfo, torch.Tensor]:
        """The final eps at (x, step.t): model function, guidance terms, x0 processing, constraints."""
        info = self.info(x, step)
        eps = model_fn(x, info)
        for term in self.guidance.terms:
            eps = term(eps, info)
        eps = process_x0(eps, info, self.guidance.x0)  # the guided x0 is a clean image too: keep it in range
        for constraint in self.guidance.constraints:
            eps = constraint(eps, info)
        return info, eps

    def step(self, model_fn: ModelFn, x: torch.Tensor, step: Step) -> torch.Tensor:
        """x_t -> x_{t_next}."""
        info, eps = self.predict(model_fn, x, step)
        x0 = epsilon_to_x0(eps, info.x, info.alpha_bar)

        def predict_at(x_other: torch.Tensor, t_other: int | float) -> torch.Tensor:
            """Heun's second point, seen by terms and constraints as a step that starts there."""
            return self.predict(model_fn, x_other, Step(step.index, t_other, t_other))[1]

        x = self.sampler.update(x, x0, eps, step, info.alpha_bar, info.alpha_bar_next, self.generators, predict_at)
        for hook in self.guidance.hooks:
            x = hook(x, info)
        return x


Loop = Callable[[ModelFn, Trajectory, torch.Tensor, Progress | None], torch.Tensor]


@torch.no_grad()
def sample_loop(model_fn: ModelFn, trajectory: Trajectory, noise: torch.Tensor,
                progress: Progress | None = None) -> torch.Tensor:
    """x_0 from starting noise, visiting the sampler's steps in order."""
    x = noise
    steps = trajectory.sampler.steps
    for step in steps:
        x = trajectory.step(model_fn, x, step)
        if progress is not None:
            progress(step.index + 1, len(steps))
    return x
