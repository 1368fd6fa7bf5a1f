"""Classifier, CLIP and classifier-free guidance on real faces (CelebA at 16 px), judged independently.

Every method asks for the same 4 classes, Male and Smiling read as bits (0 woman, 1 man, 2 smiling
woman, 3 smiling man), with the same seeds, and a separate judge reads both attributes from the
pixels of every sample. Stages, each skipped when its output is already in --work:

  1. train (shipped configs, two runs at a time, one CPU thread each):
       configs/celeba16_uncond.yaml      the unconditional base that classifier and CLIP guidance steer
       configs/classifier_celeba16.yaml  a noise-aware attribute classifier p(y | x_t, t)
       configs/clip_celeba16.yaml        a noise-aware CLIP on captions such as "a photo of a smiling man"
       configs/celeba16.yaml             a class-conditional model (20% condition dropout) for class CFG
  2. judge: a clean CNN (diffusion/evaluate/clean_classifier.py) trained on held-out faces (the
     valid split and the first half of the test split; the runs above train on the train split) and
     scored on the second half of the test split. It is never used for guidance.
  3. sample and judge every (method, sampler, scale) cell: n samples, n/4 per class. Each row is
     also appended to WORK/cells.jsonl, keyed by the cell and a digest of diffusion/'s source, so an
     interrupted run picks up where it stopped and a code change measures afresh.

Prints a Markdown table of the share of samples the judge reads as the asked class (both
attributes right), per method and sampler, one column per scale; scale 0 is unguided. The row
"real held-out faces" is the same share for real faces of each class that the judge never saw
(how well it reads a real face; guided samples can score higher, being more typical of their class).

  python benchmarks/guidance_realdata.py --data-root ../shared/datasets/celeba-6k.tar.gz --work runs/guidance_realdata
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)


ATTRIBUTES = ("Male", "Smiling")  # class label bits, as in the configs
RUNS = {  # name -> config; the order is the order of the two training chains below
    "celeba16_uncond": "configs/celeba16_uncond.yaml",
    "classifier_celeba16": "configs/classifier_celeba16.yaml",
    "celeba16": "configs/celeba16.yaml",
    "clip_celeba16": "configs/clip_celeba16.yaml",
}
CHAINS = (("celeba16_uncond", "classifier_celeba16"), ("celeba16", "clip_celeba16"))
METHODS = ("classifier", "clip", "cfg")
JUDGE_WIDTH = 32


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--data-root", required=True,
                        help="a folder holding celeba/ (torchvision's layout), or the celeba-6k.tar.gz archive")
    parser.add_argument("--work", default="runs/guidance_realdata", help="runs, judge and results go here")
    parser.add_argument("--num-samples", type=int, default=200, help="per cell, spread over the 4 classes")
    parser.add_argument("--scales", default="0,1,2,4,10")
    parser.add_argument("--samplers", default="ddim:50,dpmsolver:20,ddpm:50", help="SAMPLER:STEPS,...")
    parser.add_argument("--methods", default="classifier,clip,cfg")
    parser.add_argument("--sample-args", default="", help='extra sample.py options for every cell, e.g. "--guidance-form mean"')
    parser.add_argument("--tag", default="", help="a label for these rows in the JSON (e.g. the code version)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--fresh", action="store_true", help="measure every cell again (ignore WORK/cells.jsonl)")
    parser.add_argument("--json", default=None, help="write the rows here (default: WORK/results.json)")
    parser.add_argument("--grid", default=None, help="also draw a PNG: per method at --grid-scale, 4 classes x 8 samples")
    parser.add_argument("--grid-scale", type=float, default=4.0)
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported (0.1 s, not 10-30 s)
    build_parser().parse_args()

import torch
from diffusion.cli.sample import build_parser as sample_parser, check_args, features, load_denoiser, make_plan, sampler_settings  # noqa: E402
from diffusion.config import load_config  # noqa: E402
from diffusion.data.celeba import CelebA, attribute_caption  # noqa: E402
from diffusion.errors import UserError, exit_on_user_error  # noqa: E402
from diffusion.io import atomic_write, atomic_write_text  # noqa: E402
from diffusion.evaluate.clean_classifier import SmallConvNet, predict, train_classifier  # noqa: E402
from diffusion.sampling.images import save_grid, to_uint8  # noqa: E402
from diffusion.sampling.plan import run_plan  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)



def data_root(spec: str, work: Path) -> Path:
    """A folder with celeba/ in it: the one given, or the archive unpacked once into WORK/data."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "celeba").is_dir():
            raise UserError(f"--data-root {path} has no celeba/ folder (torchvision's layout)")
        return path
    if not path.is_file():
        raise UserError(f"--data-root {path} not found: give a folder holding celeba/ or celeba-6k.tar.gz")
    target = work / "data"
    if not (target / "celeba").is_dir():
        print(f"unpacking {path} into {target}")
        with tarfile.open(path) as archive:
            archive.extractall(target, filter="data")
    return target


def train_runs(work: Path, root: Path) -> None:
    """The four runs of the shipped configs, two chains in parallel with one thread each."""
    missing = [name for name in RUNS if not (work / name / "final").is_dir()]
    if not missing:
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()

    def command(name: str) -> list[str]:
        return [sys.executable, str(ROOT / "train.py"), str(ROOT / RUNS[name]), f"data.root={root}",
                f"output_dir={work / name}", "--resume", "auto"]

    chains = [[name for name in chain if name in missing] for chain in CHAINS]
    scripts = [" && ".join(" ".join(f"'{part}'" for part in command(name)) + f" > '{work / name}.log' 2>&1"
                           for name in chain) for chain in chains if chain]
    print(f"training {', '.join(missing)} (logs in {work}/NAME.log)", flush=True)
    procs = [subprocess.Popen(["bash", "-c", script], env=env) for script in scripts]
    if any(proc.wait() for proc in procs):
        raise UserError(f"a training run failed: see the logs in {work}")
    print(f"trained in {time.time() - start:.0f} s", flush=True)


def bits(labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([(labels >> b) & 1 for b in range(len(ATTRIBUTES))], dim=1).float()


def load_split(root: Path, resolution: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = CelebA(str(root), resolution, split, attributes=list(ATTRIBUTES))
    items = [data[i] for i in range(len(data))]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def quantised(images: torch.Tensor) -> torch.Tensor:
    """Images as their 8-bit PNG would hold them, back in [-1, 1]: the judge sees what a file shows."""
    return to_uint8(images).float() / 127.5 - 1


def get_judge(work: Path, root: Path, resolution: int) -> tuple[torch.nn.Module, dict]:
    """The clean judge and its held-out accuracy, trained once (WORK/judge.pt, WORK/judge.json)."""
    path, report_path = work / "judge.pt", work / "judge.json"
    valid, valid_y = load_split(root, resolution, "valid")
    test, test_y = load_split(root, resolution, "test")
    half = len(test) // 2
    if path.is_file() and report_path.is_file():
        report = json.loads(report_path.read_text())
        judge = SmallConvNet(len(ATTRIBUTES), report["width"])
        judge.load_state_dict(torch.load(path, weights_only=True))
        return judge.eval(), report
    start = time.time()
    images, labels = torch.cat([valid, test[:half]]), torch.cat([valid_y, test_y[:half]])
    model = train_classifier(images, bits(labels), width=JUDGE_WIDTH)
    held_out, held_y = test[half:], test_y[half:]
    read = (predict(model, held_out) > 0).float()
    per_class = [float((read[held_y == y] == bits(held_y[held_y == y])).all(1).float().mean()) for y in range(4)]
    report = {
        "trained_on": f"{len(images)} faces (valid split + first {half} of test)",
        "scored_on": f"{len(held_out)} faces (last {len(test) - half} of test)",
        "attribute_accuracy": dict(zip(ATTRIBUTES, (read == bits(held_y)).float().mean(0).tolist())),
        "class_accuracy": float((read == bits(held_y)).all(1).float().mean()),
        "class_accuracy_per_class": per_class,
        "balanced_class_accuracy": sum(per_class) / 4,
        "width": JUDGE_WIDTH,
        "seconds": round(time.time() - start, 1),
    }
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    atomic_write_text(report_path, json.dumps(report, indent=2))
    return model, report


def code_digest() -> str:
    """A digest of diffusion/'s source: cached rows are reused only for the code that measured them."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "diffusion").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cached_rows(path: Path) -> dict[str, dict]:
    """Rows measured before, by cell key (WORK/cells.jsonl, one JSON object per line)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["key"]: row for row in rows}


def caption(label: int) -> str:
    """The CLIP prompt of a class: the captions the CLIP was trained on (data.celeba_captions: class)."""
    attrs = {a: bool(label >> b & 1) for b, a in enumerate(ATTRIBUTES)}
    return "a photo of " + attribute_caption(attrs)


CAPTIONS = [caption(label) for label in range(4)]


class Cells:
    """Samples for (method, sampler, steps, scale) cells, models loaded once."""

    def __init__(self, work: Path, num_samples: int, batch_size: int, extra: list[str]):
        self.work, self.per_class, self.batch_size, self.extra = work, max(1, num_samples // 4), batch_size, extra
        self.features = features()
        self.parser = sample_parser(self.features)
        self.loaded: dict[str, object] = {}
        self.unguided: dict[tuple, torch.Tensor] = {}  # classifier and CLIP at scale 0: the same samples

    def request(self, method: str, scale: float) -> tuple[str, list[str]]:
        """(denoiser, sample.py options) asking for every class in turn at `scale`."""
        w = self.work
        if method == "cfg":  # no --class-label: the classes in turn
            return str(w / "celeba16"), ["--guidance-scale", f"{scale:g}"]
        if method == "classifier":
            return str(w / "celeba16_uncond"), ["--classifier", str(w / "classifier_celeba16"),
                                                 "--classifier-scale", f"{scale:g}"]
        prompts = [part for label in range(4) for part in ("--prompt", caption(label))]
        return str(w / "celeba16_uncond"), ["--clip", str(w / "clip_celeba16"), "--clip-scale", f"{scale:g}", *prompts]

    def samples(self, method: str, sampler: str, steps: int, scale: float) -> torch.Tensor:
        """(4 * per_class, 3, 16, 16) samples in class-major order; sample i uses seed i in every cell."""
        key = (sampler, steps, self.per_class)
        if method != "cfg" and scale == 0:  # unguided base samples: drawn once for both methods
            if key not in self.unguided:
                self.unguided[key] = self._draw(method, sampler, steps, scale)
            return self.unguided[key]
        return self._draw(method, sampler, steps, scale)

    def _draw(self, method: str, sampler: str, steps: int, scale: float) -> torch.Tensor:
        denoiser, options = self.request(method, scale)
        args = self.parser.parse_args([
            "--checkpoint", denoiser, "--num-samples", str(self.per_class), "--seed", "0", "--sampler", sampler,
            "--steps", str(steps), "--batch-size", str(self.batch_size), "--device", "cpu", *options, *self.extra])
        check_args(args)
        if denoiser not in self.loaded:
            self.loaded[denoiser] = load_denoiser(denoiser, torch.device("cpu"))
        loaded = self.loaded[denoiser]
        settings = sampler_settings(args, loaded)
        plan = make_plan(args, loaded, self.features, settings)
        asked = [item.label if item.label is not None else CAPTIONS.index(item.prompt) for item in plan.items]
        if asked != sorted(asked) or len(asked) != 4 * self.per_class:
            raise RuntimeError(f"expected {self.per_class} samples per class in class order, got {asked}")
        return run_plan(loaded, plan, settings, bar=False)


def judged(judge: torch.nn.Module, images: torch.Tensor, per_class: int) -> dict[str, float]:
    """Share of samples read as their asked class (both attributes), and per attribute."""
    asked = torch.arange(4).repeat_interleave(per_class)
    right = (predict(judge, quantised(images)) > 0).float() == bits(asked)
    return {"share": float(right.all(1).float().mean()),
            **{a: float(right[:, i].float().mean()) for i, a in enumerate(ATTRIBUTES)}}


def markdown(rows: list[dict], scales: list[float], judge_report: dict) -> str:
    lines = ["| method | sampler | " + " | ".join(f"scale {s:g}" for s in scales) + " |",
             "|---|---|" + "---|" * len(scales)]
    keys = sorted({(r["method"], r["sampler"]) for r in rows}, key=lambda k: (METHODS.index(k[0]), k[1]))
    for method, sampler in keys:
        cells = {r["scale"]: r["share"] for r in rows if (r["method"], r["sampler"]) == (method, sampler)}
        lines.append(f"| {method} | {sampler} | " + " | ".join(f"{cells[s]:.3f}" if s in cells else "" for s in scales) + " |")
    lines.append(f"| real held-out faces, read by the judge | | {judge_report['balanced_class_accuracy']:.3f} |"
                 + " |" * (len(scales) - 1))
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    scales = [float(s) for s in args.scales.split(",")]
    samplers = [(name, int(steps)) for name, steps in (s.split(":") for s in args.samplers.split(","))]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise UserError(f"unknown --methods {', '.join(sorted(unknown))}: choose from {', '.join(METHODS)}")
    root = data_root(args.data_root, work)
    train_runs(work, root)
    resolution = load_config(ROOT / RUNS["celeba16"]).data.resolution
    judge, judge_report = get_judge(work, root, resolution)
    print(f"judge: {judge_report['trained_on']}; on {judge_report['scored_on']}: attributes "
          + ", ".join(f"{a} {v:.3f}" for a, v in judge_report["attribute_accuracy"].items())
          + f", both (balanced over classes) {judge_report['balanced_class_accuracy']:.3f}", flush=True)
    cells = Cells(work, args.num_samples, args.batch_size, args.sample_args.split())
    cache_path, code = work / "cells.jsonl", code_digest()
    cache = {} if args.fresh else cached_rows(cache_path)
    rows = []
    for method in methods:
        for sampler, steps in samplers:
            for scale in scales:
                key = json.dumps([code, method, sampler, steps, scale, cells.per_class, args.sample_args])
                if key in cache:
                    rows.append(cache[key])
                    print(f"{method:<10} {sampler:>9} {steps:>4} scale {scale:>5g}: share {cache[key]['share']:.3f} "
                          f"(from {cache_path.name})", flush=True)
                    continue
                start = time.time()
                images = cells.samples(method, sampler, steps, scale)
                row = {"method": method, "sampler": f"{sampler} {steps}", "scale": scale, "n": len(images),
                       "tag": args.tag, "sample_args": args.sample_args, **judged(judge, images, cells.per_class),
                       "seconds": round(time.time() - start, 1), "code": code, "key": key}
                rows.append(row)
                with open(cache_path, "a") as cache_file:
                    cache_file.write(json.dumps(row) + "\n")
                print(f"{method:<10} {sampler:>9} {steps:>4} scale {scale:>5g}: share {row['share']:.3f} "
                      f"(Male {row['Male']:.3f}, Smiling {row['Smiling']:.3f}; n={len(images)}, {row['seconds']:.0f} s)",
                      flush=True)
    print(markdown(rows, scales, judge_report))
    out = Path(args.json) if args.json else work / "results.json"
    atomic_write_text(out, json.dumps({"judge": judge_report, "rows": rows}, indent=2))
    print(f"rows: {out}")
    if args.grid:
        draw_grid(cells, methods, samplers[0], args.grid_scale, Path(args.grid))
    return rows


def draw_grid(cells: Cells, methods: list[str], sampler: tuple[str, int], scale: float, path: Path) -> None:
    """Per method, 4 rows (the classes) of 8 samples at `scale`, the same seeds for every method."""
    cells.unguided.clear()
    cells.per_class = 8
    blocks = [cells.samples(method, *sampler, scale) for method in methods]
    grid = torch.nn.functional.interpolate(torch.cat(blocks), scale_factor=4, mode="nearest")
    save_grid(grid, path, nrow=8)
    print(f"wrote {path}: {', '.join(methods)} (4 rows each: woman, man, smiling woman, smiling man), "
          f"{sampler[0]} {sampler[1]}, scale {scale:g}")


if __name__ == "__main__":
    main()
