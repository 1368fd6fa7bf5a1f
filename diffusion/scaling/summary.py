"""The Markdown summary of a sweep's fits."""
from __future__ import annotations

from typing import Any


def _ci(fit: dict, key: str) -> str:
    lo_hi = fit.get("ci", {}).get(key)
    return f"{fit[key]:.3g} [{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]" if lo_hi else f"{fit[key]:.3g}"


def _law_row(name: str, fit: dict) -> str:
    if "error" in fit:
        return f"| {name} | not fitted: {fit['error']} | | | | |"
    rng = fit.get("x_range") or fit.get("n_range")
    return (f"| {name} | {_ci(fit, 'alpha')} | {_ci(fit, 'E')} | {fit['r2']:.4f} | {fit['n_points']} | "
            f"{rng[0]:.3g} – {rng[1]:.3g} |")


def summary_markdown(rep, holdout: dict | None) -> str:
    """Exponents with 95% bootstrap intervals, R², data ranges, IsoFLOP, outliers and the holdout test."""
    fits: dict[str, Any] = rep.fits
    lines = ["# Scaling-law fits", "",
             "Laws: L(x) = E + A·x^-alpha; joint L(N, D) = E + A/N^alpha + B/D^beta (D = images seen). "
             "Intervals: 95% bootstrap.", "",
             "| fit | alpha | E | R² (log L) | points | x range |", "| --- | --- | --- | --- | --- | --- |"]
    for key in [k for k in fits if k == "L_N" or k.startswith("L_D") or k == "L_C"]:
        lines.append(_law_row(key, fits[key]))
    joint = fits.get("joint", {})
    if "error" not in joint and joint:
        lines += ["", f"Joint fit: alpha = {_ci(joint, 'alpha')}, beta = {_ci(joint, 'beta')}, E = {_ci(joint, 'E')}, "
                  f"R² = {joint['r2']:.4f}, {joint['n_points']} points, N {joint['n_range'][0]:.3g}–{joint['n_range'][1]:.3g}, "
                  f"D {joint['d_range'][0]:.3g}–{joint['d_range'][1]:.3g} images."]
    iso = fits.get("isoflop", {})
    if "error" not in iso and iso:
        lines += ["", f"IsoFLOP: N_opt ∝ C^a with a = {_ci(iso, 'a')} over {len(iso['budgets'])} budgets "
                  f"({min(iso['budgets']):.3g}–{max(iso['budgets']):.3g} FLOPs)."]
    outliers = fits.get("outliers", [])
    lines += ["", "## Outliers", ""]
    lines += [f"- {o['run']}: {o['sigma']:+.1f} sigma, {o['message']}" for o in outliers] or ["none"]
    if holdout:
        lines += ["", "## Holdout: the largest model predicted before it is used", "",
                  f"Fitted without the {holdout['held_out_params']:.3g}-parameter runs."]
        for key, label in (("L_N", "best loss, L(N)"),):
            h = holdout.get(key)
            if h:
                lines.append(f"- {label}: predicted {h['predicted']:.5g} [{h['interval'][0]:.5g}, {h['interval'][1]:.5g}]"
                             + (f", measured {h['measured']:.5g}, relative error {100 * h['relative_error']:+.1f}%" if "measured" in h else ""))
        for h in holdout.get("joint", []):
            lines.append(f"- final loss of {h['run']}, joint L(N, D) at {h['images_seen']:.3g} images: predicted "
                         f"{h['predicted']:.5g} [{h['interval'][0]:.5g}, {h['interval'][1]:.5g}], measured {h['measured']:.5g}, "
                         f"relative error {100 * h['relative_error']:+.1f}%")
    if rep.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in rep.notes]
    return "\n".join(lines) + "\n"
