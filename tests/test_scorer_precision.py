"""`--scorer-precision`: the per-image scorers on tiny random-weight models of the real classes in fp32, tf32 and bf16;
the provenance, the CLI (refusal, result JSON, `onestep compare` of two precisions) and scripts/scorer_precision.py.
HPSv2's case is in test_hpsv2.py (its tiny ViT-H-14 needs that module's open_clip registration)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from onestep_cli.eval import MetricContext, MetricError, compute_metrics
from onestep_cli.eval.clip import AestheticScore, CLIPScore
from onestep_cli.eval.imagereward import ImageRewardScore
from onestep_cli.eval.scorer_precision import ScorerArithmetic
from onestep_cli.eval.transformers_models import PickScore
from test_eval_sources import write_folder
from test_metrics_tiny_models import random_images, tiny_open_clip

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

PROMPTS = ["a photo of a cat", "a red car on the grass", "the big blue dog", "a small dog on the grass"]
# bf16 keeps 8 significant bits: each rounding is within 2^-8 of the value. Through these one- and two-layer networks
# a correct computation stays within a few such units of the largest score; 8 units (2^-5, about 3%) keeps the test
# steady across CPUs while a wrong one (a lost normalisation, scale or sign) moves the scores by their whole size.
BF16_TOLERANCE = 2.0 ** -5
SCORERS = {"clip_score": CLIPScore, "aesthetic": AestheticScore, "imagereward": ImageRewardScore,
           "pickscore": PickScore}


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ONESTEP_HOME", str(tmp_path / "onestep-home"))


@pytest.fixture(scope="module")
def weights(tiny_weights, tmp_path_factory) -> dict[str, str]:
    """The session's tiny weights, with a CLIP whose text projection is negated: the random one's cosines are all
    negative on these images, so CLIP score's clamp at 0 would hide any change of precision."""
    state = tiny_open_clip().state_dict()
    state["text_projection"] = -state["text_projection"]
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save(state, path)
    return {**tiny_weights, "clip_vit_l14": str(path)}


@pytest.fixture(scope="module")
def images():
    return random_images(4, 40, 48, seed=11)


def scores(scorer, weights, images, precision) -> tuple[np.ndarray, dict]:
    extractor = SCORERS[scorer](MetricContext(weights=weights, scorer_precision=precision))
    return extractor.extract(images, PROMPTS)[:, 0], extractor.provenance


@pytest.mark.parametrize("scorer", SCORERS)
def test_bf16_scores_are_close_to_fp32_but_not_the_same(scorer, weights, images):
    fp32, fp32_provenance = scores(scorer, weights, images, "fp32")
    bf16, bf16_provenance = scores(scorer, weights, images, "bf16")
    if scorer == "clip_score":
        assert (fp32 > 0).all()  # Not clamped at 0: the scores can move.
    difference = np.abs(bf16 - fp32)
    assert difference.max() > 0  # The option computes something else...
    assert difference.max() <= BF16_TOLERANCE * np.abs(fp32).max()  # ...close to fp32.
    assert fp32_provenance["precision"] == "fp32" and "strict float32" in fp32_provenance["arithmetic"]
    assert bf16_provenance["precision"] == "bf16" and "autocast(bfloat16)" in bf16_provenance["arithmetic"]


def test_tf32_on_the_cpu_is_fp32_and_says_so(weights, images):
    fp32, _ = scores("pickscore", weights, images, "fp32")
    tf32, provenance = scores("pickscore", weights, images, "tf32")
    np.testing.assert_array_equal(tf32, fp32)
    assert provenance["precision"] == "fp32" and provenance["precision_asked"] == "tf32"
    assert "TF32 had no effect on this device (cpu" in provenance["arithmetic"]


def test_tf32_is_on_only_inside_the_scorer_call_and_fp32_is_strict(monkeypatch):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults.
        with ScorerArithmetic("tf32", "cuda")():
            assert flags() == (True, True)
        assert flags() == (False, True)
        with ScorerArithmetic("fp32", "cuda")():
            assert flags() == (False, False) and not torch.is_autocast_enabled("cuda")
        assert flags() == (False, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ScorerArithmetic("tf32", "cuda").provenance()["precision"] == "tf32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert ScorerArithmetic("tf32", "cuda").provenance()["precision_asked"] == "tf32"


def test_a_bad_precision_is_refused_by_the_library(weights, images):
    with pytest.raises(MetricError, match=r"--scorer-precision 'fp16' is not one of fp32, tf32, bf16"):
        compute_metrics(["imagereward"], images, context=MetricContext(weights=weights, prompts=PROMPTS,
                                                                       scorer_precision="fp16"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, images) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scored")
    (root / "prompts.txt").write_text("".join(f"{p}\n" for p in PROMPTS))
    return write_folder(root / "images", images), root / "prompts.txt"


def test_cli_refuses_a_bad_scorer_precision(cli, folder):
    images, prompts = folder
    result = cli.invoke("eval", images, "--metrics", "imagereward", "--prompts", prompts, "--scorer-precision", "bf8")
    assert result.exit_code == 2
    assert " ".join(result.output.split()).startswith("Error: --scorer-precision 'bf8' is not one of fp32, tf32, bf16")


def test_cli_records_the_precision_and_compare_shows_the_difference(cli, folder, weights, tmp_path):
    images, prompts = folder
    common = ["eval", images, "--metrics", "imagereward,pickscore", "--prompts", prompts, "--device", "cpu",
              "--weights", f"imagereward={weights['imagereward']}", "--weights", f"pickscore={weights['pickscore']}"]
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        run = cli.invoke(*common, "--scorer-precision", precision, "--out", out, "--json")
        assert run.exit_code == 0, run.output
        results[precision] = json.loads(out.read_text())
        provenance = results[precision]["provenance"]
        assert provenance["common"]["scorer_precision"] == precision
        assert provenance["imagereward"]["precision"] == provenance["pickscore"]["precision"] == precision
    assert results["bf16"]["metrics"]["pickscore"] != results["fp32"]["metrics"]["pickscore"]

    compared = cli.invoke("compare", tmp_path / "fp32.json", tmp_path / "bf16.json", "--json", "--out",
                          tmp_path / "report")
    assert compared.exit_code == 0, compared.output
    differences = json.loads(compared.stdout)["measurement_differences"]
    for metric in ("imagereward", "pickscore"):  # Only the precision: same weights, preprocessing, backend.
        assert differences[metric] == {"precision": {"fp32": "fp32", "bf16": "bf16"},
                                       "common.scorer_precision": {"fp32": "fp32", "bf16": "bf16"}}
    for page in ("table.md", "report.html"):
        assert "Measured differently" in (tmp_path / "report" / page).read_text()
    table = cli.invoke("compare", tmp_path / "fp32.json", tmp_path / "bf16.json")
    assert "Measured differently" in table.stdout and "scorer_precision" in table.stdout
    same = cli.invoke("compare", tmp_path / "fp32.json", tmp_path / "fp32.json", "--json")
    assert json.loads(same.stdout)["measurement_differences"] == {}


def test_script_tables_bf16_and_tf32_against_fp32_and_the_noise(folder, weights, capsys):
    path = Path(__file__).parents[1] / "scripts" / "scorer_precision.py"
    spec = importlib.util.spec_from_file_location("scorer_precision_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    images, prompts = folder
    code = script.main([str(images), "--prompts", str(prompts), "--metrics", "imagereward,clip_score",
                        "--weights", f"imagereward={weights['imagereward']}",
                        "--weights", f"clip_vit_l14={weights['clip_vit_l14']}", "--device", "cpu", "--json"])
    assert code == 0
    output = json.loads(capsys.readouterr().out)
    for metric in ("imagereward", "clip_score"):
        fp32, tf32, bf16 = output["tables"][metric]
        assert [row["precision"] for row in (fp32, tf32, bf16)] == ["fp32", "tf32", "bf16"]
        assert fp32["delta_mean"] == fp32["max_abs_delta"] == 0 and tf32["max_abs_delta"] == 0  # No TF32 on a CPU.
        assert 0 < bf16["mean_abs_delta"] <= bf16["max_abs_delta"]
        assert bf16["delta_mean"] == pytest.approx(bf16["mean"] - fp32["mean"], abs=1e-9)
        per_image = scores(metric, weights, folder_images(images), "fp32")[0]
        assert fp32["mean"] == pytest.approx(per_image.mean(), rel=1e-6)
        assert fp32["standard_error"] == pytest.approx(per_image.std(ddof=1) / 2, rel=1e-5)  # sqrt(4 images).
        assert fp32["halves"] > 0 and fp32["num_images"] == 4
        assert output["provenance"]["tf32"][metric]["precision_asked"] == "tf32"
    code = script.main([str(images), "--metrics", "imagereward", "--precisions", "fp16"])
    assert code == 2 and "--scorer-precision 'fp16' is not one of" in capsys.readouterr().err


def folder_images(folder: Path) -> np.ndarray:
    from onestep_cli.eval.evaluate import open_image_source

    return np.concatenate([batch for _, batch in open_image_source(folder).batches(64)])
