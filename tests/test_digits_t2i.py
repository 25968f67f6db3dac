"""The shipped text-to-image digits teachers through the product's diffusers path: each digits t2i preset distils
for a few CPU steps as a user runs it, and `onestep demo --t2i` ends in a table of prompt following.

Both teachers are real (trained here on the digits, docs/digits-t2i.md); the GPU-scale numbers live in
docs/results.md, not here.
"""

from __future__ import annotations

import json

import pytest

from onestep_cli import demo_t2i
from onestep_cli.config import resolve_asset_path, resolve_config
from onestep_cli.runs.run_dir import RunDir

pytest.importorskip("diffusers")

T2I_PRESETS = {"digits-t2i-sim": "digits_t2i_teacher", "digits-t2i-sid": "digits_t2i_teacher",
               "digits-t2i-dmd": "digits_t2i_teacher", "digits-pixart-sim": "digits_pixart_teacher"}


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("preset", list(T2I_PRESETS))
def test_preset_distils_the_shipped_teacher_on_the_cpu(cli, preset, tmp_path, one_thread):
    config = resolve_config(preset)
    assert config.teacher.kind == "diffusers" and config.train.precision == "auto"
    assert config.teacher.resolved_path == str(resolve_asset_path(f"@assets/{T2I_PRESETS[preset]}"))
    args = ["distill", "--preset", preset, "--out", tmp_path / "run", "--set", "train.max_steps=2",
            "--set", "train.batch_size=2", "--set", "train.checkpoint_every=2", "--json"]
    # The first preset through the console script; the others in process, where a new interpreter would add only
    # its start-up and the import of diffusers.
    if preset == next(iter(T2I_PRESETS)):
        result = cli.run(*args)
    else:
        result = cli.invoke(*args)
        assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["step"] == 2 and RunDir(tmp_path / "run").read_status()["status"] == "complete"
    assert (tmp_path / "run" / "prompts.safetensors").is_file()


@pytest.mark.e2e
def test_demo_t2i_scores_students_and_teacher_on_heldout_prompts(cli, tmp_path, monkeypatch):
    prompts = tmp_path / "heldout.txt"
    held_out = resolve_asset_path(demo_t2i.HELDOUT_PROMPTS).read_text().splitlines()
    prompts.write_text("\n".join(held_out[::32]) + "\n")  # Ten phrasings: the shape of the demo, in seconds.
    monkeypatch.setattr(demo_t2i, "HELDOUT_PROMPTS", str(prompts))
    result = cli.invoke("demo", "--t2i", "--out", tmp_path / "demo", "--steps", "2")
    assert result.exit_code == 0, result.output
    for needle in ("digits-t2i-sim", "teacher-heun", "prompt_accuracy", "report.html"):
        assert needle in result.stdout, result.stdout
    student = json.loads(next((tmp_path / "demo" / "digits-t2i-sim" / "eval").glob("*.json")).read_text())
    teacher = json.loads((tmp_path / "demo" / "teacher-heun.json").read_text())
    for evaluation in (student, teacher):
        assert 0.0 <= evaluation["metrics"]["prompt_accuracy"] <= 1.0
        assert evaluation["provenance"]["prompt_accuracy"]["num_images"] == 10
    assert teacher["provenance"]["common"]["samples_meta"]["nfe"] == 2 * demo_t2i.TEACHER_STEPS - 1
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert (tmp_path / "demo" / "report" / "grids" / "grid.png").is_file()


def test_prompts_encode_where_the_text_encoder_is_while_the_networks_sit_elsewhere(monkeypatch):
    # Sampling a run on a GPU moves the VAE and the denoiser there and leaves the text encoder on the CPU, where
    # diffusers' execution device may follow the networks (as it did on an H200); "meta" stands in for the GPU.
    import torch

    from onestep_cli.denoisers.diffusers.loading import load_pipeline
    from onestep_cli.denoisers.diffusers.prompts import PromptEncoder

    pipeline = load_pipeline(resolve_asset_path("@assets/digits_t2i_teacher"))
    prompts = ["the digit 7", "a handwritten three"]
    expected = PromptEncoder(pipeline).encode(prompts).embeds
    pipeline.vae.to("meta")
    pipeline.unet.to("meta")
    monkeypatch.setattr(type(pipeline), "_execution_device", property(lambda self: torch.device("meta")))
    assert torch.equal(PromptEncoder(pipeline).encode(prompts).embeds, expected)
