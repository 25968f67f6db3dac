"""HPSv2 (`hpsv2`) on a tiny open_clip registered as ViT-H-14, with random weights saved in the layout of the official
checkpoints: the scorer against the score computed directly with open_clip, the version option, the errors, the CLI."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as tvf

from onestep_cli.eval import MetricContext, MetricError, compute_metrics
from onestep_cli.eval.hpsv2 import HPS_ARCHITECTURE, HPSv2Score
from onestep_cli.eval.weights import MissingWeightsError
from test_eval_sources import write_folder
from test_metrics_tiny_models import random_images

PROMPTS = ["a photo of a cat", "a red car on the grass", "the big blue dog"]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 32
# ViT-H-14's structure (GELU, 77-token CLIP BPE text tower, vocabulary 49408) at a size that runs in milliseconds.
TINY_VIT_H_14 = {"embed_dim": 16,
                 "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
SEEDS = {"hps_v2.0": 0, "hps_v2.1": 1}  # One random model per version, so that the option is seen to choose.


@pytest.fixture(autouse=True)
def _tiny_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_HOME", str(tmp_path / "onestep-home"))
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, HPS_ARCHITECTURE, copy.deepcopy(TINY_VIT_H_14))


def tiny_hps_model(weight_set: str) -> CLIP:
    torch.manual_seed(SEEDS[weight_set])
    return CLIP(**copy.deepcopy(TINY_VIT_H_14), output_dict=True).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """weight-set key -> a checkpoint as xswu/HPSv2 publishes them: {'state_dict': open_clip state dict, ...}."""
    folder = tmp_path_factory.mktemp("hps")
    paths = {"hps_v2.0": folder / "HPS_v2_compressed.pt", "hps_v2.1": folder / "HPS_v2.1_compressed.pt"}
    for key, path in paths.items():
        torch.save({"epoch": 1, "name": key, "state_dict": tiny_hps_model(key).state_dict()}, path)
    return {key: str(path) for key, path in paths.items()}


def reference_pixels(images: np.ndarray) -> torch.Tensor:
    """HPSv2's eval transform written out per image: ToTensor, bicubic resize of the long side to the model size,
    black padding centred (extra pixel right/bottom), CLIP mean/std."""
    pixels = []
    for image in images:
        x = tvf.to_tensor(Image.fromarray(image))
        height, width = x.shape[1:]
        scale = IMAGE_SIZE / max(height, width)
        if scale != 1.0:
            x = tvf.resize(x, [round(height * scale), round(width * scale)], InterpolationMode.BICUBIC, antialias=True)
        pad_height, pad_width = IMAGE_SIZE - x.shape[1], IMAGE_SIZE - x.shape[2]
        x = tvf.pad(x, [pad_width // 2, pad_height // 2, pad_width - pad_width // 2, pad_height - pad_height // 2])
        pixels.append(tvf.normalize(x, MEAN, STD))
    return torch.stack(pixels)


@torch.no_grad()
def reference_scores(weight_set: str, images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """The diagonal of image_features @ text_features.T from open_clip's own forward (which L2-normalises both)."""
    out = tiny_hps_model(weight_set)(reference_pixels(images), open_clip.tokenize(prompts))
    return torch.diagonal(out["image_features"] @ out["text_features"].T).numpy()


@pytest.mark.parametrize("shape", [(40, 48), (32, 20)])  # Resized and padded; padded only (long side already 32).
def test_hpsv2_is_the_cosine_of_open_clips_normalised_embeddings(checkpoints, shape):
    images = random_images(3, *shape, seed=11)
    for version, key in (("v2.1", "hps_v2.1"), ("v2.0", "hps_v2.0")):
        ctx = MetricContext(weights=checkpoints, options={"hpsv2.version": version}, batch_size=2)
        expected = reference_scores(key, images, PROMPTS)
        np.testing.assert_allclose(HPSv2Score(ctx).extract(images, PROMPTS)[:, 0], expected, rtol=1e-5, atol=1e-6)
        result = compute_metrics(["hpsv2"], images, context=MetricContext(
            weights=checkpoints, options={"hpsv2.version": version}, prompts=PROMPTS, batch_size=2))["hpsv2"]
        assert result.value == pytest.approx(expected.mean(), rel=1e-5, abs=1e-7)
        prov = result.provenance
        assert prov["version"] == version and prov["open_clip_model"] == "ViT-H-14"
        assert prov["weights"]["weights"] == key and prov["weights"]["path"] == checkpoints[key]
        assert prov["weights"]["sha256"][Path(checkpoints[key]).name] == hashlib.sha256(
            Path(checkpoints[key]).read_bytes()).hexdigest()
        assert prov["architecture"]["parameters"] == sum(p.numel() for p in tiny_hps_model(key).parameters())


def test_the_score_follows_the_prompt_and_the_version(checkpoints):
    images = random_images(3, 40, 48, seed=11)
    scorer = HPSv2Score(MetricContext(weights=checkpoints))
    assert scorer.provenance["version"] == "v2.1"  # The default.
    swapped = [PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    first, second = scorer.extract(images, PROMPTS)[:, 0], scorer.extract(images, swapped)[:, 0]
    assert abs(first[0] - second[0]) > 1e-4 and abs(first[1] - second[1]) > 1e-4
    assert second[2] == pytest.approx(first[2], abs=1e-7)  # Its prompt did not change.
    np.testing.assert_allclose(second, reference_scores("hps_v2.1", images, swapped), rtol=1e-5, atol=1e-6)
    older = HPSv2Score(MetricContext(weights=checkpoints, options={"hpsv2.version": "v2.0"})).extract(images, PROMPTS)
    assert np.abs(older[:, 0] - first).max() > 1e-4
    with pytest.raises(MetricError, match=r"hpsv2\.version=2\.1 is not one of v2\.0, v2\.1"):
        HPSv2Score(MetricContext(weights=checkpoints, options={"hpsv2.version": "2.1"}))


def test_bf16_scores_are_close_to_fp32_but_not_the_same(checkpoints):
    """As test_scorer_precision.py for the other scorers: bf16 autocast moves the cosines by a few units of 2^-8."""
    images = random_images(3, 40, 48, seed=11)
    fp32, bf16 = (HPSv2Score(MetricContext(weights=checkpoints, scorer_precision=precision)) for precision in
                  ("fp32", "bf16"))
    assert (fp32.provenance["precision"], bf16.provenance["precision"]) == ("fp32", "bf16")
    difference = np.abs(bf16.extract(images, PROMPTS) - fp32.extract(images, PROMPTS))
    assert 0 < difference.max() <= 2.0 ** -5  # A cosine: its scale is 1 (BF16_TOLERANCE of test_scorer_precision).


def test_missing_weights_name_the_file_its_source_and_the_command(tmp_path):
    for options, name, key in (({}, "HPS_v2.1_compressed.pt", "hps_v2.1"),
                               ({"hpsv2.version": "v2.0"}, "HPS_v2_compressed.pt", "hps_v2.0")):
        with pytest.raises(MissingWeightsError) as info:
            HPSv2Score(MetricContext(options=options))
        message = " ".join(str(info.value).split())
        assert "Metric 'hpsv2'" in message and name in message
        assert f"huggingface.co/xswu/HPSv2/resolve/697403c78157020a1ae59d23f111aa58ced35b0a/{name}" in message
        assert f"onestep weights fetch {key}" in message and str(tmp_path / "onestep-home") in message


def test_a_file_that_is_not_an_hps_checkpoint_is_named(tmp_path):
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {"head.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(MetricError, match=rf"{path} does not fit open_clip's ViT-H-14: missing .*unexpected "
                                          r"\['head\.weight'\]"):
        HPSv2Score(MetricContext(weights={"hps_v2.1": str(path)}))


@pytest.mark.e2e
def test_cli_eval_hpsv2_with_prompts_and_provenance(cli, tmp_path, checkpoints):
    images = random_images(3, 16, 16, seed=4)
    folder = write_folder(tmp_path / "imgs", images, names=["b.png", "a.png", "c.png"])
    (tmp_path / "prompts.txt").write_text("".join(f"{p}\n" for p in PROMPTS))
    in_file_order = images[[1, 0, 2]]  # Prompts pair with the sorted file names: a.png, b.png, c.png.
    for version, key in (("v2.1", "hps_v2.1"), ("v2.0", "hps_v2.0")):
        run = cli.invoke("eval", folder, "--metrics", "hpsv2", "--prompts", tmp_path / "prompts.txt", "--weights",
                         f"{key}={checkpoints[key]}", *(["--option", f"hpsv2.version={version}"] if version != "v2.1"
                                                        else []), "--device", "cpu", "--json")
        assert run.exit_code == 0, run.output
        result = json.loads(run.stdout)
        assert result["metrics"]["hpsv2"] == pytest.approx(reference_scores(key, in_file_order, PROMPTS).mean(),
                                                           rel=1e-5, abs=1e-7)
        prov = result["provenance"]["hpsv2"]
        assert prov["metric"] == "hpsv2" and prov["version"] == version and prov["num_samples"] == 3
        assert prov["weights"]["path"] == checkpoints[key] and prov["weights"]["origin"] == "user path"
        assert prov["prompt_pairing"]["first_pair"] == ["a.png", PROMPTS[0]]
    missing = cli.invoke("eval", folder, "--metrics", "hpsv2", "--prompts", tmp_path / "prompts.txt", "--device",
                         "cpu")
    assert missing.exit_code == 1 and "onestep weights fetch hps_v2.1" in " ".join(missing.output.split())
