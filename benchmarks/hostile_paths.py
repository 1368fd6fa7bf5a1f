"""Round 3 of the hostile-input drill, paths, run folders and faults (issue #34 classes 4 and 5, issue
#35's sample.py items): outputs inside another run, sweep values that lead out of the sweep,
--overwrite on a mount point, a full disk while training or sampling, Ctrl-C during sample.py
--overwrite, and sample.py's defaults. Faults that a process cannot be given from outside (a full
disk, a mount point) run the real command line under `python -c` with the one writer patched.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import yaml
from PIL import Image

from benchmarks.hostile_env import STEP4, Case, Env, Result, sample_argv, stale_samples, train_argv, unchanged_run
from tests.conftest import ROOT, TINY

PRELUDE = """
import errno, sys
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
def run(entry):
    if entry == "train":
        import train
        train.main(sys.argv[1:])
    else:
        from diffusion.cli.sample import main
        main(sys.argv[1:])
"""


def patched(setup: str, argv: Callable[[Env, Path], list[str]]) -> Callable[[Env, Path], list[str]]:
    """The case command `argv` (train or sample) run by `python -c` after `setup` patched a writer."""
    def build(env: Env, folder: Path) -> list[str]:
        command = argv(env, folder)
        return ["python", "-c", f"{PRELUDE}\n{setup}\nrun({command[0]!r})", *command[1:]]
    return build


def copy(env: Env, folder: Path) -> None:
    env.copy_run(folder)


def copy_and_link(env: Env, folder: Path) -> None:
    (env.copy_run(folder) / "link").symlink_to(folder / "run" / STEP4)


def resume6(*extra: str) -> Callable[[Env, Path], list[str]]:
    def argv(env: Env, folder: Path) -> list[str]:
        return ["train", "configs/shapes.yaml", *TINY, "train.max_steps=6", f"output_dir={folder / 'run'}", *extra,
                "--resume", "auto"]
    return argv


def checkpoints_intact(env: Env, folder: Path, result: Result) -> str | None:
    """After a failed save: no temporary folder, steps 2 and 4 kept and still verifying."""
    from diffusion.checkpoints import store

    run = folder / "run"
    left = [p.name for p in run.rglob("*") if p.name.startswith((".tmp-", ".old-"))]
    if left:
        return f"temporary folders left: {left}"
    names = [p.name for p in store.list_checkpoints(run)]
    if names[:2] != ["step-000002", "step-000004"]:
        return f"checkpoints now {names}"
    try:
        for checkpoint in store.list_checkpoints(run):
            store.verify_digests(checkpoint)
    except Exception as err:  # noqa: BLE001 - any failure to verify is the finding
        return f"a checkpoint no longer verifies: {err}"
    return None


def stale_kept(env: Env, folder: Path, result: Result) -> str | None:
    """The 4 images stale_samples wrote are there, unchanged, and no scratch folder is left."""
    found = sorted(p.name for p in (folder / "samples").iterdir())
    if found != [f"sample_{i:04d}.png" for i in range(4)]:
        return f"--out now holds {found}"
    for i in range(4):
        with Image.open(folder / "samples" / f"sample_{i:04d}.png") as image:
            if image.getextrema()[0] != (10 * i, 10 * i):
                return f"sample_{i:04d}.png changed"
    scratch = [p.name for p in folder.iterdir() if p.name.startswith(".sampling-")]
    return f"scratch folders left: {scratch}" if scratch else None


def images_in(relative: str, count: int) -> Callable[[Env, Path, Result], str | None]:
    def check(env: Env, folder: Path, result: Result) -> str | None:
        found = len(list((folder / relative).glob("sample_*.png")))
        return None if found == count else f"{found} images in {relative}, expected {count}"
    return check


def numbered_folders(env: Env, folder: Path, result: Result) -> str | None:
    made = sorted(p.name for p in (folder / "samples").iterdir()) if (folder / "samples").is_dir() else []
    if made != ["run", "run-2"]:
        return f"samples/ holds {made}, expected run and run-2"
    return None if "to samples/run-2" in result.out else "the second call did not say where its images went"


def shows_defaults(env: Env, folder: Path, result: Result) -> str | None:
    text = " ".join(result.out.split())
    missing = [words for words in ("(default: 16)", "(default: 0)", "per class", "sample.num_samples", "samples/RUN")
               if words not in text]
    return f"--help lacks {missing}" if missing else None


TWICE_WITHOUT_OUT = """
import os, sys
os.chdir(sys.argv[1])
from diffusion.cli.sample import main
for _ in range(2):
    try:
        main(["--checkpoint", sys.argv[2], "--class-label", "1", "--steps", "1"])
    except SystemExit as exit:
        if exit.code:
            raise
"""


def sweep_file(value: str) -> Callable[[Env, Path], None]:
    """A tiny one-point sweep in {folder}/sweep.yaml whose grid value is `value`."""
    def prepare(env: Env, folder: Path) -> None:
        overrides: dict = {}
        for item in TINY + ["train.max_steps=2", "model.condition=none"]:
            key, text = item.split("=", 1)
            node = overrides
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = yaml.safe_load(text)
        data = {"base": str(ROOT / "configs/shapes_uncond.yaml"), "output_dir": str(folder / "sweep" / "s"),
                "config": overrides, "grids": [{"data.root": [value], "model.base_channels": [8]}],
                "eval": {"points": 2, "first_step": 1, "val": {"num_images": 8, "repeats": 1, "buckets": 2}}}
        (folder / "sweep.yaml").write_text(yaml.safe_dump(data))
    return prepare


def stayed_inside_the_sweep(env: Env, folder: Path, result: Result) -> str | None:
    outside = [p.name for p in (folder / "sweep").iterdir() if p.name != "s"]
    if outside:
        return f"trained outside the sweep's output_dir: {outside}"
    runs = [p.parent.parent.name for p in (folder / "sweep" / "s").glob("*/scaling/done.json")]
    return None if len(runs) == 1 else f"finished runs inside the sweep: {runs}"


SAMPLE_OVERWRITE = sample_argv("--overwrite", "--class-label", "1", "--num-samples", "2")
ROUND3_PATHS = [
    # class 4: an output inside another run
    Case("run folder", "output_dir inside another run's checkpoint (RUN/checkpoints/step-000004/accelerate)",
         train_argv("output_dir={folder}/run/" + STEP4 + "/accelerate"), "is inside the checkpoint", prepare=copy,
         check=unchanged_run, lost=True),
    Case("run folder", "output_dir inside another run's checkpoint, --overwrite",
         train_argv("output_dir={folder}/run/" + STEP4, "--overwrite"), "is inside the run", prepare=copy,
         check=unchanged_run, lost=True),
    Case("run folder", "output_dir inside another run's final/", train_argv("output_dir={folder}/run/final/x"),
         "is inside the checkpoint", prepare=copy, check=unchanged_run, lost=True),
    Case("run folder", "output_dir inside another run's checkpoints/", train_argv("output_dir={folder}/run/checkpoints/x"),
         "is inside the run", prepare=copy, check=unchanged_run, lost=True),
    Case("run folder", "output_dir inside another run (RUN/sub)", train_argv("output_dir={folder}/run/sub"),
         "is inside the run", prepare=copy, check=unchanged_run, lost=True),
    Case("run folder", "output_dir through a symlink into a checkpoint", train_argv("output_dir={folder}/run/link/x"),
         "is inside the checkpoint", prepare=copy_and_link, check=unchanged_run, lost=True),
    Case("run folder", "output_dir reaching a checkpoint by .. after a symlink",
         train_argv("output_dir={folder}/run/link/../step-000002/x"), "is inside the checkpoint", prepare=copy_and_link,
         check=unchanged_run, lost=True),
    Case("run folder", "--overwrite on a mount point (os.path.ismount says so)",
         patched("import os.path; os.path.ismount = lambda path: True",
                 train_argv("output_dir={folder}/run", "--overwrite")),
         "is a mount point", prepare=copy, check=unchanged_run, lost=True, quick=False),
    Case("run folder", "--overwrite where renaming output_dir fails with EBUSY",
         patched("import os, diffusion.checkpoints.run_folder as rf\n"
                 "def busy(*a): raise OSError(errno.EBUSY, 'Device or resource busy')\n"
                 "rf.os = type('os', (), {'rename': staticmethod(busy), 'path': os.path})",
                 train_argv("output_dir={folder}/run", "--overwrite")),
         "is a mount point", prepare=copy, check=unchanged_run, lost=True, quick=False),
    Case("sample flags", "--out a checkpoint (RUN/checkpoints/step-000004)",
         sample_argv("--out", "{copy}/" + STEP4, checkpoint="{copy}"), "would change its files", prepare=copy,
         check=unchanged_run, lost=True),
    Case("sample flags", "--out RUN/final", sample_argv("--out", "{copy}/final", checkpoint="{copy}"),
         "would change its files", prepare=copy, check=unchanged_run, lost=True),
    Case("sample flags", "--out RUN/checkpoints/samples", sample_argv("--out", "{copy}/checkpoints/samples", checkpoint="{copy}"),
         "would change its files", prepare=copy, check=unchanged_run, lost=True),
    Case("sweep", "a grid value holding ../../../escape",
         lambda env, folder: ["python", "-m", "diffusion.scaling", "sweep", str(folder / "sweep.yaml")], status=0,
         words=None, prepare=sweep_file("../../../escape"), check=stayed_inside_the_sweep, quick=False, timeout=400),
    # class 5: faults
    Case("faults", "disk full saving a checkpoint (OSError ENOSPC in ema.safetensors)",
         patched("import diffusion.checkpoints.store as s; s.save_file = full", resume6()), "no space left on device",
         prepare=copy, check=checkpoints_intact, lost=True, quick=False),
    Case("faults", "disk full saving a checkpoint (safetensors' own error in accelerate's model.safetensors)",
         patched("import accelerate.utils.other as o\nfrom safetensors import SafetensorError\n"
                 "def st(*a, **k): raise SafetensorError('Error while serializing: I/O error: No space left on device "
                 "(os error 28)')\no.safe_save_file = st", resume6()),
         "no space left on device", prepare=copy, check=checkpoints_intact, lost=True, quick=False),
    Case("faults", "disk full saving a checkpoint (torch.save's own error in optimizer.bin)",
         patched("import torch\ndef ts(*a, **k): raise RuntimeError('[enforce fail at inline_container.cc:672] . "
                 "unexpected pos 576 vs 534')\ntorch.save = ts", resume6()),
         "no space left on device", prepare=copy, check=checkpoints_intact, lost=True, quick=False),
    Case("faults", "disk full writing info.json or config.yaml (fsync fails)",
         patched("import os\nreal = os.fsync\ncalls = [0]\n"
                 "def fs(fd):\n    calls[0] += 1\n    if calls[0] > 3: full()\n    return real(fd)\nos.fsync = fs",
                 resume6()),
         "no space left on device", prepare=copy, check=checkpoints_intact, lost=True, quick=False),
    Case("faults", "disk full at train.py start (config.yaml)",
         patched("import diffusion.config as c; c.save_config = full", train_argv()), "no space left on device",
         quick=False),
    Case("faults", "disk full during sample.py --overwrite (PNG writes)",
         patched("from PIL import Image; Image.Image.save = full", SAMPLE_OVERWRITE), "no space left on device",
         prepare=stale_samples, check=stale_kept, quick=False),
    Case("faults", "Ctrl-C during sample.py --overwrite keeps the earlier images",
         patched("import diffusion.sampling.plan as p\ndef stop(*a, **k): raise KeyboardInterrupt\np.run_plan = stop",
                 SAMPLE_OVERWRITE), status=130, words=None, prepare=stale_samples, check=stale_kept, quick=False),
    # issue #35: sample.py's defaults
    Case("sample flags", "no --out, twice: a new numbered folder each call",
         lambda env, folder: ["python", "-c", TWICE_WITHOUT_OUT, str(folder), str(folder / "run")], status=0,
         words=None, prepare=copy, check=numbered_folders, quick=False),
    Case("sample flags", "--checkpoint missing while --out holds images", sample_argv(checkpoint="{folder}/nope"),
         "checkpoint not found", prepare=stale_samples),
    Case("sample flags", "no --num-samples: the run's sample.num_samples (2)",
         lambda env, folder: ["sample", "--checkpoint", str(env.run), "--out", str(folder / "samples"), "--class-label",
                              "1", "--steps", "1"], status=0, words=None, check=images_in("samples", 2), quick=False),
    Case("sample flags", "--help shows every default and the per-class count", lambda env, folder: ["sample", "--help"],
         status=0, words=None, check=shows_defaults),
]
