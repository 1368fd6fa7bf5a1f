"""The sweep file: a base run config, overrides, and grids over any dotted config keys.

```yaml
base: shapes_uncond.yaml          # a run config, relative to this file (optional)
output_dir: runs/scaling_cifar10
config: {data: {name: imagefolder, ...}}   # overrides of the base, ordinary config sections
grids:                            # the union of each grid's product; shared points run once
  - {model.base_channels: [8, 16, 32], data.subset_size: [50000]}
  - {model.base_channels: [16], data.subset_size: [3125, 12500, 50000]}
eval: {points: 8, first_step: 20, val: {num_images: 128}}
```
The grid key `compute` (training FLOPs) sets `train.max_steps` so the run uses that budget (IsoFLOP).
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigDumper, apply_overrides, from_dict, load_config, to_dict, validate
from ..errors import UserError, preview
from ..structured import load_yaml
from .valloss import ValLossConfig

COMPUTE_KEY = "compute"


@dataclass
class EvalConfig:
    points: int = 8  # log-spaced evaluation points per run (the last step is always one)
    first_step: int = 20
    val: ValLossConfig = field(default_factory=ValLossConfig)


@dataclass
class FitConfig:
    n_boot: int = 200
    outlier_sigma: float = 3.0
    huber_scale: float = 0.01  # Huber threshold on log-loss residuals


@dataclass
class SweepSettings:
    base: str | None = None
    output_dir: str = "runs/scaling"
    eval: EvalConfig = field(default_factory=EvalConfig)
    fit: FitConfig = field(default_factory=FitConfig)


@dataclass
class Sweep:
    settings: SweepSettings
    base_data: dict[str, Any]  # the base config with `config:` overrides merged in
    grids: list[dict[str, list[Any]]]
    path: Path | None = None


@dataclass
class Point:
    """One run of the grid: its directory name and the dotted keys it sets."""

    name: str
    values: dict[str, Any]


def _merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


SWEEP_SHAPE = "a mapping of sweep settings (base, output_dir, config, grids, eval, fit)"
MAX_POINTS = 10_000  # grid points of one sweep file: each is a training run


def read_sweep_yaml(path: str | Path, kind: str = "sweep file") -> dict[str, Any]:
    """A sweep file's mapping through the shared loader (diffusion/structured.py): one line naming the
    file for binary data, invalid YAML, duplicate keys, alias bombs, deep nesting or a wrong shape."""
    return load_yaml(path, kind, dict, SWEEP_SHAPE, empty={})


def _grids(raw: dict[str, Any], label: str) -> list[dict[str, list[Any]]]:
    """The `grids` list (or the one `grid` mapping), each a mapping of dotted keys to value lists."""
    if "grid" in raw and "grids" in raw:
        raise UserError(f"{label} has both 'grid' and 'grids': keep one (grids: a list of grid mappings)")
    grids = raw.pop("grids", None) if "grids" in raw else [raw.pop("grid")] if "grid" in raw else None
    if isinstance(grids, dict):
        raise UserError(f"{label}: 'grids' must be a list of grid mappings (- {{key: [values]}}), not a mapping; "
                        "for one grid write 'grid:'")
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) and g for g in grids):
        raise UserError(f"{label} needs a 'grid' mapping (or a 'grids' list) of dotted config keys to value lists")
    out, points = [], 0
    for grid in grids:
        for key, values in grid.items():
            if not isinstance(key, str) or not key:
                raise UserError(f"{label}: the grid key {preview(key)} is not a dotted config key (e.g. model.base_channels)")
            if isinstance(values, list) and not values:
                raise UserError(f"{label}: the grid key {preview(key)} has an empty value list: give it at least one value")
            if key == COMPUTE_KEY and not all(_positive(v) for v in (values if isinstance(values, list) else [values])):
                raise UserError(f"{label}: every '{COMPUTE_KEY}' value must be a positive number of training FLOPs, "
                                f"got {preview(values)}")
        out.append({k: (v if isinstance(v, list) else [v]) for k, v in grid.items()})
        points += math.prod(len(v) for v in out[-1].values())
        if points > MAX_POINTS:
            raise UserError(f"{label}: the grids hold more than {MAX_POINTS} points, each a training run: split the sweep")
    return out


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_settings(settings: SweepSettings, label: str) -> None:
    """Values of eval: and fit: no sweep can use (each is read long after the file, at the first evaluation)."""
    ev, fc, val = settings.eval, settings.fit, settings.eval.val
    wrong = [("eval.points", ev.points, ev.points >= 1), ("eval.first_step", ev.first_step, ev.first_step >= 1),
             ("eval.val.num_images", val.num_images, val.num_images >= 1), ("eval.val.repeats", val.repeats, val.repeats >= 1),
             ("eval.val.buckets", val.buckets, val.buckets >= 1), ("eval.val.batch_size", val.batch_size, val.batch_size >= 1),
             *fit_problems(fc)]
    for key, value, ok in wrong:
        if not ok:
            raise UserError(f"{label}: {key} = {preview(value)} is out of range (see docs/scaling.md)")


def fit_problems(fc: FitConfig) -> list[tuple[str, Any, bool]]:
    """(key, value, within range) of each fit: setting."""
    return [("fit.n_boot", fc.n_boot, 0 <= fc.n_boot <= 100_000),
            ("fit.outlier_sigma", fc.outlier_sigma, math.isfinite(fc.outlier_sigma) and fc.outlier_sigma > 0),
            ("fit.huber_scale", fc.huber_scale, math.isfinite(fc.huber_scale) and fc.huber_scale > 0)]


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file; unknown keys, empty grids and grid points that are no valid config are refused
    in one line naming the file."""
    path = Path(path)
    label = f"sweep file {path}"
    raw = read_sweep_yaml(path)
    grids = _grids(raw, label)
    overrides = raw.pop("config", None) or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{label}: 'config' must be a mapping of config sections (overrides of the base config)")
    try:
        settings = from_dict(SweepSettings, raw)
    except UserError as err:
        raise UserError(f"{label}: {err}".replace("config key", "sweep key")) from None
    _check_settings(settings, label)
    base = {}
    if settings.base:
        base_path = (path.parent / settings.base) if not Path(settings.base).is_absolute() else Path(settings.base)
        try:
            base = to_dict(load_config(base_path))
        except UserError as err:
            raise UserError(f"{label}: its base: {err}") from None
    base_data = _merge(base, overrides)
    sweep = Sweep(settings, base_data, grids, path)
    for point in expand_grid(sweep):  # every point must be a valid config
        try:
            point_config(sweep, point, check_only=True)
        except UserError as err:
            raise UserError(f"{label}, grid point {preview(point.name, 100)}: {err}") from None
    return sweep


def _short(key: str, keys: set[str]) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def expand_grid(sweep: Sweep) -> list[Point]:
    """Every point of every grid, in file order, each distinct setting once."""
    keys = {k for g in sweep.grids for k in g}
    points: dict[str, Point] = {}
    for grid in sweep.grids:
        names = list(grid)
        for combo in itertools.product(*(grid[k] for k in names)):
            values = dict(zip(names, combo))
            name = "_".join(f"{_short(k, keys)}={_fmt(v)}" for k, v in sorted(values.items()))
            points.setdefault(name, Point(name, values))
    return list(points.values())


def point_config(sweep: Sweep, point: Point, check_only: bool = False) -> Config:
    """The run config of a grid point (ordinary run directory under the sweep's output_dir)."""
    import copy

    data = copy.deepcopy(sweep.base_data)
    items = [f"{k}={yaml.dump(v, Dumper=ConfigDumper, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in point.values.items() if k != COMPUTE_KEY]
    items.append(f"output_dir={Path(sweep.settings.output_dir) / point.name}")

    cfg = validate(from_dict(Config, apply_overrides(data, items)))
    if COMPUTE_KEY in point.values and not check_only:
        from .flops import denoiser_forward_flops

        per_step = 3 * denoiser_forward_flops(cfg) * cfg.train.batch_size * cfg.train.grad_accum
        cfg.train.max_steps = max(1, round(float(point.values[COMPUTE_KEY]) / per_step))
    return cfg


def parse_shard(text: str | None, env: dict[str, str] | None = None) -> tuple[int, int]:
    """(index, count), 0-based index, from `--shard K/N` (1 <= K <= N) or SLURM array variables."""
    env = os.environ if env is None else env
    if text:
        try:
            k, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise UserError(f"--shard {text}: expected K/N, e.g. 2/8") from None
        if not 1 <= k <= n:
            raise UserError(f"--shard {text}: K must be between 1 and N")
        return k - 1, n
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        if not 0 <= task < count:
            raise UserError(f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']} is outside the array of {count} tasks")
        return task, count
    return 0, 1


def shard(points: list[Point], index: int, count: int) -> list[Point]:
    """The index-th of `count` interleaved shares: every point in exactly one share."""
    return points[index::count]
