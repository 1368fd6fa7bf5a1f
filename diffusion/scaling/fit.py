"""Scaling-law fits with scipy: power laws, the joint L(N, D), the compute frontier and IsoFLOP.

Every fit minimises a Huber loss on log-loss residuals (as in Hoffmann et al., 2022) with
`scipy.optimize.least_squares` from several starting points and keeps the best. Inputs are
rescaled by their geometric mean so the optimiser sees numbers near 1; reported coefficients
are in the original units. Confidence intervals come from a bootstrap over the data points.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import least_squares, minimize_scalar

from ..errors import UserError

ALPHA_STARTS = (0.1, 0.3, 0.7, 1.5)
E_FRACTIONS = (0.0, 0.5, 0.9)  # starting E as a fraction of the smallest loss
OUTLIER_MESSAGE = "far from the power law: check this run"


@dataclass
class PowerLawFit:
    """L(x) = E + A * x**-alpha."""

    E: float
    A: float
    alpha: float
    r2: float  # of log L
    n_points: int
    x_range: tuple[float, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95% bootstrap intervals
    boot: list[dict[str, float]] = field(default_factory=list, repr=False)  # bootstrap refits

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha

    def to_dict(self) -> dict:
        return {"law": "E + A*x^-alpha", "E": self.E, "A": self.A, "alpha": self.alpha, "r2": self.r2,
                "n_points": self.n_points, "x_range": list(self.x_range), "ci": {k: list(v) for k, v in self.ci.items()}}


@dataclass
class JointFit:
    """L(N, D) = E + A / N**alpha + B / D**beta."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    r2: float
    n_points: int
    n_range: tuple[float, float]
    d_range: tuple[float, float]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    boot: list[dict[str, float]] = field(default_factory=list, repr=False)

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A * n**-self.alpha + self.B * d**-self.beta

    def to_dict(self) -> dict:
        return {"law": "E + A/N^alpha + B/D^beta", "E": self.E, "A": self.A, "alpha": self.alpha, "B": self.B,
                "beta": self.beta, "r2": self.r2, "n_points": self.n_points, "n_range": list(self.n_range),
                "d_range": list(self.d_range), "ci": {k: list(v) for k, v in self.ci.items()}}


def _r2(log_y: np.ndarray, log_pred: np.ndarray) -> float:
    total = float(np.sum((log_y - log_y.mean()) ** 2))
    return 1.0 - float(np.sum((log_y - log_pred) ** 2)) / total if total > 0 else float("nan")


def _check(x: np.ndarray, y: np.ndarray, minimum: int, what: str) -> None:
    if len(x) < minimum:
        raise UserError(f"{what}: need at least {minimum} points, got {len(x)}")
    if np.any(x <= 0) or np.any(y <= 0) or not np.all(np.isfinite(y)):
        raise UserError(f"{what}: every x and loss must be positive and finite")


def _best_least_squares(residual: Callable, starts: Sequence[np.ndarray], lower: np.ndarray, upper: np.ndarray,
                        f_scale: float) -> np.ndarray:
    best = None
    for p0 in starts:
        p0 = np.clip(p0, lower + 1e-9, upper - 1e-9)
        res = least_squares(residual, p0, bounds=(lower, upper), loss="huber", f_scale=f_scale, method="trf")
        if best is None or res.cost < best.cost:
            best = res
    return best.x


def _bootstrap(n: int, refit: Callable[[np.ndarray], dict[str, float]], n_boot: int, seed: int
               ) -> tuple[dict[str, tuple[float, float]], list[dict[str, float]]]:
    """95% percentile intervals of each refit parameter over resampled point indices, and the refits."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(max(n_boot, 0)):
        idx = rng.integers(0, n, n)
        if len(np.unique(idx)) >= 3 and (params := refit(idx)):
            samples.append(params)
    keys = samples[0].keys() if samples else ()
    ci = {k: (float(np.percentile([s[k] for s in samples], 2.5)), float(np.percentile([s[k] for s in samples], 97.5)))
          for k in keys}
    return ci, samples


# -- L(x) = E + A x^-alpha --------------------------------------------------------------------

def _power_law_params(x: np.ndarray, y: np.ndarray, f_scale: float, starts: Sequence[np.ndarray] | None = None) -> tuple[float, float, float]:
    x0 = float(np.exp(np.mean(np.log(x))))
    u, log_y = x / x0, np.log(y)

    def residual(p: np.ndarray) -> np.ndarray:  # p = (log E, log A', alpha), A' in rescaled units
        return np.log(np.exp(p[0]) + np.exp(p[1]) * u ** -p[2]) - log_y

    if starts is None:
        y_min, y_mean = float(y.min()), float(y.mean())
        starts = []
        for alpha, frac in itertools.product(ALPHA_STARTS, E_FRACTIONS):
            e = max(frac * y_min, 1e-4 * y_min)
            starts.append(np.array([np.log(e), np.log(max(y_mean - e, 1e-3 * y_mean)), alpha]))
    lower = np.array([np.log(y.min()) - 25, -50.0, 0.0])
    upper = np.array([np.log(y.min()), 50.0, 5.0])
    p = _best_least_squares(residual, starts, lower, upper, f_scale)
    return float(np.exp(p[0])), float(np.exp(p[1]) * x0 ** p[2]), float(p[2])


def fit_power_law(x: Sequence[float], y: Sequence[float], n_boot: int = 100, seed: int = 0,
                  f_scale: float = 1e-2) -> PowerLawFit:
    """Fit L = E + A x^-alpha (Huber on log residuals, several starts) with bootstrap intervals."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    _check(x, y, 3, "power-law fit")
    E, A, alpha = _power_law_params(x, y, f_scale)
    x0 = float(np.exp(np.mean(np.log(x))))
    start = [np.array([np.log(max(E, 1e-12)), np.log(A * x0**-alpha), alpha])]

    def refit(idx: np.ndarray) -> dict[str, float]:
        e, a, al = _power_law_params(x[idx], y[idx], f_scale, _rescale_starts(start, x, x[idx]))
        return {"E": e, "A": a, "alpha": al}

    fit = PowerLawFit(E, A, alpha, 0.0, len(x), (float(x.min()), float(x.max())))
    fit.r2 = _r2(np.log(y), np.log(fit.predict(x)))
    fit.ci, fit.boot = _bootstrap(len(x), refit, n_boot, seed)
    return fit


def _rescale_starts(starts: list[np.ndarray], x_full: np.ndarray, x_sub: np.ndarray) -> list[np.ndarray]:
    """Starting points given in `x_full`'s rescaled units, moved to `x_sub`'s."""
    shift = np.mean(np.log(x_sub)) - np.mean(np.log(x_full))
    return [np.array([p[0], p[1] - p[2] * shift, p[2]]) for p in starts]


# -- L(N, D) = E + A/N^alpha + B/D^beta -------------------------------------------------------

def _joint_params(n: np.ndarray, d: np.ndarray, y: np.ndarray, f_scale: float, starts: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Best (log E, log A', alpha, log B', beta) in units rescaled by the geometric means."""
    u, v, log_y = n / np.exp(np.mean(np.log(n))), d / np.exp(np.mean(np.log(d))), np.log(y)

    def residual(p: np.ndarray) -> np.ndarray:
        return np.log(np.exp(p[0]) + np.exp(p[1]) * u ** -p[2] + np.exp(p[3]) * v ** -p[4]) - log_y

    if starts is None:
        y_min, y_mean = float(y.min()), float(y.mean())
        starts = []
        for alpha, beta, frac in itertools.product((0.2, 0.5, 1.0), (0.2, 0.5, 1.0), E_FRACTIONS):
            e = max(frac * y_min, 1e-4 * y_min)
            rest = np.log(max(y_mean - e, 1e-3 * y_mean) / 2)
            starts.append(np.array([np.log(e), rest, alpha, rest, beta]))
    lower = np.array([np.log(y.min()) - 25, -50.0, 0.0, -50.0, 0.0])
    upper = np.array([np.log(y.min()), 50.0, 5.0, 50.0, 5.0])
    return _best_least_squares(residual, starts, lower, upper, f_scale)


def _joint_from_rescaled(p: np.ndarray, n: np.ndarray, d: np.ndarray) -> dict[str, float]:
    n0, d0 = np.exp(np.mean(np.log(n))), np.exp(np.mean(np.log(d)))
    return {"E": float(np.exp(p[0])), "A": float(np.exp(p[1]) * n0 ** p[2]), "alpha": float(p[2]),
            "B": float(np.exp(p[3]) * d0 ** p[4]), "beta": float(p[4])}


def fit_joint_law(n: Sequence[float], d: Sequence[float], y: Sequence[float], n_boot: int = 100, seed: int = 0,
                  f_scale: float = 1e-2) -> JointFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al.) with bootstrap intervals."""
    n, d, y = (np.asarray(a, dtype=float) for a in (n, d, y))
    _check(n, y, 5, "joint L(N, D) fit")
    _check(d, y, 5, "joint L(N, D) fit")
    p = _joint_params(n, d, y, f_scale)
    params = _joint_from_rescaled(p, n, d)

    def refit(idx: np.ndarray) -> dict[str, float]:
        shift_n = np.mean(np.log(n[idx])) - np.mean(np.log(n))
        shift_d = np.mean(np.log(d[idx])) - np.mean(np.log(d))
        start = p.copy()
        start[1] -= p[2] * shift_n
        start[3] -= p[4] * shift_d
        return _joint_from_rescaled(_joint_params(n[idx], d[idx], y[idx], f_scale, [start]), n[idx], d[idx])

    fit = JointFit(**params, r2=0.0, n_points=len(y), n_range=(float(n.min()), float(n.max())),
                   d_range=(float(d.min()), float(d.max())))
    fit.r2 = _r2(np.log(y), np.log(fit.predict(n, d)))
    fit.ci, fit.boot = _bootstrap(len(y), refit, n_boot, seed)
    return fit


# -- compute frontier ------------------------------------------------------------------------

def compute_frontier(flops: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """Indices of the lower envelope of loss against FLOPs over all runs' points, by increasing FLOPs.

    A point is on the frontier when no point at equal or lower compute has a lower loss.
    """
    c, y = np.asarray(flops, dtype=float), np.asarray(loss, dtype=float)
    order = np.lexsort((y, c))
    keep, best = [], np.inf
    for i in order:
        if y[i] < best:
            keep.append(i)
            best = y[i]
    return np.asarray(keep, dtype=int)


def fit_frontier(flops: Sequence[float], loss: Sequence[float], **kwargs) -> tuple[PowerLawFit, np.ndarray]:
    """L(C) fitted to the compute frontier; returns the fit and the frontier's indices."""
    idx = compute_frontier(flops, loss)
    c, y = np.asarray(flops, dtype=float)[idx], np.asarray(loss, dtype=float)[idx]
    return fit_power_law(c, y, **kwargs), idx


# -- IsoFLOP ---------------------------------------------------------------------------------

@dataclass
class IsoFlopResult:
    """Per-budget parabolas in log N and the fitted N_opt(C) = k * C**a."""

    budgets: list[float]
    points: list[list[tuple[float, float]]]  # per budget: (N, loss at that budget)
    parabolas: list[tuple[float, float, float]]  # loss = p0 (ln N)^2 + p1 ln N + p2
    n_opt: list[float]
    loss_opt: list[float]
    a: float
    k: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"law": "N_opt = k*C^a", "a": self.a, "k": self.k, "budgets": self.budgets, "n_opt": self.n_opt,
                "loss_opt": self.loss_opt, "points": self.points, "parabolas": self.parabolas,
                "ci": {k: list(v) for k, v in self.ci.items()}}


def loss_at_budget(flops: Sequence[float], loss: Sequence[float], budget: float) -> float | None:
    """One run's loss at compute `budget`, interpolated linearly in log-log; None outside its range."""
    c, y = np.asarray(flops, dtype=float), np.asarray(loss, dtype=float)
    order = np.argsort(c)
    c, y = c[order], y[order]
    if len(c) == 0 or budget < c[0] * (1 - 1e-9) or budget > c[-1] * (1 + 1e-9):
        return None
    return float(np.exp(np.interp(np.log(budget), np.log(c), np.log(y))))


def isoflop_fit(curves: Sequence[tuple[float, Sequence[float], Sequence[float]]], budgets: Sequence[float],
                n_boot: int = 100, seed: int = 0) -> IsoFlopResult:
    """For each budget C, fit loss against ln N with a parabola over runs that reach C; then N_opt ∝ C^a.

    `curves`: one (N, flops array, loss array) per run. Budgets with fewer than three sizes, or
    whose parabola opens downwards or whose minimum lies outside the sizes tried, are skipped.
    """
    kept, pts, parabolas, n_opt, l_opt = [], [], [], [], []
    for budget in budgets:
        row = [(n, v) for n, c, y in curves if (v := loss_at_budget(c, y, budget)) is not None]
        if len({n for n, _ in row}) < 3:
            continue
        log_n = np.log([n for n, _ in row])
        coef = np.polyfit(log_n, [v for _, v in row], 2)
        if coef[0] <= 0:
            continue
        vertex = -coef[1] / (2 * coef[0])
        if not log_n.min() <= vertex <= log_n.max():
            continue
        kept.append(float(budget))
        pts.append([(float(n), float(v)) for n, v in row])
        parabolas.append(tuple(float(c) for c in coef))
        n_opt.append(float(np.exp(vertex)))
        l_opt.append(float(np.polyval(coef, vertex)))
    if len(kept) < 2:
        raise UserError("IsoFLOP: fewer than two budgets have a minimum inside the model sizes tried")
    log_c, log_n = np.log(kept), np.log(n_opt)
    a, b = np.polyfit(log_c, log_n, 1)

    def refit(idx: np.ndarray) -> dict[str, float]:
        if len(np.unique(log_c[idx])) < 2:
            return {}
        return {"a": float(np.polyfit(log_c[idx], log_n[idx], 1)[0])}

    ci = _bootstrap(len(kept), refit, n_boot, seed)[0] if len(kept) >= 3 else {}
    return IsoFlopResult(kept, pts, parabolas, n_opt, l_opt, float(a), float(np.exp(b)), ci)


# -- outliers and the compute needed for a target loss ---------------------------------------

@dataclass
class Outlier:
    name: str
    sigma: float  # residual in robust standard deviations
    message: str = OUTLIER_MESSAGE


def flag_outliers(names: Sequence[str], predicted: Sequence[float], measured: Sequence[float], k: float = 3.0) -> list[Outlier]:
    """Runs whose log residual is more than k robust sigmas (1.4826 MAD) from the fit."""
    r = np.log(np.asarray(measured, dtype=float)) - np.log(np.asarray(predicted, dtype=float))
    sigma = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    sigma = max(sigma, 1e-3 * float(np.std(r)) if np.std(r) > 0 else 1e-12, 1e-12)
    return [Outlier(str(name), float(z)) for name, z in zip(names, (r - np.median(r)) / sigma) if abs(z) > k]


@dataclass
class ComputePlan:
    target_loss: float
    flops: float
    params: float
    images: float


def compute_for_target_loss(fit: JointFit, target: float, forward_flops: Callable[[float], float],
                            n_bounds: tuple[float, float] = (1e3, 1e13)) -> ComputePlan:
    """Least training compute C = 3 * forward_flops(N) * D with L(N, D) = target, and its N/D split.

    For each N the images needed are D(N) = (B / (target - E - A/N^alpha))^(1/beta); C is
    minimised over ln N (grid, then bounded scalar refinement).
    """
    if target <= fit.E:
        raise UserError(f"target loss {target:g} is at or below the fitted irreducible loss E = {fit.E:.4g}: no compute reaches it")

    def images(n: float) -> float:
        gap = target - fit.E - fit.A * n**-fit.alpha
        return (fit.B / gap) ** (1 / fit.beta) if gap > 0 else np.inf

    def log_c(log_n: float) -> float:
        d = images(float(np.exp(log_n)))
        return float(np.log(3 * forward_flops(float(np.exp(log_n))) * d)) if np.isfinite(d) else np.inf

    grid = np.linspace(np.log(n_bounds[0]), np.log(n_bounds[1]), 400)
    values = np.array([log_c(g) for g in grid])
    if not np.isfinite(values).any():
        raise UserError(f"target loss {target:g} is not reachable with models of {n_bounds[0]:.3g}-{n_bounds[1]:.3g} parameters")
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = minimize_scalar(log_c, bounds=(lo, hi), method="bounded") if hi > lo else None
    log_n = float(best.x) if best is not None and best.fun <= values[i] else float(grid[i])
    n = float(np.exp(log_n))
    return ComputePlan(target, float(np.exp(log_c(log_n))), n, float(images(n)))
