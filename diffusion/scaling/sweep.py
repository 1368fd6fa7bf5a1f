"""Run a sweep: every grid point is an ordinary run directory trained by the shared trainer.

Finished runs (RUN/scaling/done.json) are skipped; an interrupted one resumes from its newest
checkpoint. `collect` gathers every run's evaluation rows into one tidy sweep.csv.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

from ..config import Config
from ..data import build_dataset
from ..errors import UserError, preview
from ..io import atomic_write_text, check_output_path
from .flops import count_params, denoiser_forward_flops
from .recorder import DONE_FILE, EVALS_FILE, META_FILE, EvalRecorder, eval_steps, read_jsonl, read_meta
from .sweep_config import Point, Sweep, expand_grid, point_config, shard

SWEEP_CSV = "sweep.csv"


def is_done(run_dir: Path) -> bool:
    return (run_dir / "scaling" / DONE_FILE).is_file()


UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")  # characters a run folder's name does not keep
NAME_LIMIT = 120  # characters of a run folder's name (file systems allow 255 bytes)


def folder_name(point: Point) -> str:
    """The run folder name of a grid point: its name (`base_channels=16_lr=0.0001`) where that is a
    plain file name, else a slug of it (`/`, spaces and other characters to `_`, no leading `.`, cut
    to NAME_LIMIT characters) with a short hash of the full name, so a value such as `../..` stays one
    folder below the sweep's output_dir and two distinct points never share a folder."""
    slug = UNSAFE.sub("_", point.name).lstrip(".") or "_"
    if slug == point.name and len(slug) <= NAME_LIMIT:
        return slug
    digest = hashlib.sha256(point.name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug[:NAME_LIMIT]}-{digest}"


def run_folders(sweep: Sweep, points: list[Point]) -> dict[str, Path]:
    """Every grid point's run folder, by point name, each checked (check_output_path: inside the
    sweep's output_dir, inside no other run); two points that would share a folder are refused."""
    out = Path(sweep.settings.output_dir)
    folders: dict[str, Path] = {}
    seen: dict[str, str] = {}
    for point in points:
        name = folder_name(point)
        if name in seen:
            raise UserError(f"grid points {preview(seen[name])} and {preview(point.name)} would share the run folder "
                            f"{out / name}: change one of their values")
        seen[name] = point.name
        folders[point.name] = check_output_path(out / name, f"the run folder of grid point {preview(point.name)}",
                                                run=True, within=out)
    return folders


def run_point(sweep: Sweep, point: Point, run_dir: Path | None = None) -> str:
    """Train one grid point (or resume it) in `run_dir` (default: run_folders' choice); returns
    'skipped', 'trained' or 'interrupted'."""
    from ..training.trainer import Trainer

    cfg = point_config(sweep, point)
    run_dir = run_dir or run_folders(sweep, [point])[point.name]
    cfg.output_dir = str(run_dir)
    if is_done(run_dir):
        return "skipped"
    recorder = None

    def hook(trainer, loss):
        nonlocal recorder
        if recorder is None:
            recorder = make_recorder(sweep, point, cfg, trainer)
        recorder(trainer, loss)

    trainer = Trainer(cfg, resume="auto", on_step=hook)
    trainer.fit()
    if trainer.state.step < cfg.train.max_steps:
        return "interrupted"
    if trainer.accelerator.is_main_process:
        atomic_write_text(run_dir / "scaling" / DONE_FILE, json.dumps({"step": trainer.state.step}) + "\n")
    return "trained"


def make_recorder(sweep: Sweep, point: Point, cfg: Config, trainer) -> EvalRecorder:
    """The run's evaluation hook; writes RUN/scaling/meta.json (N, D, forward FLOPs, grid values)."""
    fwd = denoiser_forward_flops(cfg, trainer.core)
    meta = {"run": point.name, "values": point.values, "params": count_params(trainer.core),
            "dataset_size": len(build_dataset(cfg.data)) if cfg.data.subset_size <= 0 else cfg.data.subset_size,
            "forward_flops": fwd, "max_steps": cfg.train.max_steps,
            "batch_size": cfg.train.batch_size * cfg.train.grad_accum, "lr": cfg.train.lr}
    if trainer.accelerator.is_main_process:
        atomic_write_text(Path(cfg.output_dir) / "scaling" / META_FILE, json.dumps(meta, indent=1) + "\n")
    ev = sweep.settings.eval
    return EvalRecorder(cfg, ev.val, eval_steps(cfg.train.max_steps, ev.points, ev.first_step), fwd)


def run_sweep(sweep: Sweep, index: int = 0, count: int = 1, log=print) -> dict[str, str]:
    """Train this shard's points in order; then write sweep.csv from whatever runs exist."""
    every = expand_grid(sweep)
    folders = run_folders(sweep, every)  # the whole grid, so every shard refuses the same clash
    points = shard(every, index, count)
    out = Path(sweep.settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sweep.path is not None:
        atomic_write_text(out / "sweep.yaml", sweep.path.read_text())
    status = {}
    for i, point in enumerate(points, 1):
        log(f"[{i}/{len(points)}] {point.name}")
        status[point.name] = run_point(sweep, point, folders[point.name])
        log(f"[{i}/{len(points)}] {point.name}: {status[point.name]}")
        if status[point.name] == "interrupted":
            break
    collect(out)
    return status


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per (run, evaluation point) for every run under `sweep_dir`; writes sweep.csv."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for meta_path in sorted(sweep_dir.glob(f"*/scaling/{META_FILE}")):
        meta = read_meta(meta_path)  # the shared loader; a damaged file is one line naming it
        done = is_done(meta_path.parent.parent)
        for ev in read_jsonl(meta_path.parent / EVALS_FILE):
            rows.append({"run": meta["run"], **meta["values"], "params": meta["params"],
                         "dataset_size": meta["dataset_size"], "forward_flops": meta["forward_flops"],
                         "max_steps": meta["max_steps"], "finished": done, **ev})
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with (sweep_dir / SWEEP_CSV).open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
    return rows


def read_sweep_csv(path: Path) -> list[dict]:
    """sweep.csv rows with numbers parsed."""
    def parse(v: str):
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return {"True": True, "False": False}.get(v, v)

    with path.open() as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
