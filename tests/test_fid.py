"""FID/KID harness: the metric's sanity, the reference cache, sampling from a checkpoint, offline Inception."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusion.config import load_config
from diffusion.data.shapes import ShapesDataset
from diffusion.evaluate.__main__ import main
from diffusion.sampling.images import save_png
from diffusion.checkpoints import store as ckpt
from diffusion.training.tasks import build_task


class PoolFeatures(torch.nn.Module):
    """A tiny extractor: 4x4 average colours and their squares (96-d), from uint8 images."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)
        return torch.cat([x, x * x], dim=1)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("extractor") / "pool.pt"
    torch.jit.script(PoolFeatures()).save(str(path))
    return path


def write_images(directory: Path, resolution: int, count: int, split: str = "train", noise: float = 0.0) -> Path:
    data = ShapesDataset(resolution, size=count, seed=3, split=split)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        image = data[i]["image"]
        if noise:
            image = image + noise * torch.randn(image.shape, generator=generator)
        save_png(image, directory / f"img_{i:03d}.png", {})
    return directory


def fid(tmp_path: Path, samples: Path, reference: Path, extractor: Path, *extra: str) -> dict:
    out = tmp_path / f"report_{len(list(tmp_path.glob('report_*')))}.json"
    main(["fid", "--samples", str(samples), "--reference", str(reference), "--feature-extractor", str(extractor),
          "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--workers", "0", "--batch-size", "32",
          "--kid-subsets", "10", *extra])
    return json.loads(out.read_text())


def test_fid_is_zero_against_itself_and_rises_with_noise(tmp_path, extractor):
    clean = write_images(tmp_path / "clean", 16, 120)
    noisy = write_images(tmp_path / "noisy", 16, 120, noise=0.5)
    other = write_images(tmp_path / "other", 16, 120, split="test")
    same = fid(tmp_path, clean, clean, extractor)
    assert same["n"] == 120 and abs(same["fid"]) < 1e-6 and abs(same["kid_mean"]) < 1e-2
    fresh = fid(tmp_path, other, clean, extractor)["fid"]
    noised = fid(tmp_path, noisy, clean, extractor)["fid"]
    assert 0 < fresh < noised, (fresh, noised)
    for key in ("n", "fid", "kid_mean", "kid_std", "sampler", "steps", "guidance_scale", "reference", "feature_extractor"):
        assert key in same
    assert same["feature_extractor"]["name"] == "torchscript pool.pt"


def test_reference_cache_is_reused_and_keyed_by_resolution(tmp_path, extractor, capsys):
    reference = write_images(tmp_path / "ref", 16, 60)
    samples16 = write_images(tmp_path / "s16", 16, 20, split="test")
    samples8 = write_images(tmp_path / "s8", 8, 20, split="test")
    first = fid(tmp_path, samples16, reference, extractor)
    second = fid(tmp_path, samples16, reference, extractor)
    assert not first["reference"]["cached"] and second["reference"]["cached"]
    assert first["reference"]["cache_key"] == second["reference"]["cache_key"]
    assert first["fid"] == pytest.approx(second["fid"])
    small = fid(tmp_path, samples8, reference, extractor)
    assert not small["reference"]["cached"] and small["reference"]["cache_key"]["resolution"] == 8
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    assert "cached" in capsys.readouterr().out


def tiny_checkpoint(root: Path) -> Path:
    cfg = load_config("configs/shapes.yaml", ["data.resolution=8", "model.base_channels=8", "model.channel_mult=[1]",
                                              "model.attention_resolutions=[]", "model.attention_head_dim=8", "model.num_classes=12",
                                              f"output_dir={root}"])
    model = build_task(cfg).build_model()
    tmp, final = root / ".tmp-final", root / "final"
    tmp.mkdir(parents=True)
    ckpt.write_weights(tmp / ckpt.EMA_FILE, ckpt.named_weights(model))
    ckpt.finish_checkpoint(tmp, final, cfg, ckpt.TrainState(), keep=0)
    return final


def test_samples_from_a_checkpoint_are_seeded_balanced_pngs(tmp_path, extractor, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "run")
    args = ["fid", "--samples", str(checkpoint), "--num-samples", "24", "--sampler", "ddim", "--steps", "2",
            "--guidance-scale", "1", "--reference-num", "40", "--feature-extractor", str(extractor),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json"), "--workers", "0"]
    main(args)
    report = json.loads((tmp_path / "r.json").read_text())
    pngs = sorted((tmp_path / "r_samples").glob("*.png"))
    assert report["n"] == 24 and len(pngs) == 24
    assert report["sampler"] == "ddim" and report["steps"] == 2 and report["guidance_scale"] == 1.0
    assert report["reference"]["reference"].startswith("shapes:train") and report["reference"]["resolution"] == 8
    from PIL import Image

    labels = [Image.open(p).text["label"] for p in pngs]
    assert sorted(labels.count(str(c)) for c in range(12)) == [2] * 12  # classes cycle
    main(args)  # a second run reuses the PNGs and the reference statistics
    assert "reusing 24 matching samples" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["fid"] == pytest.approx(report["fid"])


def test_offline_inception_gives_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch_fidelity")
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_network)
    samples = write_images(tmp_path / "s", 8, 4)
    with pytest.raises(SystemExit) as exit_info:
        main(["fid", "--samples", str(samples), "--reference", str(samples), "--cache-dir", str(tmp_path / "cache")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "--inception-weights" in err and "--feature-extractor" in err


def test_bad_feature_extractor_is_one_line(tmp_path, capsys):
    samples = write_images(tmp_path / "s", 8, 4)
    bogus = tmp_path / "features.pt"
    bogus.write_text("not a module")
    with pytest.raises(SystemExit) as exit_info:
        main(["fid", "--samples", str(samples), "--reference", str(samples), "--feature-extractor", str(bogus)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TorchScript" in err
