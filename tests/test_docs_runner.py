"""benchmarks/run_docs.py, the docs runner, on a toy repository: it runs each block's commands in order in a
fresh copy, judges markers (skip, expect-error, save-as), console blocks and `pip install` lines, names a
failing command, and fails when a command writes outside git-ignored places. (CI runs it on the real docs.)"""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import run_docs  # noqa: E402

TOY = '''# toy

```bash
pip install nothing-at-all
mkdir -p runs && echo one > runs/a.txt      # a comment
GREETING="hello
  there"
test "$(cat runs/a.txt)" = one && echo $GREETING > runs/b.txt
```

<!-- docs-runner: skip: takes hours -->
```bash
exit 1
```

```python
from pathlib import Path
assert Path("runs/b.txt").read_text().split() == ["hello", "there"]
```

<!-- docs-runner: save-as: make_it.py -->
```python
print("saved, not run")
```

<!-- docs-runner: expect-error: no such thing -->
```bash
sh -c 'echo "error: no such thing (here)" >&2; exit 2'
```

```console
$ sh -c 'echo "error: cannot reach the internet (no network); pass --offline" >&2; exit 2'
error: cannot reach the internet (<urlopen error>); pass --offline
```
'''


def toy_repo(tmp_path: Path, page: str) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".gitignore").write_text("runs/\n")
    (repo / "README.md").write_text(page)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    return repo


def run(repo: Path, tmp_path: Path) -> tuple[list[run_docs.Result], str]:
    out = io.StringIO()
    results = run_docs.run_pages([repo / "README.md"], repo, tmp_path / "work", out=out)
    return results, out.getvalue()


def test_runs_blocks_in_order_and_judges_markers(tmp_path):
    repo = toy_repo(tmp_path, TOY)
    results, printed = run(repo, tmp_path)
    statuses = [(r.command.where, r.status) for r in results]
    assert statuses == [("README.md:4", "SKIP"), ("README.md:5", "PASS"), ("README.md:8", "PASS"),
                        ("README.md:13", "SKIP"), ("README.md:17", "PASS"), ("README.md:23", "PASS"),
                        ("README.md:28", "PASS"), ("README.md:32", "PASS"), ("git status", "PASS")], printed
    assert "7 passed, 0 failed, 2 skipped" in printed
    assert not (repo / "runs").exists() and (tmp_path / "work" / "repo" / "make_it.py").is_file()  # the copy, not the repo


@pytest.mark.parametrize("broken, named", [
    ("```bash\necho fine\nfalse_command_that_does_not_exist --flag\n```\n", "README.md:5"),
    ("<!-- docs-runner: expect-error: the documented message -->\n```bash\necho 'error: another message' >&2; exit 2\n```\n",
     "README.md:5"),
    ("<!-- docs-runner: expect-error: works -->\n```bash\ntrue\n```\n", "README.md:5"),
    ("```bash\necho stray > stray.txt\n```\n", "git status"),
])
def test_a_broken_command_fails_the_run_and_is_named(tmp_path, broken, named):
    repo = toy_repo(tmp_path, "# toy\n\n" + broken)
    results, printed = run(repo, tmp_path)
    failed = [r.command.where for r in results if r.status == "FAIL"]
    assert failed == [named], printed
    assert "1 failed" in printed and f"failed: {named}" in printed


def test_train_commands_get_the_tiny_override(tmp_path):
    """The `python` on the runner's PATH appends TINY to `python train.py ...` (behind env and nice too) only."""
    page = ("```bash\nmkdir -p runs\nOMP_NUM_THREADS=1 nice -n 5 python train.py c.yaml a=1 > runs/train.txt\n"
            "python -c 'import sys; print(sys.argv[1:])' x > runs/other.txt\n```\n")
    repo = toy_repo(tmp_path, "# toy\n\n" + page)
    (repo / "train.py").write_text("import sys\nprint(' '.join(sys.argv[1:]))\n")
    work = tmp_path / "work"
    run_docs.run_pages([repo / "README.md"], repo, work, out=io.StringIO())
    assert (work / "repo" / "runs" / "train.txt").read_text().split() == ["c.yaml", "a=1", *run_docs.TINY.split()]
    assert (work / "repo" / "runs" / "other.txt").read_text().strip() == "['x']"


def test_lanes_run_each_other_page_in_its_own_copy_of_the_first_pages_state(tmp_path):
    """lanes=2: the first page alone, then every other page in its own copy of that state, two at once: a page
    sees what the README made but never what another page made, and every copy's git status is checked."""
    repo = toy_repo(tmp_path, "# toy\n\n```bash\nmkdir -p runs && echo base > runs/base.txt\n```\n")
    (repo / "docs").mkdir()
    for name in ("a", "b", "c"):
        (repo / "docs" / f"{name}.md").write_text(f"```bash\ncat runs/base.txt > runs/{name}.txt\nsleep 1\n```\n")
    (repo / "docs" / "d.md").write_text("```bash\ntest ! -e runs/a.txt && echo stray > stray.txt\n```\n")
    work, out = tmp_path / "work", io.StringIO()
    results = run_docs.run_pages([repo / "README.md", *sorted((repo / "docs").glob("*.md"))], repo, work, out=out,
                                 lanes=2)
    printed = out.getvalue()
    failed = [r.command.where for r in results if r.status == "FAIL"]
    assert failed == ["git status (d.md)"], printed  # d.md ran (no a.txt in its copy) and wrote outside runs/
    assert "12 passed, 1 failed" in printed and "2 page(s) at once" in printed
    for name in ("a", "b", "c"):
        assert sorted(f.name for f in (work / f"repo-{name}" / "runs").iterdir()) == sorted(["base.txt", f"{name}.txt"])


def test_lanes_take_the_page_with_most_commands_first(tmp_path):
    """Lanes are fed the pages with the most commands that run first (skipped ones do not count; ties keep
    page order), and the results still come back in page order."""
    repo = toy_repo(tmp_path, "# toy\n")
    (repo / "docs").mkdir()
    pages = {"a": "```bash\ntrue\n```\n", "b": "```bash\ntrue\ntrue\ntrue\n```\n",
             "c": "<!-- docs-runner: skip: hours -->\n```bash\ntrue\ntrue\ntrue\ntrue\n```\n```bash\ntrue\n```\n",
             "d": "```bash\ntrue\ntrue\n```\n"}
    for name, text in pages.items():
        (repo / "docs" / f"{name}.md").write_text(text)
    per_page = [(page, run_docs.page_commands(page, repo)) for page in sorted((repo / "docs").glob("*.md"))]
    assert run_docs.lane_order(per_page) == [1, 3, 0, 2]  # b (3 run), d (2), then a and c (1 each, page order)
    results = run_docs.run_pages([repo / "README.md", *(page for page, _ in per_page)], repo, tmp_path / "work",
                                 out=io.StringIO(), lanes=2)
    assert [r.command.where.split(":")[0] for r in results if r.status == "PASS" and "git" not in r.command.where] \
        == ["docs/a.md", *["docs/b.md"] * 3, "docs/c.md", *["docs/d.md"] * 2]


def test_unknown_marker_is_refused(tmp_path):
    repo = toy_repo(tmp_path, "<!-- docs-runner: sometimes -->\n```bash\ntrue\n```\n")
    with pytest.raises(SystemExit, match="unknown docs-runner marker 'sometimes'"):
        run_docs.page_commands(repo / "README.md", repo)


def test_every_real_block_is_runnable_or_marked():
    """The real pages parse into commands, and every marker the pages use is one the runner knows."""
    commands = [c for page in run_docs.default_pages() for c in run_docs.page_commands(page, ROOT)]
    kinds = {c.kind for c in commands}
    assert len(commands) >= 80 and kinds <= {"run", "python", "skip", "expect-error", "server", "save-as"}
    assert all(c.arg for c in commands if c.kind != "run" and c.kind != "python")  # every skip says why
