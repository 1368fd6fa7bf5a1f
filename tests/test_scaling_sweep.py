"""Scaling sweep: shards, nested subsets, the fixed validation loss, skip and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from diffusion.data.subset import nested_subset_indices
from diffusion.errors import UserError
from diffusion.scaling.sweep_config import Point, expand_grid, load_sweep, parse_shard, shard

from .conftest import ROOT, TINY, tiny_config


def _sweep_file(tmp: Path, grid: dict, **extra) -> Path:
    overrides: dict = {}
    for item in TINY + ["train.max_steps=4", "model.condition=none"]:
        key, value = item.split("=", 1)
        node = overrides
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    data = {"base": str(ROOT / "configs/shapes_uncond.yaml"), "output_dir": str(tmp / "runs"), "config": overrides,
            "grids": [grid], "eval": {"points": 2, "first_step": 2, "val": {"num_images": 8, "repeats": 2, "buckets": 2}},
            **extra}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shards_cover_grid_once(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, {"model.base_channels": [8, 16, 24], "data.subset_size": [16, 32, 64]}))
    points = [p.name for p in expand_grid(sweep)]
    assert len(points) == 9
    for count in (1, 2, 4, 9, 12):
        shares = [p.name for k in range(count) for p in shard(expand_grid(sweep), k, count)]
        assert sorted(shares) == sorted(points)
    assert parse_shard("2/4") == (1, 4)
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    with pytest.raises(UserError):
        parse_shard("5/4")


def test_subsets_nested_and_seeded():
    small, large = nested_subset_indices(1000, 100, 7), nested_subset_indices(1000, 400, 7)
    assert set(small) <= set(large) and len(set(large)) == 400
    assert small == nested_subset_indices(1000, 100, 7)
    assert small != nested_subset_indices(1000, 100, 8)


def test_formulation_is_a_sweepable_key(tmp_path):
    from diffusion.scaling.sweep_config import point_config

    sweep = load_sweep(_sweep_file(tmp_path, {"diffusion.formulation": ["ddpm", "edm"], "model.base_channels": [8]}))
    points = expand_grid(sweep)
    assert len({p.name for p in points}) == 2 and all("formulation" in p.name for p in points)
    assert [point_config(sweep, p).diffusion.formulation for p in points] == ["ddpm", "edm"]


@pytest.mark.parametrize("formulation", ["ddpm", "edm"])
def test_validation_loss_deterministic_and_lower_when_trained(tmp_path, formulation):
    from diffusion.models import build_denoiser
    from diffusion.scaling.valloss import ValLossConfig, build_valset, validation_loss
    from diffusion.training.tasks import DenoiserTask

    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, "model.condition=none", f"diffusion.formulation={formulation}",
                      config="configs/shapes_uncond.yaml")
    valset = build_valset(cfg, ValLossConfig(num_images=16, repeats=4, buckets=4))
    model = build_denoiser(cfg.model, cfg.data.resolution, 1)
    before = validation_loss(model, cfg, valset)
    assert before == validation_loss(model, cfg, valset)  # bit for bit
    assert set(before) == {"val_loss", *(f"val_loss_b{b}" for b in range(4))}
    task, opt = DenoiserTask(cfg), torch.optim.Adam(model.parameters(), lr=2e-3)
    from diffusion.data import build_dataset

    data = build_dataset(cfg.data)
    images = torch.stack([data[i]["image"] for i in range(32)])
    for step in range(20):
        loss, _ = task.loss(model, model, {"image": images[(step % 4) * 8:(step % 4 + 1) * 8]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert validation_loss(model, cfg, valset)["val_loss"] < before["val_loss"]


@pytest.mark.slow
def test_sweep_skips_finished_and_resumes_killed(tmp_path):
    from diffusion.scaling.sweep import collect, run_point

    sweep = load_sweep(_sweep_file(tmp_path, {"model.base_channels": [8]}))
    (point,) = expand_grid(sweep)
    killed = Point(point.name, dict(point.values))
    sweep.base_data["train"]["max_steps"] = 2  # a run killed at step 2 of 4: its checkpoint exists
    assert run_point(sweep, killed) == "trained"
    (tmp_path / "runs" / point.name / "scaling" / "done.json").unlink()
    sweep.base_data["train"]["max_steps"] = 4
    assert run_point(sweep, point) == "trained"  # resumed from step 2
    rows = collect(tmp_path / "runs")
    assert [r["step"] for r in rows] == [2, 4] and all(r["run"] == point.name for r in rows)
    assert run_point(sweep, point) == "skipped"
    assert (tmp_path / "runs" / "sweep.csv").is_file()


@pytest.mark.slow
def test_fit_and_predict_cli_on_synthetic_sweep(tmp_path, capsys):
    """fit writes fits.json, summary.md and plots; predict answers; a target below E exits with status 2."""
    import numpy as np

    from diffusion.scaling.cli import main

    rng = np.random.default_rng(1)
    for n in (7e4, 1.6e5, 2.9e5, 6.4e5, 1.1e6, 2.6e6):
        d = tmp_path / f"n{n:g}" / "scaling"
        d.mkdir(parents=True)
        meta = {"run": f"n{n:g}", "values": {"model.base_channels": int(n)}, "params": int(n), "dataset_size": 50000,
                "forward_flops": 107 * n, "max_steps": 600}
        (d / "meta.json").write_text(json.dumps(meta))
        rows = []
        for s in (25, 50, 100, 200, 400, 600):
            loss = (0.03 + 8 * n**-0.3 + 30 * (32 * s) ** -0.4) * np.exp(rng.normal(0, 0.003))
            rows.append(json.dumps({"step": s, "images_seen": 32 * s, "flops": 3 * 107 * n * 32 * s, "wall_s": s,
                                    "train_loss": loss, "val_loss": loss}))
        (d / "evals.jsonl").write_text("\n".join(rows) + "\n")
    main(["fit", str(tmp_path), "--holdout", "largest", "--n-boot", "5"])
    fits = json.loads((tmp_path / "fits.json").read_text())
    assert "alpha" in fits["L_N"] and "relative_error" in fits["holdout"]["L_N"]
    assert (tmp_path / "loss_vs_params.png").is_file() and (tmp_path / "summary.md").is_file()
    main(["predict", str(tmp_path), "--target-loss", "0.5"])
    assert "training FLOPs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["predict", str(tmp_path), "--target-loss", "0.001"])
    assert err.value.code == 2
