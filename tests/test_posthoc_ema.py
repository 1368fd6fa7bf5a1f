"""Post-hoc EMA (issue 32): the power-function profiles tracked in training, their snapshots across
kills (ranks: tests/test_training.py), the least-squares reconstruction (EDM2's Algorithm 3) and its refusals; and
train.keep_checkpoint_steps (issue 31)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from diffusion.checkpoints import store as ckpt
from diffusion.ema.__main__ import main as ema_main
from diffusion.ema.reconstruct import parse_sigma_rels, reconstruct
from diffusion.errors import UserError
from diffusion.training import phema
from diffusion.training.trainer import Trainer, train
from tests.conftest import cli_result, tiny_config

POSTHOC = ["train.posthoc_ema=true", "train.posthoc_ema_every=2", "train.checkpoint_every=4"]


class Killed(Exception):
    """Stands for a kill: the run ends at once, without its end-of-run checkpoint."""


def snapshot_bytes(run: Path) -> dict[int, bytes]:
    return {step: (path / phema.SNAPSHOT_FILE).read_bytes() for step, path in phema.snapshot_steps(run)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """`whole`: 8 steps uninterrupted (snapshots 2..8, checkpoints 4, 8; keep_checkpoints=1 and
    keep_checkpoint_steps=[4]); `killed`: the same run killed at step 7 (after snapshot 6, whose
    checkpoint never came) and resumed with --resume auto."""
    extra = [*POSTHOC, "train.max_steps=8", "train.keep_checkpoints=1", "train.keep_checkpoint_steps=[4]"]
    whole, killed = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("killed")
    train(tiny_config(whole, *extra))

    def kill_at_7(trainer, loss):
        if trainer.state.step == 7:
            raise Killed

    trainer = Trainer(tiny_config(killed, *extra), on_step=kill_at_7)
    with pytest.raises(Killed):
        trainer.fit()
    trainer.accelerator.end_training()
    assert sorted(snapshot_bytes(killed)) == [2, 4, 6]
    assert [ckpt.read_info(c).step for c in ckpt.list_checkpoints(killed)] == [4]
    train(tiny_config(killed, *extra), resume="auto")
    return {"whole": whole, "killed": killed}


def test_a_killed_and_resumed_run_writes_the_same_snapshots_bit_for_bit(runs, capsys):
    whole, killed = snapshot_bytes(runs["whole"]), snapshot_bytes(runs["killed"])
    assert sorted(whole) == [2, 4, 6, 8]
    assert whole == killed  # the snapshot of step 6, written after checkpoint 4 by the killed run, was redone
    for run in runs.values():  # the live profiles travel in the checkpoint
        assert (ckpt.list_checkpoints(run)[-1] / phema.STATE_FILE).is_file()
    last = [load_file(str(ckpt.list_checkpoints(r)[-1] / phema.STATE_FILE)) for r in runs.values()]
    assert all(torch.equal(last[0][k], last[1][k]) for k in last[0])


def test_keep_checkpoint_steps_survive_rotation(runs, tmp_path):
    assert [ckpt.read_info(c).step for c in ckpt.list_checkpoints(runs["whole"])] == [4, 8]  # keep 1, plus step 4
    paths = [tmp_path / f"step-{s:06d}" for s in (2, 4, 6, 8, 10)]
    assert [p.name for p in ckpt.prunable(paths, 2, [4])] == ["step-000002", "step-000006"]
    assert ckpt.prunable(paths, 2, []) == paths[:3]


def test_reconstruction_at_a_tracked_sigma_rel_is_that_profile(runs, tmp_path):
    out = reconstruct(runs["whole"], [0.05, 0.10], out=str(tmp_path / "posthoc"), progress=False)
    snap = load_file(str(phema.snapshot_root(runs["whole"]) / "step-000008" / phema.SNAPSHOT_FILE))
    for path, sigma in zip(out, (0.05, 0.10)):
        assert path.name == f"sigma_rel-{sigma:.3f}"
        weights = load_file(str(path / ckpt.EMA_FILE))
        for name, value in weights.items():
            torch.testing.assert_close(value, snap[f"{phema.profile_key(sigma)}/{name}"], rtol=1e-6, atol=1e-7)
        info = ckpt._read_info_json(path)["posthoc_ema"]
        assert info["sigma_rel"] == sigma and info["step"] == 8 and [s["step"] for s in info["snapshots"]] == [2, 4, 6, 8]
        assert ckpt.read_info(path).step == 8  # a normal checkpoint: info.json reads, every file's sha256 checks
        ckpt.verify_digests(path)


def test_a_reconstruction_loads_as_a_checkpoint_and_a_diffusers_pipeline(runs, tmp_path):
    from diffusion.checkpoints.load import load_model
    from diffusion.pipeline import GuidedDiffusionPipeline

    (path,) = reconstruct(runs["whole"], [0.07], step=6, out=str(tmp_path / "p"), progress=False)
    assert path.name == "sigma_rel-0.070-step-000006"
    loaded = load_model(path)
    assert loaded.info.step == 6 and loaded.info.class_names
    assert GuidedDiffusionPipeline.from_pretrained(str(path)) is not None


def test_the_ordinary_ema_stays_what_sample_loads(runs):
    assert ckpt.resolve_checkpoint(runs["whole"]) == ckpt.list_checkpoints(runs["whole"])[-1]
    assert not (runs["whole"] / "final" / phema.STATE_FILE).exists()  # final/: the ordinary EMA only


def test_reconstruction_of_a_synthetic_sequence_matches_an_ema_tracked_directly():
    """w_t = f(t), a known rule, no network. Profiles 0.05 and 0.10 snapshotted every 10 of 300 steps;
    0.07 reconstructed at step 300 against a 0.07 profile tracked step by step.

    Tolerance, derived rather than guessed: with beta_t = (1 - 1/t)^(g+1) the tracked EMA gives w_s
    exactly the mass of the profile p(tau) over [s-1, s], so every EMA is the integral of p against the
    step-wise constant trajectory w(tau). The reconstruction error is then the integral of (sum_i c_i p_i
    - p_out) times w, which Cauchy-Schwarz bounds by ||sum_i c_i p_i - p_out||_2 * ||w||_2: the residual
    of the solve (it shrinks as snapshots come closer together) times sqrt(sum_s w_s^2), per element,
    plus float64 rounding. And since that mass is known in closed form, (s^(g+1) - (s-1)^(g+1)) / t^(g+1),
    the difference itself is predicted exactly: this pins the tracking rule (beta) to float64 precision."""
    steps, every, sigmas, target = 300, 10, [0.05, 0.10], 0.07
    t = torch.arange(1, steps + 1, dtype=torch.float64)[:, None]
    phase = torch.linspace(0, 3, 16, dtype=torch.float64)[None, :]
    w = torch.sin(0.05 * t + phase) + 0.002 * t * phase + torch.cos(0.31 * t) * 0.3  # (steps, 16)
    tracked = phema.PowerEMA([w[0]], sigmas, dtype=torch.float64)
    direct = phema.PowerEMA([w[0]], [target], dtype=torch.float64)
    snaps = []
    for s in range(1, steps + 1):
        tracked.update([w[s - 1]], s)
        direct.update([w[s - 1]], s)
        if s % every == 0:
            snaps += [(s, g, shadows[0].clone()) for g, shadows in zip(tracked.gammas, tracked.shadows)]
    gamma = phema.gamma_from_sigma_rel(target)
    x, residual, _ = phema.solve_weights([s for s, _, _ in snaps], [g for _, g, _ in snaps], steps, [gamma])
    rebuilt = sum(float(c) * v for c, (_, _, v) in zip(x[:, 0], snaps))
    norm_p = float(np.sqrt(phema.profile_dot(steps, gamma, steps, gamma)))
    bound = residual[0] * norm_p * w.pow(2).sum(0).sqrt() + 1e-9
    error = (rebuilt - direct.shadows[0][0]).abs()
    assert (error <= bound).all(), (error, bound)
    nearest = (tracked.shadows[1][0] - direct.shadows[0][0]).abs()  # the 0.10 profile as is, for scale

    def mass(end: int, g: float) -> np.ndarray:  # each step's weight in the profile ending at `end`
        s = np.arange(1, steps + 1, dtype=np.float64)
        return np.where(s <= end, (s ** (g + 1) - (s - 1) ** (g + 1)) / float(end) ** (g + 1), 0.0)

    r = sum(float(c) * mass(s, g) for c, (s, g, _) in zip(x[:, 0], snaps)) - mass(steps, gamma)
    predicted = torch.from_numpy(r) @ w
    torch.testing.assert_close(rebuilt - direct.shadows[0][0], predicted, rtol=0, atol=1e-9)
    assert error.max() < 0.1 * nearest.max()  # the bound is tight enough to mean something


@given(st.floats(0.005, 0.28))
def test_sigma_rel_and_gamma_invert_each_other(sigma):
    gamma = phema.gamma_from_sigma_rel(sigma)
    assert gamma > 0 and abs(phema.sigma_rel_from_gamma(gamma) - sigma) < 1e-9 * max(1, sigma)
    assert phema.beta(gamma, 1) == 0.0  # the profile starts as the weights themselves


@given(st.text(max_size=30))
def test_sigma_rel_lists_parse_or_are_refused_in_one_line(text):
    try:
        values = parse_sigma_rels(text)
    except UserError as err:
        assert "\n" not in str(err) and "--sigma-rel" in str(err)
        return
    assert values == sorted(values) and all(0 < v < phema.MAX_SIGMA_REL for v in values)


@pytest.mark.parametrize("argv, words", [
    (["--sigma-rel", "abc"], "is not a number"),
    (["--sigma-rel", "0.05,,0.1"], "not a comma-separated list"),
    (["--sigma-rel", "0"], "outside (0, 0.2887)"),
    (["--sigma-rel", "0.3"], "outside (0, 0.2887)"),
    (["--sigma-rel", "nan"], "is not a finite number"),
    (["--sigma-rel", "0.1,0.1"], "repeats a value"),
    (["--sigma-rel", "0.01"], "is outside what the 4 snapshots up to step 8"),
    (["--sigma-rel", "0.1", "--step", "1"], "before the first post-hoc EMA snapshot (step 2)"),
    (["--sigma-rel", "0.1", "--step", "5"], "not a snapshot step"),
    (["--sigma-rel", "0.1", "--step", "0"], "expected a step >= 1"),
    (["--sigma-rel", "0.1", "--max-residual", "0"], "--max-residual must be in (0, 1]"),
])
def test_bad_reconstruction_input_is_one_line(runs, argv, words, capsys):
    status, err, _ = cli_result(ema_main, ["reconstruct", str(runs["whole"]), *argv], capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_runs_without_snapshots_are_refused(tiny_run, runs, tmp_path, capsys):
    status, err, _ = cli_result(ema_main, ["reconstruct", str(tiny_run), "--sigma-rel", "0.1"], capsys)
    assert status == 2 and "trained without train.posthoc_ema" in err[0] and len(err) == 1
    bare = tmp_path / "bare"
    shutil.copytree(runs["whole"], bare, ignore=shutil.ignore_patterns("snapshots"))
    status, err, _ = cli_result(ema_main, ["reconstruct", str(bare), "--sigma-rel", "0.1"], capsys)
    assert status == 2 and "no post-hoc EMA snapshots yet" in err[0]
    status, err, _ = cli_result(ema_main, ["reconstruct", str(tmp_path / "nowhere"), "--sigma-rel", "0.1"], capsys)
    assert status == 2 and "run folder not found" in err[0]


def test_a_damaged_snapshot_is_refused(runs, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(runs["whole"], copy)
    file = phema.snapshot_root(copy) / "step-000004" / phema.SNAPSHOT_FILE
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))
    status, err, _ = cli_result(ema_main, ["reconstruct", str(copy), "--sigma-rel", "0.1", "--no-progress"], capsys)
    assert status == 2 and "is damaged: sha256 mismatch" in err[0] and not (copy / "posthoc" / "sigma_rel-0.100").exists()


@pytest.mark.parametrize("override, words", [
    ("train.posthoc_ema_sigma_rels=[0.5]", "outside (0, 0.2887)"),
    ("train.posthoc_ema_sigma_rels=[]", "is empty"),
    ("train.posthoc_ema_sigma_rels=[0.1,0.1001]", "repeats a width"),
    ("train.posthoc_ema_every=0", "must be >= 1"),
])
def test_bad_posthoc_settings_are_one_line(override, words, tmp_path):
    with pytest.raises(UserError, match="train.posthoc_ema") as err:
        tiny_config(tmp_path, "train.posthoc_ema=true", override)
    assert words in str(err.value)
    with pytest.raises(UserError, match="is read only when train.posthoc_ema is true"):
        tiny_config(tmp_path, "train.posthoc_ema_every=7")
    with pytest.raises(UserError, match="no checkpoint is saved"):
        tiny_config(tmp_path, "train.max_steps=8", "train.keep_checkpoint_steps=[3]")


def test_resume_refuses_other_profiles(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs["whole"], copy)
    cfg = tiny_config(copy, *POSTHOC, "train.max_steps=10", "train.posthoc_ema_sigma_rels=[0.05,0.2]")
    trainer = Trainer(cfg, resume="auto", log=False)
    with pytest.raises(UserError, match=r"resume with train.posthoc_ema_sigma_rels=\[0.05, 0.1\]"):
        trainer.load_checkpoint(ckpt.list_checkpoints(copy)[-1])
    trainer.release_run()
