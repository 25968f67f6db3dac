"""Multi-step generators (generator.num_steps): the step schedule, one step unchanged, backward simulation in the
training step, N-step sampling and its diffusers export, and the CLI from distill to sample."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from onestep_cli.config import ConfigError, resolve_config
from onestep_cli.denoisers.generator import OneStepGenerator, ddpm_step_timesteps, karras_step_sigmas
from onestep_cli.engine.switches import use_cuda_graph
from onestep_cli.engine.trainer import Trainer
from onestep_cli.runs.networks import build_networks
from onestep_cli.runtime.distributed import DistEnv
from onestep_cli.sampling import generate, seeded_inputs, seeded_latents

CPU = torch.device("cpu")
TINY_GMM = ["generator.mlp.hidden_dim=16", "generator.mlp.num_layers=2", "fake.mlp.hidden_dim=16",
            "fake.mlp.num_layers=2", "train.batch_size=6", "train.device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # Tiny networks: one thread (conftest.py).


# ---------------------------------------------------------------------------------------------------------------------
# The schedule.

def test_default_edm_schedule_walks_the_karras_ramp_down_from_sigma_init():
    sigmas = karras_step_sigmas(2.5, 4)
    assert sigmas[0] == 2.5  # Exactly: the first step is the one-step generator's level.
    rho, top, bottom = 7.0, 2.5 ** (1 / 7), 0.002 ** (1 / 7)
    assert sigmas[1:] == pytest.approx([(top + k / 4 * (bottom - top)) ** rho for k in (1, 2, 3)], rel=1e-12)
    assert all(later < earlier for earlier, later in zip(sigmas, sigmas[1:])) and sigmas[-1] > 0.002
    config = resolve_config("gmm-sid", overrides=["generator.num_steps=4"])
    assert build_networks(config).generator.step_sigmas == sigmas


def test_ddpm_schedule_is_dmd2s_denoising_step_list():
    assert ddpm_step_timesteps(1000, 4) == [999, 749, 499, 249]  # DMD2's SDXL 4-step timesteps.
    assert ddpm_step_timesteps(1000, 3) == [999, 666, 333]
    with pytest.raises(ValueError, match="do not fit"):
        ddpm_step_timesteps(10, 11)


def test_more_steps_than_a_ddpm_teacher_has_timesteps_is_refused_naming_the_key():
    from types import SimpleNamespace

    from onestep_cli.config import GeneratorConfig
    from onestep_cli.denoisers.diffusers.schedule import DDPMSigmaSchedule
    from onestep_cli.denoisers.diffusers.training import multi_step_schedule

    teacher = SimpleNamespace(schedule=DDPMSigmaSchedule(torch.linspace(0.99, 0.01, 10, dtype=torch.float64)))
    assert len(multi_step_schedule(GeneratorConfig(num_steps=10), teacher)[0]) == 10
    with pytest.raises(ConfigError, match="generator.num_steps=11 is more steps than the teacher's 10 timesteps"):
        multi_step_schedule(GeneratorConfig(num_steps=11), teacher)


def test_explicit_step_sigmas_are_used_and_checked():
    config = resolve_config("gmm-sid", overrides=["generator.num_steps=2", "generator.step_sigmas=[3.0, 0.5]"])
    assert build_networks(config).generator.step_sigmas == (3.0, 0.5)
    with pytest.raises(ConfigError, match=r"generator.step_sigmas has 2 levels but generator.num_steps is 3"):
        resolve_config("gmm-sid", overrides=["generator.num_steps=3", "generator.step_sigmas=[3.0, 0.5]"])
    with pytest.raises(ConfigError, match="must decrease"):
        resolve_config("gmm-sid", overrides=["generator.num_steps=2", "generator.step_sigmas=[0.5, 3.0]"])
    with pytest.raises(ConfigError, match="generator.num_steps"):
        resolve_config("gmm-sid", overrides=["generator.num_steps=0"])


def test_multi_step_runs_are_not_captured_as_cuda_graphs():
    cuda = torch.device("cuda")
    assert not use_cuda_graph("auto", "bf16", DistEnv(), False, cuda, generator_steps=2)
    with pytest.raises(ConfigError, match="generator.num_steps=2"):
        use_cuda_graph(True, "bf16", DistEnv(), False, cuda, generator_steps=2)


# ---------------------------------------------------------------------------------------------------------------------
# One step is unchanged; N steps chain the generator's own estimates.

def test_one_step_is_the_denoiser_at_sigma_init_and_draws_nothing_more():
    networks = build_networks(resolve_config("gmm-sid", overrides=TINY_GMM))
    generator = networks.generator
    assert generator.num_steps == 1 and generator.step_sigmas == (2.5,)
    z = torch.randn(5, 2)
    expected = generator.denoiser(2.5 * z, torch.full((5,), 2.5))
    assert torch.equal(generator(z), expected)
    z1, cond1, step_noise = seeded_inputs([3, 4], (2,), label_dim=10)
    z0, cond0 = seeded_latents([3, 4], (2,), label_dim=10)
    assert step_noise is None and torch.equal(z0, z1) and torch.equal(cond0, cond1)


def test_sampling_runs_every_step_on_each_seeds_own_noise():
    networks = build_networks(resolve_config("gmm-sid", overrides=[*TINY_GMM, "generator.num_steps=3"]))
    generator = networks.generator.eval()
    s0, s1, s2 = generator.step_sigmas
    samples = generate(generator, [7, 8], (2,))
    D = generator.denoiser
    expected = []
    for seed in (7, 8):
        rng = torch.Generator().manual_seed(seed)
        z, e1, e2 = (torch.randn(1, 2, generator=rng) for _ in range(3))  # The seed's latent, then its step noises.
        with torch.no_grad():
            x0 = D(s0 * z, torch.tensor([s0]))
            x0 = D(x0 + s1 * e1, torch.tensor([s1]))
            expected.append(D(x0 + s2 * e2, torch.tensor([s2])))
    assert torch.allclose(samples, torch.cat(expected), atol=1e-6)
    one_step = OneStepGenerator(D, s0)
    assert (samples - generate(one_step, [7, 8], (2,))).abs().max() > 1e-3  # The later steps do change the sample.


class RecordingObjective:
    """A stand-in generator loss that records the x_g it is given: (x_g . w) per sample."""

    def __init__(self, weight):
        self.weight, self.seen = weight, []

    def generator_loss(self, x_g, sigma, noise, teacher, fake, cond):
        self.seen.append(x_g)
        return (x_g * self.weight).sum(dim=1)


def test_training_step_trains_the_chosen_step_on_the_generators_own_earlier_steps():
    """Backward simulation: at step index 1 of 2, x_g is the generator's second step applied to its own first
    estimate re-noised, and the gradient flows through the second step only (the first made its input)."""
    config = resolve_config("gmm-sid", overrides=[*TINY_GMM, "generator.num_steps=2", "train.ema_halflife_kimg=null"])
    networks = build_networks(config)
    trainer = Trainer(config, networks, CPU, "fp32")
    recorder = RecordingObjective(torch.tensor([0.3, -1.1]))
    trainer.objective = recorder
    generator = copy.deepcopy(trainer.generator)  # Its weights before the update.
    s0, s1 = generator.step_sigmas
    batch = config.train.batch_size
    rng = torch.Generator().set_state(trainer.rng.get_state())
    z = torch.randn(batch, 2, generator=rng)
    torch.randn(batch, 2, generator=rng)  # The objective's noise.
    step_noise = torch.randn(batch, 1, 2, generator=rng)

    trainer._generator_update(torch.ones(batch), steps=2)
    x_g = recorder.seen[0]
    with torch.no_grad():
        first = generator.denoiser(s0 * z, torch.full((batch,), s0))
    second = generator.denoiser(first + s1 * step_noise[:, 0], torch.full((batch,), s1))
    assert torch.allclose(x_g, second, atol=1e-6)
    (second * recorder.weight).sum(dim=1).mean().backward()
    for trained, expected in zip(trainer.generator.parameters(), generator.parameters()):
        assert torch.allclose(trained.grad, expected.grad, atol=1e-6)

    recorder.seen.clear()  # Step index 0: the first step alone, from the latent, as a one-step generator does.
    before = copy.deepcopy(trainer.generator)
    rng = torch.Generator().set_state(trainer.rng.get_state())
    z = torch.randn(batch, 2, generator=rng)
    trainer._generator_update(torch.ones(batch), steps=1)
    with torch.no_grad():
        assert torch.allclose(recorder.seen[0], before.denoiser(s0 * z, torch.full((batch,), s0)), atol=1e-6)


def test_each_update_draws_a_step_index_uniformly():
    config = resolve_config("gmm-sid", overrides=[*TINY_GMM, "generator.num_steps=3"])
    trainer = Trainer(config, build_networks(config), CPU, "fp32")
    drawn = trainer._draw_generator_steps(3000)
    counts = np.bincount(drawn, minlength=4)
    assert counts[0] == 0 and all(abs(c / 3000 - 1 / 3) < 0.04 for c in counts[1:])
    one = resolve_config("gmm-sid", overrides=TINY_GMM)
    assert Trainer(one, build_networks(one), CPU, "fp32")._draw_generator_steps(2) is None


# ---------------------------------------------------------------------------------------------------------------------
# End to end: the CLI on digits, and the diffusers export of a text-to-image run.

@pytest.mark.e2e
def test_cli_distills_samples_and_exports_a_two_step_digits_generator(cli, tmp_path):
    run = tmp_path / "run"
    result = cli.invoke("distill", "--preset", "digits-sid", "--set", "generator.num_steps=2", "--set",
                        "train.max_steps=2", "--set", "train.batch_size=8", "--set", "train.tick_every=1", "--set",
                        "train.device=cpu", "--out", run, "--json")
    assert result.exit_code == 0, result.output
    samples = tmp_path / "samples"
    result = cli.invoke("sample", run, "--seeds", "0-3", "--out", samples, "--json")
    assert result.exit_code == 0, result.output
    meta = json.loads((samples / "samples.json").read_text())
    assert meta["sampler"] == "multi_step" and meta["nfe"] == 2 and meta["step_sigmas"][0] == 2.5
    from onestep_cli.runs.loading import load_generator_source

    loaded = load_generator_source(run)
    assert loaded.generator.num_steps == 2
    images = generate(loaded.generator, [0, 1, 2, 3], loaded.data_shape, loaded.label_dim)
    one_step = generate(OneStepGenerator(loaded.generator.denoiser, 2.5), [0, 1, 2, 3], loaded.data_shape,
                        loaded.label_dim)
    from PIL import Image

    written = np.stack([np.asarray(Image.open(samples / f"{seed:06d}.png")) for seed in range(4)])
    expected = ((images.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).squeeze(-1).numpy()
    assert np.abs(written.astype(np.float64) - expected.reshape(written.shape)).max() <= 1
    assert (images - one_step).abs().max() > 1e-2  # The file holds the two-step samples, not the first step's.
    from onestep_cli.sampling import generator_source

    in_memory = generator_source(loaded.generator, [0, 1, 2, 3], loaded.data_shape, loaded.label_dim)
    (_, batch), = in_memory.batches(4)
    assert np.array_equal(batch[..., 0], written.reshape(batch.shape[:3]))  # What `onestep eval RUN` scores.
    weights = tmp_path / "weights"
    result = cli.invoke("export", run, "--out", weights, "--format", "safetensors", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads((weights / "generator.json").read_text())
    assert info["num_steps"] == 2 and info["step_sigmas"] == list(loaded.generator.step_sigmas)
    assert info["config"]["generator"]["num_steps"] == 2


@pytest.mark.e2e
def test_diffusers_export_reproduces_the_steps_of_onestep_sample(cli, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from test_diffusers_adapters import build_sd

    from onestep_cli.engine.loop import distill
    from onestep_cli.runs.loading import load_generator_source
    from onestep_cli.sampling import generate_text_to_image

    teacher = tmp_path / "sd"
    build_sd().save_pretrained(teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bicycle\n")
    config = resolve_config("sd15-sid", overrides=[
        f"teacher.path={teacher}", f"prompts.path={prompts}", "generator.num_steps=2", "train.batch_size=2",
        "train.max_steps=1", "train.device=cpu", "train.precision=fp32", "teacher.dtype=float32",
        "train.gradient_checkpointing=false", "train.ema_halflife_kimg=null", "train.generator_lr=1e-2"])
    run = tmp_path / "run"
    distill(config, run, progress=False, log=lambda message: None)
    source = load_generator_source(run)
    schedule = source.generator.denoiser.schedule
    assert source.generator.step_sigmas == pytest.approx([float(schedule.sigmas[t]) for t in (999, 499)])
    assert source.generator.start_scale == pytest.approx(math.sqrt(1 + float(schedule.sigmas[999]) ** 2))
    ours = (generate_text_to_image(source.generator, source.pipeline, ["a red bicycle"], [3, 5],
                                   source.data_shape) + 1) / 2
    out = tmp_path / "export"
    result = cli.invoke("export", run, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert "num_inference_steps=2" in json.loads((out / "onestep.json").read_text())["call"]
    pipeline = diffusers.DiffusionPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline.scheduler).__name__ == "LCMScheduler"
    theirs = torch.cat([pipeline("a red bicycle", num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                                 generator=torch.Generator().manual_seed(seed)).images for seed in (3, 5)])
    assert (theirs - ours).abs().max() < 1e-4
    one_step = torch.cat([pipeline("a red bicycle", num_inference_steps=1, guidance_scale=1.0, output_type="pt",
                                   generator=torch.Generator().manual_seed(seed)).images for seed in (3, 5)])
    assert (one_step - ours).abs().max() > 1e-3  # The second step matters: the match above is not the first step's.
