"""Bad input through the command lines, as a table: every quick case of the hostile-input drill
(benchmarks/hostile_cases.py, built from hostile_env.py and hostile_runners.py) answered cleanly,
run in-process through its CLI entry point.

Quick cases are answered before any training: bad config keys and files, flags, damaged, edited or
hostile checkpoints, image files, demo requests. A clean answer is exit status 2 and one line
`error: ...` naming the problem (or the status and check the case names), never a traceback. The
drill itself (`python benchmarks/hostile_inputs.py`) also runs the slow cases (signals, training)
as separate processes. Hostile pickles would create a marker file if anything unpickled them.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import train as train_cli
from benchmarks.hostile_cases import CASES
from benchmarks.hostile_env import MARKER, Case, Env, Payload, Result, build_env
from benchmarks.hostile_runners import run_demo_case
from benchmarks.hostile_inputs import classify
from diffusion.checkpoints import store as ckpt
from diffusion.cli import sample as sample_cli
from diffusion.config import DataConfig, load_config
from diffusion.errors import UserError
from diffusion.evaluate.__main__ import main as evaluate_main
from tests.conftest import ROOT

__all__ = ["Payload"]  # tests/test_checkpoint_safety.py plants it too

QUICK = [case for case in CASES if case.quick]
ENTRY = {"train": train_cli.main, "sample": sample_cli.main, "evaluate": evaluate_main, "demo": run_demo_case}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_run) -> Env:
    return build_env(tmp_path_factory.mktemp("hostile"), trained=tiny_run)  # tiny_run: the same 4-step run


def run_in_process(case: Case, env: Env, folder: Path, capsys) -> Result:
    """The case through its CLI entry point in this process: exit status, stdout and stderr as a shell sees them."""
    if case.prepare is not None:
        case.prepare(env, folder)
    argv = case.argv(env, folder)
    capsys.readouterr()
    try:
        returned = ENTRY[argv[0]](argv[1:])
        status = returned if isinstance(returned, int) else 0
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 1
    finally:
        ckpt.trust_checkpoints(False)  # --trust-checkpoint lasts for its process
    captured = capsys.readouterr()
    return Result(status, captured.out, captured.err)


def case_id(case: Case) -> str:
    return f"{case.group}: {case.id}".encode("ascii", "backslashreplace").decode()


@pytest.mark.parametrize("case", QUICK, ids=[case_id(case) for case in QUICK])
def test_hostile_input_is_answered_cleanly(case, env, tmp_path, capsys):
    if case.cpu_only and torch.cuda.is_available():
        pytest.skip("valid where a GPU exists")
    folder = tmp_path / "case"
    folder.mkdir()
    result = run_in_process(case, env, folder, capsys)
    outcome, note = classify(case, result, env, folder)
    assert outcome == "clean", f"{outcome}: {note}\n{result.err[-2000:]}"


def test_the_table_covers_the_drill_and_no_hostile_pickle_ran(env):
    """Run last in this file: no case ran a planted pickle; the drill has at least 150 cases."""
    assert len(CASES) >= 150 and len(QUICK) >= 150
    assert not (env.root / MARKER).exists()


def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path):
    """An untrusted data.root: a batch file whose pickle would run `touch` is refused, not run."""
    from diffusion.data import build_dataset

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batch = {"data": np.zeros((4, 3072), dtype=np.uint8), "labels": [0, 3, 9, 1], "batch_label": "x"}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False)
    assert len(build_dataset(cfg)) == 20  # plain batches (numpy arrays, lists, dicts) load
    marker = tmp_path / "MARKER"
    for name in ("data_batch_3", "batches.meta"):
        original = (base / name).read_bytes()
        (base / name).write_bytes(pickle.dumps({"data": Payload(marker), "label_names": Payload(marker)}))
        with pytest.raises(UserError, match=f"refusing .*{name}.*system"):
            build_dataset(cfg)
        (base / name).write_bytes(original)
    assert not marker.exists()


@pytest.mark.parametrize("override, value", [
    ("train.lr=1e-4", 1e-4), ("train.lr=1e8", 1e8), ("train.lr=3E-5", 3e-5),
    ("data.root=on", "on"), ("data.root=no", "no"), ("data.root=1e3", "1e3"),
    ("train.mixed_precision=no", "no"), ("init_from=null", None),
])
def test_values_people_write_are_read_as_meant(override, value):
    key, _ = override.split("=", 1)
    cfg = load_config(ROOT / "configs/shapes.yaml", [override])
    section, _, name = key.rpartition(".")
    assert getattr(getattr(cfg, section) if section else cfg, name) == value


def test_yaml_files_read_1e_minus_4_as_a_float_and_keep_on_a_string(tmp_path):
    from diffusion.config import save_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  mixed_precision: no\ndata:\n  root: on\n  hflip: true\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.mixed_precision, cfg.data.root, cfg.data.hflip) == (1e-4, "no", "on", True)
    save_config(cfg, path)  # and a saved config reads back the same, with YAML 1.1 readers too
    assert load_config(path) == cfg
    import yaml

    assert yaml.safe_load(path.read_text())["data"]["root"] == "on"
