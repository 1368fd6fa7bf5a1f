"""How far one classifier-guidance step moves the sample, step by step (why a guidance scale means
little at t = 999 on the cosine schedule).

For each step of a DDIM run guided by the noise-aware classifier, prints alpha_bar, the RMS of the
classifier gradient g = grad log p(y | x_t), the RMS shift of the predicted x0 that the eps-form
term s * g asks for, what is left of it once the guided x0 is clipped (the loop's order), and the
shift of x_{t_next}. On the cosine schedule alpha_bar(999) = 2.4e-9, so the first step asks for an
x0 shift of (1 - ab) / sqrt(ab) = 20,000 times s * g; the clip bounds it.

  python benchmarks/guidance_shift_per_step.py --uncond runs/shapes_uncond --classifier runs/classifier_shapes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--uncond", default="runs/shapes_uncond")
    p.add_argument("--classifier", default="runs/classifier_shapes")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--num-samples", type=int, default=24)
    return p


if __name__ == "__main__":  # --help and bad flags answer before torch is imported (0.1 s, not 10-30 s)
    build_parser().parse_args()

import torch  # noqa: E402

from diffusion.checkpoints.load import load_model  # noqa: E402
from diffusion.sampling.guidance import ClassifierFreeGuidance, clip_x0, gradient_term, process_x0  # noqa: E402
from diffusion.sampling.loop import Trajectory, seeded_noise  # noqa: E402
from diffusion.sampling.samplers import build_sampler  # noqa: E402
from diffusion.sampling.schedule import epsilon_to_x0  # noqa: E402


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    den, clf = load_model(args.uncond), load_model(args.classifier)
    labels = torch.arange(args.num_samples) % 12
    res = den.cfg.data.resolution
    x, gens = seeded_noise((3, res, res), list(range(args.num_samples)))
    model_fn = ClassifierFreeGuidance(den.model, {}, {}, 0.0)  # unconditional denoiser
    term = gradient_term(lambda xt, t: clf.model.log_prob(xt, t, labels), args.scale)
    traj = Trajectory(den.schedule, build_sampler(den.schedule, "ddim", args.steps), gens)
    print(f"DDIM {args.steps}, classifier scale {args.scale:g}, {args.num_samples} samples (RMS over pixels)")
    print(f"{'t':>4} {'alpha_bar':>9} {'|g|':>8} {'asked x0 shift':>14} {'x0 shift':>9} {'x_next shift':>12}")
    for step in traj.sampler.steps:
        info = traj.info(x, step)
        raw = model_fn(x, info)
        asked = term(raw, info)
        eps, guided = process_x0(raw, info, clip_x0), process_x0(asked, info, clip_x0)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            g = torch.autograd.grad(clf.model.log_prob(xg, info.t, labels).sum(), xg)[0]
        x0, x0g = epsilon_to_x0(eps, x, info.alpha_bar), epsilon_to_x0(guided, x, info.alpha_bar)
        x0_asked = epsilon_to_x0(asked, x, info.alpha_bar) - epsilon_to_x0(raw, x, info.alpha_bar)
        plain = traj.sampler.update(x, x0, eps, step, info.alpha_bar, info.alpha_bar_next, gens)
        x_next = traj.sampler.update(x, x0g, guided, step, info.alpha_bar, info.alpha_bar_next, gens)
        print(f"{step.t:>4} {float(info.alpha_bar[0]):>9.3g} {rms(g):>8.3g} {rms(x0_asked):>14.3g} "
              f"{rms(x0g - x0):>9.3g} {rms(x_next - plain):>12.3g}")
        x = x_next


if __name__ == "__main__":
    from diffusion.errors import exit_on_user_error

    exit_on_user_error(main)()  # bad input (a missing run, --steps out of range): one line, exit status 2
