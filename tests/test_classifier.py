"""Classifier guidance: the noise-aware classifier, its diagnostics, guided sampling, CLIs."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from diffusion.checkpoints import store as ckpt
from diffusion.checkpoints.load import LoadedModel, load_model
from diffusion.cli.sample import build_parser, features, make_plan
from diffusion.cli.sample import main as sample_main
from diffusion.conditioning.classifier import classifier_terms
from diffusion.config import load_config
from diffusion.data import build_dataset
from diffusion.evaluate.__main__ import main as evaluate
from diffusion.evaluate.classifier import held_out_accuracy
from diffusion.models import Denoiser, NoisyClassifier
from diffusion.sampling.guidance import gradient_term
from diffusion.sampling.loop import Guidance, Trajectory
from diffusion.sampling.plan import SamplerSettings, SamplingPlan, run_plan
from diffusion.sampling.samplers import build_sampler
from diffusion.sampling.schedule import build_train_scheduler, x0_to_epsilon
from diffusion.training.trainer import train
from tests.conftest import ROOT, tiny_config

CLASSIFIER = ["model.base_channels=8", "model.attention_resolutions=[4]", "model.pool=mean", "train.batch_size=32", "train.lr=0.003",
              "train.ema_decay=0.9", "train.checkpoint_every=1000", "data.shapes_size=512"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny classifier (60 steps) and a tiny unconditional denoiser (2 steps) on 8x8 shapes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these models are too small to gain from threads on a shared CPU
    root = tmp_path_factory.mktemp("classifier")
    train(tiny_config(root / "clf", *CLASSIFIER, "train.max_steps=60", config="configs/classifier_shapes.yaml"))
    train(tiny_config(root / "den", "train.max_steps=2", config="configs/shapes_uncond.yaml"))
    yield {"clf": root / "clf", "den": root / "den"}
    torch.set_num_threads(threads)


def plan_for(argv: list[str], loaded: LoadedModel) -> SamplingPlan:
    feature_list = features()
    args = build_parser(feature_list).parse_args(["--checkpoint", "unused", *argv])
    return make_plan(args, loaded, feature_list, SamplerSettings())


def test_classifier_beats_chance_on_low_t(runs):
    clf = load_model(runs["clf"])
    assert isinstance(clf.model, NoisyClassifier) and clf.cfg.task == "classifier"
    data = build_dataset(clf.cfg.data, "test")
    g = torch.Generator().manual_seed(0)
    x0 = torch.stack([data[i]["image"] for i in range(128)])
    labels = torch.tensor([data[i]["label"] for i in range(128)])
    t = torch.randint(0, clf.cfg.diffusion.num_train_timesteps // 10, (128,), generator=g)
    x_t = build_train_scheduler(clf.cfg.diffusion).add_noise(x0, torch.randn(x0.shape, generator=g), t)
    accuracy = (clf.model(x_t, t).argmax(-1) == labels).float().mean().item()
    assert accuracy > 2 / 12, f"held-out low-t accuracy {accuracy:.3f} is not above chance (1/12)"


def test_bucket_report_has_ten_rows(runs, tmp_path, capsys):
    final = runs["clf"] / "final"
    with open(final / "classifier_accuracy.csv") as f:  # written by the task at export
        assert len(list(csv.DictReader(f))) == 10
    evaluate(["classifier", "--checkpoint", str(runs["clf"]), "--num-samples", "100", "--out", str(tmp_path)])
    with open(tmp_path / "classifier_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["bucket"]) for r in rows] == list(range(10)) and all(int(r["n"]) == 10 for r in rows)
    assert Image.open(tmp_path / "classifier_accuracy.png").size[0] > 100
    assert "t range" in capsys.readouterr().out
    rows = held_out_accuracy(load_model(runs["clf"]).model, load_model(runs["clf"]).cfg, 50)
    assert len(rows) == 10 and sum(r["n"] for r in rows) == 50


@pytest.mark.parametrize("sampler,form", [("ddim", "eps"), ("dpmsolver", "eps"), ("ddpm", "eps"), ("ddpm", "mean")])
def test_one_guided_step_raises_log_prob(runs, sampler, form):
    """Same x_t, same noise draws: the guided step ends where the classifier gives y more probability.

    The denoiser is an oracle that predicts a held-out image pushed out of range, so x0 is clipped
    at every step: guidance must act after the clipping, not be undone by it.
    """
    clf = load_model(runs["clf"])
    schedule = clf.schedule
    data = build_dataset(clf.cfg.data, "test")
    x0 = torch.stack([data[i]["image"] for i in range(8)])
    target = (torch.tensor([data[i]["label"] for i in range(8)]) + 5) % 12  # some other class
    index = 4
    ab = schedule.alpha_bar(build_sampler(schedule, sampler, 10).steps[index].t)
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    oracle = lambda x_, info: x0_to_epsilon(1.5 * x0, x_, info.alpha_bar)  # noqa: E731

    def step(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = build_sampler(schedule, sampler, 10)
        generators = [torch.Generator().manual_seed(i) for i in range(8)]
        term = gradient_term(lambda x_, t_: clf.model.log_prob(x_, t_, target), scale, form)
        trajectory = Trajectory(schedule, chosen, generators, Guidance(terms=[term]))
        # DPM-Solver's first step is first order: run the unguided history up to `index` for it
        y = x
        for earlier in chosen.steps[:index] if sampler == "dpmsolver" else []:
            chosen.scheduler.step(x0.clamp(-1, 1), earlier.t, y)
        return trajectory.step(oracle, y, chosen.steps[index]), torch.full((8,), chosen.steps[index].t_next)

    with torch.no_grad():
        (plain, next_t), (guided, _) = step(0.0), step(5.0)
        before, after = clf.model.log_prob(plain, next_t, target), clf.model.log_prob(guided, next_t, target)
    assert not torch.equal(plain, guided)
    assert after.mean() > before.mean() and (after > before).float().mean() >= 0.75


def test_scale_zero_is_unguided_and_classifier_sees_denoiser_inputs(runs):
    den = load_model(runs["den"])
    common = ["--num-samples", "2", "--sampler", "ddpm", "--steps", "4"]
    settings = SamplerSettings("ddpm", 4, 0.0, 8)
    unguided = run_plan(den, plan_for(common, den), settings, bar=False)
    plan = plan_for([*common, "--classifier", str(runs["clf"]), "--classifier-scale", "0", "--class-label", "3"], den)
    assert [it.label for it in plan.items] == [3, 3] and plan.items[0].meta["classifier_scale"] == "0"
    assert torch.equal(run_plan(den, plan, settings, bar=False), unguided)

    seen: dict[str, list] = {"den": [], "clf": []}
    clf = load_model(runs["clf"])
    forward = den.model.forward
    den.model.forward = lambda x, t, **kw: seen["den"].append((x.clone(), t.clone())) or forward(x, t, **kw)
    log_prob = clf.model.log_prob
    clf.model.log_prob = lambda x, t, labels: seen["clf"].append((x.detach().clone(), t.clone())) or log_prob(x, t, labels)
    plan = plan_for(common, den)
    plan.items = [item.but(label=7) for item in plan.items]
    plan.terms.append(classifier_terms(clf.model, 3.0))
    for sampler in ("ddpm", "ddim", "dpmsolver"):
        seen["den"].clear(), seen["clf"].clear()
        run_plan(den, plan, SamplerSettings(sampler, 4, 0.0, 8), bar=False)
        assert len(seen["den"]) == len(seen["clf"]) == 4
        for (xd, td), (xc, tc) in zip(seen["den"], seen["clf"]):
            assert torch.equal(td, tc) and torch.equal(xd, xc)


def test_combines_with_cfg_on_a_conditional_denoiser(runs, tmp_path):
    clf = load_model(runs["clf"])
    cfg = tiny_config(tmp_path, config="configs/shapes.yaml")
    cfg.model.num_classes = 12
    den = LoadedModel(cfg, Denoiser(cfg.model, 8, 12).eval(), clf.schedule, ckpt.TrainState(), tmp_path)
    den.model.requires_grad_(False)
    argv = ["--num-samples", "1", "--class-label", "4", "--classifier", str(runs["clf"])]
    settings = SamplerSettings("ddim", 3, 3.0, 8)
    cfg_only = run_plan(den, plan_for([*argv, "--classifier-scale", "0"], den), settings, bar=False)
    plan = plan_for([*argv, "--classifier-scale", "4"], den)
    assert plan.items[0].cond["labels"].tolist() == [4] and plan.items[0].label == 4
    both = run_plan(den, plan, settings, bar=False)
    assert not torch.equal(both, cfg_only)


def test_sample_cli_end_to_end(runs, tmp_path):
    out = sample_main(["--checkpoint", str(runs["den"]), "--classifier", str(runs["clf"]), "--classifier-scale", "2",
                       "--class-label", "5", "--num-samples", "2", "--steps", "3", "--out", str(tmp_path / "a")])
    image = Image.open(out / "sample_0001.png")
    assert image.text["label"] == "5" and image.text["classifier_scale"] == "2" and image.text["class_name"]
    assert (out / "grid.png").is_file()
    out = sample_main(["--checkpoint", str(runs["den"]), "--classifier", str(runs["clf"]), "--num-samples", "1",
                       "--sampler", "ddpm", "--steps", "3", "--guidance-form", "mean", "--out", str(tmp_path / "b")])
    assert len(list(out.glob("sample_*.png"))) == 12  # every class in turn without --class-label


def test_shapes_accuracy_sweeps_classifier_scale(runs, capsys):
    evaluate(["shapes-accuracy", "--checkpoint", str(runs["den"]), "--classifier", str(runs["clf"]),
              "--classifier-scale", "0,2", "--guidance-scale", "0", "--num-samples", "12", "--steps", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("guidance_scale | classifier_scale") and len(lines) == 4
    assert lines[-1] == f"report: {runs['den'] / 'eval' / 'shapes_accuracy.json'}"


def edited_copy(run: Path, dest: Path, **changes) -> Path:
    """A copy of a run's final checkpoint with config keys (dotted) changed."""
    shutil.copytree(run / "final", dest)
    data = yaml.safe_load((dest / "config.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    (dest / "config.yaml").write_text(yaml.safe_dump(data))
    ckpt.write_info(dest, ckpt.read_info(dest))  # its digests too, as a run trained so would have them
    return dest


@pytest.mark.parametrize("argv,message", [
    (["--classifier-scale", "2"], "--classifier-scale needs --classifier"),
    (["--guidance-form", "mean", "--sampler", "ddpm"], "add --classifier"),
    (["--classifier", "{clf}", "--guidance-form", "mean", "--sampler", "ddim"], "use --sampler ddpm"),
    (["--classifier", "{clf}", "--class-label", "12"], "out of range"),
    (["--classifier", "{den}"], "is a denoiser checkpoint"),
    (["--classifier", "{big}"], "retrain it with data.resolution=8"),
])
def test_refusals(runs, tmp_path, capsys, argv, message):
    paths = {"clf": runs["clf"], "den": runs["den"],  # other schedules are read at equal noise level: test_guidance_review
             "big": edited_copy(runs["clf"], tmp_path / "big", data__resolution=16, model__attention_resolutions=[8])}
    argv = [a.format(**paths) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        sample_main(["--checkpoint", str(runs["den"]), "--num-samples", "1", "--steps", "2",
                     "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_shipped_configs_load():
    for name in ("classifier_shapes", "classifier_cifar10", "classifier_celeba64", "shapes_uncond"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.task == ("denoiser" if name == "shapes_uncond" else "classifier")


def test_shapes_accuracy_detects_at_a_lower_resolution(monkeypatch):
    """64-px samples with mottled interiors fool the fill-based detector; area-downsampled to 16 px they read right."""
    import argparse

    from diffusion.data.shapes import CLASS_NAMES, ShapesDataset, detect_label
    from diffusion.evaluate import shapes_accuracy

    dataset = ShapesDataset(resolution=16, size=400, split="test")
    by_label = {}
    for i in range(len(dataset)):
        item = dataset[i]
        if detect_label(item["image"]) == item["label"]:
            by_label.setdefault(item["label"], item["image"])
    images = torch.stack([by_label[label] for label in range(len(CLASS_NAMES))])
    big = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")
    mottle = torch.ones(64, 64)
    mottle[::2, ::2] = mottle[1::2, 1::2] = 0.5
    big = ((big + 1) * mottle - 1).clamp(-1, 1)  # black stays black, colours get a fine dark checkerboard
    monkeypatch.setattr(shapes_accuracy, "class_samples", lambda args, rest, settings: big)
    args = argparse.Namespace(num_samples=12, detect_resolution=None)
    assert shapes_accuracy.accuracy(args, [], {}) < 1.0
    args.detect_resolution = 16
    assert shapes_accuracy.accuracy(args, [], {}) == 1.0
