"""Caption conditioning: dropout rate, CFG limits, padding invariance, rescale/threshold formulas, end to end."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.conftest import TINY, tiny_config
from diffusion.config import DiffusionConfig, ModelConfig, TextConfig
from diffusion.data.common import template_caption
from diffusion.cli.sample import main as sample_main
from diffusion.sampling.guidance import CFGOptions, ClassifierFreeGuidance, StepInfo, dynamic_threshold, rescale_guidance
from diffusion.sampling.loop import Trajectory
from diffusion.sampling.samplers import Step
from diffusion.models import build_denoiser
from diffusion.models.text import TextEncoder, empty_tokens_like, real_token_mask, tokenize
from diffusion.sampling.schedule import NoiseSchedule, epsilon_to_x0, x0_to_epsilon
from diffusion.training.tasks import DenoiserTask

TEXT = TextConfig(width=16, layers=1, heads=2, context_length=16)


def tiny_text_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(condition="text", base_channels=16, channel_mult=[1, 2], layers_per_block=1,
                      attention_resolutions=[4], attention_head_dim=8, text=TEXT, **overrides)
    return build_denoiser(cfg, 8, num_classes=12).eval()


def test_caption_dropout_rate_is_cond_drop_prob(tmp_path):
    cfg = tiny_config(tmp_path, "model.condition=text", "model.text.width=16", "model.text.layers=1")
    assert cfg.model.cond_drop_prob == 0.2
    task = DenoiserTask(cfg)
    model = tiny_text_model()
    torch.manual_seed(1)
    batch = {"image": torch.zeros(64, 3, 8, 8), "caption": ["a small red circle"] * 64}
    dropped = total = 0
    for _ in range(200):
        tokens = task.condition(model, batch, batch["image"])["tokens"]
        dropped += int((tokens == empty_tokens_like(tokens)).all(dim=1).sum())
        total += len(tokens)
    assert abs(dropped / total - 0.2) < 0.015


class TwoPredictions(torch.nn.Module):
    """A stand-in denoiser: fixed eps_u for the empty caption, fixed eps_c for any other."""

    def __init__(self, eps_c: torch.Tensor, eps_u: torch.Tensor):
        super().__init__()
        self.eps_c, self.eps_u = eps_c, eps_u

    def forward(self, x, t, tokens):
        empty = (tokens == empty_tokens_like(tokens)).all(dim=1).view(-1, 1, 1, 1)
        return torch.where(empty, self.eps_u, self.eps_c)


SCHEDULE = NoiseSchedule.from_config(DiffusionConfig(num_train_timesteps=100))


def info_at(x: torch.Tensor, t: int) -> StepInfo:
    """What the loop hands the model function at timestep t (the whole batch shares it)."""
    return Trajectory(SCHEDULE, None, []).info(x, Step(0, t, t - 1))


def _cfg(model, scale, **options):
    tokens = tokenize(["a red circle", "a blue square"], 16)
    return ClassifierFreeGuidance(model, {"tokens": tokens}, {"tokens": empty_tokens_like(tokens)}, scale,
                                  CFGOptions(**options))


def test_cfg_scale_one_is_conditional_and_zero_unconditional():
    model = tiny_text_model()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([40, 40])
    tokens = tokenize(["a red circle", "a blue square"], 16)
    info = info_at(x, 40)
    with torch.no_grad():
        eps_c, eps_u = model(x, t, tokens=tokens), model(x, t, tokens=empty_tokens_like(tokens))
        assert not torch.allclose(eps_c, eps_u)
        assert torch.equal(_cfg(model, 1.0)(x, info), eps_c)
        assert torch.equal(_cfg(model, 0.0)(x, info), eps_u)
        torch.testing.assert_close(_cfg(model, 3.0)(x, info), eps_u + 3 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)


def test_padding_does_not_change_the_text_embedding():
    encoder = TextEncoder.from_text_config(TEXT).eval()
    short, long = tokenize(["a red circle!"], 8), tokenize(["a red circle!"], 16)
    real = real_token_mask(long)
    assert int(real.sum()) == 6  # SOT a red circle ! EOT: "!" is id 0, the padding id, yet real
    with torch.no_grad():
        a, b = encoder(short), encoder(long)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.tokens[a.mask], b.tokens[b.mask], atol=1e-5, rtol=1e-5)
    model = tiny_text_model()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([30])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, tokens=short), model(x, t, tokens=long), atol=1e-5, rtol=1e-5)


def test_rescale_matches_formula():
    x_cfg = torch.tensor([[1.0, 3.0, 5.0, 7.0]]).view(1, 1, 2, 2)  # std 2.582
    x_cond = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).view(1, 1, 2, 2)  # std 1.291: half of x_cfg's
    torch.testing.assert_close(rescale_guidance(x_cfg, x_cond, 1.0), x_cfg / 2)
    torch.testing.assert_close(rescale_guidance(x_cfg, x_cond, 0.0), x_cfg)
    torch.testing.assert_close(rescale_guidance(x_cfg, x_cond, 0.7), 0.7 * x_cfg / 2 + 0.3 * x_cfg)
    # Inside CFG: applied to the predicted x0 of eps_u + s (eps_c - eps_u), then back to eps.
    torch.manual_seed(0)
    eps_c, eps_u = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    fn = _cfg(TwoPredictions(eps_c, eps_u), 4.0, rescale=0.7)
    x = torch.randn(2, 3, 4, 4)
    ab = SCHEDULE.alpha_bar(torch.tensor([60, 60]))
    guided = eps_u + 4.0 * (eps_c - eps_u)
    x0 = rescale_guidance(epsilon_to_x0(guided, x, ab), epsilon_to_x0(eps_c.expand(2, -1, -1, -1), x, ab), 0.7)
    torch.testing.assert_close(fn(x, info_at(x, 60)), x0_to_epsilon(x0, x, ab), atol=1e-4, rtol=1e-4)


def test_dynamic_threshold_matches_formula():
    x0 = torch.tensor([[-0.5, 0.2, 0.9, -1.0], [-4.0, -2.0, 0.0, 2.0]]).view(2, 1, 2, 2)
    # p=50: |x0| of sample 2 is (4, 2, 0, 2), median s = 2: clip to [-2, 2], divide by 2; sample 1 has s < 1 -> 1.
    expected = torch.tensor([[-0.5, 0.2, 0.9, -1.0], [-1.0, -1.0, 0.0, 1.0]]).view(2, 1, 2, 2)
    torch.testing.assert_close(dynamic_threshold(50)(x0), expected)
    torch.testing.assert_close(dynamic_threshold(100)(x0)[1], x0[1] / 4)  # s = max |x0| = 4: plain rescaling
    assert CFGOptions(threshold=50).x0_processor()(x0).abs().max() <= 1


def test_guidance_interval_guides_only_inside():
    torch.manual_seed(0)
    eps_c, eps_u = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    fn = _cfg(TwoPredictions(eps_c, eps_u), 3.0, interval=(20, 60))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fn(x, info_at(x, 40)), (eps_u + 3 * (eps_c - eps_u)).expand(2, -1, -1, -1))
    for outside in (10, 80):
        torch.testing.assert_close(fn(x, info_at(x, outside)), eps_c.expand(2, -1, -1, -1))


def test_cifar_style_captions_vary():
    import random

    rng = random.Random(0)
    captions = {template_caption("airplane", rng) for _ in range(50)}
    assert len(captions) > 5 and all("airplane" in c for c in captions)
    assert "an image of an airplane" in captions or "an airplane" in captions


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    import train

    run = tmp_path_factory.mktemp("text_run")
    cfg_args = [f"output_dir={run}", "model.condition=text", "model.text.width=16", "model.text.layers=1",
                "model.text.context_length=8", "train.max_steps=2", "train.sample_every=2", "train.checkpoint_every=2",
                "sample.prompts=[a red circle]"]


    train.main(["configs/shapes_text.yaml", *TINY, *cfg_args])
    return run


def test_train_with_captions_then_sample_prompt(text_run, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    assert (text_run / "samples" / "step-000002.png").is_file()
    UNet2DConditionModel.from_pretrained(text_run / "final" / "unet")
    TextEncoder.from_pretrained(text_run / "final" / "text_encoder")
    out = sample_main(["--checkpoint", str(text_run), "--prompt", "a blue square", "--prompt", "",
                       "--prompt", "a very small and rather dark blue square", "--num-samples", "2", "--steps", "2",
                       "--guidance-scale", "3", "--negative-prompt", "a red circle", "--guidance-rescale", "0.7",
                       "--dynamic-threshold", "99.5", "--guidance-interval", "10", "90", "--out", str(tmp_path / "s")])
    assert "was cut" in capsys.readouterr().err
    files = sorted(out.glob("sample_*.png"))
    assert len(files) == 6 and (out / "grid.png").is_file()
    meta = Image.open(files[0]).text
    assert meta["prompt"] == "a blue square" and meta["negative_prompt"] == "a red circle"
    assert Image.open(files[2]).text["prompt"] == ""


def test_prompt_errors(text_run, tiny_run, tmp_path, capsys):
    out = sample_main(["--checkpoint", str(text_run), "--num-samples", "1", "--steps", "1", "--out", str(tmp_path / "d")])
    assert Image.open(out / "sample_0000.png").text["prompt"] == "a red circle"  # no --prompt: the run's sample.prompts
    for argv, message in (
        (["--checkpoint", str(tiny_run), "--prompt", "a red circle"], "caption-conditioned"),
        (["--checkpoint", str(text_run), "--prompt", "x", "--dynamic-threshold", "0.995"], "percentile"),
        (["--checkpoint", str(text_run), "--prompt", "x", "--guidance-interval", "90", "10"], "LO <= HI"),
        (["--checkpoint", str(text_run), "--prompts-file", str(tmp_path / "missing.txt")], "not found"),
    ):
        with pytest.raises(SystemExit) as err:
            sample_main([*argv, "--num-samples", "1", "--steps", "1", "--out", str(tmp_path)])
        assert err.value.code == 2
        assert message in capsys.readouterr().err
