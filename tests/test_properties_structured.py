"""Generated YAML and JSON documents through the shared loader (diffusion/structured.py) and the real
entry points that read such files (load_config, the scaling sweep-file reader, fit/predict on a sweep
folder).

Contract: a document is read as an independent parse reads it (the generator's own value, json.loads,
or yaml.safe_load of a small trusted input), or refused with a UserError of one line that names the
file; never another exception, never a hang (an alias bomb is refused in about a second).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from diffusion.config import load_config
from diffusion.errors import UserError
from diffusion.structured import (MAX_VALUES, ConfigDumper, StructuredFileError, load_json, load_jsonl, load_yaml,
                                  parse_json)

from .conftest import ROOT

KEYS = st.text("abcdefghij_", min_size=1, max_size=6)
SCALARS = (st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.text(max_size=12)
           | st.floats(allow_nan=False, width=64))
TREES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                     max_leaves=25)
LOCAL = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _file(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _one_line_naming(err: BaseException, path: Path | str) -> str:
    text = str(err)
    assert "\n" not in text, text
    assert str(path) in text, text
    return text


def _refused_or_equal(read, path: Path, expected) -> None:
    """`read(path)` equals `expected` (unless that is None: no independent value), or is a one-line UserError naming `path`."""
    try:
        value = read(path)
    except UserError as err:
        _one_line_naming(err, path)
        return
    if expected is not None:
        assert value == expected


# -- valid documents read as an independent parse reads them ---------------------------------------------

@given(tree=TREES)
def test_yaml_and_json_read_back_what_was_written(tree):
    with tempfile.TemporaryDirectory() as tmp:
        text = yaml.dump(tree, Dumper=ConfigDumper)
        assert load_yaml(_file(Path(tmp), "a.yaml", text), shape=None) == tree
        text = json.dumps(tree)
        assert load_json(_file(Path(tmp), "a.json", text), shape=None) == json.loads(text)


def _render(value, dup_depth: int, depth: int = 0) -> str:
    """JSON (also valid YAML flow style) of `value`, repeating the first key of the first mapping met at
    depth >= dup_depth (with another value): -1 = no duplicate."""
    if isinstance(value, dict):
        items = [f"{json.dumps(k)}: {_render(v, dup_depth, depth + 1)}" for k, v in value.items()]
        if items and 0 <= dup_depth <= depth:
            items.append(f"{json.dumps(next(iter(value)))}: 0")
            dup_depth = -1
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_render(v, dup_depth, depth + 1) for v in value) + "]"
    return json.dumps(value)


ASCII_TREES = st.recursive(st.none() | st.booleans() | st.integers(-1000, 1000) | st.text("xyz ", max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, min_size=1, max_size=3),
                           max_leaves=15)


@given(tree=st.dictionaries(KEYS, ASCII_TREES, min_size=1, max_size=4), depth=st.integers(0, 4))
def test_a_key_written_twice_at_any_depth_is_refused_in_yaml_and_json(tree, depth):
    text = _render(tree, depth)
    assume(text != _render(tree, -1))  # a mapping exists at that depth
    with tempfile.TemporaryDirectory() as tmp:
        for name, read in (("d.json", load_json), ("d.yaml", load_yaml)):
            path = _file(Path(tmp), name, text)
            with pytest.raises(UserError) as err:
                read(path)
            assert "appears twice" in _one_line_naming(err.value, path)
        clean = _render(tree, -1)  # and without the duplicate, the same reading as json.loads and yaml.safe_load
        assert load_yaml(_file(Path(tmp), "c.yaml", clean)) == json.loads(clean) == yaml.safe_load(clean)


@given(base=st.dictionaries(KEYS, st.integers(-10**6, 10**6), min_size=1, max_size=5),
       other=st.dictionaries(KEYS, st.integers(-10**6, 10**6), max_size=5),
       explicit=st.dictionaries(KEYS, st.integers(-10**6, 10**6), max_size=5))
def test_merge_keys_follow_yaml_explicit_keys_override_merged_ones(base, other, explicit):
    lines = [f"base: &b {json.dumps(base)}", f"other: &o {json.dumps(other)}", "out:", "  <<: [*b, *o]"]
    lines += [f"  {k}: {v}" for k, v in explicit.items()]
    text = "\n".join(lines) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        data = load_yaml(_file(Path(tmp), "m.yaml", text))
    assert data["out"] == {**other, **base, **explicit}  # of the merged mappings the first wins
    assert data["out"] == yaml.safe_load(text)["out"]  # as PyYAML reads it (which also keeps duplicates silently)


def test_the_reported_merge_key_case_is_accepted(tmp_path):
    path = _file(tmp_path, "c.yaml", "train:\n  <<: {lr: 0.001}\n  lr: 0.002\n")
    assert load_config(path).train.lr == 0.002
    with pytest.raises(UserError, match="appears twice"):
        load_config(_file(tmp_path, "d.yaml", "train:\n  <<: {lr: 0.001}\n  lr: 0.002\n  lr: 0.003\n"))


# -- bombs, bytes, encodings, truncation -------------------------------------------------------------------

def _alias_bomb(levels: int, fan: int, merge: bool) -> str:
    lines = ["a0: &a0 {k0: 1, k1: 2}" if merge else "a0: &a0 [x, y]"]
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * fan)
        lines.append(f"a{i}: &a{i} {{<<: [{refs}], m{i}: {i}}}" if merge else f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


@given(levels=st.integers(2, 30), fan=st.integers(2, 10), merge=st.booleans())
def test_alias_and_merge_bombs_are_refused_within_a_second_and_small_ones_read(levels, fan, merge):
    text = _alias_bomb(levels, fan, merge)
    with tempfile.TemporaryDirectory() as tmp:
        path = _file(Path(tmp), "bomb.yaml", text)
        start = time.perf_counter()
        try:
            data = load_yaml(path)
        except UserError as err:
            assert "alias bomb" in _one_line_naming(err, path)
            data = None
        assert time.perf_counter() - start < 3  # about 0.1 s idle; slack for a shared CPU
    sizes = [3]  # values of a_i expanded: its list and, fan times, a_(i-1)'s
    for _ in range(levels):
        sizes.append(1 + fan * sizes[-1])
    total = 1 + sum(1 + size for size in sizes)  # the top mapping, each key and its value
    assert (data is None) == (not merge and total > MAX_VALUES)  # merges keep each key once: never a bomb
    if data is not None and fan ** levels <= 1000:  # small: PyYAML's own reading agrees
        assert data == yaml.safe_load(text)


@given(data=st.binary(max_size=300), suffix=st.sampled_from(["yaml", "json", "jsonl"]))
def test_random_bytes_are_read_or_refused_in_one_line(data, suffix):
    read = {"yaml": lambda p: load_yaml(p, shape=None), "json": lambda p: load_json(p, shape=None),
            "jsonl": lambda p: load_jsonl(p, shape=None)}[suffix]
    with tempfile.TemporaryDirectory() as tmp:
        path = _file(Path(tmp), f"f.{suffix}", data)
        expected = None
        if suffix == "json":
            try:
                expected = json.loads(data.decode("utf-8").removeprefix("\ufeff"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                pass
            if expected is not None and isinstance(expected, float) and math.isnan(expected):
                expected = None
        _refused_or_equal(read, path, expected)


@given(tree=st.dictionaries(KEYS, TREES, min_size=1, max_size=4), where=st.integers(0, 10**6), fmt=st.sampled_from(["yaml", "json"]))
def test_a_file_cut_at_any_byte_is_read_as_cut_or_refused(tree, where, fmt):
    text = yaml.dump(tree, Dumper=ConfigDumper) if fmt == "yaml" else json.dumps(tree)
    raw = text.encode("utf-8")
    cut = raw[: where % len(raw)]
    with tempfile.TemporaryDirectory() as tmp:
        path = _file(Path(tmp), f"cut.{fmt}", cut)
        expected = None
        if fmt == "json":
            try:
                expected = json.loads(cut.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                pass
        _refused_or_equal(lambda p: load_yaml(p, shape=None) if fmt == "yaml" else load_json(p, shape=None), path, expected)


@given(text=st.text(st.characters(min_codepoint=0xA0, max_codepoint=0xFF), min_size=1, max_size=10))
def test_latin_1_text_is_refused_as_not_utf_8(text):
    with tempfile.TemporaryDirectory() as tmp:
        for name, read in (("c.yaml", load_yaml), ("c.json", load_json)):
            path = _file(Path(tmp), name, f"data: {{root: '{text}\xe9'}}\n".encode("latin-1"))
            with pytest.raises(UserError) as err:
                read(path)
            assert "not UTF-8" in _one_line_naming(err.value, path)


def test_bounds_size_depth_and_shape(tmp_path):
    cases = [("big.json", "[" + "1," * 600_000 + "1]", "characters long"),
             ("deep.json", "[" * 5000 + "]" * 5000, "nested too deeply"),
             ("deep.yaml", "a: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
             ("many.yaml", "- 1\n" * (MAX_VALUES + 1), "values"),
             ("list.json", "[1, 2]", "must hold a mapping, not a list"),
             ("empty.json", "", "is empty"),
             ("digits.json", "1" * 5000, "not valid JSON")]
    for name, text, words in cases:
        path = _file(tmp_path, name, text)
        with pytest.raises(UserError) as err:
            (load_yaml if name.endswith("yaml") else load_json)(path)
        assert words in _one_line_naming(err.value, path)
    with pytest.raises(StructuredFileError, match="appears twice"):
        parse_json('{"a": 1, "a": 2}', "metadata.jsonl:3")


# -- the real entry points --------------------------------------------------------------------------------

SHAPES_YAML = (ROOT / "configs/shapes.yaml").read_bytes()


@LOCAL
@given(where=st.integers(0, len(SHAPES_YAML)), junk=st.binary(max_size=8), mode=st.sampled_from(["cut", "insert", "bomb", "twice"]))
def test_load_config_reads_a_damaged_config_file_or_refuses_it_in_one_line(where, junk, mode):
    raw = {"cut": SHAPES_YAML[:where], "insert": SHAPES_YAML[:where] + junk + SHAPES_YAML[where:],
           "bomb": _alias_bomb(12, 4, False).encode() + b"model:\n  channel_mult: *a12\n",
           "twice": SHAPES_YAML + b"\ntrain:\n  lr: 0.1\n"}[mode]
    with tempfile.TemporaryDirectory() as tmp:
        path = _file(Path(tmp), "c.yaml", raw)
        try:
            load_config(path, [f"output_dir={tmp}/out"])
        except UserError as err:
            text = str(err)
            assert "\n" not in text
            if isinstance(err, StructuredFileError) or mode in ("bomb", "twice"):
                assert str(path) in text, text
            if mode in ("bomb", "twice"):
                assert ("alias bomb" if mode == "bomb" else "appears twice") in text


SWEEP = """base: {base}
output_dir: {out}
config:
  train: {{max_steps: 4, batch_size: 2, lr: 1e-3}}
  data: {{resolution: 8, shapes_size: 64}}
  model: {{base_channels: 8, channel_mult: [1, 2], layers_per_block: 1, attention_resolutions: [], condition: none}}
grids:
  - {{model.base_channels: [8, 16], data.subset_size: [16]}}
eval: {{points: 2, first_step: 2}}
fit: {{n_boot: 5}}
"""


@settings(LOCAL, max_examples=8)  # each reads the base config and checks 2 grid points: 0.2 s idle
@given(where=st.integers(0, 2000), mode=st.sampled_from(["cut", "bomb", "twice", "latin-1", "list", "flip"]))
def test_sweep_files_are_read_or_refused_in_one_line_naming_them(where, mode):
    from diffusion.scaling.sweep_config import expand_grid, load_sweep

    with tempfile.TemporaryDirectory() as tmp:
        good = SWEEP.format(base=ROOT / "configs/shapes_uncond.yaml", out=f"{tmp}/runs")
        raw = good.encode()
        raw = {"cut": raw[: where % len(raw)], "bomb": good.replace("grids:\n", _alias_bomb(10, 5, False) + "grids:\n  - {x: *a10}\n").encode(),
               "twice": raw + b"grids:\n  - {model.base_channels: [4]}\n", "latin-1": raw.replace(b"none", b"n\xe9"),
               "list": b"- " + raw.replace(b"\n", b"\n  "), "flip": raw[:where % len(raw)] + b"\x00" + raw[where % len(raw) + 1:]}[mode]
        path = _file(Path(tmp), "sweep.yaml", raw)
        start = time.perf_counter()
        try:
            sweep = load_sweep(path)
        except UserError as err:
            text = _one_line_naming(err, path)
            words = {"bomb": "alias bomb", "twice": "appears twice", "latin-1": "not UTF-8", "list": "must hold a mapping",
                     "flip": "not valid YAML"}.get(mode, "")
            assert words in text
        else:
            assert mode == "cut" and len(expand_grid(sweep)) >= 1
        assert time.perf_counter() - start < 5


def _sweep_folder(root: Path) -> None:
    for n in (7e4, 1.6e5, 2.9e5):
        d = root / f"n{n:g}" / "scaling"
        d.mkdir(parents=True)
        meta = {"run": f"n{n:g}", "values": {"model.base_channels": int(n)}, "params": int(n), "dataset_size": 50000,
                "forward_flops": 107 * n, "max_steps": 600}
        (d / "meta.json").write_text(json.dumps(meta))
        rows = [{"step": s, "images_seen": 32 * s, "flops": 3 * 107 * n * 32 * s, "wall_s": s, "train_loss": 0.1,
                 "val_loss": 0.03 + 8 * n**-0.3 + 30 * (32 * s) ** -0.4} for s in (25, 50, 100)]
        (d / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _scaling_main(argv: list[str]) -> tuple[int, str]:
    """`python -m diffusion.scaling ARGV` in this process: (exit status, stderr)."""
    from diffusion.scaling.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            status = 0
        except SystemExit as exit:
            status = exit.code
    return status, err.getvalue()


BAD_ROWS = [{"images_seen": 800}, {"step": 25, "images_seen": 800, "flops": 1e9, "wall_s": 1, "val_loss": float("nan")},
            {"step": "25", "images_seen": 800, "flops": 1e9, "wall_s": 1, "val_loss": 0.3},
            {"step": 25, "images_seen": 800, "flops": 0, "wall_s": 1, "val_loss": 0.3},
            {"step": 25, "images_seen": 800, "flops": 1e9, "wall_s": 1, "val_loss": 0.3, "run": ["x"]}, [1, 2], "text"]


@settings(LOCAL, max_examples=12)
@given(where=st.integers(0, 10**6), junk=st.binary(max_size=6), target=st.sampled_from(["meta", "evals", "sweep.yaml"]),
       command=st.sampled_from(["fit", "predict"]), row=st.sampled_from(BAD_ROWS))
def test_fit_and_predict_answer_a_damaged_sweep_folder_in_one_line(where, junk, target, command, row):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _sweep_folder(root)
        run = root / "n70000" / "scaling"
        if target == "meta":  # truncated (json.dumps writes no newline: every cut is invalid), empty or binary
            raw = (run / "meta.json").read_bytes()
            (run / "meta.json").write_bytes(raw[: where % len(raw)] + junk[:0] if where % 3 else junk)
            path = run / "meta.json"
        elif target == "evals":
            with (run / "evals.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            path = run / "evals.jsonl"
        else:
            path = _file(root, "sweep.yaml", [b"fit: {n_boot: 5", b"fit: [1]", b"fit: {n_boot: -1}", b"\xff\xfe",
                                              b"fit: {n_boot: 5}\nfit: {n_boot: 6}\n", b"- 1\n"][where % 6])
        argv = [command, str(root), *(["--n-boot", "0", "--no-plots"] if command == "fit" else ["--target-loss", "0.5"])]
        status, err = _scaling_main(argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], (status, err)


# -- the drill's scaling cases, in this process (tests/test_bad_input.py runs its train/sample cases) ------------

def _scaling_cases():
    from benchmarks.hostile_cases import ROUND3_STRUCTURED

    return [c for c in ROUND3_STRUCTURED if c.id.startswith(("sweep: ", "fit: ", "predict: "))]


@pytest.mark.parametrize("case", _scaling_cases(), ids=lambda c: c.id)
def test_drill_scaling_case_is_answered_cleanly(case, tmp_path):
    from benchmarks.hostile_env import Result
    from benchmarks.hostile_inputs import classify

    import diffusion.scaling.plots  # noqa: F401 - imported before the clock starts
    import diffusion.scaling.report  # noqa: F401
    import diffusion.scaling.sweep  # noqa: F401

    case.prepare(None, tmp_path)
    argv = case.argv(None, tmp_path)
    assert argv[:3] == ["python", "-m", "diffusion.scaling"]
    start = time.perf_counter()
    status, err = _scaling_main(argv[3:])
    result = Result(status, "", err, time.perf_counter() - start)
    assert classify(case, result, None, tmp_path) == ("clean", ""), err
    assert result.seconds < 5, result.seconds  # answered before any training or fitting (about 0.1 s)
