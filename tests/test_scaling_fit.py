"""Scaling laws: fits recover known laws, FLOP counts match a hand count, shards, subsets, validation loss."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diffusion.scaling.fit import compute_frontier, fit_frontier, fit_joint_law, fit_power_law, flag_outliers
from diffusion.scaling.flops import count_forward_flops, training_flops

RNG = np.random.default_rng(0)


def _noisy(y: np.ndarray, sigma: float = 0.002) -> np.ndarray:
    return y * np.exp(RNG.normal(0, sigma, y.shape))


def test_power_law_recovers_exponent():
    x = np.geomspace(1e5, 1e8, 16)
    fit = fit_power_law(x, _noisy(0.05 + 30 * x**-0.35), n_boot=20)
    assert abs(fit.alpha - 0.35) < 0.02
    assert abs(fit.E - 0.05) / 0.05 < 0.02
    assert fit.r2 > 0.99 and fit.ci["alpha"][0] <= fit.alpha <= fit.ci["alpha"][1]


def test_compute_frontier_recovers_exponent():
    """Envelope points L(C) = E + A C^-alpha among dominated ones; the frontier fit finds the envelope."""
    c_env = np.geomspace(1e10, 1e14, 20)
    c_dom = np.geomspace(1.1e10, 1e14, 60)
    c_all = np.concatenate([c_env, c_dom])
    y_all = np.concatenate([_noisy(0.04 + 200 * c_env**-0.25, 0.001), 1.2 * (0.04 + 200 * c_dom**-0.25)])
    fit, idx = fit_frontier(c_all, y_all, n_boot=0)
    assert len(idx) == 20
    assert abs(fit.alpha - 0.25) < 0.02
    assert abs(fit.E - 0.04) / 0.04 < 0.02


def test_joint_law_recovers_exponents():
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e5, 1e8, 7), np.geomspace(1e4, 1e7, 7)))
    fit = fit_joint_law(n, d, _noisy(0.04 + 20 * n**-0.3 + 50 * d**-0.4, 0.001), n_boot=0)
    assert abs(fit.alpha - 0.3) < 0.02 and abs(fit.beta - 0.4) < 0.02
    assert abs(fit.E - 0.04) / 0.04 < 0.02


def test_frontier_is_lower_envelope():
    assert compute_frontier([1, 2, 3, 4], [5.0, 6.0, 4.0, 4.5]).tolist() == [0, 2]


def test_outlier_named():
    x = np.geomspace(1e5, 1e8, 10)
    y = 0.05 + 30 * x**-0.35
    measured = _noisy(y, 0.002)
    measured[4] *= 1.3
    out = flag_outliers([f"run{i}" for i in range(10)], y, measured)
    assert [o.name for o in out] == ["run4"] and "check this run" in out[0].message


def test_flop_counter_matches_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 10))
    x = torch.zeros(1, 3, 8, 8)
    hand = 2 * (8 * 8 * 8 * 3 * 9) + 2 * (4 * 4 * 4 * 8 * 9) + 2 * (64 * 10)  # 2 FLOPs per multiply-add
    assert count_forward_flops(net, x) == hand
    assert training_flops(hand, 100) == 3 * hand * 100
