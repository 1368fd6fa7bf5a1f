"""Pieces of the drill's structured-file cases (ROUND3_STRUCTURED in benchmarks/hostile_cases.py): sweep
files, sweep folders (meta.json, evals.jsonl, sweep.yaml) and YAML/JSON files damaged the ways an
outside tester damaged them. Every case here is answered before any training."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from benchmarks.hostile_env import Case, Env, Result
from tests.conftest import ROOT

SCALING = ("python", "-m", "diffusion.scaling")
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9))  # 10^10 values
SWEEP = """base: {base}
output_dir: {folder}/runs
config:
  train: {{max_steps: 4, batch_size: 2}}
  data: {{resolution: 8, shapes_size: 64}}
  model: {{channel_mult: [1, 2], layers_per_block: 1, attention_resolutions: [], attention_head_dim: 8}}
grids:
  - {{model.base_channels: [8, 16], data.subset_size: [16, 32]}}
eval: {{points: 2, first_step: 2}}
"""


def sweep_text(folder: Path) -> str:
    return SWEEP.format(base=ROOT / "configs" / "shapes_uncond.yaml", folder=folder)


def sweep_case(name: str, edit: Callable[[str], str | bytes], words: str) -> Case:
    """`python -m diffusion.scaling sweep` on a tiny valid sweep file changed by `edit`."""
    def prepare(env: Env, folder: Path) -> None:
        text = edit(sweep_text(folder))
        (folder / "sweep.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())

    return Case("structured files", f"sweep: {name}", lambda env, folder: [*SCALING, "sweep", str(folder / "sweep.yaml")],
                words, prepare=prepare, quick=False)


def sweep_folder(folder: Path) -> Path:
    """A finished-looking sweep folder of three runs (meta.json, evals.jsonl each) and its sweep.yaml."""
    root = folder / "runs"
    for n in (7e4, 1.6e5, 2.9e5):
        run = root / f"n{n:g}" / "scaling"
        run.mkdir(parents=True)
        meta = {"run": f"n{n:g}", "values": {"model.base_channels": int(n)}, "params": int(n), "dataset_size": 50000,
                "forward_flops": 107 * n, "max_steps": 600}
        (run / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        rows = [{"step": s, "images_seen": 32 * s, "flops": 3 * 107 * n * 32 * s, "wall_s": s, "train_loss": 0.1,
                 "val_loss": 0.03 + 8 * n**-0.3 + 30 * (32 * s) ** -0.4} for s in (25, 50, 100)]
        (run / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "sweep.yaml").write_text(sweep_text(folder) + "fit: {n_boot: 5}\n")
    return root


def folder_case(command: str, name: str, file: str, content: bytes | Callable[[bytes], bytes], words: str) -> Case:
    """`fit` or `predict` on the sweep folder with `file` (relative to it) replaced by `content`, or by
    `content(old bytes)`."""
    def prepare(env: Env, folder: Path) -> None:
        path = sweep_folder(folder) / file
        path.write_bytes(content(path.read_bytes()) if callable(content) else content)

    def argv(env: Env, folder: Path) -> list[str]:
        extra = ["--n-boot", "0", "--no-plots"] if command == "fit" else ["--params", "1e6", "--images", "1e6"]
        return [*SCALING, command, str(folder / "runs"), *extra]

    return Case("structured files", f"{command}: {name}", argv, words, prepare=prepare, quick=False)


def add_row(row: object) -> Callable[[bytes], bytes]:
    return lambda old: old + json.dumps(row).encode() + b"\n"


ROW = {"step": 200, "images_seen": 6400, "flops": 1e13, "wall_s": 200, "val_loss": 0.2}
META = "n70000/scaling/meta.json"
EVALS = "n70000/scaling/evals.jsonl"


def config_lr_is(value: str) -> Callable[[Env, Path, Result], str | None]:
    def check(env: Env, folder: Path, result: Result) -> str | None:
        return None if result.out.strip().endswith(value) else f"train.lr read as {result.out.strip()[-40:]!r}, not {value}"
    return check


def merge_key_config(folder: Path) -> Path:
    path = folder / "merge.yaml"
    path.write_text("train:\n  <<: {lr: 0.001}\n  lr: 0.002\n")
    return path


def duplicate_in_info(checkpoint: Path, env: Env) -> None:
    """info.json with its first key written twice (json.loads would keep the second silently)."""
    text = (checkpoint / "info.json").read_text()
    (checkpoint / "info.json").write_text(text.replace("{", '{"step": 4, ', 1))


def cut_file(name: str, keep: float) -> Callable[[Path, Env], None]:
    def edit(checkpoint: Path, env: Env) -> None:
        raw = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(raw[: int(len(raw) * keep)])
    return edit
