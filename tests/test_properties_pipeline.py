"""GuidedDiffusionPipeline.__call__ on generated arguments: images in range, as many as asked, of the
asked class; or a ValueError / TypeError whose one line names the argument (the checks sample.py
uses, diffusion.cli.args); never a tensor error from deep inside the sampler."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusion.cli.args import BadValue
from diffusion.pipeline import GuidedDiffusionPipeline, export_scheduler
from tests.conftest import tiny_config

ARGUMENTS = ("class_labels", "prompt", "guidance_scale", "num_inference_steps", "batch_size", "generator", "seed",
             "sampler", "output_type", "return_dict")
UNKNOWN = ("eta", "guidance_interval")  # not arguments of this pipeline: Python's TypeError names them

NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 5), st.booleans())
JUNK = st.one_of(st.none(), st.text(max_size=6), NUMBERS, st.lists(st.integers(0, 3), max_size=2))
LABEL = st.one_of(st.integers(-2, 13), st.integers(-2, 13), st.floats(-1, 13), st.booleans(),
                  st.lists(st.integers(0, 11), max_size=2), st.text(max_size=2))
GENERATOR = st.integers(0, 100).map(lambda s: torch.Generator().manual_seed(s))

VALID = {  # (values a caller means, neighbours that must be refused), drawn 3:1
    "class_labels": (st.one_of(st.none(), st.integers(0, 11), st.lists(st.integers(0, 11), min_size=1, max_size=3),
                               st.lists(st.integers(0, 11), min_size=1, max_size=3).map(torch.tensor)),
                     st.one_of(st.integers(-2, 13), st.lists(LABEL, max_size=3), st.just(torch.tensor([1.0, 2.0])),
                               st.just(np.array([[1, 2]])), JUNK)),
    "prompt": (st.one_of(st.none(), st.text(max_size=12), st.lists(st.text(max_size=8), min_size=1, max_size=3)),
               st.one_of(st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=2), JUNK)),
    "guidance_scale": (st.sampled_from([0.0, 1.0, 3.0, 2]), st.one_of(NUMBERS, JUNK)),
    "num_inference_steps": (st.sampled_from([2, 3]),
                            st.sampled_from([-1, 0, 2.5, 3.0, float("nan"), "3", True, None, 101, 10**9])),
    "batch_size": (st.one_of(st.none(), st.integers(1, 4)), st.one_of(st.integers(-2, 0), st.just(10**15), JUNK)),
    "generator": (st.one_of(st.none(), GENERATOR, st.lists(GENERATOR, min_size=1, max_size=4)), JUNK),
    "seed": (st.one_of(st.none(), st.integers(0, 5)), st.one_of(st.integers(-2, -1), st.just(2**63), JUNK)),
    "sampler": (st.sampled_from(["ddim", "ddpm", "dpmsolver", "heun", "euler", None]),
                st.one_of(st.sampled_from(["bogus", "DDIM"]), JUNK)),
    "output_type": (st.sampled_from(["pil", "np", "pt"]), st.one_of(st.sampled_from(["latent", "numpy"]), JUNK)),
    "return_dict": (st.booleans(), JUNK),
}
VALUES = {name: st.one_of(good, good, good, bad) for name, (good, bad) in VALID.items()}


def examples(cases: list[dict]):
    """hypothesis.example for each case (with the tiny step count), so every listed case runs every time."""
    def decorate(test):
        for case in reversed(cases):
            test = example(kwargs={"num_inference_steps": 2, **case})(test)
        return test
    return decorate


@st.composite
def call_arguments(draw, allowed: tuple[str, ...]) -> dict:
    names = draw(st.lists(st.sampled_from(allowed), max_size=4, unique=True))
    kwargs = {name: draw(VALUES[name]) for name in names}
    if draw(st.sampled_from(range(10))) == 7:
        kwargs[draw(st.sampled_from(UNKNOWN))] = 0.0
    kwargs.setdefault("num_inference_steps", 2)
    return kwargs


def expected_batch(kwargs: dict, given_name: str | None) -> int:
    given_value, batch_size = kwargs.get(given_name) if given_name else None, kwargs.get("batch_size")
    if isinstance(given_value, (list, tuple, torch.Tensor)):
        return len(given_value)
    return batch_size or 1


def check_call(pipe: GuidedDiffusionPipeline, kwargs: dict, given_name: str | None, seen: list) -> None:
    """The contract: images in range, as many as asked, of the asked class (the labels the U-Net was
    given); or a ValueError / TypeError naming an argument that was passed. `given_name`: the condition
    this model reads (class_labels or prompt; None: neither), so the other must have been refused."""
    seen.clear()
    try:
        out = pipe(**kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        assert "\n" not in message, message
        assert isinstance(err, BadValue) or "unexpected keyword argument" in message, repr(err)
        assert any(name in message for name in kwargs), message
        return
    for name in ("class_labels", "prompt"):
        assert name == given_name or kwargs.get(name) is None, f"{name} was accepted by a model that ignores it"
    scale = kwargs.get("guidance_scale", 3.0)
    assert isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale >= 0
    steps = kwargs["num_inference_steps"]
    assert isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
    images = out.images if kwargs.get("return_dict", True) else out[0]
    n = expected_batch(kwargs, given_name)
    kind = kwargs.get("output_type", "pil")
    if kind == "pil":
        assert len(images) == n and all(isinstance(i, Image.Image) and i.size == (8, 8) for i in images)
    else:
        array = images.numpy() if kind == "pt" else images
        assert array.shape == ((n, 3, 8, 8) if kind == "pt" else (n, 8, 8, 3)), array.shape
        assert np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1
    labels = kwargs.get("class_labels")
    if labels is not None and scale != 0:  # scale 0 runs the null class alone
        asked = torch.as_tensor(labels).reshape(-1).tolist()
        asked = asked * n if len(asked) == 1 and n > 1 else asked
        assert seen and seen[0][:n].tolist() == asked


def recording(pipe: GuidedDiffusionPipeline) -> list:
    """The class_labels of every U-Net call, for checking the asked class was drawn."""
    seen: list = []
    pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"]) if kwargs.get("class_labels") is not None
        and kwargs["class_labels"].dtype == torch.long else None, with_kwargs=True)
    return seen


@pytest.fixture(scope="module")
def class_pipe(tiny_run):
    pipe = GuidedDiffusionPipeline.from_pretrained(tiny_run / "final")
    pipe.set_progress_bar_config(disable=True)
    return pipe, recording(pipe)


def untrained_pipe(tmp_path_factory, *overrides: str, config: str = "configs/shapes.yaml") -> GuidedDiffusionPipeline:
    """A pipeline of an untrained tiny model (enough for argument handling), without a training run."""
    from diffusion.models import build_model
    from diffusion.sampling.schedule import build_train_scheduler

    cfg = tiny_config(tmp_path_factory.mktemp("pipe"), *overrides, config=config)
    model = build_model(cfg).eval()
    scheduler = export_scheduler(cfg.diffusion, build_train_scheduler(cfg.diffusion))
    pipe = GuidedDiffusionPipeline(unet=model.unet, scheduler=scheduler, text_encoder=getattr(model, "text_encoder", None))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def text_pipe(tmp_path_factory):
    return untrained_pipe(tmp_path_factory, "model.text.width=16", "model.text.layers=1",
                          "model.text.context_length=8", config="configs/shapes_text.yaml")


@pytest.fixture(scope="module")
def uncond_pipe(tmp_path_factory):
    return untrained_pipe(tmp_path_factory, config="configs/shapes_uncond.yaml")


ISSUE_34 = [  # the cases the issue found, and neighbours; each must be refused naming the argument
    dict(guidance_scale=float("nan")), dict(guidance_scale=float("inf")), dict(prompt="a red circle"),
    dict(prompt=["a red circle"], class_labels=[1]), dict(class_labels=[1.7]), dict(class_labels=1.7),
    dict(class_labels=torch.tensor([1.7])), dict(num_inference_steps=2.5), dict(class_labels=[1, 2], batch_size=3),
    dict(batch_size=-2), dict(class_labels=[[1, 2], [3]]), dict(class_labels=[[1, 2], [3, 4]]), dict(class_labels=[True]),
    dict(class_labels=[-1]), dict(class_labels=[12]), dict(class_labels=[]), dict(seed=1.5), dict(eta=0.0),
    dict(generator=[torch.Generator()] * 3, class_labels=[1, 2]), dict(output_type="latent"), dict(return_dict="no"),
    dict(class_labels=2, batch_size=3, guidance_scale=3.0),  # works: one label, repeated
]


@settings(max_examples=100)  # a call is 2-3 steps of an 8 px model: milliseconds
@given(kwargs=call_arguments(ARGUMENTS))
@examples(ISSUE_34)
def test_class_pipeline_on_generated_arguments(class_pipe, kwargs):
    pipe, seen = class_pipe
    check_call(pipe, kwargs, "class_labels", seen)


@given(kwargs=call_arguments(tuple(a for a in ARGUMENTS if a != "class_labels") + ("class_labels",)))
def test_caption_pipeline_on_generated_arguments(text_pipe, kwargs):
    check_call(text_pipe, kwargs, "prompt", [])


@given(kwargs=call_arguments(ARGUMENTS))
def test_unconditional_pipeline_on_generated_arguments(uncond_pipe, kwargs):
    check_call(uncond_pipe, kwargs, None, [])
