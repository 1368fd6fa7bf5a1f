"""RUN/final loads as a diffusers DiffusionPipeline that samples with class or caption CFG."""
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from diffusion.pipeline import GuidedDiffusionPipeline
from tests.conftest import tiny_config


def test_class_run_final_is_a_pipeline(tiny_run):
    pipe = GuidedDiffusionPipeline.from_pretrained(tiny_run / "final")
    assert isinstance(pipe, DiffusionPipeline) and pipe.text_encoder is None
    pipe.set_progress_bar_config(disable=True)

    def draw(**kwargs):
        return pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(0), **kwargs).images

    images = draw(class_labels=[2, 5], guidance_scale=3.0)
    assert len(images) == 2 and images[0].size == (8, 8)
    again = draw(class_labels=[2, 5], guidance_scale=3.0)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))  # seeded
    guided = draw(class_labels=[2, 5], guidance_scale=3.0, output_type="pt")
    plain = draw(class_labels=[2, 5], guidance_scale=1.0, output_type="pt")
    unconditional = draw(class_labels=[2, 5], guidance_scale=0.0, output_type="pt")
    null = draw(batch_size=2, output_type="pt")  # no labels: the learned null class
    assert guided.shape == (2, 3, 8, 8) and not torch.equal(guided, plain)
    torch.testing.assert_close(unconditional, null)
    with pytest.raises(ValueError, match="class_labels must be in 0..11"):
        pipe(class_labels=[12], num_inference_steps=2)


def test_caption_run_final_is_a_pipeline(tmp_path):
    from diffusion.training.trainer import train

    text = ["model.text.width=16", "model.text.layers=1", "model.text.context_length=8", "train.max_steps=2"]
    train(tiny_config(tmp_path, *text, config="configs/shapes_text.yaml"))
    pipe = GuidedDiffusionPipeline.from_pretrained(tmp_path / "final")
    assert pipe.text_encoder is not None
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["a red circle", "a blue square"], guidance_scale=3.0, num_inference_steps=2,
               generator=torch.Generator().manual_seed(1), output_type="np").images
    assert out.shape == (2, 8, 8, 3) and np.isfinite(out).all()
