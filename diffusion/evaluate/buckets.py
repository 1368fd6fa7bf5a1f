"""Accuracy per noise-level bucket, for noise-aware models (classifier, CLIP): CSV and a PNG plot.

ddpm guides are bucketed by timestep. edm guides are trained on log-uniform sigmas (`EDMSchedule.
guide_sigmas`); they are evaluated at POSITIONS levels spread the same way (position p <-> the
quantile p / POSITIONS) and bucketed by position, each row also giving its sigma range.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from ..io import atomic_write, atomic_write_text
from ..sampling.schedule import EDMSchedule, Schedule

POSITIONS = 1000  # edm: evaluation levels, the counterpart of a ddpm model's timesteps


def noise_positions(schedule: Schedule) -> int:
    """How many bucketed positions a report spreads its noise levels over (timesteps, or POSITIONS)."""
    return POSITIONS if isinstance(schedule, EDMSchedule) else schedule.num_train_timesteps


def noisy_inputs(schedule: Schedule, scheduler, x0: torch.Tensor, noise: torch.Tensor, position: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(network input, network time) of x0 at bucket positions: q_sample at timestep = position (ddpm),
    or the guides' preconditioned input at sigma = guide_sigmas((position + 0.5) / POSITIONS) (edm)."""
    if isinstance(schedule, EDMSchedule):
        sigma = schedule.guide_sigmas((position.float() + 0.5) / POSITIONS)
        x_in, t_in, _ = schedule.training_example(x0, noise, sigma)
        return x_in, t_in
    return scheduler.add_noise(x0, noise, position), position


def bucket_accuracy(correct: torch.Tensor, t: torch.Tensor, num_timesteps: int, buckets: int = 10,
                    schedule: Schedule | None = None) -> list[dict]:
    """Rows {bucket, t_lo, t_hi, n, accuracy} for `buckets` equal ranges of [0, num_timesteps); with an
    edm schedule, t are positions and each row also gets its sigma range (sigma_lo, sigma_hi)."""
    edges = torch.linspace(0, num_timesteps, buckets + 1).round().long().tolist()
    rows = []
    for b in range(buckets):
        lo, hi = edges[b], edges[b + 1]
        inside = (t >= lo) & (t < hi)
        n = int(inside.sum())
        acc = float(correct[inside].float().mean()) if n else float("nan")
        rows.append({"bucket": b, "t_lo": lo, "t_hi": hi - 1, "n": n, "accuracy": acc})
        if isinstance(schedule, EDMSchedule):
            sigmas = schedule.guide_sigmas(torch.tensor([lo, hi], dtype=torch.float64) / num_timesteps).tolist()
            rows[-1].update(sigma_lo=round(sigmas[0], 4), sigma_hi=round(sigmas[1], 4))
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a printed table, one line per bucket."""
    if rows and "sigma_lo" in rows[0]:
        lines = ["bucket | sigma range     | n     | accuracy"]
        for r in rows:
            lines.append(f"{r['bucket']:>6} | {r['sigma_lo']:>7.3g}-{r['sigma_hi']:<7.3g} | {r['n']:<5} | {r['accuracy']:.3f}")
        return "\n".join(lines)
    lines = ["bucket | t range   | n     | accuracy"]
    for r in rows:
        lines.append(f"{r['bucket']:>6} | {r['t_lo']:>4}-{r['t_hi']:<4} | {r['n']:<5} | {r['accuracy']:.3f}")
    return "\n".join(lines)


def write_bucket_report(rows: list[dict], out_dir: Path, name: str, title: str,
                        chance: float | None = None) -> tuple[Path, Path]:
    """Write `name.csv` and `name.png` (accuracy against t, with a dashed chance line if given) into `out_dir`."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    csv_path, png_path = out_dir / f"{name}.csv", out_dir / f"{name}.png"
    atomic_write_text(csv_path, buffer.getvalue())
    fig, ax = plt.subplots(figsize=(5, 3.2))
    by_sigma = "sigma_lo" in rows[0]
    centres = [(r["sigma_lo"] * r["sigma_hi"]) ** 0.5 if by_sigma else (r["t_lo"] + r["t_hi"]) / 2 for r in rows]
    ax.plot(centres, [r["accuracy"] for r in rows], marker="o")
    if by_sigma:
        ax.set_xscale("log")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
        ax.legend(loc="upper right", fontsize=8)
    ax.set(xlabel="sigma" if by_sigma else "timestep t", ylabel="held-out accuracy", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return csv_path, png_path
