"""Help and reports of the command lines (issue 35): `python -m diffusion.evaluate --help` lists the evaluations,
every option's --help line shows its default, the benchmark scripts answer --help without importing torch,
and shapes-accuracy takes --num-samples as given and writes its report by default."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ROOT


def option_help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each optional argument's rendered help, whitespace folded, by its first option string."""
    formatter = parser._get_formatter()
    return {a.option_strings[0]: " ".join(formatter._format_action(a).split())
            for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS}


def assert_every_default_shown(parser: argparse.ArgumentParser) -> None:
    from diffusion.cli.help_format import shows_default

    lines = option_help_lines(parser)
    for action in parser._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS and (shows_default(action)
                                                                                or "default" in (action.help or "")):
            assert "default" in lines[action.option_strings[0]], (parser.prog, lines[action.option_strings[0]])


def test_evaluate_help_lists_every_evaluation(capsys):
    from diffusion.evaluate import COMMANDS
    from diffusion.evaluate.__main__ import main

    main(["--help"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert all(len(line.split(None, 1)) == 2 for line in out.splitlines() if line.startswith("  "))  # each has its line
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "name an evaluation" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["shapes-accuracy", "classifier", "clip", "inpaint", "fid", "upsample",
                                     "train-extractor"])
def test_every_evaluation_help_shows_its_defaults(command):
    from diffusion.evaluate.__main__ import build_parser

    parser, _ = build_parser(command)
    assert_every_default_shown(parser)
    assert "(default: 120)" in parser.format_help().replace("\n", " ") or command != "shapes-accuracy"


def test_train_and_scaling_help_show_their_defaults():
    import train
    from diffusion.scaling.cli import build_parser

    assert_every_default_shown(train.build_parser())
    scaling = build_parser()
    subparsers = next(a for a in scaling._actions if isinstance(a, argparse._SubParsersAction))
    for sub in subparsers.choices.values():
        assert_every_default_shown(sub)
    assert "(default: none)" in " ".join(subparsers.choices["fit"].format_help().split())


def test_benchmark_scripts_answer_help_without_torch():
    """Every benchmarks/*.py --help prints its usage and exits 0 before torch is imported (was 11-30 s each)."""
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("hostile_"))
    probe = (
        "import runpy, sys\n"
        f"for name in {scripts!r}:\n"
        "    sys.argv = ['benchmarks/' + name, '--help']\n"
        "    try:\n"
        "        runpy.run_path('benchmarks/' + name, run_name='__main__')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code in (0, None), (name, exit.code)\n"
        "    else:\n"
        "        raise AssertionError(name + ' --help did not exit')\n"
        "    assert 'torch' not in sys.modules, name + ' imported torch for --help'\n"
        "print('ok', len(sys.argv))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    assert done.stdout.count("usage:") >= len(scripts) - 2  # common.py prints its docstring; run_docs its own


@given(st.integers(1, 5000))
def test_shapes_accuracy_takes_the_count_as_given(n):
    from diffusion.evaluate.shapes_accuracy import class_counts

    counts = class_counts(n)
    assert sum(counts) == n and max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("n", [0, -3])
def test_shapes_accuracy_refuses_counts_below_one(n):
    from diffusion.errors import UserError
    from diffusion.evaluate.shapes_accuracy import class_counts

    with pytest.raises(UserError, match="--num-samples must be at least 1"):
        class_counts(n)


def test_shapes_accuracy_writes_its_report_by_default(tiny_run, tmp_path, capsys):
    """13 samples are 13 (2 for class 0, 1 for the others), and the table lands in RUN/eval/shapes_accuracy.json."""
    from diffusion.evaluate.__main__ import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    main(["shapes-accuracy", "--checkpoint", str(run), "--num-samples", "13", "--steps", "2", "--guidance-scale", "0,1"])
    out = capsys.readouterr().out
    report = run / "eval" / "shapes_accuracy.json"
    rows = json.loads(report.read_text())
    assert [(r["guidance_scale"], r["n"]) for r in rows] == [(0.0, 13), (1.0, 13)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows) and f"report: {report}" in out
    assert [line.split(" | ")[-1] for line in out.splitlines()[1:3]] == ["13", "13"]
