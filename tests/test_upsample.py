"""Diffusion upsamplers: low-res channels, noise augmentation, init_from widening, the cascade and --low-res."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.checkpoints import store as ckpt
from diffusion.checkpoints.init_from import initialise_from
from diffusion.cli.sample import main as sample_main
from diffusion.conditioning import upsample as up
from diffusion.config import DiffusionConfig, ModelConfig, UpsampleConfig, save_config
from diffusion.data import build_dataset
from diffusion.evaluate.upsample import high_frequency_power
from diffusion.models import Denoiser
from diffusion.sampling.guidance import StepInfo
from diffusion.sampling.samplers import Step
from diffusion.sampling.schedule import NoiseSchedule, epsilon_to_x0, x0_to_epsilon
from tests.conftest import UP, tiny_config


def tiny_model_config(**changes) -> ModelConfig:
    base = dict(condition="class", base_channels=16, channel_mult=[1, 2], layers_per_block=1,
                attention_resolutions=[], attention_head_dim=8)
    return ModelConfig(**{**base, **changes})


def write_checkpoint(model: torch.nn.Module, cfg, directory) -> None:
    directory.mkdir(parents=True)
    ckpt.write_weights(directory / ckpt.EMA_FILE, ckpt.named_weights(model))
    save_config(cfg, directory / ckpt.CONFIG_FILE)
    ckpt.write_info(directory, ckpt.TrainState())


def test_channels_are_the_bilinear_upsample_of_the_quantised_low_res(tmp_path):
    cfg = tiny_config(tmp_path, *UP, "upsample.aug_noise=[0,0]")
    data = up.with_low_res(build_dataset(cfg.data), cfg)
    assert data.num_classes == build_dataset(cfg.data).num_classes  # the wrapper passes attributes through
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    low = batch["low_res"]
    expected_low = F.interpolate(batch["image"], size=(8, 8), mode="area")
    expected_low = ((expected_low + 1) * 127.5).round() / 127.5 - 1
    assert torch.equal(low, expected_low)
    levels = (low + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # 8-bit levels
    cond = up.training_condition(low, cfg, NoiseSchedule.from_config(cfg.diffusion))
    assert torch.equal(cond["aug_level"], torch.zeros(3, dtype=torch.long))
    expected = F.interpolate(expected_low, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(cond["channels"], expected, atol=1e-6)


def test_aug_noise_follows_the_schedule_and_level_zero_is_clean():
    schedule = NoiseSchedule.from_config(DiffusionConfig(num_train_timesteps=1000, beta_schedule="cosine"))
    x, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    assert torch.equal(up.augment(x, torch.zeros(4, dtype=torch.long), schedule, noise), x)
    level = torch.tensor([1, 250, 500, 1000])
    ab = schedule.table[level - 1].view(-1, 1, 1, 1)
    assert torch.allclose(up.augment(x, level, schedule, noise), ab.sqrt() * x + (1 - ab).sqrt() * noise)
    assert up.level_index(0.25, 1000) == 250
    with pytest.raises(Exception, match="aug level"):
        up.level_index(1.5, 1000)
    # training levels stay in the configured range and the noise has the schedule's variance
    cfg = UpsampleConfig(aug_noise=[0.5, 0.5])
    big = torch.zeros(64, 3, 4, 4)

    class Cfg:  # the two sections training_condition reads
        upsample = cfg
        data = type("D", (), {"resolution": 8})

    cond = up.training_condition(big, Cfg, schedule)
    assert torch.all(cond["aug_level"] == 500)
    assert abs(cond["channels"].std().item() - (1 - schedule.table[499]).sqrt().item()) < 0.05


@pytest.mark.parametrize("condition", ["class", "text"])
def test_widened_upsampler_equals_base_at_init(tmp_path, condition):
    torch.manual_seed(0)
    changes = {"condition": condition}
    base = Denoiser(tiny_model_config(**changes), 8, 12).eval()
    cfg = tiny_config(tmp_path, f"model.condition={condition}")
    write_checkpoint(base, cfg, tmp_path / "base")
    widened = Denoiser(tiny_model_config(upsample=True, **changes), 8, 12).eval()
    report = initialise_from(widened, tmp_path / "base")
    assert report["widened"] == ["unet.conv_in.weight"]
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 50, 99])
    cond = {"labels": torch.tensor([0, 5, 12])} if condition == "class" else {"tokens": base.tokenize(["a", "b c", ""])}
    channels, level = torch.randn(3, 3, 8, 8), torch.tensor([0, 300, 1000])
    with torch.no_grad():
        assert torch.allclose(widened(x, t, channels=channels, aug_level=level, **cond), base(x, t, **cond), atol=1e-6)
        torch.nn.init.normal_(widened.level_embedding.mlp.linear_2.weight)  # a trained level embedding is used
        assert not torch.allclose(widened(x, t, channels=channels, aug_level=level, **cond), base(x, t, **cond))


@pytest.mark.parametrize("down, interp", [("area", "bilinear"), ("bicubic", "bicubic")])
def test_consistency_projection_makes_x0_downsample_to_the_low_res(down, interp):
    cfg = UpsampleConfig(factor=4, downsample=down, upsample=interp)
    schedule = NoiseSchedule.from_config(DiffusionConfig(num_train_timesteps=1000, beta_schedule="cosine"))
    low = up.quantise((torch.rand(2, 3, 4, 4) - 0.5) / 2)
    x, model_x0 = torch.randn(2, 3, 16, 16), (torch.rand(2, 3, 16, 16) - 0.5) / 2  # well in range, so clipping plays no part
    ab = schedule.alpha_bar(400).expand(2).view(-1, 1, 1, 1)
    eps = x0_to_epsilon(model_x0, x, ab)
    info = StepInfo(x=x, t=torch.full((2,), 400), step=Step(0, 400, 200), alpha_bar=ab,
                    alpha_bar_next=schedule.alpha_bar(200).expand(2).view(-1, 1, 1, 1), schedule=schedule)
    term = up.consistency_term(low, 16, cfg)
    projected = term(eps, info)
    x0 = epsilon_to_x0(projected, x, ab)
    assert (up.resample(model_x0, 4, down) - low).abs().max() > 0.15  # the model's x0 was far off
    assert torch.allclose(up.resample(x0, 4, down), low, atol=1e-4)
    assert torch.allclose(term(projected, info), projected, atol=1e-4)  # a consistent x0 is left alone
    # the correction is the interpolation of a low-res image, so it adds no detail of its own
    change = x0 - model_x0
    g = up.resample_matrix(4, 16, interp)
    coefficients = torch.linalg.pinv(g) @ change @ torch.linalg.pinv(g).T
    assert torch.allclose(g @ coefficients @ g.T, change, atol=1e-4)


def _consistency_psnr(folder, index: int) -> float:
    high, low = (torch.from_numpy(np.array(Image.open(folder / f"{name}_{index:04d}.png"))).permute(2, 0, 1)[None].float()
                 for name in ("sample", "lowres"))
    mse = ((F.interpolate(high, size=low.shape[-2:], mode="area") - low) ** 2).mean()
    return float(10 * torch.log10(255**2 / mse))


def test_consistency_flag_makes_the_result_downsample_to_the_input(up_run, tmp_path):
    photo = (np.random.default_rng(2).random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    psnr = {}
    for flag in ("--consistency", "--no-consistency"):
        out = tmp_path / flag
        sample_main(["--checkpoint", str(up_run), "--low-res", str(tmp_path / "photo.png"), "--class-label", "1",
                     "--num-samples", "1", "--steps", "3", "--out", str(out), flag])
        assert Image.open(out / "sample_0000.png").text["consistency"] == str(flag == "--consistency")
        psnr[flag] = _consistency_psnr(out, 0)
    assert psnr["--consistency"] > 40 > psnr["--no-consistency"], psnr


def test_cascade_writes_both_stages_with_metadata(tiny_run, up_run, tmp_path):
    out = tmp_path / "cascade"
    sample_main(["--checkpoint", str(tiny_run), "--upsampler", str(up_run), "--class-label", "3", "--num-samples", "2",
                 "--steps", "2", "--upsampler-sampler", "ddpm", "--upsampler-steps", "2", "--aug-level", "0.2",
                 "--out", str(out)])
    for i in range(2):
        high, low = Image.open(out / f"sample_{i:04d}.png"), Image.open(out / f"lowres_{i:04d}.png")
        assert high.size == (16, 16) and low.size == (8, 8)
        for picture in (high, low):
            assert picture.text["label"] == "3" and picture.text["seed"] == str(i)
            assert picture.text["upsampler_sampler"] == "ddpm" and picture.text["aug_level"] == "0.2" and picture.text["aug_level_input"] == "20"
            assert picture.text["checkpoint"] and picture.text["upsampler_checkpoint"]
            assert picture.text["consistency"] == "True"  # the config's default
        assert _consistency_psnr(out, i) > 40  # each 16-px sample downsamples to its 8-px base sample
    alone = tmp_path / "alone"  # the base stage is the ordinary sample with the same seed
    sample_main(["--checkpoint", str(tiny_run), "--class-label", "3", "--num-samples", "2", "--steps", "2",
                 "--out", str(alone)])
    assert np.array_equal(np.asarray(Image.open(alone / "sample_0001.png")), np.asarray(Image.open(out / "lowres_0001.png")))


def test_low_res_on_an_odd_sized_rgba_image(up_run, tmp_path):
    rgba = (np.random.default_rng(0).random((7, 13, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "photo.png")
    out = tmp_path / "sr"
    sample_main(["--checkpoint", str(up_run), "--low-res", str(tmp_path / "photo.png"), "--class-label", "1",
                 "--num-samples", "2", "--steps", "2", "--out", str(out)])
    for i in range(2):
        assert Image.open(out / f"sample_{i:04d}.png").size == (16, 16)
        assert Image.open(out / f"bicubic_{i:04d}.png").size == (16, 16)
        assert Image.open(out / f"lowres_{i:04d}.png").size == (8, 8)


def _one_line_exit_2(argv: list[str], capsys, match: str) -> None:
    with pytest.raises(SystemExit) as exc:
        sample_main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and match in err, err


def test_bad_input_exits_2_with_one_line(tiny_run, up_run, tmp_path, capsys):
    cfg = tiny_config(tmp_path, "data.resolution=32", "model.upsample=true", "upsample.factor=2", "model.num_classes=12")
    write_checkpoint(Denoiser(cfg.model, 32, 12), cfg, tmp_path / "up32")  # expects 16 px, the base makes 8
    _one_line_exit_2(["--checkpoint", str(tiny_run), "--upsampler", str(tmp_path / "up32"), "--out", str(tmp_path)],
                     capsys, "chain")
    (tmp_path / "notes.png").write_text("not an image")
    _one_line_exit_2(["--checkpoint", str(up_run), "--low-res", str(tmp_path / "notes.png"), "--out", str(tmp_path)],
                     capsys, "not an image")
    _one_line_exit_2(["--checkpoint", str(tiny_run), "--upsampler", str(up_run), "--aug-level", "1.5",
                      "--out", str(tmp_path)], capsys, "--aug-level")
    _one_line_exit_2(["--checkpoint", str(up_run), "--out", str(tmp_path)], capsys, "--low-res")
    _one_line_exit_2(["--checkpoint", str(tiny_run), "--no-consistency", "--out", str(tmp_path)], capsys, "--upsampler")
    with pytest.raises(Exception, match="cannot both"):
        tiny_config(tmp_path, "model.inpaint=true", "model.upsample=true")


def test_evaluate_upsample_writes_the_table_and_grid(up_run, tmp_path, capsys):
    from diffusion.evaluate.__main__ import main as evaluate_main

    out = tmp_path / "eval"
    evaluate_main(["upsample", "--checkpoint", str(up_run), "--num-images", "3", "--steps", "2",
                   "--aug-levels", "0,0.5", "--out", str(out), "--save-images"])
    rows = list(csv.DictReader(open(out / "upsample.csv")))
    assert [r["method"] for r in rows] == ["bicubic", "bilinear", *["diffusion", "diffusion+consistency"] * 2]
    bicubic = rows[0]
    assert float(bicubic["detail"]) < 1 and float(bicubic["consistency_psnr"]) > 20  # blurry but consistent
    for plain, projected in (rows[2:4], rows[4:6]):
        assert float(projected["consistency_psnr"]) > 40 > float(plain["consistency_psnr"])
    assert (out / "upsample.md").is_file() and Image.open(out / "upsample_grid.png").size[0] > 16 * 5
    for folder in ("bicubic", "bilinear", "sr_0", "sr_0_consistency", "sr_0.5", "sr_0.5_consistency"):  # for FID/KID
        assert sorted(p.name for p in (out / folder).iterdir()) == ["0000.png", "0001.png", "0002.png"], folder
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(high_frequency_power(image), high_frequency_power(image.clone()))
    with pytest.raises(SystemExit):
        evaluate_main(["upsample", "--checkpoint", str(up_run), "--aug-levels", "2", "--out", str(out)])
    assert "--aug-levels" in capsys.readouterr().err


def test_shapes_accuracy_of_a_cascade_writes_no_files(tiny_run, up_run, tmp_path, monkeypatch, capsys):
    from diffusion.evaluate.__main__ import main as evaluate_main

    monkeypatch.chdir(tmp_path)  # sample.py's default --out (samples/) is relative
    evaluate_main(["shapes-accuracy", "--checkpoint", str(tiny_run), "--upsampler", str(up_run), "--num-samples", "12",
                   "--steps", "2", "--upsampler-steps", "2", "--detect-resolution", "8"])
    assert "accuracy" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
