"""`onestep export --format lora` on a LoRA student of the shipped SD-style digits teacher: the adapter, loaded into the
teacher's own pipeline with `load_lora_weights` by the code the export's README.md gives, reproduces `onestep sample`;
a run that trained every weight is refused with a pointer to --format diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from onestep_cli.config import ConfigError  # noqa: E402
from onestep_cli.export import write_lora  # noqa: E402
from onestep_cli.runs.loading import load_generator_source  # noqa: E402
from onestep_cli.sampling import generate_text_to_image  # noqa: E402

PROMPTS = ["the digit 3", "a bold seven"]
SEEDS = [0, 5]
FAST = ["train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=2", "train.tick_every=1",
        "train.generator_lr=1e-2"]  # A large step, so that the adapter visibly changes the teacher.


def distill(cli, out: Path, *overrides: str) -> Path:
    settings = [part for item in (*FAST, *overrides) for part in ("--set", item)]
    result = cli.invoke("distill", "--preset", "digits-t2i-sim", *settings, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return out


def readme_namespace(folder: Path, **variables) -> dict:
    """The globals after running the python block of `folder`/README.md as written, with `variables` defined."""
    code = (folder / "README.md").read_text().split("```python\n")[1].split("```")[0]
    namespace = dict(variables)
    exec(code, namespace)
    return namespace


def one_step(pipe, prompt: str, seed: int) -> torch.Tensor:
    """The pipeline's one-step image in [0, 1], as float, for the README's call with `output_type="pt"`."""
    return pipe(prompt, num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.mark.e2e
def test_lora_adapter_in_the_teacher_pipeline_reproduces_onestep_sample(cli, tmp_path, one_thread):
    run = distill(cli, tmp_path / "run", "generator.lora_rank=8", "fake.lora_rank=8")
    out = tmp_path / "lora"
    result = cli.invoke("export", run, "--out", out, "--format", "lora", "--json")
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written["format"] == "lora" and written["network"] == "unet" and written["rank"] == 8
    assert written["loader"] == "load_lora_weights" and written["step"] == 2

    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as weights:
        keys = list(weights.keys())
        metadata = json.loads(weights.metadata()["lora_adapter_metadata"])
    assert keys and all(key.startswith("unet.") and (".lora_A." in key or ".lora_B." in key) for key in keys)
    assert metadata["unet.r"] == 8 and metadata["unet.lora_alpha"] == 8  # The LoraConfig, as diffusers records it.
    info = json.loads((out / "onestep.json").read_text())
    assert info["sigma_init"] == 2.5 and info["pipeline_class"] == "StableDiffusionPipeline"
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["sigma_max"] == 2.5

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    samples = tmp_path / "samples"
    seeds = ",".join(map(str, SEEDS))
    assert cli.invoke("sample", run, "--prompts", prompts, "--seeds", seeds, "--out", samples).exit_code == 0
    from PIL import Image

    namespace = readme_namespace(out, prompt=PROMPTS[1], seed=SEEDS[1])  # The README's code, as a user runs it.
    written_png = np.asarray(Image.open(samples / f"p0001-s{SEEDS[1]:06d}.png"), dtype=np.int16)
    assert np.abs(np.asarray(namespace["image"], dtype=np.int16) - written_png).max() <= 1  # uint8 rounding.

    pipe = namespace["pipe"]
    source = load_generator_source(run)  # What `onestep sample` generates, before it is rounded to PNG.
    ours = (generate_text_to_image(source.generator, source.pipeline, PROMPTS, SEEDS, source.data_shape) + 1) / 2
    theirs = torch.stack([one_step(pipe, prompt, seed) for prompt in PROMPTS for seed in SEEDS])
    assert (theirs - ours).abs().max() < 1e-4
    pipe.disable_lora()
    teacher_alone = torch.stack([one_step(pipe, prompt, seed) for prompt in PROMPTS for seed in SEEDS])
    assert (teacher_alone - ours).abs().max() > 1e-2  # The adapter is what makes the difference.

    with torch.no_grad():  # As if the teacher's files had changed since training: the adapter alone is not enough.
        next(source.pipeline.denoiser.model.parameters()).add_(1e-2)
    with pytest.raises(ConfigError, match="differs from the teacher's.*--format diffusers"):
        write_lora(source, tmp_path / "stale", {"source": str(run), "step": 2, "kimg": 0.0, "sigma_init": 2.5})


@pytest.mark.e2e
def test_a_run_without_lora_is_told_to_export_diffusers(cli, tmp_path, one_thread):
    run = distill(cli, tmp_path / "run", "train.max_steps=1", "train.batch_size=1", "train.checkpoint_every=1")
    result = cli.invoke("export", run, "--out", tmp_path / "lora", "--format", "lora")
    assert result.exit_code == 2, result.output  # A command line to change, as every refused --format.
    message = " ".join(result.output.split())
    assert "generator.lora_rank: 0" in message and "use --format diffusers" in message
    assert not (tmp_path / "lora").exists() or not any((tmp_path / "lora").iterdir())


@pytest.mark.e2e
def test_a_run_without_a_diffusers_teacher_is_told_to_export_safetensors(cli, tmp_path):
    run = tmp_path / "run"
    assert cli.invoke("distill", "--preset", "gmm-sim", "--set", "train.max_steps=1", "--set", "train.batch_size=2",
                      "--set", "eval.metrics=[]", "--out", run).exit_code == 0
    result = cli.invoke("export", run, "--out", tmp_path / "lora", "--format", "lora")
    assert result.exit_code == 2 and "--format safetensors" in result.output, result.output
