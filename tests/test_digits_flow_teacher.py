"""The shipped flow-matching digits teacher through onestep's flow path, on a teacher that generates digits:

- the sigma <-> t mapping: its own StableDiffusion3Pipeline and onestep's sigma-unit denoiser take the same guided
  Euler steps from the same noise to the same latents (a wrong timestep, input scaling or x0 formula fails this);
- `onestep sample RUN --teacher` (EDM's Heun in sigma units) draws the pipeline's own 25-step images on the same seeds;
- `digits-flow-sim` distils for a few CPU steps, samples and exports, and the export reproduces `onestep sample`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from onestep_cli.config import resolve_asset_path, resolve_config

diffusers = pytest.importorskip("diffusers")

from onestep_cli.denoisers.diffusers.loading import load_diffusers_teacher  # noqa: E402
from onestep_cli.digits import flow_teacher  # noqa: E402
from onestep_cli.digits.t2i_teacher import quick_class_accuracy  # noqa: E402

TEACHER = resolve_asset_path("@assets/digits_flow_teacher")
PROMPTS = ["the digit 3", "a bold handwritten seven, slanted left", "a thin 0"]
GUIDANCE = 3.0


@pytest.fixture(scope="module")
def flow_run(cli, tmp_path_factory):
    """A two-step digits-flow-sim run, as a user distils it, and its prompt file."""
    root = tmp_path_factory.mktemp("digits-flow")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = cli.invoke("distill", "--preset", "digits-flow-sim", "--out", root / "run", "--set",
                            "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.checkpoint_every=2",
                            "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["step"] == 2
        prompts = root / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        yield root / "run", prompts
    finally:
        torch.set_num_threads(threads)


def seeded_noise(seeds, shape=(4, 8, 8)) -> torch.Tensor:
    """The unit noise the pipeline (and onestep) draws for each seed."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


def test_pipeline_and_onestep_take_the_same_euler_steps(one_thread):
    pipeline = flow_teacher.load_pipeline(TEACHER)
    teacher = load_diffusers_teacher(TEACHER, max_sequence_length=flow_teacher.MAX_SEQUENCE_LENGTH)
    flow_times = [0.99, 0.9, 0.7, 0.45, 0.2, 0.05]
    z = seeded_noise([0, 1, 2])
    theirs = pipeline(PROMPTS, sigmas=flow_times, latents=flow_times[0] * z, guidance_scale=GUIDANCE,
                      max_sequence_length=flow_teacher.MAX_SEQUENCE_LENGTH, output_type="latent").images
    guided, cond = teacher.guided(GUIDANCE), teacher.encoder.encode(PROMPTS)
    sigmas = [t / (1 - t) for t in flow_times] + [0.0]
    x = sigmas[0] * z  # x_t = t z in the pipeline's units is (1 + sigma) t z = sigma z in ours.
    with torch.no_grad():
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):  # Euler in sigma units (k-diffusion's sample_euler).
            x = x + (next_sigma - sigma) * (x - guided(x, torch.full((3,), sigma), cond)) / sigma
    torch.testing.assert_close(x, theirs, atol=2e-4, rtol=2e-4)
    assert x.std() > 0.3  # Latents of digits, not a collapse to zero.


@pytest.mark.e2e
def test_onestep_teacher_sampling_draws_the_pipeline_digits(cli, flow_run, tmp_path):
    run, prompts = flow_run
    out = tmp_path / "teacher"
    result = cli.invoke("sample", run, "--teacher", "--steps", "25", "--prompts", prompts, "--seeds", "0-1",
                        "--out", out, "--json")
    assert result.exit_code == 0, result.output
    from PIL import Image

    ours = torch.stack([torch.from_numpy(np.asarray(Image.open(out / f"p{p:04d}-s{s:06d}.png"), dtype=np.float32))
                        for p in range(len(PROMPTS)) for s in (0, 1)]).permute(0, 3, 1, 2) / 255
    pipeline = flow_teacher.load_pipeline(TEACHER)
    theirs = torch.cat([pipeline(prompt, num_inference_steps=25, guidance_scale=GUIDANCE, output_type="pt",
                                 max_sequence_length=flow_teacher.MAX_SEQUENCE_LENGTH,
                                 generator=torch.Generator().manual_seed(seed)).images
                        for prompt in PROMPTS for seed in (0, 1)])
    same_seed = (ours - theirs).abs().mean()
    other_seed = (ours - theirs[[1, 0, 3, 2, 5, 4]]).abs().mean()
    # Two solvers of one ODE (Heun, 49 evaluations on a Karras grid; Euler, 25 uniform steps): 0.006 apart in [0, 1]
    # pixels on the shipped teacher, against 0.08 between seeds.
    assert same_seed < 0.015 and same_seed < other_seed / 5, (same_seed, other_seed)
    digits = torch.tensor([3, 3, 7, 7, 0, 0])
    accuracy, _ = quick_class_accuracy(ours * 2 - 1, digits)
    assert accuracy == quick_class_accuracy(theirs * 2 - 1, digits)[0] == 1.0


@pytest.mark.e2e
def test_digits_flow_sim_samples_and_exports_like_its_pipeline(cli, flow_run, tmp_path):
    run, prompts = flow_run
    config = resolve_config("digits-flow-sim")
    assert config.teacher.resolved_path == str(TEACHER) and config.teacher.max_sequence_length == 0
    samples = tmp_path / "samples"
    assert cli.invoke("sample", run, "--prompts", prompts, "--seeds", "4", "--out", samples).exit_code == 0
    out = tmp_path / "export"
    assert cli.invoke("export", run, "--out", out).exit_code == 0
    call = json.loads((out / "onestep.json").read_text())["call"]
    assert "text_encoder_3=None, tokenizer_3=None" in call and "sigmas=[0.999]" in call
    assert "max_sequence_length=0" in call
    pipeline = diffusers.DiffusionPipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(PROMPTS[1], sigmas=[0.999], guidance_scale=1.0, max_sequence_length=0, output_type="np",
                     generator=torch.Generator().manual_seed(4)).images[0]
    from PIL import Image

    ours = np.asarray(Image.open(samples / "p0001-s000004.png"), dtype=np.float64)
    assert np.abs(ours - (image * 255).round()).max() <= 1  # The same pixels up to uint8 rounding.
