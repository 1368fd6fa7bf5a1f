"""Published diffusers pipeline folders (docs/pretrained.md): read, sampled sample-for-sample as diffusers'
own DDPMPipeline samples them, guided, in-painted, fine-tuned and refused, offline.

The folders are written in the hub's layout by diffusers itself (`DDPMPipeline(unet, scheduler).save_pretrained`)
or, for google/ddpm-cifar10-32, in its flat layout, from the model cards' config.json and
scheduler_config.json; a tiny U-Net trained here (shapes, 8 px) stands in for the real weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from diffusion.checkpoints import diffusers_folder as folders
from diffusion.checkpoints.load import load_model
from diffusion.cli.sample import main as sample_main
from diffusion.conditioning.inpaint import methods
from diffusion.config import DiffusionConfig, from_dict, load_config
from diffusion.errors import UserError
from diffusion.sampling.plan import SampleItem, SamplerSettings, SamplingPlan, run_plan
from diffusion.sampling.schedule import NoiseSchedule, SamplingRules
from diffusion.training.trainer import train
from tests.conftest import ROOT, cli_result, tiny_config

# google/ddpm-cifar10-32, as its model card's files have them (diffusers 0.0.4 / 0.1.1 keys)
CIFAR_UNET = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CIFAR_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                   "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
                   "trained_betas": None, "variance_type": "fixed_large"}
CIFAR_INDEX = {"_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1", "scheduler": ["diffusers", "DDPMScheduler"],
               "unet": ["diffusers", "UNet2DModel"]}
# google/ddpm-celebahq-256 (and ddpm-ema-church-256, ddpm-cat-256: the same U-Net)
CELEBAHQ_UNET = {**CIFAR_UNET, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256,
                 "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}
CELEBAHQ_SCHEDULER = {**CIFAR_SCHEDULER, "variance_type": "fixed_small"}
# the scheduler of a folder whose U-Net was trained here (configs/shapes_uncond.yaml: cosine, v-prediction)
SHAPES_SCHEDULER = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "variance_type": "fixed_small"}


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def write_folder(path: Path, unet: UNet2DModel, scheduler: dict) -> Path:
    """A pipeline folder as diffusers itself saves one."""
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**_public(scheduler))).save_pretrained(path)
    return path


def config_only_folder(path: Path, unet: dict, scheduler: dict, index: dict = CIFAR_INDEX, flat: bool = False) -> Path:
    """A folder with the configs alone (no weights): enough for everything that reads configs."""
    unet_dir, sched_dir = (path, path) if flat else (path / "unet", path / "scheduler")
    for folder in (unet_dir, sched_dir):
        folder.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps(index))
    (unet_dir / "config.json").write_text(json.dumps(unet))
    (sched_dir / "scheduler_config.json").write_text(json.dumps(scheduler))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny unconditional shapes run (4 steps) and its U-Net saved by diffusers under two schedulers."""
    root = tmp_path_factory.mktemp("pretrained")
    train(tiny_config(root / "run", "train.max_steps=4", config="configs/shapes_uncond.yaml"))
    unet = UNet2DModel.from_pretrained(root / "run" / "final" / "unet")
    return {"run": root / "run", "unet": root / "run" / "final" / "unet",
            "cifar": write_folder(root / "cifar", unet, CIFAR_SCHEDULER),
            "shapes": write_folder(root / "shapes", unet, SHAPES_SCHEDULER)}


def ours(folder: Path, sampler: str, steps: int, seeds: list[int], **load) -> torch.Tensor:
    """sample.py's images (before PNG quantisation) in [0, 1]: sample i from seed i."""
    loaded = load_model(folder)
    images = run_plan(loaded, SamplingPlan([SampleItem(seed=s) for s in seeds]), SamplerSettings(sampler, steps, 1.0, 4),
                      bar=False)
    return (images / 2 + 0.5).clamp(0, 1)


def theirs(pipe: DDPMPipeline, steps: int, seeds: list[int]) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return torch.cat([pipe(batch_size=1, generator=torch.Generator().manual_seed(s), num_inference_steps=steps,
                           output_type="pt").images for s in seeds])


def test_model_cards_map_onto_our_config(tmp_path):
    """The real hub configs (flat layout for CIFAR-10, sub-folders for CelebA-HQ) give the schedule and size."""
    cifar = folders.folder_config(config_only_folder(tmp_path / "cifar", CIFAR_UNET, CIFAR_SCHEDULER, flat=True))
    assert cifar.data.resolution == 32 and cifar.model.condition == "none"
    d = cifar.diffusion
    assert (d.beta_schedule, d.beta_start, d.beta_end, d.num_train_timesteps, d.prediction_type) == (
        "linear", 0.0001, 0.02, 1000, "epsilon")
    assert (d.variance_type, d.clip_sample, d.clip_sample_range, d.timestep_spacing, d.steps_offset) == (
        "fixed_large", True, 1.0, "leading", 0)  # DDPMScheduler's defaults where the 0.1.1 file is silent
    assert json.loads(cifar.model.unet_config) == _public(CIFAR_UNET)
    celeba = folders.folder_config(config_only_folder(tmp_path / "celeba", CELEBAHQ_UNET, CELEBAHQ_SCHEDULER))
    assert celeba.data.resolution == 256 and celeba.diffusion.variance_type == "fixed_small"
    pndm = folders.folder_config(config_only_folder(
        tmp_path / "pndm", CIFAR_UNET, {"_class_name": "PNDMScheduler", "beta_schedule": "linear", "num_train_timesteps": 1000},
        {**CIFAR_INDEX, "_class_name": "PNDMPipeline", "scheduler": ["diffusers", "PNDMScheduler"]}))
    assert pndm.diffusion.clip_sample is False  # PNDM has no x0 clipping
    nested = folders.folder_config(config_only_folder(tmp_path / "nested", CIFAR_UNET, CIFAR_SCHEDULER))
    assert nested.model == cifar.model and nested.diffusion == cifar.diffusion  # sub-folders or flat: one config


@pytest.mark.parametrize("name,scheduler", [
    ("cifar", CIFAR_SCHEDULER),  # fixed_large, leading, clip
    ("celebahq", CELEBAHQ_SCHEDULER),  # fixed_small
    ("v-scaled-linspace", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                           "prediction_type": "v_prediction", "clip_sample": False, "timestep_spacing": "linspace",
                           "variance_type": "fixed_small_log"}),
    ("x0-threshold-offset", {"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.5,
                             "steps_offset": 1, "variance_type": "fixed_small"}),
])
def test_ddpm_matches_diffusers_pipeline_sample_for_sample(trained, tmp_path, name, scheduler):
    """DDPM, 50 steps, same seeds: betas, prediction type, clipping or thresholding, variance type and
    timestep spacing all as diffusers' own DDPMPipeline samples the folder."""
    folder = trained["cifar"] if name == "cifar" else write_folder(
        tmp_path / name, UNet2DModel.from_pretrained(trained["unet"]), scheduler)
    seeds, steps = [5], 20  # CPU time: the 50-step check is test_sample_cli_pngs_equal_the_pipeline's
    reference = theirs(DDPMPipeline.from_pretrained(folder), steps, seeds)
    # float tolerance: x0 ("sample") models go x0 -> eps -> x0, which scales fp32 round-off by 1 / sqrt(ab)
    assert torch.allclose(ours(folder, "ddpm", steps, seeds), reference, atol=1e-4), name


def test_sample_cli_pngs_equal_the_pipeline(trained, tmp_path):
    out = tmp_path / "samples"
    sample_main(["--checkpoint", str(trained["cifar"]), "--sampler", "ddpm", "--steps", "50", "--num-samples", "2",
                 "--seed", "3", "--out", str(out)])
    pipe = DDPMPipeline.from_pretrained(trained["cifar"])
    reference = theirs(pipe, 50, [3, 4]).permute(0, 2, 3, 1).numpy() * 255
    for i in range(2):
        png = np.asarray(Image.open(out / f"sample_{i:04d}.png"), dtype=np.float64)
        assert np.abs(png - reference[i]).max() <= 1.0  # PNG quantisation: within one level


def test_our_export_samples_the_same_in_diffusers_ddpm_pipeline(trained):
    """Round trip: a run's final/ in diffusers' DDPMPipeline equals sample.py --sampler ddpm on the run."""
    final = trained["run"] / "final"
    index = json.loads((final / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    pipe = DDPMPipeline.from_pretrained(final)
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    assert torch.allclose(ours(trained["run"], "ddpm", 20, [0]), theirs(pipe, 20, [0]), atol=1e-4)


def test_every_sampler_and_the_pipeline_class_read_the_folder(trained):
    from diffusion.pipeline import GuidedDiffusionPipeline

    for sampler in ("ddim", "dpmsolver", "heun", "euler"):
        images = ours(trained["cifar"], sampler, 2, [0])
        assert images.shape == (1, 3, 8, 8) and torch.isfinite(images).all(), sampler
    pipe = GuidedDiffusionPipeline.from_pretrained(trained["cifar"])
    schedule = pipe.schedule()
    assert schedule.rules.variance_type == "fixed_large" and schedule.rules.timestep_spacing == "leading"
    out = pipe(num_inference_steps=10, seed=0, sampler="ddpm", output_type="pt").images
    assert torch.allclose(out, theirs(DDPMPipeline.from_pretrained(trained["cifar"]), 10, [0]), atol=1e-4)


def test_repaint_and_replace_keep_the_known_pixels(trained):
    loaded = load_model(trained["shapes"])
    g = torch.Generator().manual_seed(0)
    image, keep = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    for method, sampler in (("replace", "ddim"), ("repaint", "ddpm")):
        out = methods.run_inpainting(loaded, image, keep, method, SamplerSettings(sampler, 4), jump_length=2,
                                     jump_n_sample=2)
        known = keep.expand(-1, 3, -1, -1) > 0
        assert torch.equal(out[known], image[known]), method
        assert not torch.equal(out[~known], image[~known])


def test_classifier_trained_on_the_folders_schedule_guides_it(trained, tmp_path):
    """`diffusion.from_pretrained=FOLDER` gives the guide the folder's schedule; guidance then raises how
    likely the classifier (at t = 0) finds the asked class in the samples."""
    clf = tmp_path / "clf"
    args = ["model.base_channels=8", "model.attention_resolutions=[4]", "model.pool=mean", "train.batch_size=16",
            "train.lr=0.003", "train.ema_decay=0.5", "train.checkpoint_every=1000", "data.shapes_size=256",
            "train.max_steps=8", f"diffusion.from_pretrained={trained['shapes']}", "diffusion.num_train_timesteps=1000"]
    cfg = tiny_config(clf, *args, config="configs/classifier_shapes.yaml")
    assert cfg.diffusion.timestep_spacing == "leading" and cfg.diffusion.prediction_type == "v_prediction"
    train(cfg)
    guide, denoiser = load_model(clf), load_model(trained["shapes"])
    assert torch.equal(guide.schedule.table, denoiser.schedule.table)
    from tests.test_classifier import plan_for

    def judged(scale: float) -> float:
        plan = plan_for(["--classifier", str(clf), "--class-label", "4", "--classifier-scale", str(scale),
                         "--num-samples", "8"], denoiser)
        images = run_plan(denoiser, plan, SamplerSettings("ddim", 5, 1.0, 8), bar=False)
        with torch.no_grad():
            return guide.model.log_prob(images, torch.zeros(8, dtype=torch.long), torch.full((8,), 4)).mean().item()

    assert judged(20.0) > judged(0.0)


def test_finetune_to_inpainting_from_the_folder(trained, tmp_path, capsys):
    """init_from a diffusers folder: its U-Net layout and schedule, widened to the mask channels."""
    run = tmp_path / "inpaint"
    cfg = tiny_config(run, "train.max_steps=2", f"init_from={trained['shapes']}", "model.condition=none",
                      "diffusion.num_train_timesteps=1000", config="configs/inpaint_shapes.yaml")
    assert json.loads(cfg.model.unet_config)["block_out_channels"] == [16, 32]
    assert cfg.diffusion.timestep_spacing == "leading"
    train(cfg)
    assert "widened unet.conv_in.weight" in capsys.readouterr().out
    loaded = load_model(run)
    assert loaded.model.unet.config.in_channels == 7 and loaded.cfg.model.inpaint
    g = torch.Generator().manual_seed(1)
    image, keep = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    out = methods.run_inpainting(loaded, image, keep, "channels", SamplerSettings("ddim", 3))
    assert torch.equal(out[keep.expand(-1, 3, -1, -1) > 0], image[keep.expand(-1, 3, -1, -1) > 0])
    with pytest.raises(UserError, match=r"conflicts with the scheduler .*diffusion.beta_schedule=linear"):
        tiny_config(run, f"init_from={trained['shapes']}", "model.condition=none", "diffusion.beta_schedule=linear",
                    "diffusion.num_train_timesteps=1000", config="configs/inpaint_shapes.yaml")
    with pytest.raises(UserError, match="model.condition=class"):
        tiny_config(run, f"init_from={trained['shapes']}", "diffusion.num_train_timesteps=1000",
                    config="configs/inpaint_shapes.yaml")


REFUSALS = [
    ("conditional", {**CIFAR_INDEX, "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
     CIFAR_SCHEDULER, "conditional U-Net"),
    ("latent-vae", {**CIFAR_INDEX, "vae": ["diffusers", "AutoencoderKL"]}, CIFAR_SCHEDULER, "latent diffusion"),
    ("latent-vqvae", {**CIFAR_INDEX, "_class_name": "LDMPipeline", "vqvae": ["diffusers", "VQModel"]}, CIFAR_SCHEDULER,
     "pixel space"),
    ("text-encoder", {**CIFAR_INDEX, "text_encoder": ["transformers", "CLIPTextModel"]}, CIFAR_SCHEDULER,
     "does not drive"),
    ("learned-variance", CIFAR_INDEX, {**CIFAR_SCHEDULER, "variance_type": "learned_range"}, "learned_range"),
    ("zero-snr", CIFAR_INDEX, {**CIFAR_SCHEDULER, "rescale_betas_zero_snr": True}, "zero terminal SNR"),
    ("edm-scheduler", {**CIFAR_INDEX, "scheduler": ["diffusers", "EDMEulerScheduler"]},
     {"_class_name": "EDMEulerScheduler"}, "not a DDPM-style scheduler"),
    ("beta-schedule", CIFAR_INDEX, {**CIFAR_SCHEDULER, "beta_schedule": "exponential"}, "beta_schedule"),
    ("bad-betas", CIFAR_INDEX, {**CIFAR_SCHEDULER, "trained_betas": [0.5] * 10}, "trained_betas"),
]


@pytest.mark.parametrize("name,index,scheduler,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_one_line(tmp_path, capsys, name, index, scheduler, message):
    folder = config_only_folder(tmp_path / name, CIFAR_UNET, scheduler, index)
    status, lines, _ = cli_result(sample_main, ["--checkpoint", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_hub_name_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder named google/
    status, lines, _ = cli_result(sample_main, ["--checkpoint", "google/ddpm-cifar10-32"], capsys)
    assert status == 2 and len(lines) == 1, lines
    assert "google/ddpm-cifar10-32" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "local folder" in lines[0]


def test_hub_name_downloads_through_snapshot_download(trained, tmp_path, monkeypatch, capsys):
    """The hub client mocked at its boundary: the name goes to snapshot_download, its folder is read; a
    network failure is one line."""
    import huggingface_hub

    calls = []

    def fake(name, **kwargs):
        calls.append((name, kwargs))
        return str(trained["cifar"])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = load_model("google/ddpm-cifar10-32")
    assert loaded.cfg.diffusion.variance_type == "fixed_large" and calls[0][0] == "google/ddpm-cifar10-32"
    assert calls[0][1]["local_files_only"] is False and "*.safetensors" in calls[0][1]["allow_patterns"]

    def unreachable(name, **kwargs):
        raise OSError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    status, lines, _ = cli_result(sample_main, ["--checkpoint", "google/ddpm-cifar10-32"], capsys)
    assert status == 2 and len(lines) == 1 and "cannot be reached" in lines[0] and "local folder" in lines[0]
    (tmp_path / "runs").mkdir()  # owner/name under an existing local folder is a local path, never a hub name
    with pytest.raises(UserError, match="checkpoint not found: runs/missing"):
        load_model("runs/missing")


def test_shipped_cifar_configs_take_the_cifar_model(tmp_path):
    """configs/classifier_cifar10.yaml and configs/inpaint_cifar10.yaml agree with google/ddpm-cifar10-32's schedule."""
    folder = config_only_folder(tmp_path / "cifar", CIFAR_UNET, CIFAR_SCHEDULER, flat=True)
    cfg = load_config(ROOT / "configs/classifier_cifar10.yaml", [f"diffusion.from_pretrained={folder}"], prepare=folders.fill_from_pretrained)
    assert cfg.diffusion.variance_type == "fixed_large" and cfg.diffusion.beta_schedule == "linear"
    with pytest.raises(UserError, match="diffusion.beta_schedule=cosine"):
        load_config(ROOT / "configs/classifier_shapes.yaml", [f"diffusion.from_pretrained={folder}"], prepare=folders.fill_from_pretrained)


SCHEDULES = st.fixed_dictionaries({
    "num_train_timesteps": st.integers(10, 1000),
    "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]),
    "beta_start": st.floats(1e-5, 1e-3), "beta_end": st.floats(5e-3, 0.03),
    "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction"]),
    "clip_sample": st.booleans(), "clip_sample_range": st.floats(0.5, 4.0),
    "timestep_spacing": st.sampled_from(["leading", "trailing", "linspace"]), "steps_offset": st.integers(0, 1),
    "variance_type": st.sampled_from(["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"]),
})


@given(SCHEDULES, st.floats(0.0, 1.0))
def test_generated_scheduler_configs_give_diffusers_tables_and_timesteps(config, fraction):
    settings = folders.settings_of_scheduler(config, "DDPMScheduler", "generated")
    schedule = NoiseSchedule.from_config(from_dict(DiffusionConfig, settings))
    reference = DDPMScheduler(**config)
    assert torch.equal(schedule.table[:-1], reference.alphas_cumprod)
    assert schedule.prediction_type == config["prediction_type"]
    steps = max(1, round(fraction * config["num_train_timesteps"]))
    rules = SamplingRules.from_config(from_dict(DiffusionConfig, settings))
    try:
        reference.set_timesteps(steps)
    except ValueError:
        return
    expected = reference.timesteps.tolist()[:steps]
    if expected[0] >= config["num_train_timesteps"]:  # steps_offset past the end: we refuse in one line
        with pytest.raises(UserError, match="past the model's last"):
            rules.timesteps(config["num_train_timesteps"], steps)
        return
    assert rules.timesteps(config["num_train_timesteps"], steps) == expected
    assert rules.large_variance == config["variance_type"].startswith("fixed_large")

