"""CLIP guidance: the noise-aware open_clip model, its task and diagnostics, guided sampling, pretrained loading."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.checkpoints.load import LoadedModel
from diffusion.checkpoints.store import TrainState
from diffusion.cli.sample import main as sample
from diffusion.conditioning.clip import CleanGuide, NoiseAwareGuide, load_open_clip
from diffusion.errors import UserError
from diffusion.evaluate.__main__ import main as evaluate
from diffusion.evaluate.clip import retrieval_hits, right_captions
from diffusion.models.clip import NoisyCLIP
from diffusion.sampling.guidance import StepInfo
from diffusion.sampling.loop import Guidance, Trajectory, sample_loop, seeded_noise
from diffusion.sampling.samplers import build_sampler
from diffusion.sampling.schedule import NoiseSchedule, epsilon_to_x0
from diffusion.training.batches import drop_words

from .conftest import tiny_config

CLIP_TINY = [
    "model.embed_dim=16", "model.vision.width=32", "model.vision.layers=1", "model.vision.head_width=16",
    "model.vision.patch_size=4", "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
    "model.text.context_length=8", "train.batch_size=8",
]
PROMPT = "a red circle"
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def clip_config(tmp: Path, *extra: str):
    return tiny_config(tmp, *CLIP_TINY, *extra, config="configs/clip_shapes.yaml")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP run (through train.py, with the diagnostics preview) and a tiny unconditional denoiser."""
    import train

    root = tmp_path_factory.mktemp("clip_runs")
    clip, denoiser = root / "clip", root / "denoiser"
    train.main(["configs/clip_shapes.yaml", *tiny_overrides(clip, CLIP_TINY), "train.max_steps=2", "train.sample_every=2"])
    train.main(["configs/shapes_uncond.yaml", *tiny_overrides(denoiser, []), "train.max_steps=1"])
    return {"clip": clip, "denoiser": denoiser}


def tiny_overrides(out: Path, extra: list[str]) -> list[str]:
    from .conftest import TINY

    return [*TINY, *extra, f"output_dir={out}"]


def step_info(schedule: NoiseSchedule, sampler, x: torch.Tensor, index: int) -> StepInfo:
    return Trajectory(schedule, sampler, []).info(x, sampler.steps[index])


def noisy_pair(schedule: NoiseSchedule, sampler, n: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, eps) of an image inside [-1, 1]."""
    x0, eps = torch.rand(n, 3, 8, 8) - 0.5, torch.randn(n, 3, 8, 8)
    ab = schedule.alpha_bar(sampler.steps[index].t)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps, eps


def test_timestep_reaches_the_image_tower(tmp_path):
    torch.manual_seed(0)
    model = NoisyCLIP(clip_config(tmp_path)).eval()
    x = torch.randn(2, 3, 8, 8)
    early, late = model.encode_image(x, torch.tensor([5, 5])), model.encode_image(x, torch.tensor([90, 90]))
    assert not torch.allclose(early, late, atol=1e-4)
    torch.testing.assert_close(model.encode_image(x, torch.tensor([5, 5])), early)
    with pytest.raises(RuntimeError, match="timestep"):
        model.clip.encode_image(x)  # the tower refuses to run without t


@pytest.mark.parametrize("sampler,form", [("ddim", "eps"), ("dpmsolver", "eps"), ("ddpm", "mean")])
def test_one_guided_step_raises_clip_similarity(tmp_path, sampler, form):
    torch.manual_seed(0)
    cfg = clip_config(tmp_path)
    model = NoisyCLIP(cfg).eval().requires_grad_(False)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    guide = NoiseAwareGuide(LoadedModel(cfg, model, schedule, TrainState(), tmp_path), schedule)
    x, eps = noisy_pair(schedule, build_sampler(schedule, sampler, 10), 6, 4)
    text = guide.encode_prompts([PROMPT] * 6)
    term = guide.term(text, 0.05, form, list(range(6)))
    outs = []
    for terms in ([], [term]):  # a fresh sampler each: DPM-Solver keeps its last outputs
        chosen = build_sampler(schedule, sampler, 10)
        trajectory = Trajectory(schedule, chosen, [torch.Generator().manual_seed(i) for i in range(6)], Guidance(terms=terms))
        outs.append(trajectory.step(lambda x_, info: eps, x, chosen.steps[4]))
    plain_x, guided_x = outs
    next_t = torch.full((6,), chosen.steps[4].t_next)
    with torch.no_grad():
        assert (model.similarity(guided_x, next_t, text) > model.similarity(plain_x, next_t, text)).all()


def save_tiny_open_clip(tmp_path: Path) -> tuple[Path, Path, dict]:
    import open_clip

    config = tmp_path / "tiny-test-clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    return config, weights, model.state_dict()


def test_pretrained_open_clip_loads_from_a_local_file_and_guides_through_x0(tmp_path):
    config, weights, state = save_tiny_open_clip(tmp_path)
    model, tokenizer = load_open_clip(str(config), str(weights), "cpu")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])
    with pytest.raises(UserError, match="not found"):
        load_open_clip(str(config), str(tmp_path / "missing.bin"), "cpu")
    with pytest.raises(UserError, match="--clip-weights"):
        load_open_clip(str(config), None, "cpu")
    # A clean CLIP scores the predicted x0 (resized to 16x16, normalised): a guided eps raises that score.
    guide = CleanGuide(model, tokenizer)
    schedule = NoiseSchedule.from_config(tiny_config(tmp_path).diffusion)
    sampler = build_sampler(schedule, "ddim", 10)
    torch.manual_seed(1)
    x, eps = noisy_pair(schedule, sampler, 4, 6)
    info = step_info(schedule, sampler, x, 6)
    text = guide.encode_prompts([PROMPT] * 4)
    guided = guide.term(text, 1e-3, "eps", list(range(4)))(eps, info)
    with torch.no_grad():
        before = guide.similarity(epsilon_to_x0(eps, x, info.alpha_bar), text, [])
        after = guide.similarity(epsilon_to_x0(guided, x, info.alpha_bar), text, [])
    assert (after > before).all()
    cutouts = CleanGuide(model, tokenizer, cutouts=3)
    assert cutouts.views(x, [torch.Generator().manual_seed(i) for i in range(4)]).shape == (12, 3, 16, 16)


def test_clean_clip_scores_an_x0_inside_the_data_range_and_moves_it_boundedly(tmp_path):
    """Over a whole run with a model whose raw x0 is far out of range and a large scale, the x0 that
    CLIP scores stays within [-1, 1] at every t, and one guided step moves x0 by s (1 - ab) grad_x0,
    at most s * grad_x0 (not s (1 - ab) / ab * grad_x0, ~25,000 s at t = 999)."""
    config, weights, _ = save_tiny_open_clip(tmp_path)
    guide = CleanGuide(*load_open_clip(str(config), str(weights), "cpu"))
    scored = []
    similarity = guide.similarity
    guide.similarity = lambda x0, text, gens: scored.append(x0.detach().clone()) or similarity(x0, text, gens)
    schedule = NoiseSchedule.from_config(tiny_config(tmp_path).diffusion)
    text = guide.encode_prompts([PROMPT] * 2)
    scale = 50.0
    noise, generators = seeded_noise((3, 8, 8), [0, 1])
    wild = lambda x, info: -4 * x  # noqa: E731  raw x0 = 5x / sqrt(ab): far outside [-1, 1]
    sampler = build_sampler(schedule, "ddim", 10)
    trajectory = Trajectory(schedule, sampler, generators, Guidance(terms=[guide.term(text, scale, "eps", [0, 1])]))
    sample_loop(wild, trajectory, noise)
    assert len(scored) == 10 and all(float(x0.abs().max()) <= 1.0 for x0 in scored)

    info = step_info(schedule, sampler, noise, 0)
    eps = torch.randn_like(noise)
    shifted = guide.term(text, scale, "eps", [0, 1])(eps, info)
    x0_shift = epsilon_to_x0(shifted, noise, info.alpha_bar) - epsilon_to_x0(eps, noise, info.alpha_bar)
    x0 = epsilon_to_x0(eps, noise, info.alpha_bar).clamp(-1, 1).requires_grad_(True)
    grad = torch.autograd.grad(similarity(x0, text, []).sum(), x0)[0]
    expected = scale * (1 - info.alpha_bar) * grad
    assert float((x0_shift - expected).norm() / expected.norm()) < 1e-3


def test_retrieval_counts_any_caption_of_the_same_class():
    captions, labels = ["a red circle", "a small red circle", "a blue square"], [0, 0, 5]
    right = right_captions(captions, labels, by_label=True)
    assert right[0] == right[1] == {"a red circle", "a small red circle"} and right[2] == {"a blue square"}
    assert right_captions(captions, labels, by_label=False)[0] == {"a red circle"}
    logits = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # columns: the captions above
    assert retrieval_hits(logits, captions, right).tolist() == [True, False, True]


def test_word_drop_keeps_the_first_word():
    torch.manual_seed(0)
    dropped = drop_words(["a smiling woman with blond hair"] * 50, 0.5)
    assert all(c.startswith("a") for c in dropped) and len(set(dropped)) > 3
    assert drop_words(["a small red circle"], 0.0) == ["a small red circle"]


def read_pixels(directory: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(directory.glob("sample_*.png"))]


def test_end_to_end_through_the_clis(runs, tmp_path, capsys):
    clip, denoiser = runs["clip"], runs["denoiser"]
    assert (clip / "diagnostics" / "clip_retrieval_step-000002.csv").is_file()
    evaluate(["clip", "--checkpoint", str(clip), "--num-samples", "40"])
    rows = (clip / "diagnostics" / "clip_retrieval.csv").read_text().splitlines()
    assert len(rows) == 11 and (clip / "diagnostics" / "clip_retrieval.png").is_file()
    assert "chance" in capsys.readouterr().out

    common = ["--checkpoint", str(denoiser), "--num-samples", "2", "--steps", "3", "--device", "cpu"]
    plain = read_pixels(sample([*common, "--out", str(tmp_path / "plain")]))
    zero = read_pixels(sample([*common, "--clip", str(clip), "--clip-scale", "0", "--prompt", PROMPT,
                               "--out", str(tmp_path / "zero")]))
    guided_dir = sample([*common, "--clip", str(clip), "--clip-scale", "30", "--prompt", PROMPT, "--sampler", "ddpm",
                         "--guidance-form", "mean", "--out", str(tmp_path / "guided")])
    assert all(np.array_equal(a, b) for a, b in zip(plain, zero)) and len(zero) == 2
    meta = Image.open(guided_dir / "sample_0000.png").text
    assert meta["clip_scale"] == "30" and meta["guidance_form"] == "mean" and meta["prompt"] == PROMPT

    config, weights, _ = save_tiny_open_clip(tmp_path)
    clean = read_pixels(sample([*common, "--clip", f"open_clip:{config}", "--clip-weights", str(weights), "--clip-scale", "0.01",
                                "--clip-cutouts", "2", "--prompt", PROMPT, "--out", str(tmp_path / "clean")]))
    assert not all(np.array_equal(a, b) for a, b in zip(plain, clean))

    for bad, message in [
        (["--clip", str(denoiser), "--prompt", PROMPT], "is a denoiser checkpoint"),
        (["--clip", str(clip)], "--prompt"),
        (["--clip", f"open_clip:{config}", "--clip-weights", str(tmp_path / "nope.bin"), "--prompt", PROMPT], "not found"),
        (["--clip-scale", "2"], "need --clip"),
        (["--clip", str(clip), "--prompt", PROMPT, "--guidance-form", "mean"], "--sampler ddpm"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            sample([*common, *bad, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and "\n" not in err
