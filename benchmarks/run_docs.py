"""Run every documented command, in order, as a newcomer would paste them (issue 35).

    python benchmarks/run_docs.py                 # README.md, then docs/*.md in name order
    python benchmarks/run_docs.py docs/edm.md     # some pages only (their order as given)

The pages' ```bash (also sh, shell), ```console (`$ ` lines) and ```python blocks run in a fresh copy
of the working tree (tracked files and untracked ones git does not ignore, as they are now, committed
into a throwaway git repository in a temporary folder; `../shared` is linked beside it, as in CI).
Each command runs through bash in the copy's root, in page order. The first page (README.md) runs
alone; every other page then runs in its own copy of what the first page made (the quickstart's
runs/shapes), --lanes pages at once (default 2): a page may use what the README made, never what
another page made, so each page works for a newcomer who read the README and then that page.
--lanes 1 runs every page in order in one copy. Nothing is written into this repository.

The one change to the commands: every `python train.py ...` (behind env assignments, `nice`,
`timeout` too) gets TINY appended, so each training is 2 steps of a small model at the config's
resolution; the documented figures come from the full commands, not from this run:

    TINY = model.base_channels=16 model.channel_mult=[1,2] model.layers_per_block=1
           model.attention_resolutions=[] model.attention_head_dim=8
           train.batch_size=4 train.warmup_steps=1 train.log_every=1 train.sample_every=0
           train.checkpoint_every=2 train.max_steps=2 sample.steps=3 sample.num_samples=2 data.shapes_size=64

(a `python` on PATH does it: a wrapper that calls this interpreter).

Markers, an HTML comment on the line before a block's fence (readers see the reason in the text):

    <!-- docs-runner: skip: REASON -->           not run (hours of real data, the test suite, ...);
                                                 tests/test_docs.py still parses its commands
    <!-- docs-runner: expect-error: MESSAGE -->  each command must exit 2 with `error: MESSAGE...`
                                                 (what the docs say happens on this machine: no GPU,
                                                 no internet, no Inception weights)
    <!-- docs-runner: server: TEXT -->           a server: passes once it prints TEXT, then stopped
    <!-- docs-runner: save-as: FILE -->          a python block the page says to save as FILE

A ```console block whose output shows an `error: ...` line expects that failure (exit 2, the same
message up to its first parenthesis). `pip install` and `apt-get install` lines are skipped (CI's
install step ran them). After the last command, `git status --porcelain` of the copy must show
nothing: documented commands write only into git-ignored places (runs/, samples/, data/).

Prints one line per command (status, seconds, page:line, command), then `N passed, N failed, N
skipped in S s`; exits 1 when any command failed.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ("model.base_channels=16 model.channel_mult=[1,2] model.layers_per_block=1 model.attention_resolutions=[] "
        "model.attention_head_dim=8 train.batch_size=4 train.warmup_steps=1 "
        "train.log_every=1 train.sample_every=0 train.checkpoint_every=2 train.max_steps=2 sample.steps=3 "
        "sample.num_samples=2 data.shapes_size=64")
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
MARKER = re.compile(r"<!--[ \t]*docs-runner:[ \t]*([\w-]+)[ \t]*:?[ \t]*([^\n]*?)[ \t]*-->[ \t]*\n(?:[ \t]*\n)*\Z")
RUNNABLE = {"bash", "sh", "shell", "console", "python"}
INSTALL = re.compile(r"^\s*(sudo\s+)?(pip3?|python3? -m pip|apt-get|apt)\s+install\b")
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
TIMEOUT_S = 600  # one command
SERVER_WAIT_S = 300

WRAPPER = """#!/bin/sh
# docs runner (benchmarks/run_docs.py): `python train.py ...` trains a tiny model (DOCS_TINY appended)
if [ "$1" = train.py ]; then exec "{python}" "$@" $DOCS_TINY; fi
exec "{python}" "$@"
"""


@dataclass
class Command:
    """One command of a page: where it is, its text, and how the runner treats it."""

    where: str  # page:line
    text: str
    kind: str = "run"  # run | skip | expect-error | server | save-as | python
    arg: str = ""  # the skip reason, expected message, server text or file name
    prelude: str = ""  # the block's variable assignments before it


@dataclass
class Result:
    command: Command
    status: str  # PASS | FAIL | SKIP
    seconds: float = 0.0
    detail: str = ""
    output: list[str] = field(default_factory=list)


def logical_lines(body: str) -> list[tuple[int, str]]:
    """(line offset, command) for each command of a shell block: continuations joined, open quotes
    carried on, comment-only and blank lines dropped."""
    out, current, start = [], "", 0
    for k, line in enumerate(body.splitlines()):
        if not current:
            start = k
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        current += line + "\n"
        if line.endswith("\\"):
            continue
        try:
            shlex.split(current, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        out.append((start, current.rstrip("\n")))
        current = ""
    if current.strip():
        out.append((start, current.rstrip("\n")))
    return out


def is_assignment(text: str) -> bool:
    """`NAME=value ...` alone on its line(s): it sets shell variables for the later commands."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return False
    return bool(words) and all(ASSIGNMENT.match(w) for w in words)


def page_commands(page: Path, root: Path) -> list[Command]:
    """Every command of a page, in order, with its marker."""
    text = page.read_text(encoding="utf-8")
    name = page.relative_to(root).as_posix()
    found: list[Command] = []
    for block in FENCE.finditer(text):
        lang, body = block.group(1), block.group(2)
        if lang not in RUNNABLE:
            continue
        first = text.count("\n", 0, block.start(2)) + 1
        marker = MARKER.search(text[:block.start()])
        kind, arg = (marker.group(1), marker.group(2)) if marker else ("run", "")
        if marker and kind not in ("skip", "expect-error", "server", "save-as"):
            raise SystemExit(f"error: {name}:{first - 1}: unknown docs-runner marker '{kind}': "
                             "use skip, expect-error, server or save-as")
        if lang == "python":
            found.append(Command(f"{name}:{first}", body, "save-as" if kind == "save-as" else
                                 "skip" if kind == "skip" else "python", arg))
            continue
        if lang == "console":
            found += console_commands(body, name, first, kind, arg)
            continue
        prelude = ""
        for offset, line in logical_lines(body):
            where = f"{name}:{first + offset}"
            if is_assignment(line):
                prelude += line + "\n"
            elif INSTALL.match(line):
                found.append(Command(where, line, "skip", "installs packages (CI's install step ran it)"))
            else:
                found.append(Command(where, line, kind, arg, prelude))
    return found


def console_commands(body: str, name: str, first: int, kind: str, arg: str) -> list[Command]:
    """`$ ` lines of a console block; an `error: ...` line in the output shown after one is expected."""
    found: list[Command] = []
    for k, line in enumerate(body.splitlines()):
        if line.startswith("$ "):
            found.append(Command(f"{name}:{first + k}", line[2:], kind, arg))
        elif line.startswith("error: ") and found and found[-1].kind == "run":
            found[-1].kind, found[-1].arg = "expect-error", line[len("error: "):].split("(")[0].strip()
    return found


def make_copy(root: Path, work: Path) -> Path:
    """The working tree as it is (tracked + untracked, not ignored) copied into work/NAME, committed
    into a fresh git repository there, so `git status` shows exactly what the commands add."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            check=True, capture_output=True).stdout.decode().split("\0")
    copy = work / root.name
    for rel in filter(None, listed):
        src = root / rel
        if src.is_file():  # a tracked file deleted in the working tree is left out
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / rel)
    git = ["git", "-c", "user.name=docs-runner", "-c", "user.email=docs-runner@localhost", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "the working tree, for the docs runner"]):
        subprocess.run(git + args, cwd=copy, check=True, capture_output=True)
    shared = root.parent / "shared"
    if shared.is_dir() and not (work / "shared").exists():
        (work / "shared").symlink_to(shared)  # the docs' ../shared/datasets
    return copy


def environment(work: Path) -> dict[str, str]:
    """PATH with the train.py-shrinking `python` first; DOCS_TINY for it."""
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        path = bin_dir / name
        path.write_text(WRAPPER.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", DOCS_TINY=TINY,
               PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return env


def run_one(command: Command, copy: Path, env: dict[str, str]) -> Result:
    """Run one command in the copy and judge it by its kind."""
    if command.kind == "skip":
        return Result(command, "SKIP", detail=command.arg)
    if command.kind == "save-as":
        target = copy / command.arg
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(command.text)
        return Result(command, "PASS", detail=f"saved as {command.arg}")
    if command.kind == "python":
        argv, stdin = ["python", "-"], command.text
    else:
        argv, stdin = ["bash", "-c", "set -eo pipefail\n" + command.prelude + command.text], None
    start = time.perf_counter()
    if command.kind == "server":
        return run_server(command, argv, copy, env, start)
    try:
        done = subprocess.run(argv, cwd=copy, env=env, input=stdin, capture_output=True, encoding="utf-8",
                              errors="replace", timeout=TIMEOUT_S, start_new_session=True)
    except subprocess.TimeoutExpired as err:
        lines = ((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")).splitlines()
        return Result(command, "FAIL", time.perf_counter() - start, f"still running after {TIMEOUT_S} s", lines)
    seconds = time.perf_counter() - start
    lines = (done.stdout + done.stderr).splitlines()
    if command.kind == "expect-error":
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        wanted = f"error: {command.arg}"
        if done.returncode == 2 and len(errors) == 1 and errors[0].startswith(wanted) and "Traceback" not in done.stderr:
            return Result(command, "PASS", seconds, f"failed as documented: {errors[0][:100]}")
        return Result(command, "FAIL", seconds, f"expected exit 2 with one line '{wanted}...', got exit "
                      f"{done.returncode}", lines)
    if done.returncode != 0:
        return Result(command, "FAIL", seconds, f"exit status {done.returncode}", lines)
    return Result(command, "PASS", seconds)


def run_server(command: Command, argv: list[str], copy: Path, env: dict[str, str], start: float) -> Result:
    """Start a server command; it passes once it prints the marker's text, and is then stopped."""
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        proc = subprocess.Popen(argv, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        status, detail = "FAIL", f"did not print '{command.arg}' within {SERVER_WAIT_S} s"
        try:
            while time.perf_counter() - start < SERVER_WAIT_S:
                time.sleep(0.5)
                log.seek(0)
                if command.arg in log.read():
                    status, detail = "PASS", f"printed '{command.arg}'; stopped"
                    break
                if proc.poll() is not None:
                    detail = f"exited with status {proc.returncode} before printing '{command.arg}'"
                    break
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        log.seek(0)
        return Result(command, status, time.perf_counter() - start, detail, log.read().splitlines())


def untracked(copy: Path, made: set[str]) -> list[str]:
    """What the commands wrote outside git-ignored places (the files the runner saved left out)."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=copy, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    return [line for line in status if line[3:] not in made]


def one_line(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def report(result: Result, out) -> None:
    """One command's line (and the end of its output when it failed), written at once."""
    c = result.command
    text = (f"{result.status:4}  {result.seconds:6.1f}s  {c.where:24}  {one_line(c.text)}"
            + (f"\n      {result.detail}" if result.detail and result.status != "PASS" else ""))
    if result.status == "FAIL":
        text += "".join(f"\n      | {line[-200:]}" for line in result.output[-15:])
    print(text, file=out, flush=True)


def run_commands(commands: list[Command], copy: Path, env: dict[str, str], out, servers: threading.Lock) -> list[Result]:
    """Run commands in order in one copy; servers one at a time across lanes (they share a port)."""
    results = []
    for command in commands:
        try:
            if command.kind == "server":
                with servers:
                    result = run_one(command, copy, env)
            else:
                result = run_one(command, copy, env)
        except Exception as err:  # noqa: BLE001  (the runner's own trouble fails that command, not the run)
            result = Result(command, "FAIL", detail=f"the runner could not run it: {type(err).__name__}: {err}")
        results.append(result)
        report(result, out)
    return results


def status_check(copy: Path, made: set[str], out, name: str = "git status") -> Result:
    """The copy's `git status`: documented commands write only git-ignored places."""
    stray = untracked(copy, made)
    check = Command(name, "git status --porcelain (documented commands write only git-ignored places)")
    result = Result(check, "FAIL" if stray else "PASS", detail="; ".join(stray[:20]))
    print(f"{result.status:4}  {0.0:6.1f}s  {check.where:24}  {check.text}"
          + (f"\n      written outside git-ignored places: {result.detail}" if stray else ""), file=out, flush=True)
    return result


def lane_order(per_page: list[tuple[Path, list[Command]]]) -> list[int]:
    """Page indices, the page with the most commands that run first (ties in page order): greedy lanes fed
    longest first end closer together than in name order (stop 40's CI page times, replayed: 647 s
    of lanes in name order, 617 s longest first)."""
    running = [sum(c.kind != "skip" for c in cmds) for _, cmds in per_page]
    return sorted(range(len(per_page)), key=lambda i: -running[i])


def run_pages(pages: list[Path], root: Path = ROOT, work: Path | None = None, out=sys.stdout,
              lanes: int = 1) -> list[Result]:
    """Run the pages' commands in a fresh copy of `root` (in `work`, else a temporary folder); print a line per
    command and the summary. With lanes > 1 the first page runs alone; then every other page runs in its own
    copy of that state (COPY-PAGE), `lanes` pages at once, so each page sees exactly what the first page made
    (a newcomer who read the README, then that page) whatever ran beside it. The results end with each
    copy's `git status` check."""
    per_page = [(page, page_commands(page, root)) for page in pages]
    commands = [c for _, page_cmds in per_page for c in page_cmds]
    made = {c.arg for c in commands if c.kind == "save-as"}
    owned = work is None
    work = Path(tempfile.mkdtemp(prefix="docs-runner-")) if owned else work
    total = time.perf_counter()
    results: list[Result] = []
    servers = threading.Lock()
    try:
        copy = make_copy(root, work)
        env = environment(work)
        lanes = max(1, min(lanes, len(per_page) - 1))
        if lanes > 1:  # the lanes share the cores: fewer threads each
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // lanes))
        print(f"docs runner: {len(commands)} commands in {copy}, {lanes} page(s) at once after the first "
              f"(train.py gets: {TINY})", file=out, flush=True)
        results += run_commands(per_page[0][1] if lanes > 1 else commands, copy, env, out, servers)
        results.append(status_check(copy, made, out))
        if lanes > 1:
            page_copies = [copy.with_name(f"{copy.name}-{page.stem}") for page, _ in per_page[1:]]
            for page_copy in page_copies:  # before any page runs: each starts from the first page's state
                shutil.copytree(copy, page_copy, symlinks=True)

            def run_page(index: int) -> list[Result]:
                (page, page_cmds), page_copy = per_page[index + 1], page_copies[index]
                done = run_commands(page_cmds, page_copy, env, out, servers)
                return done + [status_check(page_copy, made, out, f"git status ({page.name})")]

            with ThreadPoolExecutor(lanes) as pool:  # the most commands first, so the lanes end together
                order = lane_order(per_page[1:])
                done = dict(zip(order, pool.map(run_page, order)))
            for index in range(len(page_copies)):  # reported in page order
                results += done[index]
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{time.perf_counter() - total:.0f} s", file=out)
    failed = [r.command.where for r in results if r.status == "FAIL"]
    if failed:
        print("failed: " + ", ".join(failed), file=out)
    return results


def default_pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pages", nargs="*", help="pages to run, in this order (default: README.md, docs/*.md)")
    parser.add_argument("--work", default=None,
                        help="keep the copy in this (new or empty) folder instead of a temporary one that is removed")
    parser.add_argument("--list", action="store_true", help="list the commands and their markers; run nothing")
    parser.add_argument("--lanes", type=int, default=2,
                        help="after the first page, run this many of the other pages at once, each in its own copy of "
                             "the first page's state (1: every page in order in one copy)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pages = [Path(p).resolve() for p in args.pages] or default_pages()
    for page in pages:
        if not page.is_file() or ROOT not in page.parents:
            print(f"error: {page} is not a page of this repository: give README.md or docs/NAME.md", file=sys.stderr)
            return 2
    if args.list:
        for page in pages:
            for c in page_commands(page, ROOT):
                print(f"{c.kind:12}  {c.where:24}  {one_line(c.text)}" + (f"   [{c.arg}]" if c.arg else ""))
        return 0
    work = Path(args.work).resolve() if args.work else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            print(f"error: --work {work} is not empty: give a new or empty folder", file=sys.stderr)
            return 2
    results = run_pages(pages, ROOT, work, lanes=args.lanes)
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
