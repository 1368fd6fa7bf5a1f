"""The documentation's commands and links are real.

Every fenced shell block (bash, sh, shell; `$ ` lines of console blocks) in README.md and docs/*.md,
and every inline `python ...` command in README.md (the feature map), is split into commands the way
a shell would (quotes, backslash continuations, comments, `&&`, `;`, pipes, `VAR=...` assignments and
`$VAR`, env prefixes, `nice`, `timeout`). Each `python train.py`, `python sample.py` and
`python -m diffusion...` command (also after `accelerate launch` or `torchrun`) is parsed by the
real argument parser (parse only, nothing runs); train.py's config file is loaded with its
`key=value` overrides by the real config code; and every file a command names inside the repository
(configs/, docs/, benchmarks/, ...) must exist. Links and images between the pages must resolve,
anchors included, and every page in docs/ must be linked from the README.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`(python [^`]+)`")
SEPARATOR = set(";&|\n()")
REPO_DIRS = ("configs/", "docs/", "benchmarks/", "tests/", "diffusion/", ".ci/")
PROGRAM = re.compile(r"(^|/)(train|sample)\.py$")


@dataclass
class Command:
    where: str  # file:line
    argv: list[str]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def strip_comments_and_continuations(block: str) -> str:
    """Drop `# ...` comments and backslash-newlines outside quotes; keep every newline that ends a line."""
    out, quote, i = [], None, 0
    while i < len(block):
        c = block[i]
        if quote:
            out.append(c)
            if c == quote:
                quote = None
            elif c == "\\" and quote == '"' and i + 1 < len(block):
                out.append(block[i + 1])
                i += 1
        elif c in "'\"":
            quote = c
            out.append(c)
        elif c == "\\" and block[i + 1:i + 2] == "\n":
            i += 1  # a continuation: the next line goes on this command
        elif c == "#" and (not out or out[-1] in " \t\n"):
            while i < len(block) and block[i] != "\n":
                i += 1
            continue
        else:
            out.append(c)
        i += 1
    return "".join(out)


def split_commands(block: str) -> list[list[str]]:
    """A shell block as a list of simple commands (token lists), split at newlines, ;, &&, || and |."""
    lexer = shlex.shlex(strip_comments_and_continuations(block), posix=True, punctuation_chars="();<>|&\n")
    lexer.whitespace, lexer.commenters, lexer.whitespace_split = " \t\r", "", True
    commands, current = [], []
    tokens = list(lexer)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if set(token) <= SEPARATOR | {"<", ">"} and set(token) & {"<", ">"}:  # a redirection and its target
            if current and current[-1].isdigit():
                current.pop()
            i += 2
            continue
        if set(token) <= SEPARATOR:
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
        i += 1
    if current:
        commands.append(current)
    return commands


def expand(argv: list[str], variables: dict[str, str]) -> list[str]:
    """$NAME and ${NAME} tokens replaced by the words of the variable's value, as an unquoted shell expansion does."""
    out = []
    for token in argv:
        name = re.fullmatch(r"\$\{?(\w+)\}?", token)
        out += shlex.split(variables[name.group(1)]) if name and name.group(1) in variables else [token]
    return out


def unwrap(argv: list[str]) -> list[str]:
    """The command behind env assignments and nice/timeout/time/env/sudo."""
    while argv:
        head = argv[0]
        if re.fullmatch(r"[A-Za-z_]\w*=.*", head) or head in ("env", "time", "sudo", "exec"):
            argv = argv[1:]
        elif head == "nice":
            argv = argv[3:] if argv[1:2] == ["-n"] else argv[2:] if argv[1:2] and argv[1].startswith("-") else argv[1:]
        elif head == "timeout":
            argv = argv[1:]
            while argv and argv[0].startswith("-"):
                argv = argv[2:] if argv[0] in ("-s", "-k", "--signal", "--kill-after") else argv[1:]
            argv = argv[1:]  # the duration
        else:
            return argv
    return argv


def shell_commands(page: Path) -> list[Command]:
    """Every command of the page's shell blocks (and, for the README, of its inline code)."""
    text = page.read_text(encoding="utf-8")
    name = page.relative_to(ROOT).as_posix()
    found = []
    for block in FENCE.finditer(text):
        lang, body = block.group(1), block.group(2)
        start = line_of(text, block.start(2))
        if lang not in SHELL:
            for k, line in enumerate(body.splitlines()):  # a command in an untagged block would escape the check
                assert not re.match(r"\s*\$?\s*python (train\.py|sample\.py|-m diffusion)", line), \
                    f"{name}:{start + k}: a command in a ```{lang} block: tag the block bash"
            continue
        if lang == "console":
            body = "\n".join(line[2:] for line in body.splitlines() if line.startswith("$ "))
        variables: dict[str, str] = {}
        for argv in split_commands(body):
            assignments = [re.fullmatch(r"([A-Za-z_]\w*)=(.*)", t, re.S) for t in argv]
            if all(assignments):
                variables.update(m.groups() for m in assignments)
                continue
            found.append(Command(f"{name}:{start}", unwrap(expand(argv, variables))))
    if page.name == "README.md":
        for match in INLINE.finditer(text):
            found.append(Command(f"{name}:{line_of(text, match.start())}", shlex.split(match.group(1))))
    return found


COMMANDS = [c for page in PAGES for c in shell_commands(page)]


def target(argv: list[str]) -> tuple[str, list[str]] | None:
    """('train.py' | 'sample.py' | 'diffusion.X', its arguments) for the commands the check parses."""
    if not argv or not re.fullmatch(r"python3?|accelerate|torchrun", Path(argv[0]).name):
        return None
    for i, token in enumerate(argv):
        if PROGRAM.search(token):
            return PROGRAM.search(token).group(2) + ".py", argv[i + 1:]
        if token == "-m" and i + 1 < len(argv) and argv[i + 1].startswith("diffusion"):
            return argv[i + 1], argv[i + 2:]
    return None


def parse_or_fail(parser: argparse.ArgumentParser, argv: list[str], intermixed: bool = False, known: bool = False):
    """Parse like the command line does; an argparse error fails the test with argparse's message."""
    from diffusion.errors import UserError

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if intermixed:
                return parser.parse_intermixed_args(argv)
            return parser.parse_known_args(argv) if known else parser.parse_args(argv)
    except UserError as error:  # our parsers' errors (diffusion.cli.args.Parser)
        pytest.fail(str(error))
    except SystemExit:
        pytest.fail(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "argparse exited")


def sample_parser() -> argparse.ArgumentParser:
    from diffusion.cli.sample import build_parser, features

    return build_parser(features())


def check_train(argv: list[str]) -> None:
    import train
    from diffusion.config import load_config
    from diffusion.errors import UserError

    args = parse_or_fail(train.build_parser(), argv, intermixed=True)
    config = ROOT / args.config
    assert config.is_file(), f"config file {args.config} not found"
    try:
        load_config(config, args.overrides)
    except UserError as err:
        pytest.fail(f"{args.config} {' '.join(args.overrides)}: {err}")


def check_sample(argv: list[str]) -> None:
    from diffusion.cli.sample import check_args
    from diffusion.errors import UserError

    try:
        check_args(parse_or_fail(sample_parser(), argv))
    except UserError as err:
        pytest.fail(str(err))


def check_module(module: str, argv: list[str]) -> None:
    if module == "diffusion.evaluate":
        from diffusion.evaluate.__main__ import build_parser, parse  # noqa: F401  (parse: how main parses)

        assert argv, "python -m diffusion.evaluate needs a command"
        parser, command = build_parser(argv[0])
        if getattr(command, "PASS_UNKNOWN", False):  # the rest goes on to sample.py's options
            args, rest = parse_or_fail(parser, argv[1:], known=True)
            parse_or_fail(sample_parser(), ["--checkpoint", "RUN", *rest])
        else:
            parse_or_fail(parser, argv[1:])
    elif module == "diffusion.scaling":
        from diffusion.scaling.cli import build_parser

        parse_or_fail(build_parser(), argv)
    elif module == "diffusion.demos.app":
        from diffusion.demos.app import build_parser

        parse_or_fail(build_parser(), argv)
    elif module == "diffusion.demos.inpaint":
        from diffusion.demos.inpaint import build_parser

        parse_or_fail(build_parser(), argv)
    elif module == "diffusion.ema":
        from diffusion.ema.__main__ import build_parser

        parse_or_fail(build_parser(), argv)
    else:
        pytest.fail(f"no parser known for python -m {module}: add it to tests/test_docs.py")


def repo_paths(argv: list[str]) -> list[str]:
    """Arguments (or values of key=value and --flag=value) that name something inside the repository."""
    values = [v for token in argv for v in token.split("=", 1)[-1].split(",")]
    return [v for v in values if v.startswith(REPO_DIRS) or (v.endswith(".py") and "/" in v and not v.startswith("/"))]


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_is_real(command):
    for path in repo_paths(command.argv):
        assert (ROOT / path).exists(), f"{command}: {path} does not exist"
    found = target(command.argv)
    if found is None:
        return
    program, argv = found
    if program == "train.py":
        check_train(argv)
    elif program == "sample.py":
        check_sample(argv)
    else:
        check_module(program, argv)


def test_the_docs_have_commands_to_check():
    checked = [c for c in COMMANDS if target(c.argv)]
    assert len(checked) >= 50, len(checked)
    kinds = {target(c.argv)[0] for c in checked}
    assert {"train.py", "sample.py", "diffusion.evaluate", "diffusion.scaling", "diffusion.demos.app"} <= kinds


def test_the_splitter_reads_blocks_as_a_shell_does():
    block = ('CEL="data.root=data\n  train.lr=0.1"   # two overrides\n'
             "OMP_NUM_THREADS=1 nice -n 10 timeout -s TERM 60 python train.py c.yaml $CEL \\\n"
             "    --resume auto && python sample.py --out 'a b' # done\n"
             "echo '# not a comment' 2>&1 | tee log\n")
    variables, commands = {}, []
    for argv in split_commands(block):
        if all(re.fullmatch(r"([A-Za-z_]\w*)=(.*)", t, re.S) for t in argv):
            variables.update(t.split("=", 1) for t in argv)
        else:
            commands.append(unwrap(expand(argv, variables)))
    assert commands == [["python", "train.py", "c.yaml", "data.root=data", "train.lr=0.1", "--resume", "auto"],
                        ["python", "sample.py", "--out", "a b"], ["echo", "# not a comment"], ["tee", "log"]]


# -- links --------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The page without fenced blocks and inline code, where link syntax is only text."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_images_resolve(page):
    broken = []
    for link in links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        file, _, anchor = link.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{link} (no heading #{anchor} in {path.name})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / link.partition("#")[0]).resolve() for link in links(readme)}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


# -- the documented examples give what the docs show -------------------------------------------

def documented(page: str, *words: str) -> list[str]:
    """The argv of the one documented command on `page` that contains every word, after `python`."""
    found = [c.argv for c in shell_commands(ROOT / page) if all(w in c.argv for w in words)]
    assert len(found) == 1, f"{page}: {len(found)} commands with {words}"
    return found[0]


def run_sample(argv: list[str], replace: dict[str, str]) -> Path:
    """Run a documented sample.py command in-process, with run and output folders replaced."""
    from diffusion.cli.sample import main as sample_main

    program, args = target(argv)
    assert program == "sample.py"
    return sample_main.__wrapped__([replace.get(a, a) for a in args])


def test_pipeline_example_draws_what_the_sample_py_command_beside_it_draws(tiny_run, tmp_path, monkeypatch):
    """docs/demo.md: the Python example and the sample.py command it names give the same pixels."""
    import numpy as np
    from PIL import Image

    text = (ROOT / "docs" / "demo.md").read_text(encoding="utf-8")
    example = next(m.group(2) for m in FENCE.finditer(text) if m.group(1) == "python" and "GuidedDiffusionPipeline" in m.group(2))
    assert '"runs/shapes/final"' in example and "seed=0" in example
    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples").mkdir()
    exec(example.replace('"runs/shapes/final"', repr(str(tiny_run / "final"))), {})  # writes samples/blue_circle.png
    out = run_sample(documented("docs/demo.md", "samples/pipeline_blue_circles"),
                     {"runs/shapes": str(tiny_run), "samples/pipeline_blue_circles": str(tmp_path / "s")})
    assert np.array_equal(np.asarray(Image.open(tmp_path / "samples" / "blue_circle.png")),
                          np.asarray(Image.open(out / "sample_0000.png").convert("RGB")))


def test_inpainting_commands_run_on_the_shipped_inputs(tiny_run, tmp_path):
    """docs/inpainting.md's two commands, on docs/examples/{in,mask}.png, with tiny models: every result
    keeps the known pixels of in.png exactly and comes with its strip, as the page says."""
    import numpy as np
    from PIL import Image

    from diffusion.conditioning.inpaint import files
    from diffusion.sampling.images import to_pil
    from diffusion.training.trainer import train
    from tests.conftest import tiny_config

    inpaint_run = tmp_path / "inpaint"
    train(tiny_config(inpaint_run, "train.max_steps=2", f"init_from={tiny_run}", config="configs/inpaint_shapes.yaml"))
    expected = np.asarray(to_pil(files.load_image(ROOT / "docs/examples/in.png", 8)[0]))
    keep = files.load_mask(ROOT / "docs/examples/mask.png", 8)[0, 0].bool().numpy()
    assert 0 < keep.mean() < 1  # the band leaves known pixels above and below it
    per_run = tiny_config(inpaint_run).sample.num_samples  # sample.py's default --num-samples: the run's sample.num_samples
    replace = {"runs/inpaint_shapes": str(inpaint_run), "runs/shapes": str(tiny_run),
               "samples/inpaint": str(tmp_path / "a"), "samples/repaint": str(tmp_path / "b")}
    for argv, method in ((documented("docs/inpainting.md", "runs/inpaint_shapes", "docs/examples/in.png"), "channels"),
                         (documented("docs/inpainting.md", "--inpaint-method", "repaint"), "repaint")):
        out = run_sample(argv, replace)
        results = sorted(out.glob("sample_*.png"))
        count = int(argv[argv.index("--num-samples") + 1]) if "--num-samples" in argv else per_run  # the run's config
        assert len(results) == count and len(list(out.glob("strip_*.png"))) == count
        for path in results:
            image = Image.open(path)
            assert image.text["inpaint_method"] == method and image.text["label"] == "2"
            assert np.array_equal(np.asarray(image)[keep], expected[keep])


def test_quickstart_figure_is_what_its_command_draws(tiny_run, tmp_path):
    """README: the picture is grid.png of the documented command (12 classes x 6 samples), 3x enlarged,
    sampled with the config's DDIM 25 steps; and the accuracy command matches the numbers quoted."""
    import yaml
    from PIL import Image

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    argv = documented("README.md", "samples/all_classes")
    out = run_sample(argv, {"runs/shapes": str(tiny_run), "samples/all_classes": str(tmp_path / "all")})
    per_class = int(argv[argv.index("--num-samples") + 1])
    assert len(list(out.glob("sample_*.png"))) == 12 * per_class

    def grid_size(side: int) -> tuple[int, int]:  # torchvision's make_grid, padding 2
        return per_class * (side + 2) + 2, 12 * (side + 2) + 2

    assert Image.open(out / "grid.png").size == grid_size(8)  # the tiny run draws 8 px images
    config = yaml.safe_load((ROOT / "configs" / "shapes.yaml").read_text())
    figure = Image.open(ROOT / "docs" / "shapes_samples.png")
    assert figure.size == tuple(3 * n for n in grid_size(config["data"]["resolution"]))
    assert config["sample"]["sampler"] == "ddim" and f"DDIM {config['sample']['steps']} steps" in readme
    accuracy = documented("README.md", "shapes-accuracy")
    assert f"{accuracy[accuracy.index('--num-samples') + 1]} samples per scale" in readme
    assert readme.count("5 min 52 s") == 1 and "6 min 26 s" not in readme  # one quickstart time
    assert not re.search(r"(?<!\d)7 min", readme)  # no stale "7 min" quickstart figure (the CI's "17 min" is another)


def test_fid_example_runs_from_a_checkpoint(tiny_run, tmp_path, monkeypatch):
    """docs/evaluation.md: make_extractor.py, then the fid command on a run (sampling without an --out of
    sample.py's: the docs runner caught it failing), report and samples where the page says."""
    import json
    import runpy

    text = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    script = next(m.group(2) for m in FENCE.finditer(text) if m.group(1) == "python" and "PoolFeatures" in m.group(2))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "make_extractor.py").write_text(script)  # saved as the page says (TorchScript reads the source)
    runpy.run_path(str(tmp_path / "make_extractor.py"), run_name="__main__")  # writes runs/pool_features.pt
    from diffusion.evaluate.__main__ import main

    program, args = target(documented("docs/evaluation.md", "runs/pool_features.pt"))
    args = [str(tiny_run) if a == "runs/shapes" else "12" if a == "120" else "200" if a == "2000" else a for a in args]
    main(args)
    report = json.loads((tmp_path / "runs" / "fid_shapes.json").read_text())
    assert report["n"] == 12 and len(list((tmp_path / "runs" / "fid_shapes_samples").glob("sample_*.png"))) == 12
