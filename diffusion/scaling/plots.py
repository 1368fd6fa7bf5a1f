"""Log-log plots of the fits (matplotlib, Agg backend): L–N, L–D, L–C and IsoFLOP curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fit import IsoFlopResult, PowerLawFit  # noqa: E402

EXTRAPOLATE = 10.0  # plot fitted lines this factor beyond the data


def _band(ax, fit: PowerLawFit, x: np.ndarray, color: str) -> None:
    """The fitted line, with a 95% band from the bootstrap refits."""
    ax.plot(x, fit.predict(x), color=color, lw=1.5,
            label=f"E={fit.E:.3g} + A·x^-{fit.alpha:.3f}")
    if fit.boot:
        curves = np.array([b["E"] + b["A"] * x ** -b["alpha"] for b in fit.boot])
        ax.fill_between(x, np.percentile(curves, 2.5, axis=0), np.percentile(curves, 97.5, axis=0), color=color, alpha=0.2)
    ax.axvline(fit.x_range[1], color="grey", ls=":", lw=0.8)


def _axes(xlabel: str, title: str):
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_law(path: Path, x, y, fit: PowerLawFit | None, xlabel: str, title: str, points=None) -> Path:
    """Data points (and optional background points) with the fitted law extrapolated past the data."""
    fig, ax = _axes(xlabel, title)
    if points is not None:
        ax.scatter(points[0], points[1], s=6, color="lightgrey", label="all evaluations")
    ax.scatter(x, y, s=18, color="k", zorder=3, label="fitted points")
    if fit is not None:
        grid = np.geomspace(min(x), max(x) * EXTRAPOLATE, 200)
        _band(ax, fit, grid, "C0")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_isoflop(path: Path, iso: IsoFlopResult) -> Path:
    """Loss against N for each budget, the fitted parabolas in ln N and their minima."""
    fig, ax = _axes("parameters N", "IsoFLOP curves")
    ax.set_yscale("linear")
    for i, (budget, pts, coef) in enumerate(zip(iso.budgets, iso.points, iso.parabolas)):
        n, loss = np.array(pts).T
        ax.scatter(n, loss, s=12, color=f"C{i % 10}")
        grid = np.geomspace(n.min(), n.max(), 100)
        ax.plot(grid, np.polyval(coef, np.log(grid)), color=f"C{i % 10}", lw=1, label=f"C={budget:.2g}")
        ax.scatter([iso.n_opt[i]], [iso.loss_opt[i]], marker="*", s=80, color=f"C{i % 10}", edgecolor="k", zorder=4)
    ax.legend(fontsize=6, title=f"N_opt ∝ C^{iso.a:.2f}", title_fontsize=7)
    return _save(fig, path)


def plot_all(out_dir: Path, runs, rep) -> list[Path]:
    """Every plot the report's fits allow; returns the files written."""
    from .report import best_per

    out = []
    by_n = best_per(runs, lambda k: runs.params[k])
    ns = sorted(by_n)
    out.append(plot_law(out_dir / "loss_vs_params.png", ns, [by_n[n][0] for n in ns], rep.objects.get("L_N"),
                        "parameters N", "L(N): best loss per model size"))
    fig, ax = _axes("dataset size D (images)", "L(D): best loss per data size, per N")
    for i, n in enumerate(ns):
        by_d = best_per(runs, lambda k: runs.data[k], [k for k in runs.names if runs.params[k] == n])
        ds = sorted(by_d)
        ax.plot(ds, [by_d[d][0] for d in ds], "o-", color=f"C{i % 10}", ms=3, lw=0.8, label=f"N={n:.3g}")
        fit = rep.objects.get(f"L_D@N={n:.4g}")
        if fit is not None:
            _band(ax, fit, np.geomspace(min(ds), max(ds) * EXTRAPOLATE, 100), f"C{i % 10}")
    ax.legend(fontsize=6)
    out.append(_save(fig, out_dir / "loss_vs_data.png"))
    c = [r["flops"] for k in runs.names for r in runs.curves[k]]
    y = [r["val_loss"] for k in runs.names for r in runs.curves[k]]
    idx = rep.objects.get("frontier")
    fx, fy = (np.array(c)[idx], np.array(y)[idx]) if idx is not None else (c, y)
    out.append(plot_law(out_dir / "loss_vs_compute.png", fx, fy, rep.objects.get("L_C"), "training FLOPs C",
                        "L(C): compute frontier", points=(c, y)))
    if rep.objects.get("isoflop") is not None:
        out.append(plot_isoflop(out_dir / "isoflop.png", rep.objects["isoflop"]))
    return out
