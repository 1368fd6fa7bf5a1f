"""Accuracy per timestep bucket, for noise-aware models (classifier, CLIP): CSV and a PNG plot."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from ..io import atomic_write, atomic_write_text


def bucket_accuracy(correct: torch.Tensor, t: torch.Tensor, num_timesteps: int, buckets: int = 10) -> list[dict]:
    """Rows {bucket, t_lo, t_hi, n, accuracy} for `buckets` equal ranges of [0, num_timesteps)."""
    edges = torch.linspace(0, num_timesteps, buckets + 1).round().long().tolist()
    rows = []
    for b in range(buckets):
        lo, hi = edges[b], edges[b + 1]
        inside = (t >= lo) & (t < hi)
        n = int(inside.sum())
        acc = float(correct[inside].float().mean()) if n else float("nan")
        rows.append({"bucket": b, "t_lo": lo, "t_hi": hi - 1, "n": n, "accuracy": acc})
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a printed table, one line per bucket."""
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
    centres = [(r["t_lo"] + r["t_hi"]) / 2 for r in rows]
    ax.plot(centres, [r["accuracy"] for r in rows], marker="o")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.3f})")
        ax.legend(loc="upper right", fontsize=8)
    ax.set(xlabel="timestep t", ylabel="held-out accuracy", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return csv_path, png_path
