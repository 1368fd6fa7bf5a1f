"""Config loading: overrides, refusal of unknown keys and wrong types, one-line CLI errors."""
import subprocess
import sys

import pytest

from diffusion.config import load_config
from diffusion.errors import UserError
from tests.conftest import ROOT


def test_overrides_apply_and_types_coerce():
    cfg = load_config(ROOT / "configs/shapes.yaml", ["train.max_steps=200", "output_dir=runs/try", "train.lr=1",
                                                      "model.channel_mult=[1,2]"])
    assert cfg.train.max_steps == 200 and cfg.output_dir == "runs/try"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.channel_mult == [1, 2]
    assert cfg.model.cond_drop_prob == 0.2


@pytest.mark.parametrize("override, words", [
    ("train.max_stepz=3", ["train.max_stepz", "train.max_steps"]),
    ("trian.max_steps=3", ["trian"]),
    ("train.max_steps=abc", ["train.max_steps", "int"]),
    ("model.condition=txt", ["model.condition", "class"]),
    ("model.cond_drop_prob=1.5", ["cond_drop_prob"]),
])
def test_bad_keys_and_values_are_refused(override, words):
    with pytest.raises(UserError) as err:
        load_config(ROOT / "configs/shapes.yaml", [override])
    assert all(w in str(err.value) for w in words), str(err.value)


def test_cli_reports_config_errors_in_one_line():
    proc = subprocess.run([sys.executable, "train.py", "configs/shapes.yaml", "train.batch_sise=4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.batch_size" in lines[0] and "Traceback" not in proc.stderr


def test_every_shipped_config_loads():
    from diffusion.scaling.sweep_config import load_sweep

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith("scaling_"):  # sweep files: a base config plus grids
            load_sweep(path)
        else:
            load_config(path)


def test_yaml_no_stays_a_string_for_string_keys():
    assert load_config(ROOT / "configs/shapes.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
