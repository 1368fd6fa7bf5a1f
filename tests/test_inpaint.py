"""In-painting: channel layout, the mask convention, paste-back, init_from widening, training masks, end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.checkpoints import store as ckpt
from diffusion.checkpoints.init_from import initialise_from
from diffusion.checkpoints.load import load_model
from diffusion.cli.sample import main as sample_main
from diffusion.conditioning.inpaint import files, methods
from diffusion.conditioning.inpaint.masks import HOLES, check_mask_config, seeded_keep_mask, training_keep_masks
from diffusion.config import DiffusionConfig, InpaintConfig, ModelConfig, save_config
from diffusion.errors import UserError
from diffusion.models import Denoiser
from diffusion.sampling.images import to_pil
from diffusion.sampling.loop import Guidance, Trajectory, sample_loop, seeded_noise
from diffusion.sampling.plan import SamplerSettings
from diffusion.sampling.samplers import build_sampler, noise_from, trailing_timesteps
from diffusion.sampling.schedule import NoiseSchedule, x0_to_epsilon
from diffusion.training.trainer import train
from tests.conftest import tiny_config


def tiny_model_config(**changes) -> ModelConfig:
    cfg = ModelConfig(condition="class", base_channels=16, channel_mult=[1, 2], layers_per_block=1,
                      attention_resolutions=[], attention_head_dim=8)
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def binary_image(seed: int, n: int = 2, res: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, res, res, generator=g) * 2 - 1, (torch.rand(n, 1, res, res, generator=g) > 0.5).float()


def test_channel_layout_and_order():
    image, keep = binary_image(0)
    channels = methods.inpaint_channels(image, keep)
    assert channels.shape == (2, 4, 8, 8)
    assert torch.equal(channels[:, :3], image * keep) and torch.equal(channels[:, 3:], keep)
    assert (channels[:, :3][keep.expand(-1, 3, -1, -1) == 0] == 0).all()  # zeros where unknown

    model = Denoiser(tiny_model_config(inpaint=True), 8, 12).eval()
    assert model.unet.conv_in.in_channels == 7
    seen = {}
    model.unet.conv_in.register_forward_hook(lambda mod, inputs, out: seen.update(x=inputs[0]))
    x_t = torch.randn(2, 3, 8, 8)
    model(x_t, torch.tensor([5, 9]), labels=torch.tensor([0, 1]), channels=channels)
    assert torch.equal(seen["x"][:, :3], x_t)  # x_t first, then masked RGB, then the keep-mask
    assert torch.equal(seen["x"][:, 3:6], image * keep) and torch.equal(seen["x"][:, 6:], keep)


def test_training_channels_mask_the_batch(tmp_path):
    """Keep-masks are drawn per item in the data-loader workers; the task masks the batch with them."""
    from diffusion.data import build_dataloader, build_dataset
    from diffusion.training.batches import training_augment
    from diffusion.training.tasks import DenoiserTask

    cfg = tiny_config(tmp_path, "model.inpaint=true")
    batch = next(iter(build_dataloader(build_dataset(cfg.data), cfg.data, 16, augment=training_augment(cfg))))
    keep = batch["keep"]
    assert keep.shape == (16, 1, 8, 8) and set(keep.unique().tolist()) <= {0.0, 1.0}
    model = Denoiser(cfg.model, 8, 12)
    channels = DenoiserTask(cfg).condition(model, batch, batch["image"])["channels"]
    assert channels.shape == (16, 4, 8, 8)
    assert torch.equal(channels[:, :3], batch["image"] * keep) and torch.equal(channels[:, 3:], keep)


def test_mask_file_round_trip(tmp_path):
    white = (np.random.default_rng(0).random((16, 16)) > 0.6).astype(np.uint8) * 255
    Image.fromarray(white, mode="L").save(tmp_path / "mask.png")
    keep = files.load_mask(tmp_path / "mask.png", 16)
    assert keep.shape == (1, 1, 16, 16)
    assert torch.equal(keep[0, 0], torch.from_numpy(white == 0).float())  # white = generate -> keep 0
    assert np.array_equal(np.asarray(files.mask_image(keep)), white)  # file -> keep-mask -> file
    flipped = files.load_mask(tmp_path / "mask.png", 16, invert=True)
    assert torch.equal(flipped, 1 - keep)
    # The mask gets the image's transform: a 2x larger, wider file maps onto the same centre crop.
    big = np.pad(np.kron(white, np.ones((2, 2), np.uint8)), ((0, 0), (8, 8)))
    Image.fromarray(big, mode="L").save(tmp_path / "big.png")
    assert torch.equal(files.load_mask(tmp_path / "big.png", 16), keep)


def test_coverage_warnings():
    assert "almost all white" in files.coverage_warning(torch.zeros(1, 1, 16, 16))
    assert "almost all black" in files.coverage_warning(torch.ones(1, 1, 16, 16))
    assert files.coverage_warning(seeded_keep_mask("half", 16, 0)) is None


def test_paste_back_is_exact():
    image, keep = binary_image(1)
    generated = torch.randn(2, 3, 8, 8) * 5
    out = methods.paste_back(generated, image, keep)
    known = keep.expand(-1, 3, -1, -1) > 0
    assert torch.equal(out[known], image[known]) and torch.equal(out[~known], generated[~known])


@pytest.mark.parametrize("kind, low, high", [
    ("box", 0.25**2, 2 * 0.6**2), ("strokes", 0.003, 0.7), ("half", 0.5, 0.5), ("border", 1 - 0.8**2, 1 - 0.4**2),
])
def test_training_mask_types_cover_what_they_should(kind, low, high):
    res, cfg = 32, InpaintConfig()
    holes = HOLES[kind](200, res, cfg, torch.Generator().manual_seed(0))
    cover = holes.mean((1, 2, 3))
    slack = 2.5 / res  # one pixel row or column per edge
    assert holes.shape == (200, 1, res, res) and set(holes.unique().tolist()) <= {0.0, 1.0}
    assert cover.min() >= low - slack and cover.max() <= high + slack, (float(cover.min()), float(cover.max()))
    if kind == "border":
        assert (holes[:, 0, res // 2, res // 2] == 0).all() and (holes[:, 0, 0, 0] == 1).all()


def test_mask_mix_follows_the_config():
    cfg = InpaintConfig(all_known=0.2, all_unknown=0.3, box=1.0, strokes=0.0, half=0.0, border=0.0)
    keep = training_keep_masks(2000, 16, cfg, torch.Generator().manual_seed(0))
    cover = 1 - keep.mean((1, 2, 3))
    assert abs(float((cover == 0).float().mean()) - 0.2) < 0.04
    assert abs(float((cover == 1).float().mean()) - 0.3) < 0.04
    with pytest.raises(UserError):
        check_mask_config(InpaintConfig(all_known=0.8, all_unknown=0.5))


def reference_schedule_jump(t_T: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """Lugmayr et al.'s `get_schedule_jump` (RePaint, guided_diffusion/scheduler.py), without its
    unused jump2/jump3 options: model timesteps t_T - 1 .. 0, then -1 for the clean image."""
    jumps = {}
    for j in range(0, t_T - jump_length, jump_length):
        jumps[j] = jump_n_sample - 1
    t = t_T
    ts = []
    while t >= 1:
        t = t - 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] = jumps[t] - 1
            for _ in range(jump_length):
                t = t + 1
                ts.append(t)
    ts.append(-1)
    return ts


def test_repaint_schedule_is_the_reference_one():
    """Their timestep t is our level t + 1 (level 0 = the clean image); their first entry is the start."""
    assert methods.repaint_schedule(6, 2, 1) == [5, 4, 3, 2, 1, 0]  # no jumps: plain descent
    for steps in range(1, 25):
        for jump_length in range(1, 6):
            for jump_n_sample in range(1, 5):
                ours = methods.repaint_schedule(steps, jump_length, jump_n_sample)
                ref = reference_schedule_jump(steps, jump_length, jump_n_sample)
                assert ours == [t + 1 for t in ref[1:]], (steps, jump_length, jump_n_sample)
    levels = methods.repaint_schedule(10, 2, 3)
    assert levels[-1] == 0 and 0 not in levels[:-1]  # the last round ends on the clean image, never restarts there


def test_replace_hook_noises_the_known_region_to_the_next_timestep():
    """After each step the known region is sqrt(ab_next) known + sqrt(1 - ab_next) noise, with that
    sample's own noise draw; after the last step it is the known image itself."""
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    image, keep = binary_image(4, n=2)
    n = 7  # does not divide 1000
    timesteps = trailing_timesteps(1000, n)
    states, seen = {}, {}

    def before(x, info):  # the generators' state as the replace hook finds it
        states[info.step.index] = [g.get_state() for g in info.generators]
        return x

    def after(x, info):
        seen[info.step.index] = x.clone()
        return x

    model_fn = lambda x, info: x0_to_epsilon(torch.zeros_like(x), x, info.alpha_bar)  # noqa: E731
    for name in ("ddpm", "ddim"):
        noise, generators = seeded_noise((3, 8, 8), [11, 12])
        hooks = [before, methods.replace_hook(image, keep), after]
        trajectory = Trajectory(schedule, build_sampler(schedule, name, n), generators, Guidance(hooks=hooks))
        sample_loop(model_fn, trajectory, noise)
        known = keep.expand(-1, 3, -1, -1) > 0
        for index in range(n):
            replay = [torch.Generator().set_state(s) for s in states[index]]
            drawn = noise_from(replay, (3, 8, 8))
            t_next = timesteps[index + 1] if index + 1 < n else -1
            ab = schedule.alpha_bar(t_next)
            expected = ab.sqrt() * image + (1 - ab).sqrt() * drawn if t_next >= 0 else image
            torch.testing.assert_close(seen[index][known], expected[known], msg=f"{name} step {index}")


def write_checkpoint(model: torch.nn.Module, cfg, directory) -> None:
    directory.mkdir(parents=True)
    ckpt.write_weights(directory / ckpt.EMA_FILE, ckpt.named_weights(model))
    save_config(cfg, directory / ckpt.CONFIG_FILE)
    ckpt.write_info(directory, ckpt.TrainState())


def test_widened_model_equals_base_at_init(tmp_path):
    torch.manual_seed(0)
    base = Denoiser(tiny_model_config(), 8, 12).eval()
    write_checkpoint(base, tiny_config(tmp_path), tmp_path / "base")
    widened = Denoiser(tiny_model_config(inpaint=True), 8, 12).eval()
    report = initialise_from(widened, tmp_path / "base")
    assert report["widened"] == ["unet.conv_in.weight"]
    x, t, labels = torch.randn(3, 3, 8, 8), torch.tensor([1, 50, 99]), torch.tensor([0, 5, 12])
    channels = methods.inpaint_channels(*binary_image(2, 3))
    with torch.no_grad():
        assert torch.allclose(widened(x, t, labels=labels, channels=channels), base(x, t, labels=labels), atol=1e-6)
    other = Denoiser(tiny_model_config(base_channels=8, inpaint=True), 8, 12)
    with pytest.raises(UserError, match="does not fit"):
        initialise_from(other, tmp_path / "base")
    base_cfg = tiny_config(tmp_path)
    other_target = "epsilon" if base_cfg.diffusion.prediction_type == "v_prediction" else "v_prediction"
    with pytest.raises(UserError, match="diffusion.prediction_type"):  # same shapes, another parameterisation
        initialise_from(widened, tmp_path / "base", tiny_config(tmp_path, f"diffusion.prediction_type={other_target}"))


def test_replace_and_repaint_keep_known_pixels_on_any_checkpoint(tiny_run):
    loaded = load_model(tiny_run)
    image, keep = binary_image(3, n=2)
    for method in ("replace", "repaint"):
        out = methods.run_inpainting(loaded, image, keep, method, SamplerSettings("ddim", 4), jump_length=2,
                                     jump_n_sample=2)
        known = keep.expand(-1, 3, -1, -1) > 0
        assert torch.equal(out[known], image[known].clamp(-1, 1))
    with pytest.raises(UserError, match="in-painting checkpoint"):
        methods.run_inpainting(loaded, image, keep, "channels", SamplerSettings("ddim", 2))
    with pytest.raises(UserError, match="--sampler ddim"):
        methods.run_inpainting(loaded, image, keep, "repaint", SamplerSettings("dpmsolver", 2))


def test_end_to_end_base_to_inpaint_finetune_to_sample(tiny_run, tmp_path, capsys):
    run = tmp_path / "inpaint"
    train(tiny_config(run, "train.max_steps=2", f"init_from={tiny_run}", config="configs/inpaint_shapes.yaml"))
    assert (run / "final" / ckpt.EMA_FILE).is_file()
    photo = (np.random.default_rng(1).random((12, 16, 3)) * 255).astype(np.uint8)  # not square, not 8x8
    Image.fromarray(photo).save(tmp_path / "in.png")
    white = np.zeros((12, 16), np.uint8)
    white[:, 8:] = 255  # generate the right half
    Image.fromarray(white, mode="L").save(tmp_path / "mask.png")
    out = tmp_path / "samples"
    sample_main(["--checkpoint", str(run), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--class-label", "3", "--num-samples", "2", "--steps", "3", "--out", str(out)])
    expected = np.asarray(to_pil(files.load_image(tmp_path / "in.png", 8)[0]))
    keep = files.load_mask(tmp_path / "mask.png", 8)[0, 0].bool().numpy()
    for i in range(2):
        result = Image.open(out / f"sample_{i:04d}.png")
        assert result.text["inpaint_method"] == "channels" and result.text["label"] == "3"
        assert np.array_equal(np.asarray(result)[keep], expected[keep])  # known pixels are the input's, exactly
        assert (out / f"strip_{i:04d}.png").is_file()
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(run), "--image", str(tmp_path / "in.png"), "--out", str(out), "--overwrite"])
    assert "--mask" in capsys.readouterr().err
    Image.fromarray(white[:, :8], mode="L").save(tmp_path / "half.png")  # a mask of another size than the image
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(run), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "half.png"),
                     "--class-label", "3", "--out", str(out), "--overwrite"])
    assert "half.png is 8x12 but --image" in capsys.readouterr().err


def test_caption_model_inpaints_with_a_prompt_and_cfg(tmp_path):
    """A caption-conditioned base, widened by init_from, in-paints from --prompt with CFG; known pixels stay."""
    text = ["model.text.width=16", "model.text.layers=1", "model.text.context_length=8", "train.max_steps=2"]
    base, run = tmp_path / "base", tmp_path / "inpaint"
    train(tiny_config(base, *text, config="configs/shapes_text.yaml"))
    train(tiny_config(run, *text, "model.inpaint=true", f"init_from={base}", config="configs/shapes_text.yaml"))
    photo = (np.random.default_rng(2).random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "in.png")
    white = np.zeros((8, 8), np.uint8)
    white[2:6, 2:6] = 255
    Image.fromarray(white, mode="L").save(tmp_path / "mask.png")
    out = tmp_path / "samples"
    sample_main(["--checkpoint", str(run), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                 "--prompt", "a green square", "--guidance-scale", "3", "--num-samples", "2", "--steps", "3",
                 "--out", str(out)])
    expected = np.asarray(to_pil(files.load_image(tmp_path / "in.png", 8)[0]))
    keep = ~white.astype(bool)
    for i in range(2):
        result = Image.open(out / f"sample_{i:04d}.png")
        assert result.text["prompt"] == "a green square" and result.text["inpaint_method"] == "channels"
        assert result.text["guidance_scale"] == "3.0"
        assert np.array_equal(np.asarray(result)[keep], expected[keep])
        assert not np.array_equal(np.asarray(result)[~keep], expected[~keep])  # the hole was generated
