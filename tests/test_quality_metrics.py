"""Precision, recall, density, coverage and class accuracy (issue 31): known answers on synthetic
features and on real (shapes) images, the bootstrap intervals, and `evaluate fid` end to end."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from diffusion.evaluate.__main__ import main
from diffusion.evaluate.quality import NEAREST_K, fid_interval, frechet_distance, knn_radii, prdc, wilson_interval
from diffusion.sampling.images import save_png
from tests.conftest import cli_result
from tests.test_fid import PoolFeatures, tiny_checkpoint


def gaussians(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift


def mixture(n: int, modes: list[int], seed: int) -> torch.Tensor:
    """n points in 2-d from unit Gaussians around 8 centres 20 apart on a circle; only the listed modes are drawn."""
    generator = torch.Generator().manual_seed(seed)
    angles = torch.arange(8) * (2 * math.pi / 8)
    centres = 26.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    which = torch.tensor(modes)[torch.randint(len(modes), (n,), generator=generator)]
    return centres[which] + torch.randn(n, 2, generator=generator)


def values(result) -> dict[str, float]:
    return {name: interval.value for name, interval in result.items()}


def test_a_set_against_itself_scores_one():
    x = gaussians(300, 8, seed=0)
    same = prdc(x, x)
    assert same["precision"].value == same["recall"].value == same["coverage"].value == 1.0
    # each point sits in its own ball and in those of its k nearest neighbours: (k + 1) / k exactly
    assert same["density"].value == pytest.approx((NEAREST_K + 1) / NEAREST_K)
    fresh = values(prdc(x, gaussians(300, 8, seed=1)))  # a fresh draw of the same distribution
    assert fresh["precision"] > 0.8 and fresh["recall"] > 0.8 and 0.8 < fresh["density"] < 1.2, fresh


def test_disjoint_clusters_score_zero():
    result = prdc(gaussians(200, 8, seed=0), gaussians(150, 8, seed=1, shift=50.0))
    for name, interval in result.items():
        assert (interval.value, interval.lo, interval.hi) == (0.0, 0.0, 0.0), name


def test_dropping_half_the_modes_loses_recall_but_keeps_precision():
    real = mixture(800, list(range(8)), seed=0)
    half = values(prdc(real, mixture(800, [0, 1, 2, 3], seed=1)))
    full = values(prdc(real, mixture(800, list(range(8)), seed=1)))  # a draw of every mode, for comparison
    # equal-size draws of one distribution: coverage is about 1 - 2^-k = 0.875 (Naeem et al. 2020)
    assert full["precision"] > 0.9 and full["recall"] > 0.9 and full["coverage"] > 0.8, full
    assert half["precision"] > 0.9 and abs(half["precision"] - full["precision"]) < 0.05, (half, full)
    assert half["density"] > 0.8, half
    assert 0.4 < half["recall"] < 0.6 and 0.4 * full["coverage"] < half["coverage"] < 0.6 * full["coverage"], half


def random_conv_features(images: torch.Tensor) -> torch.Tensor:
    """A fixed random 3x3 conv (32 channels), ReLU, 2x2 average pool: 128-d features of [-1, 1] images."""
    weight = torch.randn(32, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    return F.adaptive_avg_pool2d(F.relu(F.conv2d(images, weight, padding=1)), 2).flatten(1)


def test_a_blurred_copy_loses_precision():
    from torchvision.transforms.functional import gaussian_blur

    from diffusion.data.shapes import ShapesDataset

    def images(split: str, n: int) -> torch.Tensor:
        data = ShapesDataset(16, size=n, seed=3, split=split)
        return torch.stack([data[i]["image"] for i in range(n)])

    reference = random_conv_features(images("train", 300))
    held_out = images("test", 200)
    real = prdc(reference, random_conv_features(held_out))["precision"]
    blurred = prdc(reference, random_conv_features(gaussian_blur(held_out, [5, 5], [1.5, 1.5])))["precision"]
    assert real.value > 0.9 and blurred.value < real.value - 0.15, (real, blurred)
    assert blurred.hi < real.lo  # told apart by their intervals, not just their points


def test_bootstrap_interval_holds_the_point_and_shrinks_with_n():
    real = gaussians(400, 6, seed=0)
    widths = {}
    for n in (60, 960):
        result = prdc(real, gaussians(n, 6, seed=1) * 1.2)
        for name, interval in result.items():
            assert interval.lo <= interval.value <= interval.hi, (name, interval)
        widths[n] = {name: interval.hi - interval.lo for name, interval in result.items()}
    for name in ("precision", "density"):  # means over samples: width ~ 1/sqrt(n), 4x smaller at 16x n
        assert 0 < widths[960][name] < 0.5 * widths[60][name], (name, widths)
    for name in ("recall", "coverage"):
        assert widths[960][name] < widths[60][name], (name, widths)


def test_bootstrap_is_seeded():
    real, samples = gaussians(100, 4, seed=0), gaussians(80, 4, seed=1)
    assert prdc(real, samples, seed=5) == prdc(real, samples, seed=5)


def test_knn_radius_is_the_kth_other_point():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert knn_radii(x, k=3).tolist() == [6.0, 5.0, 3.0, 5.0, 9.0]
    with pytest.raises(ValueError, match="at least 4 points"):
        knn_radii(x[:3], k=3)


def test_wilson_interval_known_values():
    none = wilson_interval(0, 10)
    assert none.value == 0 and none.lo == 0 and none.hi == pytest.approx(0.2775, abs=1e-4)
    half = wilson_interval(5, 10)
    assert (half.lo, half.hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert wilson_interval(200, 400).hi - wilson_interval(200, 400).lo < half.hi - half.lo


def test_fid_interval_holds_the_torchmetrics_value():
    from diffusion.evaluate.feature_stats import accumulate, scores
    from diffusion.evaluate.fid import moments

    real, samples = gaussians(500, 6, seed=0), gaussians(200, 6, seed=1, shift=0.3)
    ref, fake = accumulate([real.double()], 500), accumulate([samples.double()], 200)
    fid = scores(ref, fake, subsets=5, subset_size=50)["fid"]
    assert frechet_distance(*moments(fake), *moments(ref)) == pytest.approx(fid, rel=1e-6)
    interval = fid_interval(*moments(ref), samples, fid)
    assert 0 <= interval.lo < fid < interval.hi


small_sets = st.integers(4, 24).flatmap(lambda n: st.lists(
    st.lists(st.integers(-8, 8), min_size=3, max_size=3), min_size=n, max_size=n))


@given(real=small_sets, samples=small_sets, seed=st.integers(0, 2**16))
def test_metrics_are_in_range_permutation_invariant_and_ordered(real, samples, seed):
    """Integer-valued features (exact in float32, many ties): each metric in its documented range,
    lo <= point <= hi, and the points unchanged when samples or reference are shuffled."""
    x, y = torch.tensor(real, dtype=torch.float32) / 2, torch.tensor(samples, dtype=torch.float32) / 2
    result = prdc(x, y, rounds=20)
    for name, interval in result.items():
        upper = len(x) / NEAREST_K if name == "density" else 1.0
        assert 0 <= interval.lo <= interval.value <= interval.hi <= upper, (name, interval)
    generator = torch.Generator().manual_seed(seed)
    shuffled = prdc(x[torch.randperm(len(x), generator=generator)], y[torch.randperm(len(y), generator=generator)],
                    rounds=20)
    assert values(shuffled) == pytest.approx(values(result), abs=1e-12)


# -- evaluate fid, end to end ---------------------------------------------------------------------------------

class HeadFeatures(PoolFeatures):
    """PoolFeatures with a classification head that always answers class 0."""

    @torch.jit.export
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(images.shape[0], 12)
        scores[:, 0] = 1.0
        return scores


@pytest.fixture(scope="module")
def extractors(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("extractors")
    torch.jit.script(PoolFeatures()).save(str(folder / "pool.pt"))
    torch.jit.script(HeadFeatures()).save(str(folder / "head.pt"))
    return {"pool": folder / "pool.pt", "head": folder / "head.pt"}


def labelled_pngs(directory: Path, count: int, split: str, labels: bool = True) -> Path:
    """Shapes images as PNGs; with labels, the PNG "label" text cycles 0, 1, 2 as sample.py writes it."""
    from diffusion.data.shapes import ShapesDataset

    data = ShapesDataset(8, size=count, seed=3, split=split)
    for i in range(count):
        save_png(data[i]["image"], directory / f"sample_{i:03d}.png", {"label": str(i % 3)} if labels else {})
    return directory


def evaluate(tmp_path: Path, samples: Path, extractor: Path, capsys, *extra: str) -> tuple[dict, str]:
    out = tmp_path / f"report_{len(list(tmp_path.glob('report_*')))}.json"
    status, errors, printed = cli_result(main, ["fid", "--samples", str(samples), "--feature-extractor", str(extractor),
                                                "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                                                "--workers", "0", "--kid-subsets", "5", "--bootstrap-rounds", "50",
                                                *extra], capsys)
    assert status == 0, errors
    return json.loads(out.read_text()), printed


def test_evaluate_fid_reports_quality_variety_and_class_accuracy(tmp_path, extractors, capsys):
    reference = labelled_pngs(tmp_path / "ref", 60, "train", labels=False)
    samples = labelled_pngs(tmp_path / "samples", 30, "test")
    report, printed = evaluate(tmp_path, samples, extractors["head"], capsys, "--reference", str(reference))
    for name in ("precision", "recall", "density", "coverage", "fid", "class_accuracy"):
        lo, hi = report[f"{name}_ci95"]
        assert lo <= report[name] <= hi, name
    assert report["prdc"]["k"] == 3 and report["prdc"]["n_samples"] == 30 and report["prdc"]["n_reference"] == 30  # default: as many as samples
    assert report["class_accuracy"] == pytest.approx(10 / 30) and report["class_accuracy_n"] == 30  # label 0: 1 in 3
    lines = printed.splitlines()
    assert any(line.startswith("FID ") and "[" in line.split("KID")[0] for line in lines)
    assert any(line.startswith("precision ") and "recall " in line and "coverage " in line for line in lines)
    assert any(line.startswith("class accuracy 0.333 [") for line in lines)

    report, printed = evaluate(tmp_path, samples, extractors["pool"], capsys, "--reference", str(reference),
                               "--prdc-reference-num", "20")
    assert report["prdc"]["n_reference"] == 20 and "class_accuracy" not in report
    assert report["class_accuracy_note"] == "n/a (extractor has no classification head)"
    assert "class accuracy: n/a (extractor has no classification head)" in printed

    unlabelled = labelled_pngs(tmp_path / "unlabelled", 10, "test", labels=False)
    report, printed = evaluate(tmp_path, unlabelled, extractors["head"], capsys, "--reference", str(reference))
    assert "class accuracy: n/a (the samples carry no class label)" in printed


def test_evaluate_fid_from_a_checkpoint_scores_the_asked_classes(tmp_path, extractors, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "run")
    report, printed = evaluate(tmp_path, checkpoint, extractors["head"], capsys, "--num-samples", "24",
                               "--sampler", "ddim", "--steps", "2", "--guidance-scale", "1", "--reference-num", "40")
    # 12 classes cycle over 24 samples: 2 ask for class 0, the head always answers 0
    assert report["class_accuracy"] == pytest.approx(2 / 24) and report["class_accuracy_n"] == 24
    assert all(0 <= report[name] <= (40 / 3 if name == "density" else 1)
               for name in ("precision", "recall", "density", "coverage"))


@pytest.mark.parametrize("option,value,words", [
    ("--prdc-reference-num", "3", "--prdc-reference-num must be between 4 and 10000"),
    ("--prdc-reference-num", "10001", "--prdc-reference-num must be between 4 and 10000"),
    ("--bootstrap-rounds", "5", "--bootstrap-rounds must be between 20 and 100000"),
])
def test_bad_quality_options_are_one_line(tmp_path, extractors, capsys, option, value, words):
    status, errors, _ = cli_result(main, ["fid", "--samples", str(tmp_path), "--reference", str(tmp_path),
                                          "--feature-extractor", str(extractors["pool"]), "--out",
                                          str(tmp_path / "r.json"), option, value], capsys)
    assert status == 2 and len(errors) == 1 and words in errors[0], errors
