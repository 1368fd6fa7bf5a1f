"""From sweep.csv rows to fits.json, a Markdown summary and plots."""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .fit import (JointFit, PowerLawFit, fit_frontier, fit_joint_law, fit_power_law, flag_outliers,
                  isoflop_fit)


@dataclass
class Runs:
    """Per-run curves from sweep.csv rows."""

    names: list[str]
    params: dict[str, float]
    data: dict[str, float]
    forward: dict[str, float]
    curves: dict[str, list[dict]]  # rows of each run, by step

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "Runs":
        curves: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            curves[r["run"]].append(r)
        if not curves:
            raise UserError("no evaluated runs found: run the sweep first")
        for rs in curves.values():
            rs.sort(key=lambda r: r["step"])
        first = {n: rs[0] for n, rs in curves.items()}
        return cls(sorted(curves), {n: float(r["params"]) for n, r in first.items()},
                   {n: float(r["dataset_size"]) for n, r in first.items()},
                   {n: float(r["forward_flops"]) for n, r in first.items()}, dict(curves))

    def best(self, name: str) -> dict:
        """The run's lowest validation loss over its evaluation points (early stopping)."""
        return min(self.curves[name], key=lambda r: r["val_loss"])

    def without_params(self, n: float) -> "Runs":
        keep = [k for k in self.names if self.params[k] != n]
        return Runs(keep, self.params, self.data, self.forward, {k: self.curves[k] for k in keep})


@dataclass
class Report:
    fits: dict[str, Any] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)  # fit objects, for plots and prediction
    notes: list[str] = field(default_factory=list)


def _try(report: Report, key: str, fn) -> Any:
    try:
        obj = fn()
    except (UserError, ValueError, np.linalg.LinAlgError) as err:
        report.fits[key] = {"error": str(err)}
        report.notes.append(f"{key}: not fitted ({err})")
        return None
    report.objects[key] = obj
    report.fits[key] = obj.to_dict() if hasattr(obj, "to_dict") else obj
    return obj


def best_per(runs: Runs, key, names: list[str] | None = None) -> dict[float, tuple[float, str]]:
    """Lowest loss (and the run) for each value of key(run)."""
    out: dict[float, tuple[float, str]] = {}
    for name in names or runs.names:
        loss = runs.best(name)["val_loss"]
        k = key(name)
        if k not in out or loss < out[k][0]:
            out[k] = (loss, name)
    return out


def fit_all(runs: Runs, n_boot: int = 200, huber: float = 1e-2, outlier_sigma: float = 3.0) -> Report:
    """L(N), L(D) per N, L(C) frontier, IsoFLOP, joint L(N, D) and outliers."""
    rep = Report()
    kw = dict(n_boot=n_boot, f_scale=huber)
    full = max(runs.data.values())
    big = [k for k in runs.names if runs.data[k] == full]  # L(N), IsoFLOP and joint: the largest data subset
    by_n = best_per(runs, lambda n: runs.params[n], big)  # several runs of one size (an LR grid): the best
    ns = sorted(by_n)
    _try(rep, "L_N", lambda: fit_power_law(ns, [by_n[n][0] for n in ns], **kw))
    for n in ns:  # L(D) for each model size with enough data sizes
        names = [k for k in runs.names if runs.params[k] == n]
        by_d = best_per(runs, lambda k: runs.data[k], names)
        if len(by_d) >= 3:
            ds = sorted(by_d)
            _try(rep, f"L_D@N={n:.4g}", lambda: fit_power_law(ds, [by_d[d][0] for d in ds], **kw))
    pts = [(r["flops"], r["val_loss"], k) for k in runs.names for r in runs.curves[k]]
    frontier = _try(rep, "L_C", lambda: fit_frontier([p[0] for p in pts], [p[1] for p in pts], **kw))
    if frontier is not None:
        rep.objects["L_C"], rep.objects["frontier"] = frontier
        rep.fits["L_C"] = frontier[0].to_dict()
        rep.fits["L_C"]["frontier_runs"] = sorted({pts[i][2] for i in frontier[1]})
    curves = [(runs.params[k], [r["flops"] for r in runs.curves[k]], [r["val_loss"] for r in runs.curves[k]]) for k in big]
    lo = max((min(c) for _, c, _ in curves), default=1.0)
    hi = max((max(c) for _, c, _ in curves), default=1.0)
    budgets = np.geomspace(min(lo, hi), hi, 8) if curves else []
    _try(rep, "isoflop", lambda: isoflop_fit(curves, budgets, n_boot=n_boot))
    jp = [(runs.params[k], r["images_seen"], r["val_loss"]) for k in big for r in runs.curves[k]]
    _try(rep, "joint", lambda: fit_joint_law(*zip(*jp), **kw) if len(jp) >= 5 else _raise("joint fit: fewer than 5 points"))
    _try(rep, "forward_flops", lambda: flops_law(runs))
    lnf = rep.objects.get("L_N")
    if lnf is not None:
        names = [by_n[n][1] for n in ns]
        out = flag_outliers(names, lnf.predict(ns), [by_n[n][0] for n in ns], outlier_sigma)
        rep.fits["outliers"] = [{"run": o.name, "sigma": o.sigma, "message": o.message} for o in out]
    return rep


def _raise(msg: str):
    raise UserError(msg)


@dataclass
class FlopsLaw:
    """Forward FLOPs per image as k * N**g over the sweep's models (for compute planning)."""

    k: float
    g: float

    def __call__(self, n: float) -> float:
        return self.k * n**self.g

    def to_dict(self) -> dict:
        return {"law": "forward_flops = k*N^g", "k": self.k, "g": self.g}


def flops_law(runs: Runs) -> FlopsLaw:
    pairs = sorted({(runs.params[k], runs.forward[k]) for k in runs.names})
    if len(pairs) == 1:
        n, f = pairs[0]
        return FlopsLaw(f / n, 1.0)
    g, b = np.polyfit(np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs]), 1)
    return FlopsLaw(float(np.exp(b)), float(g))


def holdout_largest(runs: Runs, **kwargs) -> dict:
    """Fit without the largest model; predict its best loss (L(N)) and final loss (joint) with intervals."""
    n_max = max(runs.params.values())
    target = [k for k in runs.names if runs.params[k] == n_max]
    rest = runs.without_params(n_max)
    if len({rest.params[k] for k in rest.names}) < 3:
        raise UserError("--holdout largest: fewer than three other model sizes to fit on")
    rep = fit_all(rest, **kwargs)
    out: dict[str, Any] = {"held_out_params": n_max, "runs": target}
    lnf: PowerLawFit | None = rep.objects.get("L_N")
    measured = [runs.best(k)["val_loss"] for k in target if runs.curves[k]]
    if lnf is not None:
        pred = float(lnf.predict(n_max))
        lo, hi = _interval(lnf.boot, lambda p: p["E"] + p["A"] * n_max ** -p["alpha"])
        out["L_N"] = {"predicted": pred, "interval": [lo, hi]}
        if measured:
            m = min(measured)
            out["L_N"].update(measured=m, relative_error=(pred - m) / m)
    jf: JointFit | None = rep.objects.get("joint")
    if jf is not None:
        out["joint"] = []
        for k in target:
            final = runs.curves[k][-1]
            d = final["images_seen"]
            pred = float(jf.predict(n_max, d))
            lo, hi = _interval(jf.boot, lambda p: p["E"] + p["A"] * n_max ** -p["alpha"] + p["B"] * d ** -p["beta"])
            m = final["val_loss"]
            out["joint"].append({"run": k, "images_seen": d, "predicted": pred, "interval": [lo, hi],
                                 "measured": m, "relative_error": (pred - m) / m})
    return out


def _interval(boot: list[dict], fn) -> tuple[float, float]:
    if not boot:
        return float("nan"), float("nan")
    values = [fn(p) for p in boot]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def write_outputs(out_dir: Path, rep: Report, holdout: dict | None) -> None:
    from ..io import atomic_write_text
    from .summary import summary_markdown

    data = dict(rep.fits)
    if holdout is not None:
        data["holdout"] = holdout
    atomic_write_text(out_dir / "fits.json", json.dumps(data, indent=1, default=float) + "\n")
    atomic_write_text(out_dir / "summary.md", summary_markdown(rep, holdout))
